//! The parent's shared state for one zygote: what every [`Zygote`] clone,
//! task and reaper of it holds, and the zygote's shutdown when the last goes.
//!
//! [`Zygote`]: crate::Zygote

use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use rustix::process::Signal;
use tokio::io::Interest;

use crate::confine::Confinement;
use crate::epoch::ForkLocal;
use crate::error::{Error, ErrorKind, Result};
use crate::mailbox::Mailboxes;
use crate::reactor;
use crate::report_pool::ReportPool;
use crate::ring::Ring;
use crate::slots::Slots;
use crate::spill::SpillReceiver;
use crate::stats::Counters;
use crate::sys;
use crate::zygote::{Limits, ZygoteProcess};

/// The parent's shared state for one zygote.
pub(crate) struct Inner {
    /// The parts of `Inner` that own fds are behind `Arc`s, so that `Drop`
    /// can leak them in another process (see `check_process`).
    pub(crate) process: Arc<ZygoteProcess>,
    pub(crate) limits: Limits,
    /// Every task's default limits and sandbox (`Builder::memory_limit`, ...).
    pub(crate) confinement: Confinement,
    /// Every task's default capture limit (`Builder::capture_limit`).
    pub(crate) capture_limit: usize,
    pub(crate) slots: Arc<Slots>,
    pub(crate) spill: Arc<SpillReceiver>,
    pub(crate) mailboxes: Arc<Mailboxes>,
    /// Spare report socket pairs for tasks forked on demand.
    pub(crate) report_pool: Arc<ReportPool>,
    next_gen: AtomicU64,
    /// Set once a task saw this zygote die: new tasks go to another one.
    dead: AtomicBool,
    /// Shared with the zygotes that replace this one (`Builder::respawn`),
    /// so that `Zygote::stats` counts their tasks together.
    pub(crate) counters: Arc<Counters>,
    /// The process that started the zygote. The epoch alone misses a child
    /// made by a raw `clone` (or `clone3`) system call, which runs no fork
    /// handler and so stays in its parent's epoch.
    owner: rustix::process::Pid,
}

impl Inner {
    pub(crate) fn new(process: ZygoteProcess, limits: Limits, confinement: Confinement) -> Inner {
        Inner {
            confinement,
            capture_limit: crate::output::DEFAULT_CAPTURE_LIMIT,
            slots: Arc::new(Slots::new(limits.slots)),
            spill: Arc::new(SpillReceiver::new(limits.slots as usize)),
            mailboxes: Arc::new(Mailboxes::new(limits.parked as usize)),
            report_pool: Arc::new(ReportPool::new(limits.slots as usize)),
            next_gen: AtomicU64::new(1),
            dead: AtomicBool::new(false),
            counters: Arc::default(),
            owner: sys::getpid_cached(),
            limits,
            process: Arc::new(process),
        }
    }

    /// Refuses use in any process but the one that started the zygote, the
    /// one whose epoch the ring belongs to (`crate::epoch`). A worker, or any
    /// other fork, inherits a handle held in a static, but not its fds: their
    /// numbers are closed there, or reused by fds of its own.
    pub(crate) fn check_process(&self) -> Result<()> {
        // The epoch first, a load; then the pid, a load too after its first
        // call in this process (`sys::getpid_cached`), which catches the
        // forks that skip `pthread_atfork` and so keep the epoch.
        if self.process.ring.is_own() && sys::getpid_cached() == self.owner {
            return Ok(());
        }
        Err(Error::new(
            ErrorKind::WrongProcess,
            format!(
                "this zygote (pid {}) belongs to the process that started it, not to this one",
                self.process.pid.as_raw_nonzero()
            ),
        ))
    }

    pub(crate) fn ring(&self) -> &Ring {
        &self.process.ring
    }

    /// The zygote's pid.
    pub(crate) fn pid(&self) -> u32 {
        self.process.pid.as_raw_nonzero().get() as u32
    }

    /// Records that the zygote is gone (seen by a task), and reaps it once
    /// it has exited: a dead zygote must not stay a zombie until the last
    /// handle drops.
    pub(crate) fn mark_dead(&self) {
        if self.dead.swap(true, Ordering::Relaxed) {
            return;
        }
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return; // reaped when the last handle drops
        };
        let Ok(pidfd) = self.process.pidfd.try_clone() else {
            return;
        };
        let Ok(pidfd) = reactor::register(pidfd, Interest::READABLE) else {
            return;
        };
        // Fork-local: dropped in a fork that inherited this runtime, it must
        // not deregister an fd of ours from the shared epoll set.
        let pidfd = ForkLocal::new(pidfd);
        handle.spawn(async move {
            // Readable once the zygote has exited; waiting on it then does
            // not block. `Drop` waits again and ignores the ECHILD.
            let fd: &tokio::io::unix::AsyncFd<_> = &pidfd;
            if fd.readable().await.is_ok() {
                let _ = sys::waitid_pidfd(fd.get_ref().as_fd());
            }
        });
    }

    /// True once a task has seen the zygote gone.
    pub(crate) fn is_dead(&self) -> bool {
        self.dead.load(Ordering::Relaxed)
    }

    /// A fresh task generation: unique for this zygote's life.
    pub(crate) fn next_gen(&self) -> u64 {
        self.next_gen.fetch_add(1, Ordering::Relaxed)
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if self.check_process().is_err() {
            // A copy in a worker (see `check_process`): the fd numbers are
            // not ours here, so neither shut down, wait on, nor close them.
            // The process leaves through `_exit`, which releases it all.
            std::mem::forget(Arc::clone(&self.process));
            std::mem::forget(Arc::clone(&self.spill));
            std::mem::forget(Arc::clone(&self.report_pool));
            // Parked workers' pidfds.
            std::mem::forget(Arc::clone(&self.mailboxes));
            return;
        }
        // End-of-stream on the command socket tells the zygote to kill its
        // workers and exit; then reap it. Bounded: a zygote that does not exit
        // within a second is killed.
        let _ = rustix::net::shutdown(&self.process.command, rustix::net::Shutdown::Write);
        let pidfd = self.process.pidfd.as_fd();
        if !matches!(
            sys::poll_readable(pidfd, Some(Duration::from_secs(1))),
            Ok(true)
        ) {
            let _ = sys::pidfd_send_signal(pidfd, Signal::KILL);
        }
        let _ = sys::waitid_pidfd(pidfd);
    }
}
