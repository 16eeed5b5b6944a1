//! Task statistics: cheap atomic counters per zygote, summed over the
//! zygotes of a handle by [`Zygote::stats`](crate::Zygote::stats).
//!
//! Each task is counted once, when the parent lets go of it (its `run`
//! future, or its `Process`, is dropped, or its result taken): so a count is
//! exact for tasks that have ended, and a task still held is `in_flight`.

use std::sync::atomic::{AtomicU64, Ordering};

/// A snapshot of a zygote's task counters. Made by
/// [`Zygote::stats`](crate::Zygote::stats).
///
/// The outcome counters (`completed` to `lost`) are exact: each task that
/// was spawned and has been let go of is counted in exactly one of them.
/// `in_flight`, `workers` and `parked` are read one after another while
/// tasks run, so together they are a moment's approximation.
///
/// ```no_run
/// # async fn demo(zygote: run_in_process::Zygote) {
/// let s = zygote.stats();
/// println!("{} done, {} panicked, {} running", s.completed, s.panicked, s.in_flight);
/// # }
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Tasks whose request reached a worker or the zygote.
    pub spawned: u64,
    /// Tasks that delivered a value (even one that then failed to decode).
    pub completed: u64,
    /// Tasks that panicked.
    pub panicked: u64,
    /// Tasks whose worker was killed by a signal, not counting timeouts and
    /// cancellations.
    pub signaled: u64,
    /// Tasks whose worker exited without a result.
    pub exited: u64,
    /// Tasks stopped by their timeout.
    pub timed_out: u64,
    /// Tasks that went past a resource limit
    /// ([`ErrorKind::ResourceLimit`](crate::ErrorKind::ResourceLimit)).
    pub resource_limit: u64,
    /// Tasks dropped before they delivered a result (their worker killed).
    pub cancelled: u64,
    /// Tasks whose value could not be encoded, whose record was invalid,
    /// whose confinement could not be applied, whose worker could not be
    /// forked, or that were lost with their zygote.
    pub lost: u64,
    /// Tasks spawned and not yet let go of (holding a slot).
    pub in_flight: u64,
    /// Worker processes alive or being reaped: those of the tasks in flight
    /// and the idle ones waiting in mailboxes.
    pub workers: u64,
    /// Idle workers waiting in mailboxes for a task: parked fresh ones and,
    /// in reuse mode, reused ones.
    pub parked: u64,
    /// Of `parked`, the workers that have served a task and wait for the
    /// next (reuse mode). The parent keeps three fds for each (its pidfd,
    /// doorbell and report socket), one for a fresh parked worker.
    pub reused: u64,
}

/// How a task ended, as counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Completed,
    Panicked,
    Signaled,
    Exited,
    TimedOut,
    ResourceLimit,
    Cancelled,
    Lost,
}

/// The counters of one zygote.
#[derive(Default)]
pub(crate) struct Counters {
    spawned: AtomicU64,
    completed: AtomicU64,
    panicked: AtomicU64,
    signaled: AtomicU64,
    exited: AtomicU64,
    timed_out: AtomicU64,
    resource_limit: AtomicU64,
    cancelled: AtomicU64,
    lost: AtomicU64,
}

impl Counters {
    pub(crate) fn spawned(&self) {
        self.spawned.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn ended(&self, outcome: Outcome) {
        let counter = match outcome {
            Outcome::Completed => &self.completed,
            Outcome::Panicked => &self.panicked,
            Outcome::Signaled => &self.signaled,
            Outcome::Exited => &self.exited,
            Outcome::TimedOut => &self.timed_out,
            Outcome::ResourceLimit => &self.resource_limit,
            Outcome::Cancelled => &self.cancelled,
            Outcome::Lost => &self.lost,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Adds this zygote's counts to `into`.
    pub(crate) fn add_to(&self, into: &mut Stats) {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        into.spawned += get(&self.spawned);
        into.completed += get(&self.completed);
        into.panicked += get(&self.panicked);
        into.signaled += get(&self.signaled);
        into.exited += get(&self.exited);
        into.timed_out += get(&self.timed_out);
        into.resource_limit += get(&self.resource_limit);
        into.cancelled += get(&self.cancelled);
        into.lost += get(&self.lost);
    }
}
