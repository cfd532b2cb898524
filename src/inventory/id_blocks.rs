//! The id databases' layout: every table in one blob of bytes, in blocks a lookup reads
//! whole. Shared by build.rs, which writes the blob and checks every name reads back,
//! and by [`super::ids`], which reads it.
//!
//! Why blocks: a lookup reads a table's index (a few KiB) and one block holding its keys,
//! name ends and names side by side, about 2 KiB: two reads of the file, or, where the
//! blob is read through the binary's mapping, few pages touched. (The kernel maps a
//! file's pages into a process in runs of 64 KiB or more around each page touched; a
//! binary search over a table-wide array of keys, another of name ends and one string
//! of names left a run of each resident per lookup.)
//!
//! The blob: [`MAGIC`], all indexes, then the blocks. A table's index is the first key of
//! each of its blocks (u32 LE each), then where each block starts in the blob and where
//! the last one ends (u32 LE each). A block: its count `n` (u8), `n` keys (u32 LE,
//! sorted), `n` ends of names (u16 LE, from the start of the block's names), then the
//! names (UTF-8).

use std::borrow::Cow;

/// The blob's first bytes: a reader that finds them where it looked has the right file.
pub const MAGIC: &[u8; 8] = b"usbr-ids";

/// Where one table lives in the blob.
#[derive(Debug, Clone, Copy)]
pub struct IdTable {
    /// Offset of the first keys of its blocks.
    pub first_keys: u32,
    /// Offset of where its blocks start (right after `first_keys`), one more for the end.
    pub block_starts: u32,
    /// How many blocks it has.
    pub blocks: u32,
}

/// Somewhere the blob's bytes can be read from.
pub trait Blob {
    /// `len` bytes at `at`, or `None` if they cannot be read.
    fn read(&self, at: usize, len: usize) -> Option<Cow<'_, [u8]>>;
}

impl Blob for [u8] {
    fn read(&self, at: usize, len: usize) -> Option<Cow<'_, [u8]>> {
        self.get(at..at.checked_add(len)?).map(Cow::Borrowed)
    }
}

fn u32_at(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

fn u16_at(bytes: &[u8], at: usize) -> Option<usize> {
    Some(u16::from_le_bytes(bytes.get(at..at + 2)?.try_into().ok()?).into())
}

impl IdTable {
    /// The name for `key`, if the table has one (and the blob reads).
    pub fn get(&self, blob: &(impl Blob + ?Sized), key: u32) -> Option<String> {
        let blocks = self.blocks as usize;
        // The index and the block starts lie side by side: one read.
        let index = blob.read(self.first_keys as usize, 8 * blocks + 4)?;
        let (mut low, mut high) = (0, blocks);
        while low < high {
            let mid = (low + high) / 2;
            if u32_at(&index, 4 * mid)? <= key {
                low = mid + 1;
            } else {
                high = mid;
            }
        }
        // The last block whose first key is at most `key`.
        let block = low.checked_sub(1)?;
        let starts = self.block_starts.checked_sub(self.first_keys)? as usize;
        let start = u32_at(&index, starts + 4 * block)? as usize;
        let end = u32_at(&index, starts + 4 * (block + 1))? as usize;
        let bytes = blob.read(start, end.checked_sub(start)?)?;
        name_in_block(&bytes, key).map(str::to_string)
    }
}

fn name_in_block(block: &[u8], key: u32) -> Option<&str> {
    let n = usize::from(*block.first()?);
    let (keys, ends) = (1, 1 + 4 * n);
    let names = ends + 2 * n;
    let i = (0..n).find(|&i| u32_at(block, keys + 4 * i) == Some(key))?;
    let from = if i == 0 {
        0
    } else {
        u16_at(block, ends + 2 * (i - 1))?
    };
    let to = u16_at(block, ends + 2 * i)?;
    std::str::from_utf8(block.get(names + from..names + to)?).ok()
}
