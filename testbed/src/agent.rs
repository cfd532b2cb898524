//! The host side of the guest agent (testbed/guest/agent) on a virtio-serial port.
//!
//! Request `C <id> <secs> <base64 script>`, reply `R <id> <rc> o<base64> e<base64>`,
//! one line each. Lines that are not the awaited reply are skipped, so noise or a late
//! reply to an abandoned request cannot be mistaken for an answer.

use anyhow::{anyhow, bail, Context, Result};
use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

/// What a guest command produced.
#[derive(Debug, Clone)]
pub struct GuestOutput {
    /// Exit status (143 when the guest-side timeout killed it).
    pub rc: i32,
    /// Standard output, lossily decoded.
    pub stdout: String,
    /// Standard error, lossily decoded.
    pub stderr: String,
}

/// A connection to the guest agent.
pub struct Agent {
    lines: Lines<BufReader<OwnedReadHalf>>,
    writer: OwnedWriteHalf,
    next_id: u64,
}

impl Agent {
    /// Connect to the agent's host socket (the guest may not have booted yet).
    pub async fn connect(path: &Path) -> Result<Agent> {
        let stream = UnixStream::connect(path)
            .await
            .with_context(|| format!("connecting to the agent socket {}", path.display()))?;
        let (read, writer) = stream.into_split();
        Ok(Agent {
            lines: BufReader::new(read).lines(),
            writer,
            next_id: 1,
        })
    }

    /// Wait for the agent's `READY` line (the guest finished booting).
    pub async fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        tokio::time::timeout(timeout, async {
            loop {
                match self.lines.next_line().await? {
                    Some(line) if line.trim() == "READY" => return Ok(()),
                    Some(_) => continue,
                    None => bail!("the agent socket closed before the guest was ready"),
                }
            }
        })
        .await
        .map_err(|_| anyhow!("the guest agent was not ready within {timeout:?}"))?
    }

    /// Run `script` with `sh` in the guest, killed there after `timeout`; its reply may
    /// take `reply_margin` more to arrive. An error means the channel is broken (the guest
    /// is gone or hung), not that the script failed: that is in [`GuestOutput::rc`].
    pub async fn run(
        &mut self,
        script: &str,
        timeout: Duration,
        reply_margin: Duration,
    ) -> Result<GuestOutput> {
        let id = self.next_id;
        self.next_id += 1;
        let secs = timeout.as_secs_f64().ceil().max(1.0) as u64;
        let request = format!("C {id} {secs} {}\n", base64_encode(script.as_bytes()));
        self.writer
            .write_all(request.as_bytes())
            .await
            .context("writing to the guest agent")?;
        // The guest kills the script after `secs`; allow for a slow reply on top.
        let host_timeout = Duration::from_secs(secs) + reply_margin;
        tokio::time::timeout(host_timeout, self.reply(id))
            .await
            .map_err(|_| anyhow!("the guest agent did not answer within {host_timeout:?}"))?
    }

    async fn reply(&mut self, id: u64) -> Result<GuestOutput> {
        let want = id.to_string();
        loop {
            let line = self
                .lines
                .next_line()
                .await?
                .ok_or_else(|| anyhow!("the guest agent's socket closed (guest gone)"))?;
            let fields: Vec<&str> = line.split(' ').collect();
            if let ["R", rid, rc, out, err] = fields.as_slice() {
                if *rid != want {
                    continue;
                }
                let decode = |field: &str, tag: char| -> Result<String> {
                    let body = field
                        .strip_prefix(tag)
                        .ok_or_else(|| anyhow!("malformed agent reply: {line}"))?;
                    Ok(String::from_utf8_lossy(&base64_decode(body)?).into_owned())
                };
                return Ok(GuestOutput {
                    rc: rc.parse().context("agent reply rc")?,
                    stdout: decode(out, 'o')?,
                    stderr: decode(err, 'e')?,
                });
            }
        }
    }
}

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding (what busybox `base64 -d` reads).
pub(crate) fn base64_encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Decode standard base64 (padding optional), as busybox `base64 -w0` writes it.
fn base64_decode(text: &str) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in text.bytes().filter(|c| *c != b'=') {
        let v = ALPHABET
            .iter()
            .position(|a| *a == c)
            .ok_or_else(|| anyhow!("bad base64 byte {c:#x} from the guest agent"))?;
        acc = (acc << 6) | v as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips_every_tail_length() {
        let inputs: [&[u8]; 4] = [b"", b"a", b"ab", b"abc\n\xff"];

        let decoded: Vec<Vec<u8>> = inputs
            .iter()
            .map(|i| base64_decode(&base64_encode(i)).unwrap())
            .collect();

        assert_eq!(decoded, inputs.map(<[u8]>::to_vec));
    }

    #[test]
    fn base64_encode_matches_the_standard_alphabet() {
        assert_eq!(base64_encode(b"usbroute?>"), "dXNicm91dGU/Pg==");
    }
}
