//! Which process this is: an epoch counter bumped in the child of every
//! `fork`, and [`ForkLocal`], a value that is forgotten rather than dropped
//! in any process but the one that made it.
//!
//! A forked child inherits every value of its parent's memory, and user code
//! can reach some of them there (a `Process` in a static, say). Values that
//! own fds or mappings of the parent must then stay inert: a worker closes
//! every fd it inherits and reuses the numbers (SAFETY.md F3), and the parent
//! keeps each ring out of later forks (SAFETY.md S1), so the same fd number
//! or address means something else in the child.

use std::ops::{Deref, DerefMut};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::sys::{self, SysError, SysResult};

/// This process's epoch: 0 in the process that first started a zygote, and
/// bumped in the child of every `fork` after that ([`watch_forks`]), be it a
/// zygote, a worker, a fork of the user's or of another copy of this crate.
static EPOCH: AtomicU64 = AtomicU64::new(0);

/// The `pthread_atfork` child handler: a new process, a new epoch. One
/// atomic add, which is async-signal-safe.
extern "C" fn forked() {
    EPOCH.fetch_add(1, Ordering::Relaxed);
}

/// Makes every later `fork` of this process start a new epoch (once per
/// process; it is inherited across `fork`).
pub(crate) fn watch_forks() -> SysResult<()> {
    // The errno of a failed registration, kept so every later call fails too.
    static WATCHING: OnceLock<Result<(), i32>> = OnceLock::new();
    let registered = WATCHING
        .get_or_init(|| sys::atfork_child(forked).map_err(|e| e.errno().unwrap_or(libc::ENOMEM)));
    registered
        .map_err(|errno| SysError::new("pthread_atfork", std::io::Error::from_raw_os_error(errno)))
}

/// This process's epoch.
pub(crate) fn current() -> u64 {
    EPOCH.load(Ordering::Relaxed)
}

/// A value that belongs to the process (the epoch) that made it: dropped in
/// any other, it is forgotten, so it closes no fd, unmaps nothing and wakes
/// no task there. That process is a fork which inherited the value; what the
/// value owns there goes when the process exits.
///
/// For fds and registrations that a value user code can reach (an unstarted
/// [`Task`](crate::Task), a future paused while it sends a request, a
/// runtime's reaper task) holds, and for a ring's mapping, which the zygote
/// and its workers [`adopt`](ForkLocal::adopt).
pub(crate) struct ForkLocal<T> {
    /// `None` only after `into_inner`, or while dropped in another epoch.
    value: Option<T>,
    /// The epoch the value belongs to; atomic so that a shared value can be
    /// adopted.
    epoch: AtomicU64,
}

impl<T> ForkLocal<T> {
    pub(crate) fn new(value: T) -> ForkLocal<T> {
        ForkLocal {
            value: Some(value),
            epoch: AtomicU64::new(current()),
        }
    }

    /// Takes the value, inherited across a fork, as this process's own: for
    /// what a fork keeps using, as a zygote and its workers do their ring.
    pub(crate) fn adopt(&self) {
        self.epoch.store(current(), Ordering::Relaxed);
    }

    /// Does the value belong to this process (made or adopted here)?
    pub(crate) fn is_own(&self) -> bool {
        self.epoch.load(Ordering::Relaxed) == current()
    }

    /// The value, to be owned by something that handles other epochs itself.
    pub(crate) fn into_inner(mut self) -> T {
        self.value.take().expect("present until taken")
    }
}

impl<T> Deref for ForkLocal<T> {
    type Target = T;

    fn deref(&self) -> &T {
        self.value.as_ref().expect("present until taken")
    }
}

impl<T> DerefMut for ForkLocal<T> {
    fn deref_mut(&mut self) -> &mut T {
        self.value.as_mut().expect("present until taken")
    }
}

impl<T> Drop for ForkLocal<T> {
    fn drop(&mut self) {
        if !self.is_own() {
            std::mem::forget(self.value.take());
        }
    }
}
