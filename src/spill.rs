//! The parent's side of the spill socket: large results arrive here as sealed
//! memfds, one notice per result.
//!
//! A worker whose result does not fit its ring slot writes it to a memfd,
//! seals it, sends it with a [`SpillNotice`] on the spill socket shared by all
//! workers, and only then commits a `Spilled` record to its slot. So when the
//! parent reads that record, the notice is already queued on the socket and a
//! non-blocking drain finds it. Notices for other tasks met on the way are kept
//! in a small stash; notices that no live task can claim (a worker sending
//! garbage) are dropped, so the stash never grows past the number of tasks in
//! flight.

use std::collections::HashMap;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::Mutex;

use crate::sys;
use crate::wire::{SPILL_LEN, SpillNotice};

pub(crate) struct SpillReceiver {
    stash: Mutex<HashMap<u64, (u64, OwnedFd)>>,
    /// Stash bound: the number of tasks that can be in flight.
    capacity: usize,
}

impl SpillReceiver {
    pub(crate) fn new(capacity: usize) -> SpillReceiver {
        SpillReceiver {
            stash: Mutex::new(HashMap::new()),
            capacity,
        }
    }

    /// Takes the memfd announced for task `generation`, if a notice with the right
    /// tag has arrived. `is_live` says whether another generation belongs to a
    /// task still in flight (whose notice is worth keeping).
    pub(crate) fn take(
        &self,
        socket: BorrowedFd<'_>,
        generation: u64,
        tag: u64,
        is_live: impl Fn(u64) -> bool,
    ) -> Option<OwnedFd> {
        let mut stash = self.stash.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((t, fd)) = stash.remove(&generation) {
            if t == tag {
                return Some(fd);
            }
        }
        let mut buf = [0u8; SPILL_LEN + 1];
        loop {
            let frame = match sys::recv_frame(socket, &mut buf) {
                Ok(Some(frame)) => frame,
                Ok(None) | Err(_) => return None,
            };
            let notice = match SpillNotice::decode(&buf[..frame.len]) {
                Ok(n) if !frame.truncated && frame.fds.len() == 1 => n,
                _ => continue,
            };
            let Some(fd) = frame.fds.into_iter().next() else {
                continue;
            };
            if notice.generation == generation && notice.tag == tag {
                return Some(fd);
            }
            if notice.generation != generation
                && is_live(notice.generation)
                && stash.len() < self.capacity
            {
                stash.insert(notice.generation, (notice.tag, fd));
            }
        }
    }

    /// Forgets any stashed notice of a finished task.
    pub(crate) fn forget(&self, generation: u64) {
        let mut stash = self.stash.lock().unwrap_or_else(|p| p.into_inner());
        stash.remove(&generation);
    }
}
