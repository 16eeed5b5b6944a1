//! Parked workers, parent side: which mailbox has a worker waiting, and who is
//! using which.
//!
//! The zygote keeps one worker forked and parked per mailbox (Android's USAP
//! pool idea: the fork happens before the task, off its critical path). A
//! mailbox is two socket pairs made before the zygote was forked, so no fd
//! ever has to be passed to set it up: a *job* socket, on which the parked
//! worker waits for exactly one task, and a *report* socket, on which the
//! zygote says `Started` (with the worker's pidfd) when a worker parks and
//! `Exited` when it has been reaped. Every task still gets a fresh process:
//! a parked worker runs one task and exits, and the zygote parks a new one.
//!
//! A mailbox moves `Empty → Ready → Busy → Empty`. Only the task that made it
//! `Busy` reads its report socket, and it stops right after the `Exited`
//! report, so the next `Started` stays queued for the next claimer.
//!
//! In reuse mode a worker that returned a value and said it will wait for
//! another task (`wire::KEY_CONTINUES`) goes `Busy → Ready` again, counting
//! that it has served a task; claiming it then takes the idle handshake
//! (`crate::idle`), which it may lose to the worker's idle timeout.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use rustix::process::Signal;
use tokio::io::unix::AsyncFd;
use tokio::runtime;

use crate::epoch::ForkLocal;
use crate::idle;
use crate::sys;
use crate::wire::{Dismissal, REPORT_LEN, Report};
use crate::zygote::Mailbox;

/// The parent's table of mailboxes.
pub(crate) struct Mailboxes {
    table: Mutex<Table>,
}

struct Table {
    states: Vec<State>,
    /// Runtimes that a kept registration may belong to, each watched for
    /// its shutdown by a [`RuntimeWatch`], which ends their registrations.
    watched: Vec<runtime::Id>,
}

enum State {
    /// No worker known to be parked: read the report socket to find out.
    Empty,
    /// A worker is parked; its pid and pidfd came with `Started`. `reused`:
    /// it has run a task (reuse mode), and waits for another.
    Ready {
        pid: u32,
        pidfd: OwnedFd,
        reused: bool,
        kept: Option<ForkLocal<Kept>>,
    },
    /// A task is using the worker; it owns the report socket until `Exited`.
    Busy,
    /// The report socket ended: the zygote is gone.
    Dead,
}

/// What the parent keeps of a reused worker between its tasks, so that the
/// next task needs neither a new eventfd nor a new duplicate of the report
/// socket, nor, on the same runtime, a new registration: four `epoll_ctl`
/// calls were a fifth of the parent's time per reused task. Nothing is
/// queued on either.
///
/// Held as a [`ForkLocal`]: dropped in a fork of the parent, which shares
/// the runtime's epoll instance, an `AsyncFd` would deregister the parent's
/// fd from it (SAFETY.md T1).
pub(crate) enum Kept {
    /// Still registered with the runtime of the worker's last task, which
    /// is running: a [`RuntimeWatch`] turns it `Plain` at its shutdown.
    Registered {
        runtime: runtime::Id,
        /// The doorbell the worker also kept (`wire::FLAG_SAME_DOORBELL`).
        doorbell: AsyncFd<OwnedFd>,
        /// The last task's duplicate of the mailbox's report socket.
        report: AsyncFd<OwnedFd>,
    },
    /// Registered nowhere.
    Plain { doorbell: OwnedFd, report: OwnedFd },
}

impl Kept {
    /// The doorbell and the report socket, registered nowhere.
    pub(crate) fn deregister(self) -> (OwnedFd, OwnedFd) {
        match self {
            Kept::Registered {
                doorbell, report, ..
            } => (doorbell.into_inner(), report.into_inner()),
            Kept::Plain { doorbell, report } => (doorbell, report),
        }
    }

    fn runtime(&self) -> Option<runtime::Id> {
        match self {
            Kept::Registered { runtime, .. } => Some(*runtime),
            Kept::Plain { .. } => None,
        }
    }
}

/// A parked worker, claimed for one task.
pub(crate) struct Claim {
    pub(crate) index: usize,
    pub(crate) pid: u32,
    pub(crate) pidfd: OwnedFd,
    /// The worker has run a task before this one.
    pub(crate) reused: bool,
    /// Its last task's doorbell and report socket, if it has served one.
    pub(crate) kept: Option<ForkLocal<Kept>>,
}

impl Mailboxes {
    pub(crate) fn new(count: usize) -> Mailboxes {
        Mailboxes {
            table: Mutex::new(Table {
                states: (0..count).map(|_| State::Empty).collect(),
                watched: Vec::new(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Claims a mailbox whose worker is parked, if there is one. Never blocks:
    /// it only reads reports that are already queued. `fresh`: only a worker
    /// that has run no task yet will do. `idle`: the mailboxes' idle words.
    pub(crate) fn claim(
        &self,
        boxes: &[Mailbox],
        idle: &[AtomicU64],
        fresh: bool,
    ) -> Option<Claim> {
        let mut table = self.lock();
        let states = &mut table.states;
        // A worker that has served tasks first: it is warm, and keeping the
        // busy ones few lets the others reach their idle timeout.
        let warm = !fresh
            && states
                .iter()
                .any(|s| matches!(s, State::Ready { reused: true, .. }));
        for (index, (state, mailbox)) in states.iter_mut().zip(boxes).enumerate() {
            if matches!(state, State::Empty) {
                *state = read_parked(mailbox);
            }
            let reused = match state {
                State::Ready { reused, .. } if !warm || *reused => *reused,
                _ => continue,
            };
            if reused {
                if fresh {
                    continue;
                }
                if !idle.get(index).is_some_and(idle::claim) {
                    // Retiring at its idle timeout (or its word was
                    // scribbled on): it gets no task. Killed so that it is
                    // gone for sure; its `Exited`, then its replacement's
                    // `Started`, follow on the report socket.
                    if let State::Ready { pidfd, .. } = std::mem::replace(state, State::Empty) {
                        let _ = sys::pidfd_send_signal(pidfd.as_fd(), Signal::KILL);
                    }
                    continue;
                }
            }
            let State::Ready {
                pid,
                pidfd,
                reused,
                kept,
            } = std::mem::replace(state, State::Busy)
            else {
                unreachable!("matched Ready just above")
            };
            return Some(Claim {
                index,
                pid,
                pidfd,
                reused,
                kept,
            });
        }
        None
    }

    /// Mailboxes whose worker is known to be waiting for a task, and how
    /// many of those workers have served one (reuse mode).
    pub(crate) fn ready(&self) -> (usize, usize) {
        self.lock()
            .states
            .iter()
            .fold((0, 0), |(ready, reused), state| match state {
                State::Ready { reused: r, .. } => (ready + 1, reused + usize::from(*r)),
                _ => (ready, reused),
            })
    }

    /// Puts back a claim whose job was never sent (setting the task up
    /// failed first): the worker is still parked and waiting.
    pub(crate) fn unclaim(&self, claim: Claim) {
        if let Some(state) = self.lock().states.get_mut(claim.index) {
            if matches!(state, State::Busy) {
                *state = State::Ready {
                    pid: claim.pid,
                    pidfd: claim.pidfd,
                    reused: claim.reused,
                    kept: claim.kept,
                };
            }
        }
    }

    /// Returns a mailbox after its worker's `Exited` report has been read (or
    /// its report socket ended).
    fn release(&self, index: usize) {
        if let Some(state) = self.lock().states.get_mut(index) {
            if matches!(state, State::Busy) {
                *state = State::Empty;
            }
        }
    }
}

/// Reads *all* of a mailbox's queued reports and returns the state they leave
/// it in: a `Started` is only good if no `Exited` (of that worker) follows it.
/// Taking the first `Started` alone would send a job to a worker that already
/// died; the job names its worker, so the replacement would not run it, but
/// the task would fail for nothing. The one exception: it stops at a worker
/// it dismisses (see below).
fn read_parked(mailbox: &Mailbox) -> State {
    let mut buf = [0u8; REPORT_LEN + 1];
    let mut state = State::Empty;
    loop {
        match sys::recv_frame(mailbox.reports.as_fd(), &mut buf) {
            Ok(Some(frame)) => match (Report::decode(&buf[..frame.len]), frame.truncated) {
                (Ok(Report::Started { pid }), truncated) => {
                    match frame.fds.into_iter().next() {
                        Some(pidfd) if !truncated => {
                            state = State::Ready {
                                pid,
                                pidfd,
                                reused: false,
                                kept: None,
                            }
                        }
                        // A worker parked, but its pidfd did not arrive (no fd
                        // was free here: the control message was cut). Without
                        // it the worker could not be killed if its task were
                        // dropped, so it gets no task; and it must not stay
                        // parked for nothing. Dismissed, it exits, and the
                        // zygote parks a replacement, whose `Started` follows
                        // its `Exited`. That is left queued for the next
                        // claim: read now, while fds are still short, the
                        // replacement would be dismissed too, and so would
                        // its own, for as long as the zygote kept up with
                        // this loop.
                        _ => {
                            let dismissal = Dismissal { worker: pid }.encode();
                            let _ = sys::send_frame(mailbox.jobs.as_fd(), &dismissal, &[]);
                            return State::Empty;
                        }
                    }
                }
                // The worker reported last has exited (nobody waited for it).
                (Ok(Report::Exited { .. }), false) => state = State::Empty,
                _ => {}
            },
            Err(e) if e.is_would_block() => return state,
            Ok(None) | Err(_) => return State::Dead,
        }
    }
}

/// Holds a claimed mailbox; dropping it makes the mailbox claimable again.
/// Dropped only once the worker's `Exited` report has been read, unless it
/// is [put back](MailboxGuard::put_back) with its worker still waiting.
///
/// It holds the mailbox table, not the zygote's shared state: a task's
/// reaper holds it, and must not keep the zygote alive after its last
/// handle is dropped (that drop is what ends a worker that committed its
/// result and never exits).
pub(crate) struct MailboxGuard {
    mailboxes: Arc<Mailboxes>,
    /// `None` once put back.
    index: Option<usize>,
}

impl MailboxGuard {
    pub(crate) fn new(mailboxes: Arc<Mailboxes>, index: usize) -> MailboxGuard {
        MailboxGuard {
            mailboxes,
            index: Some(index),
        }
    }

    /// Offers the mailbox's worker, which has served a task and is waiting
    /// for the next (reuse mode), to the next claimer. Returns a watch for
    /// the runtime `kept` is registered with if that runtime has none yet:
    /// the caller hands it to a task of that runtime that never ends.
    #[must_use]
    pub(crate) fn put_back(
        mut self,
        pid: u32,
        pidfd: OwnedFd,
        kept: ForkLocal<Kept>,
    ) -> Option<RuntimeWatch> {
        let index = self.index.take()?;
        let mut table = self.mailboxes.lock();
        let runtime = kept.runtime();
        let state = table.states.get_mut(index)?;
        if !matches!(state, State::Busy) {
            return None;
        }
        *state = State::Ready {
            pid,
            pidfd,
            reused: true,
            kept: Some(kept),
        };
        let runtime = runtime.filter(|id| !table.watched.contains(id))?;
        table.watched.push(runtime);
        Some(RuntimeWatch {
            mailboxes: Arc::downgrade(&self.mailboxes),
            runtime,
        })
    }
}

/// Ends the kept registrations with one runtime when dropped. A task spawned
/// on that runtime holds it and never completes, so it is dropped when the
/// runtime shuts down: an idle reused worker's registration would otherwise
/// keep the runtime's epoll instance (an fd) and driver alive.
pub(crate) struct RuntimeWatch {
    /// Weak: the watch must not keep the table, and with it parked
    /// workers' pidfds, alive after the zygote is dropped.
    mailboxes: Weak<Mailboxes>,
    runtime: runtime::Id,
}

impl Drop for RuntimeWatch {
    fn drop(&mut self) {
        let Some(mailboxes) = self.mailboxes.upgrade() else {
            return;
        };
        let mut table = mailboxes.lock();
        table.watched.retain(|id| *id != self.runtime);
        for state in &mut table.states {
            let State::Ready { kept, .. } = state else {
                continue;
            };
            if kept.as_ref().and_then(|k| k.runtime()) != Some(self.runtime) {
                continue;
            }
            if let Some(registered) = kept.take() {
                let (doorbell, report) = registered.into_inner().deregister();
                *kept = Some(ForkLocal::new(Kept::Plain { doorbell, report }));
            }
        }
    }
}

impl Drop for MailboxGuard {
    fn drop(&mut self) {
        if let Some(index) = self.index.take() {
            self.mailboxes.release(index);
        }
    }
}
