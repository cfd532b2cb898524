//! Giving the heap's free memory back to the kernel when the daemon comes to rest.
//!
//! glibc's malloc keeps what a burst of work freed (64 VMs connected and listed at
//! start, a storm of plugs) as free chunks inside its heap, resident, and returns only a
//! free top to the kernel. `malloc_trim(0)` also releases every whole free page inside
//! the heap. It is called when the engine comes to rest after work, once per burst, never
//! on a timer (an idle daemon makes no system calls). The daemon bench's scale part shows
//! what it gives back (docs/daemon.md, "Measured").

/// Remembers whether the engine was at rest, to trim once each time it comes to rest.
#[derive(Debug, Default)]
pub(super) struct Trim {
    at_rest: bool,
}

impl Trim {
    /// The engine's status changed; `at_rest` is whether it is at rest now. Returns
    /// whether this was the moment to trim (and trimmed).
    pub(super) fn status_changed(&mut self, at_rest: bool) -> bool {
        let came_to_rest = at_rest && !self.at_rest;
        self.at_rest = at_rest;
        if came_to_rest {
            give_back();
        }
        came_to_rest
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn give_back() {
    // SAFETY: malloc_trim takes the allocator's own locks and touches only its free
    // lists and the pages they cover; no memory of ours changes hands.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn give_back() {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_once_each_time_the_engine_comes_to_rest() {
        let mut trim = Trim::default();

        let seen: Vec<bool> = [false, true, true, false, false, true]
            .into_iter()
            .map(|at_rest| trim.status_changed(at_rest))
            .collect();

        assert_eq!(seen, [false, true, false, false, false, true]);
    }
}
