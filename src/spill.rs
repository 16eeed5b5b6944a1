//! The parent's side of the spill socket: large results arrive here as sealed
//! memfds, one notice per result.
//!
//! A worker whose result does not fit its ring slot writes it to a memfd,
//! seals it, sends it with a [`SpillNotice`] on the spill socket shared by all
//! workers, and only then commits a `Spilled` record to its slot. So when the
//! parent reads that record, the notice is already queued on the socket and a
//! non-blocking drain finds it. Notices for other tasks met on the way are kept
//! in a small stash, but only for tasks whose handle is alive now: a notice
//! no such task can claim (a cancelled task's late result, a worker sending
//! garbage) is dropped, so the stash never holds more than one notice per task
//! in flight, and stale notices cannot crowd out live ones.

use std::collections::{HashMap, HashSet};
use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::Mutex;

use crate::sys;
use crate::wire::{SPILL_LEN, SpillNotice};

pub(crate) struct SpillReceiver {
    state: Mutex<State>,
    /// Stash bound: the number of tasks that can be in flight.
    capacity: usize,
}

#[derive(Default)]
struct State {
    /// Notices met while looking for another task's, by generation.
    stash: HashMap<u64, (u64, OwnedFd)>,
    /// Generations of the tasks whose handles are alive (`begin`..`forget`).
    live: HashSet<u64>,
}

impl SpillReceiver {
    pub(crate) fn new(capacity: usize) -> SpillReceiver {
        SpillReceiver {
            state: Mutex::new(State::default()),
            capacity,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks task `generation` as one whose notice is worth keeping if
    /// another task's drain meets it first, from before its request is sent
    /// (its worker may spill at once). Forgotten again when the returned
    /// guard drops, unless it is defused once the task's handle exists.
    pub(crate) fn begin(&self, generation: u64) -> Begun<'_> {
        self.lock().live.insert(generation);
        Begun {
            receiver: self,
            generation,
            armed: true,
        }
    }

    /// Takes the memfd announced for task `generation`, if a notice with the
    /// right tag has arrived.
    pub(crate) fn take(
        &self,
        socket: BorrowedFd<'_>,
        generation: u64,
        tag: u64,
    ) -> Option<OwnedFd> {
        let mut state = self.lock();
        let State { stash, live } = &mut *state;
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
                && live.contains(&notice.generation)
                && stash.len() < self.capacity
            {
                stash.insert(notice.generation, (notice.tag, fd));
            }
        }
    }

    /// Forgets a task whose result will not be taken any more (delivered,
    /// or its handle dropped), and any notice stashed for it.
    pub(crate) fn forget(&self, generation: u64) {
        let mut state = self.lock();
        state.live.remove(&generation);
        state.stash.remove(&generation);
    }
}

/// A task marked live whose handle does not exist yet: if setting it up fails,
/// dropping this forgets it again.
pub(crate) struct Begun<'a> {
    receiver: &'a SpillReceiver,
    generation: u64,
    armed: bool,
}

impl Begun<'_> {
    /// The task's handle exists now, and forgets the task when it drops.
    pub(crate) fn defuse(mut self) {
        self.armed = false;
    }
}

impl Drop for Begun<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.receiver.forget(self.generation);
        }
    }
}
