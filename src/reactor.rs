//! The tokio side of one task: readiness on the task's eventfd and report
//! socket, timers, signals, and cleanup when the task is dropped.
//!
//! Each task owns its file descriptors and registers them with whatever tokio
//! runtime polls it, so there is no shared driver task, no background thread,
//! and nothing bound to the runtime that happened to start the zygote. (In
//! reuse mode a waiting worker's doorbell and report socket stay registered
//! with the runtime of its last task, for its next task there; an idle task
//! of that runtime, a `RuntimeWatch`, ends those registrations when the
//! runtime shuts down.)
//!
//! * the **doorbell** (an eventfd) receives the worker's key right after the
//!   worker commits its result record, *before* it exits: completion is seen
//!   without waiting for the (slow to observe) process exit;
//! * the **report socket** delivers the zygote's `Exited` report (with the
//!   wait status) and, when the task asked for it, `Started` (with the
//!   worker's pid and pidfd). End-of-stream without `Exited` means the zygote
//!   died. The pair comes from a pool and goes back once `Exited` is read
//!   (see `report_pool`). A task run by a parked worker uses a duplicate of
//!   its mailbox's report socket instead, and reads it only up to `Exited`;
//! * the **pidfd**, when there is one, is used for signals
//!   (`pidfd_send_signal` cannot hit a recycled pid).
//!
//! A dropped task shuts its report socket down for writing (a worker forked
//! on demand) or kills its worker through the pidfd (a parked worker); either
//! way no call in `Drop` blocks, and a small reaper task keeps the slot until
//! the zygote reports the worker reaped.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rustix::process::Signal;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::time::Instant;

use crate::confine::Confinement;
use crate::epoch::ForkLocal;
use crate::error::Error;
use crate::job_cell::{self, Cell};
use crate::mailbox::{Kept, MailboxGuard};
use crate::payload::Payload;
use crate::report_pool::Recycle;
use crate::ring::Taken;
use crate::shared::Inner;
use crate::shm::SealedBytes;
use crate::slots::Lease;
use crate::stats::Outcome;
use crate::sys::{self, WaitStatus};
use crate::trace::{TaskTrace, TraceOutcome};
use crate::wire::{self, IoPlan, RecordKind, Report, WireError};

/// What became of the task's result record.
pub(crate) enum Record {
    Taken(Taken),
    Invalid(WireError),
}

/// Stop policy: when to ask the worker to stop, and when to kill it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Deadlines {
    /// Send SIGTERM (a stop request) at this instant: the task's timeout.
    pub(crate) stop_at: Option<Instant>,
    /// SIGKILL at this instant: set when a stop request was sent.
    pub(crate) kill_at: Option<Instant>,
    pub(crate) grace: Duration,
    pub(crate) timeout: Option<Duration>,
}

/// What to start: the task, its argument, and how.
pub(crate) struct Launch<'a> {
    /// Address of the task's monomorphised entry point.
    pub(crate) entry: u64,
    pub(crate) arg: &'a Payload,
    pub(crate) deadlines: Deadlines,
    /// Ask the zygote for a `Started` report with the worker's pid and
    /// pidfd (needed to signal it, not to cancel it).
    pub(crate) want_started: bool,
    /// Only a worker that has run no other task will do.
    pub(crate) fresh: bool,
    /// The worker must exit after this task, even in reuse mode (the caller
    /// will wait for its exit status).
    pub(crate) last: bool,
    /// Limits and sandbox (`crate::confine`).
    pub(crate) confinement: Confinement,
    /// Env, cwd and output settings (`crate::output`), and their fds, sent
    /// after the argument's.
    pub(crate) io: IoPlan,
    pub(crate) io_fds: Vec<BorrowedFd<'a>>,
    /// The task's span and trace buffer (`crate::trace`).
    pub(crate) trace: TaskTrace,
}

/// One task's I/O state in the parent.
pub(crate) struct TaskIo {
    pub(crate) inner: Arc<Inner>,
    /// The runtime `report` and `doorbell` are registered with.
    runtime: tokio::runtime::Id,
    /// Held until the worker is known to be reaped (or handed to the reaper).
    lease: Option<Lease>,
    /// For a task run by a parked worker: its mailbox, held as long as the
    /// lease. Its report socket is then a duplicate of the mailbox's.
    mailbox: Option<MailboxGuard>,
    /// The worker said, with its key, that it will wait for another task
    /// (reuse mode): on drop, its mailbox goes back to `Ready`.
    continues: bool,
    /// A signal was sent or queued: the worker may be dying, so it is not
    /// offered another task.
    signalled: AtomicBool,
    /// The kind of the record taken from the ring (`Err` for an invalid
    /// one), kept for the statistics after the record is consumed.
    delivered: Option<Result<RecordKind, ()>>,
    pub(crate) generation: u64,
    /// The worker's key, read from the doorbell once it rang (see `wire`).
    key: Option<u64>,
    /// `Some` until `Drop` hands it to the reaper, or until the pair goes
    /// back to the pool.
    report: Option<AsyncFd<OwnedFd>>,
    /// For a task forked on demand, whose report socket pair is pooled:
    /// where it goes back. `None` once the pair cannot be reused (the task
    /// was cancelled).
    recycle: Option<Recycle>,
    /// `Some` until `Drop`, which leaks it in another process.
    doorbell: Option<AsyncFd<OwnedFd>>,
    pub(crate) pid: Option<u32>,
    pidfd: Option<OwnedFd>,
    pub(crate) record: Option<Record>,
    pub(crate) exit: Option<WaitStatus>,
    pub(crate) spawn_errno: Option<i32>,
    /// The report socket ended without an `Exited` report.
    pub(crate) zygote_gone: bool,
    pub(crate) deadlines: Deadlines,
    /// The task's limits and sandbox, to name a limit it went past.
    pub(crate) confinement: Confinement,
    /// The timeout fired (a stop request was sent because of it).
    pub(crate) timed_out: bool,
    /// A signal requested before the pidfd arrived, sent when it does.
    pending_signal: Option<Signal>,
    /// A spilled result's mapping and memfd, already decoded: released by
    /// the reaper rather than on the caller's path (for 64 MiB, the
    /// `munmap` and the freeing of the pages take about 26 ms here).
    spent: Option<(SealedBytes, OwnedFd)>,
    /// Closed, with the worker's events forwarded, when this is dropped.
    trace: TaskTrace,
}

impl TaskIo {
    /// Sends the spawn request for an already-encoded argument and returns the
    /// task's I/O state. The worker may not have been forked yet.
    pub(crate) async fn start(inner: Arc<Inner>, launch: Launch<'_>) -> Result<TaskIo, Error> {
        let Launch {
            entry,
            arg,
            deadlines,
            want_started,
            fresh,
            last,
            confinement,
            io,
            io_fds,
            trace,
        } = launch;
        // Held across awaits: see below.
        let trace = ForkLocal::new(trace);
        let trace_level = trace.level();
        // Confinement cannot be undone, so a confined task never runs in a
        // worker that ran another task (and its worker is not reused); nor
        // can env, cwd or output settings.
        let fresh = fresh || !confinement.is_default() || !io.is_default();
        inner.check_process()?;
        // The runtime this task's fds are registered with.
        let Ok(runtime) = tokio::runtime::Handle::try_current().map(|h| h.id()) else {
            return Err(Error::io(
                "epoll_ctl",
                std::io::Error::other(
                    "run-in-process futures must be polled inside a tokio runtime",
                ),
            ));
        };
        // Until they are in the `TaskIo`, what this future holds across its
        // one later await (the cold path's send) is `ForkLocal`: the future
        // may be dropped in a fork that inherited it (held in a static),
        // where the fd numbers and the wakers a lease would call are not ours.
        let lease = ForkLocal::new(inner.slots.acquire().await);
        let generation = inner.next_gen();
        // Fork-local like the lease: its drop takes a lock.
        let spill = ForkLocal::new(inner.spill.begin(generation));
        // Everything that can fail happens before the request is sent: once
        // a worker may be running, nothing but this `TaskIo` (and its reaper)
        // may release the lease.
        let (place, inline, arg_fd) = match arg {
            Payload::Inline(bytes) => (wire::ArgPlace::Inline(arg.len()), &bytes[..], None),
            Payload::Sealed { fd, len } => (wire::ArgPlace::Memfd(*len), &[][..], Some(fd.as_fd())),
        };
        // `worker`: a job names the parked worker it is for (if that worker
        // dies before reading it, its replacement must not run it); 0 asks
        // the zygote to fork one. `same_doorbell`: a reused worker rings the
        // doorbell of its last task, whose end we kept.
        let frame = |worker: u32, same_doorbell: bool, pair: u32, pooled_report: bool| {
            wire::Request {
                generation,
                want_started,
                last,
                same_doorbell,
                pair,
                pooled_report,
                entry,
                slot: lease.slot(),
                arg: place,
                worker,
                confinement,
                io,
                trace: trace_level,
            }
            .encode(inline)
        };
        // The trace buffer goes last (see `wire`).
        fn with_arg<'a>(
            doorbell: Option<BorrowedFd<'a>>,
            arg: Option<BorrowedFd<'a>>,
            io: &[BorrowedFd<'a>],
            trace: Option<BorrowedFd<'a>>,
        ) -> Vec<BorrowedFd<'a>> {
            doorbell
                .into_iter()
                .chain(arg)
                .chain(io.iter().copied())
                .chain(trace)
                .collect()
        }
        // A parked worker if one is waiting: the job goes straight to it, and
        // the fork already happened. Otherwise the zygote forks one now.
        let mut claimed = None;
        let mut doorbell = None;
        let idle = inner.process.idle.words();
        if let Some(mut claim) = inner.mailboxes.claim(&inner.process.mailboxes, idle, fresh) {
            let mailbox = &inner.process.mailboxes[claim.index];
            let kept = claim.kept.take().map(ForkLocal::into_inner);
            let same_doorbell = kept.is_some();
            // The doorbell and a duplicate of the mailbox's report socket,
            // registered with this task's runtime: kept from the worker's
            // last task (and registered already if that ran on this runtime
            // too), or new. If that fails (out of fds, say), the worker goes
            // back to the mailbox for the next task.
            let registered = match kept {
                Some(Kept::Registered {
                    runtime: theirs,
                    doorbell,
                    report,
                }) if theirs == runtime => Ok((doorbell, report)),
                Some(kept) => {
                    let (doorbell, report) = kept.deregister();
                    register(doorbell, Interest::READABLE)
                        .and_then(|d| Ok((d, register(report, Interest::READABLE)?)))
                }
                None => sys::eventfd()
                    .map_err(Error::from)
                    .and_then(|fd| register(fd, Interest::READABLE))
                    .and_then(|d| {
                        let report = mailbox
                            .reports
                            .try_clone()
                            .map_err(|e| Error::io("dup", e))?;
                        Ok((d, register(report, Interest::READABLE)?))
                    }),
            };
            let (bell, report) = match registered {
                Ok(pair) => pair,
                Err(e) => {
                    inner.mailboxes.unclaim(claim);
                    return Err(e);
                }
            };
            let bell = ForkLocal::new(bell);
            let guard = MailboxGuard::new(Arc::clone(&inner.mailboxes), claim.index);
            let fds = with_arg(
                (!same_doorbell).then(|| bell.get_ref().as_fd()),
                arg_fd,
                &io_fds,
                trace.buffer(),
            );
            // The job socket is empty (the zygote drains it before parking a
            // worker, and a reused worker read its last job), so this
            // non-blocking send cannot find it full. It fails if the worker
            // died while parked (with the zygote, say): then forget the
            // mailbox and fall through to the cold path, which reports a dead
            // zygote as such. A reused worker waits on its job cell instead
            // (`crate::job_cell`): the job goes there if it carries no fd and
            // fits, else on the socket with an empty post saying so.
            let job = frame(claim.pid, same_doorbell, 0, false);
            let send = || sys::send_frame(mailbox.jobs.as_fd(), &job, &fds).is_ok();
            let sent = if !claim.reused {
                send()
            } else if let Some(cell) =
                job_cell::cell(&inner.process.cells, claim.index).filter(Cell::writable)
            {
                // An empty post always fits a writable cell.
                let posted = (fds.is_empty() && cell.post(&job)) || (send() && cell.post(&[]));
                if posted {
                    // Fails only for a bad address, which the cell's is not.
                    let _ = cell.wake();
                }
                posted
            } else {
                // Cannot happen (the cells are this process's own writable
                // mapping). A reused worker reads only its cell, so it could
                // never get this job: end it, and take the cold path.
                let _ = sys::pidfd_send_signal(claim.pidfd.as_fd(), Signal::KILL);
                false
            };
            if sent {
                claimed = Some((guard, report, claim.pid, claim.pidfd));
            }
            drop(fds);
            doorbell = Some(bell);
        }
        let doorbell = match doorbell {
            Some(bell) => bell,
            None => ForkLocal::new(register(sys::eventfd()?, Interest::READABLE)?),
        };
        let (report, mailbox, pid, pidfd, recycle) = match claimed {
            Some((guard, report, pid, pidfd)) => {
                (report, Some(guard), Some(pid), Some(pidfd), None)
            }
            None => {
                let pair = inner.report_pool.take()?;
                // Frees the pair's number if the task never gets going.
                let recycle = ForkLocal::new(inner.report_pool.recycle(pair.id));
                let frame = frame(0, false, pair.id, pair.theirs.is_none());
                let report = ForkLocal::new(register(pair.ours, Interest::READABLE)?);
                // A new pair's far end goes with the request; a kept one's
                // is in the zygote already.
                let theirs = ForkLocal::new(pair.theirs);
                let mut with_report: Vec<BorrowedFd<'_>> =
                    theirs.as_ref().map(|fd| fd.as_fd()).into_iter().collect();
                with_report.extend(with_arg(
                    Some(doorbell.get_ref().as_fd()),
                    arg_fd,
                    &io_fds,
                    trace.buffer(),
                ));
                send_request(&inner, &frame, &with_report).await?;
                // From now on the zygote holds the only copy of the far end,
                // so its death still ends the stream.
                drop(with_report);
                drop(theirs);
                (
                    report.into_inner(),
                    None,
                    None,
                    None,
                    Some(recycle.into_inner()),
                )
            }
        };
        inner.counters.spawned();
        spill.into_inner().defuse();
        Ok(TaskIo {
            inner,
            runtime,
            lease: Some(lease.into_inner()),
            mailbox,
            continues: false,
            signalled: AtomicBool::new(false),
            delivered: None,
            generation,
            key: None,
            report: Some(report),
            recycle,
            doorbell: Some(doorbell.into_inner()),
            pid,
            pidfd,
            record: None,
            exit: None,
            spawn_errno: None,
            zygote_gone: false,
            deadlines,
            confinement,
            timed_out: false,
            pending_signal: None,
            spent: None,
            trace: trace.into_inner(),
        })
    }

    /// True once nothing more can happen: the worker was reaped, never
    /// started, or can no longer be watched.
    pub(crate) fn ended(&self) -> bool {
        self.exit.is_some() || self.spawn_errno.is_some() || self.zygote_gone
    }

    /// Waits for the next event (a doorbell, a report, a deadline) and records
    /// its effect in `self`.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: every effect is recorded in `self` before it returns, and
    /// a dropped wait loses no event (readiness stays set until consumed).
    pub(crate) async fn pump(&mut self) {
        let Deadlines {
            stop_at, kill_at, ..
        } = self.deadlines;
        // A disabled branch's future is still made, so the sleeps are made
        // only when polled: most tasks have no deadline, and a `Sleep`
        // reads the clock and looks up the timer.
        let until = |at: Option<Instant>| async move {
            match at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let report = self.report.as_ref();
        let doorbell = self.doorbell.as_ref();
        tokio::select! {
            biased;
            ready = async { doorbell?.readable().await.ok() },
                if self.record.is_none() && doorbell.is_some() => match ready {
                Some(mut guard) => {
                    guard.clear_ready();
                    drop(guard);
                    self.check_record();
                }
                None => self.zygote_gone = true,
            },
            ready = async { report?.readable().await.ok() }, if report.is_some() => match ready {
                Some(mut guard) => {
                    let (reports, end) = drain_reports(guard.get_inner().as_fd());
                    if end == Drained::WouldBlock {
                        guard.clear_ready();
                    }
                    drop(guard);
                    self.apply_reports(reports, end);
                }
                None => self.zygote_gone = true,
            },
            () = until(stop_at), if stop_at.is_some() => {
                self.deadlines.stop_at = None;
                self.timed_out = true;
                let _ = self.request_stop();
            }
            () = until(kill_at), if kill_at.is_some() => {
                self.deadlines.kill_at = None;
                let _ = self.signal(Signal::KILL);
            }
        }
    }

    /// Applies reports read from the report socket, in order.
    fn apply_reports(&mut self, reports: Vec<(Report, Option<OwnedFd>)>, end: Drained) {
        for (report, fd) in reports {
            match report {
                Report::Started { pid } => {
                    self.pid = Some(pid);
                    self.pidfd = fd;
                    if let Some(sig) = self.pending_signal.take() {
                        let _ = self.signal(sig);
                    }
                }
                Report::Exited { status } => {
                    self.exit = Some(WaitStatus(status));
                    // The record, if any, was committed before the exit, so it
                    // is visible now even if the doorbell has not been seen.
                    self.check_record();
                    drop(fd);
                    self.release(true);
                }
                Report::SpawnFailed { errno } => {
                    self.spawn_errno = Some(errno);
                    drop(fd);
                    self.release(false);
                }
            }
        }
        if matches!(end, Drained::Eof | Drained::Broken) && !self.ended() {
            // End of stream without an exit report (or a frame the zygote
            // cannot have sent): the zygote is gone. A record committed before
            // it died is still good.
            self.zygote_gone = true;
            self.inner.mark_dead();
            self.check_record();
        }
    }

    /// Takes the result record from the ring if the worker has sent its key
    /// (which it does only after committing the record).
    pub(crate) fn check_record(&mut self) {
        if self.record.is_some() {
            return;
        }
        if self.key.is_none() {
            let Some(doorbell) = &self.doorbell else {
                return;
            };
            match sys::eventfd_drain(doorbell.get_ref().as_fd()) {
                Ok(0) | Err(_) => return,
                Ok(key) => self.key = Some(key),
            }
        }
        let Some(key) = self.key else { return };
        let Some(slot) = self
            .lease
            .as_ref()
            .and_then(|l| self.inner.ring().slot(l.slot()))
        else {
            return;
        };
        self.record = Some(
            match slot.take(key, self.generation, self.inner.limits.max_payload) {
                Ok(Some(taken)) => {
                    self.continues = self.mailbox.is_some() && key & wire::KEY_CONTINUES != 0;
                    self.delivered = Some(Ok(taken.kind));
                    Record::Taken(taken)
                }
                // The worker sends its key only after committing, so a commit word
                // that does not hold our generation now was overwritten by someone
                // else: a tampered record, not a pending one.
                Ok(None) => {
                    self.delivered = Some(Err(()));
                    Record::Invalid(WireError::Stale {
                        expected: self.generation,
                        found: 0,
                    })
                }
                Err(e) => {
                    self.delivered = Some(Err(()));
                    Record::Invalid(e)
                }
            },
        );
    }

    /// How the task ended, for the statistics.
    fn outcome(&self) -> Outcome {
        match self.delivered {
            Some(Ok(RecordKind::Value | RecordKind::Spilled)) => return Outcome::Completed,
            Some(Ok(RecordKind::Panic)) => return Outcome::Panicked,
            Some(
                Ok(RecordKind::EncodeFailed | RecordKind::Unconfined | RecordKind::Setup) | Err(()),
            ) => {
                return Outcome::Lost;
            }
            None => {}
        }
        if self.timed_out {
            return Outcome::TimedOut;
        }
        match self.exit {
            Some(status) if crate::confine::exit_error(&self.confinement, status).is_some() => {
                Outcome::ResourceLimit
            }
            Some(status) if status.signal().is_some() => Outcome::Signaled,
            Some(_) => Outcome::Exited,
            None if self.spawn_errno.is_some() || self.zygote_gone => Outcome::Lost,
            None => Outcome::Cancelled,
        }
    }

    /// Has the worker committed a result record?
    pub(crate) fn committed(&self) -> bool {
        self.record.is_some()
            || self
                .lease
                .as_ref()
                .and_then(|l| self.inner.ring().slot(l.slot()))
                .is_some_and(|s| s.committed(self.generation))
    }

    /// Sends `sig` to the worker if its pidfd has arrived; returns whether it
    /// had. A worker that has already exited is not an error.
    pub(crate) fn send_now(&self, sig: Signal) -> Result<bool, Error> {
        if self.ended() {
            return Ok(true);
        }
        let Some(fd) = &self.pidfd else {
            return Ok(false);
        };
        self.signalled.store(true, Ordering::Relaxed);
        match sys::pidfd_send_signal(fd.as_fd(), sig) {
            // ESRCH: it has exited already (not yet reaped).
            Err(e) if e.errno() == Some(libc::ESRCH) => Ok(true),
            r => r.map(|()| true).map_err(Error::from),
        }
    }

    /// Sends `sig` to the worker, or queues it until the worker's pidfd arrives.
    pub(crate) fn signal(&mut self, sig: Signal) -> Result<(), Error> {
        if !self.send_now(sig)? {
            self.signalled.store(true, Ordering::Relaxed);
            // SIGKILL overrides anything queued; otherwise keep the first.
            if sig == Signal::KILL || self.pending_signal.is_none() {
                self.pending_signal = Some(sig);
            }
        }
        Ok(())
    }

    /// Asks the worker to stop: SIGTERM now, SIGKILL after the grace period.
    pub(crate) fn request_stop(&mut self) -> Result<(), Error> {
        if self.deadlines.kill_at.is_none() {
            self.deadlines.kill_at = Some(Instant::now() + self.deadlines.grace);
        }
        self.signal(Signal::TERM)
    }

    /// Returns the slot (and the mailbox, or the report socket pair) once
    /// the worker is reaped (`exited`) or was never forked. The zygote keeps
    /// its end of a pooled pair after `Exited` only, and so do we.
    fn release(&mut self, exited: bool) {
        self.inner.spill.forget(self.generation);
        if self.mailbox.take().is_some() {
            // The mailbox's report socket now belongs to its next claimer.
            self.report = None;
        } else if let (true, Some(recycle), Some(report)) =
            (exited, self.recycle.take(), self.report.take())
        {
            recycle.put_back(report);
        }
        // Last: once the lease is gone, `wait_idle` may return and empty
        // the pool, which must not miss this pair.
        self.lease = None;
    }

    /// Puts a reused worker that is waiting for its next task back in its
    /// mailbox (reuse mode), and frees the slot: the worker publishes only
    /// into the slot of the task it is given, under that task's generation.
    /// (Only from `Drop`, which has forgotten the task's spill notice.)
    fn offer_again(&mut self) {
        // Both stay registered with this task's runtime, for the next task
        // to use as they are if it runs there too, as long as that runtime
        // runs: it is the one at hand, and watched for its shutdown. The
        // doorbell was drained when the key was read, and the report socket
        // holds nothing for us: the worker has not exited.
        let current = tokio::runtime::Handle::try_current().ok();
        if let (Some(guard), Some(pid), Some(pidfd), Some(report), Some(doorbell)) = (
            self.mailbox.take(),
            self.pid,
            self.pidfd.take(),
            self.report.take(),
            self.doorbell.take(),
        ) {
            let kept = match &current {
                Some(handle) if handle.id() == self.runtime => Kept::Registered {
                    runtime: self.runtime,
                    doorbell,
                    report,
                },
                _ => Kept::Plain {
                    doorbell: doorbell.into_inner(),
                    report: report.into_inner(),
                },
            };
            if let (Some(watch), Some(handle)) =
                (guard.put_back(pid, pidfd, ForkLocal::new(kept)), &current)
            {
                // Dropped, ending the registrations, when the runtime shuts
                // down; forgotten in a fork that drops the runtime (it shares
                // the epoll instance: see `register`). On a runtime already
                // shutting down, dropped at once.
                let watch = ForkLocal::new(watch);
                handle.spawn(async move {
                    let _watch = watch;
                    std::future::pending::<()>().await
                });
            }
        }
        self.lease = None;
        if let Some(spent) = self.spent.take() {
            // Unmapping a large result is slow (see `spent`): off the
            // caller's path when a runtime is at hand.
            match current {
                Some(handle) => {
                    let spent = ForkLocal::new(spent);
                    handle.spawn(async move { drop(spent) });
                }
                None => drop(spent),
            }
        }
    }

    /// Keeps a decoded spilled result's mapping and memfd until the worker is
    /// reaped, so that releasing them is not on the caller's path.
    pub(crate) fn keep_until_reaped(&mut self, bytes: SealedBytes, fd: OwnedFd) {
        self.spent = Some((bytes, fd));
    }

    /// Takes the spilled result's memfd announced by a `Spilled` record.
    pub(crate) fn take_spill(&self, len: u64) -> Option<OwnedFd> {
        let tag = wire::SpillNotice::tag_for(self.key?, self.generation, len);
        self.inner
            .spill
            .take(self.inner.process.spill.as_fd(), self.generation, tag)
    }
}

/// Sends a spawn request, waiting for room in the socket if need be.
async fn send_request(inner: &Inner, frame: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), Error> {
    loop {
        match sys::send_frame(inner.process.command.as_fd(), frame, fds) {
            Ok(()) => return Ok(()),
            Err(e) if e.is_would_block() => {
                // Rare: the zygote is behind by a socket buffer's worth of
                // requests. Wait on a private duplicate of the fd, so that
                // concurrent waiters never share an epoll registration.
                let dup = inner
                    .process
                    .command
                    .try_clone()
                    .map_err(|e| Error::io("dup", e))?;
                // Held across the await: see `TaskIo::start`.
                let fd = ForkLocal::new(register(dup, Interest::WRITABLE)?);
                let _ = fd
                    .writable()
                    .await
                    .map_err(|e| Error::io("epoll_wait", e))?;
            }
            Err(e)
                if matches!(
                    e.errno(),
                    Some(libc::EPIPE | libc::ECONNRESET | libc::ENOTCONN)
                ) =>
            {
                return Err(Error::zygote_died());
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Registers an owned fd with the current tokio runtime's reactor.
///
/// The `AsyncFd` must be held by something that forgets it, rather than
/// drops it, in any process but this one (`TaskIo`'s `Drop`, `ForkLocal`):
/// a plain `fork` of the parent shares the runtime's epoll instance, and a
/// drop there would `EPOLL_CTL_DEL` the parent's registration, so the
/// parent's task would never wake (tests/fork_child.rs).
pub(crate) fn register(fd: OwnedFd, interest: Interest) -> Result<AsyncFd<OwnedFd>, Error> {
    // SAFETY: SAFETY.md T1. `register_with_interest` requires that the fd stay
    // open, refer to the same open file description, and be what `as_raw_fd`
    // returns, for the whole life of the `AsyncFd`. The `AsyncFd` takes the
    // `OwnedFd` by value, so nothing else can close or replace it, and
    // `OwnedFd::as_raw_fd` always returns the fd it owns.
    unsafe { AsyncFd::register_with_interest(fd, interest) }
        .map_err(|e| Error::io("epoll_ctl", e.into_parts().1))
}

/// How a drain of the report socket ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Drained {
    /// Nothing more queued for now.
    WouldBlock,
    /// The worker's final report was read; the rest is not ours to read.
    Final,
    /// End of stream: every holder of the zygote's end closed it.
    Eof,
    /// A malformed frame or a socket error: the channel is unusable.
    Broken,
}

/// Reads every report queued on a task's report socket.
fn drain_reports(fd: std::os::fd::BorrowedFd<'_>) -> (Vec<(Report, Option<OwnedFd>)>, Drained) {
    let mut out = Vec::new();
    let mut buf = [0u8; wire::REPORT_LEN + 1];
    loop {
        match sys::recv_frame(fd, &mut buf) {
            Ok(Some(frame)) => {
                match Report::decode(&buf[..frame.len]) {
                    Ok(report) => {
                        let last = report.is_final();
                        // `truncated` with data that decoded whole means the
                        // control message was cut (no fd was free here, or
                        // too many came): that loses a `Started` report's
                        // pidfd, which the task needs, but only the pooled
                        // socket's far end of a final report, whose pair is
                        // then not reused while the report stands. (Cut data
                        // never decodes: the buffer is one byte too long.)
                        if frame.truncated && !last {
                            return (out, Drained::Broken);
                        }
                        let fd = if frame.truncated {
                            None
                        } else {
                            frame.fds.into_iter().next()
                        };
                        out.push((report, fd));
                        // Stop right after the worker's last report: on a
                        // mailbox's socket, what follows belongs to the next
                        // worker parked there.
                        if last {
                            return (out, Drained::Final);
                        }
                    }
                    Err(_) => return (out, Drained::Broken),
                }
            }
            Ok(None) => return (out, Drained::Eof),
            Err(e) if e.is_would_block() => return (out, Drained::WouldBlock),
            Err(_) => return (out, Drained::Broken),
        }
    }
}

/// True if a dropped task's reports say its worker is gone (reaped or never
/// forked).
fn reaped(reports: &[(Report, Option<OwnedFd>)]) -> bool {
    reports.iter().any(|(r, _)| r.is_final())
}

impl Drop for TaskIo {
    fn drop(&mut self) {
        if self.inner.check_process().is_err() {
            // A copy in a worker (see `Inner::check_process`): these fd
            // numbers, and the runtime the fds are registered with, are not
            // ours here, and a released lease would wake tasks of that
            // runtime, whose waker writes to an fd number of its own. Leak
            // it all; the worker leaves through `_exit`.
            std::mem::forget(self.doorbell.take());
            std::mem::forget(self.report.take());
            std::mem::forget(self.pidfd.take());
            std::mem::forget(self.spent.take());
            std::mem::forget(self.lease.take());
            std::mem::forget(self.mailbox.take());
            std::mem::forget(self.recycle.take());
            self.trace.leak();
            return;
        }
        let outcome = self.outcome();
        self.inner.counters.ended(outcome);
        self.trace.finish(
            TraceOutcome::of(
                outcome,
                self.delivered,
                self.spawn_errno.is_some(),
                self.zygote_gone,
            ),
            self.pid,
        );
        if self.lease.is_none() {
            return; // released: `release` forgot it
        }
        // Nobody takes this task's result any more: a notice for it that
        // arrives late (a cancelled big result) is dropped, not stashed.
        self.inner.spill.forget(self.generation);
        if self.ended() {
            return;
        }
        if self.continues && !self.signalled.load(Ordering::Relaxed) {
            self.offer_again();
            return;
        }
        // A reused worker that has not said it goes on is killed whatever
        // it delivered: it may be waiting for another task, and nobody
        // would ever send it one or see it exit.
        let reused = self.mailbox.is_some() && self.inner.limits.reuse > 1;
        // The worker may still be running. Cancel it unless it already
        // delivered its result (then it is exiting on its own): shutting down
        // our end for writing makes the zygote kill it, whether or not its
        // pidfd ever reached us, and the zygote still reports the exit on the
        // half-closed socket. The pidfd, if we have it, is just faster.
        if !self.committed() || reused {
            // Not on a mailbox's report socket, which outlives this task (and
            // a parked worker's pidfd is always at hand).
            if let (Some(report), None) = (&self.report, &self.mailbox) {
                let _ = rustix::net::shutdown(report.get_ref(), rustix::net::Shutdown::Write);
                // Shut down for good: the pair cannot serve another task.
                self.recycle = None;
            }
            let _ = self.send_now(Signal::KILL);
        }
        // Keep the slot until the zygote reports the worker reaped, without
        // blocking: a small task on the current runtime waits for that.
        let reaper = Reaper {
            report: self.report.take(),
            recycle: self.recycle.take(),
            lease: self.lease.take(),
            mailbox: self.mailbox.take(),
            spent: self.spent.take(),
        };
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                // Fork-local: a runtime held in a static and dropped in a
                // fork drops this task there, where what the reaper owns is
                // not ours (as in this drop's first branch).
                let mut reaper = ForkLocal::new(reaper);
                handle.spawn(async move { reaper.run().await });
            }
            Err(_) => reaper.block(),
        }
    }
}

/// Waits for a dropped task's worker to be reaped, then frees its slot.
struct Reaper {
    report: Option<AsyncFd<OwnedFd>>,
    /// Where the report socket pair goes back (see `TaskIo::recycle`). Not
    /// the zygote's shared state: a reaper must not keep the zygote alive
    /// after its last handle is dropped (that is what ends a worker that
    /// committed its result and never exits).
    recycle: Option<Recycle>,
    lease: Option<Lease>,
    mailbox: Option<MailboxGuard>,
    /// Released with the slot.
    spent: Option<(SealedBytes, OwnedFd)>,
}

impl Reaper {
    async fn run(&mut self) {
        if let Some(report) = &self.report {
            loop {
                let Ok(mut guard) = report.readable().await else {
                    break;
                };
                let (reports, end) = drain_reports(guard.get_inner().as_fd());
                if reaped(&reports) || end != Drained::WouldBlock {
                    drop(guard);
                    self.recycle(reports);
                    break;
                }
                guard.clear_ready();
            }
        }
        self.finish();
    }

    /// Puts the report socket pair back into the pool if the final report
    /// among `reports` is `Exited` (see `TaskIo::release`).
    fn recycle(&mut self, reports: Vec<(Report, Option<OwnedFd>)>) {
        let exited = reports
            .iter()
            .any(|(r, _)| matches!(r, Report::Exited { .. }));
        if let (true, Some(recycle), Some(report)) =
            (exited, self.recycle.take(), self.report.take())
        {
            recycle.put_back(report);
        }
    }

    /// Outside any runtime: wait on the socket directly, bounded, then free
    /// the slot (generation checks keep a late writer harmless).
    fn block(mut self) {
        if let Some(report) = self.report.take() {
            let fd = report.into_inner();
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while std::time::Instant::now() < deadline {
                let (reports, end) = drain_reports(fd.as_fd());
                if reaped(&reports) || end != Drained::WouldBlock {
                    break;
                }
                let _ = sys::poll_readable(fd.as_fd(), Some(Duration::from_millis(100)));
            }
        }
        self.finish();
    }

    /// Releases everything the task held, the slot last: once the lease is
    /// gone, `wait_idle` promises that nothing of the task is left.
    fn finish(&mut self) {
        self.report = None;
        self.recycle = None;
        self.mailbox = None;
        self.spent = None;
        self.lease = None;
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        // A reaper task dropped unfinished (its runtime shut down): finish the
        // wait synchronously so the slot is not lost.
        if self.lease.is_some() && self.report.is_some() {
            Reaper {
                report: self.report.take(),
                recycle: None,
                lease: self.lease.take(),
                mailbox: self.mailbox.take(),
                spent: self.spent.take(),
            }
            .block();
        }
    }
}
