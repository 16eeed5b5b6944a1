//! The public API: [`Zygote`], [`Builder`], [`Task`], [`Process`], [`State`].

use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::os::fd::AsFd;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustix::process::Signal;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::time::Instant;

use crate::blob;
use crate::codec;
use crate::confine::Confinement;
use crate::env::EnvSettings;
use crate::error::{Error, ErrorKind, Result};
use crate::output::{Captured, OutputReader, OutputSettings, Streams};
use crate::payload::{Payload, PayloadError};
use crate::reactor::{Deadlines, Launch, Record, TaskIo};
use crate::shared::Inner;
use crate::shm::SealedBytes;
use crate::stats::Stats;
use crate::sys::{self, WaitStatus};
use crate::template::{self, Respawn};
use crate::trace::TaskTrace;
use crate::wire::RecordKind;
use crate::worker::{Entry, Outcome, Output};
use crate::zygote::{self, Limits};

/// Default number of tasks that may run at once.
pub const DEFAULT_MAX_IN_FLIGHT: u32 = 64;
/// Default size of one result slot in shared memory.
pub const DEFAULT_SLOT_SIZE: usize = 64 * 1024;
/// Default largest argument or result, in bytes.
pub const DEFAULT_MAX_PAYLOAD: u64 = 1 << 30;
/// Default time a task has to finish after a stop request, before `SIGKILL`.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(2);
/// Default number of parked workers.
pub const DEFAULT_PARKED: u32 = 4;
/// Default time a reused worker waits for its next task before it exits.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// A handle to a zygote process, which forks a fresh worker process per task.
///
/// Start it at the top of `main`, while the process is still single-threaded,
/// then use it from async code. `Zygote` is cheap to clone; all clones share
/// one zygote process, which exits when the last clone is dropped.
///
/// ```no_run
/// use run_in_process::Zygote;
///
/// fn square(x: u64) -> u64 {
///     x * x
/// }
///
/// fn main() -> Result<(), Box<dyn std::error::Error>> {
///     let zygote = Zygote::start()?; // before the runtime exists
///     let rt = tokio::runtime::Runtime::new()?;
///     let n: u64 = rt.block_on(zygote.run(square, 12))?;
///     assert_eq!(n, 144);
///     Ok(())
/// }
/// ```
#[derive(Clone)]
pub struct Zygote {
    group: Arc<Group>,
}

/// The zygotes of one [`Zygote`] handle ([`Builder::zygotes`]): tasks are
/// spread across them, each keeping its own ring, slots and workers.
struct Group {
    /// Each behind a lock only so that [`Builder::respawn`] can replace it.
    members: Vec<RwLock<Arc<Inner>>>,
    /// Where the search for the least busy member starts, so that ties
    /// rotate.
    next: AtomicUsize,
    /// With [`Builder::respawn`]: what replaces a dead member.
    respawn: Option<Respawn>,
}

impl Group {
    fn member(&self, i: usize) -> Arc<Inner> {
        Arc::clone(&self.members[i].read().unwrap_or_else(|p| p.into_inner()))
    }

    fn members(&self) -> Vec<Arc<Inner>> {
        (0..self.members.len()).map(|i| self.member(i)).collect()
    }

    /// The live member with the fewest tasks in flight (ties rotate), or
    /// any member if all of them are dead (its tasks then fail as such,
    /// unless it is respawned first). With respawn, a member seen dead whose
    /// last respawn did not fail comes first: this call respawns it.
    fn pick(&self) -> (usize, Arc<Inner>) {
        let n = self.members.len();
        if let Some(respawn) = &self.respawn {
            if let Some(picked) = (0..n)
                .map(|i| (i, self.member(i)))
                .find(|(i, m)| respawn.wants(*i, m))
            {
                return picked;
            }
        }
        if n == 1 {
            return (0, self.member(0));
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut best: Option<(usize, Arc<Inner>)> = None;
        for i in 0..n {
            let index = (start + i) % n;
            let member = self.member(index);
            if member.is_dead() {
                continue;
            }
            if best
                .as_ref()
                .is_none_or(|(_, b)| member.slots.in_use() < b.slots.in_use())
            {
                best = Some((index, member));
            }
        }
        best.unwrap_or_else(|| (start % n, self.member(start % n)))
    }

    /// `old`, member `index`, if alive; else the zygote that replaces it,
    /// respawned now if no other call did (at most one attempt per call).
    async fn alive(self: &Arc<Self>, index: usize, old: Arc<Inner>) -> Result<Arc<Inner>> {
        if self.respawn.is_none()
            || !old.is_dead()
            || old.check_process().is_err()
            || tokio::runtime::Handle::try_current().is_err()
        {
            // The task fails as it would without respawn.
            return Ok(old);
        }
        // The template's reply and the warm-up hook are waited for on a
        // blocking thread, not on this runtime's; if this call is dropped,
        // the respawn still completes, for the next one.
        let group = Arc::clone(self);
        tokio::task::spawn_blocking(move || {
            let respawn = group.respawn.as_ref().expect("checked above");
            respawn.respawn(index, &group.members[index], &old)
        })
        .await
        .map_err(|_| Error::zygote_died())?
    }
}

/// Options for starting a [`Zygote`]. Made by [`Zygote::builder`].
#[derive(Debug, Clone)]
pub struct Builder {
    max_in_flight: u32,
    slot_size: usize,
    max_payload: u64,
    parked: u32,
    reuse: u32,
    idle_timeout: Duration,
    zygotes: usize,
    warm_up: Option<fn()>,
    respawn: bool,
    /// Every task's default limits and sandbox (`crate::confine`).
    pub(crate) confinement: Confinement,
    /// Every task's default capture limit (`crate::output`).
    pub(crate) capture_limit: usize,
}

impl Default for Builder {
    fn default() -> Builder {
        Builder {
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            slot_size: DEFAULT_SLOT_SIZE,
            max_payload: DEFAULT_MAX_PAYLOAD,
            parked: DEFAULT_PARKED,
            reuse: 1,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            zygotes: 1,
            warm_up: None,
            respawn: false,
            confinement: Confinement::default(),
            capture_limit: crate::output::DEFAULT_CAPTURE_LIMIT,
        }
    }
}

impl Builder {
    /// How many workers may be alive at once (default 64), across all
    /// [`zygotes`](Builder::zygotes). Callers beyond the limit wait for a
    /// worker to finish; they do not fail. 0 is refused by
    /// [`start`](Builder::start).
    pub fn max_in_flight(mut self, n: u32) -> Builder {
        self.max_in_flight = n;
        self
    }

    /// Bytes of shared memory per task for its result (default 64 KiB).
    /// Larger results still work; they travel through a sealed memfd instead,
    /// which costs a few more system calls. Each slot, with its 64-byte
    /// header, is rounded up to whole pages, so that a worker can keep only
    /// its own slot mapped (see the README, "Slot isolation").
    pub fn slot_size(mut self, bytes: usize) -> Builder {
        self.slot_size = bytes.clamp(64, 1 << 30);
        self
    }

    /// The largest argument or result accepted, in bytes (default 1 GiB).
    /// Anything larger fails with [`ErrorKind::Codec`]; the limit also bounds
    /// what the parent will decode from a worker.
    pub fn max_payload(mut self, bytes: u64) -> Builder {
        self.max_payload = bytes;
        self
    }

    /// How many workers each zygote keeps forked and parked, ready for a
    /// task (default 4; 0 forks every worker on demand).
    ///
    /// A parked worker still runs exactly one task in a fresh process: it was
    /// forked from the zygote before the task arrived, so the task skips the
    /// fork and a hop through the zygote, and the zygote parks a new worker
    /// after each one exits. An idle parked worker costs a process and about
    /// 50 KiB of private memory (the pages it has written since the fork).
    /// Tasks beyond the parked workers are forked on demand.
    pub fn parked(mut self, n: u32) -> Builder {
        self.parked = n.min(1024);
        self
    }

    /// Reuse mode: each worker serves up to `tasks_per_worker` tasks, one
    /// after another, then exits and is replaced (default 1: a fresh
    /// process per task). 0 is refused by [`start`](Builder::start).
    ///
    /// A task then costs two messages instead of a fork and an exit, which
    /// is several times the throughput on small tasks (see the README's
    /// figures). In reuse mode the zygote keeps up to
    /// [`max_in_flight`](Builder::max_in_flight) workers (at least
    /// [`parked`](Builder::parked)), and idle ones exit after the
    /// [`idle_timeout`](Builder::idle_timeout). The parent keeps three fds
    /// for each idle reused worker (its pidfd, its doorbell and a report
    /// socket), so the next task needs no new ones.
    ///
    /// # What reuse gives up
    ///
    /// Tasks that share a worker share a process: whatever a task leaves
    /// behind (globals and statics it changed, memory it leaked or grew,
    /// threads it started, files it opened, the current directory, signal
    /// handlers) is there for the next task of that worker, and a hostile
    /// task can watch or tamper with the tasks that follow it in its worker.
    /// Results are never mixed up: each task has its own key and slot
    /// generation, so no result of one task is delivered for another. A
    /// worker is retired, and the next task gets a fresh one, after any
    /// task that panics, crashes, exits, fails to encode, times out, is
    /// signalled, or is cancelled. Use [`Task::fresh`] for a task that must
    /// not run after another, and [`Process`]es ([`Task::open`]) always end
    /// their worker, so that [`Process::wait`] sees it exit.
    pub fn reuse(mut self, tasks_per_worker: u32) -> Builder {
        self.reuse = tasks_per_worker;
        self
    }

    /// In reuse mode, how long a worker that has served a task waits for the
    /// next before it exits (default 10 s), returning the memory it grew.
    /// The zygote then parks a fresh worker in its place if it keeps
    /// [`parked`](Builder::parked) ones. `Duration::ZERO` keeps idle
    /// workers for ever. Without reuse, it has no effect.
    pub fn idle_timeout(mut self, timeout: Duration) -> Builder {
        self.idle_timeout = timeout;
        self
    }

    /// Starts `n` zygotes (default 1) and spreads tasks across them, each
    /// task to the one with the fewest in flight. 0 is refused by
    /// [`start`](Builder::start).
    ///
    /// One zygote forks every worker, so on a machine with many cores it
    /// caps fresh-process throughput at its fork rate (tens of thousands
    /// per second); more zygotes fork in parallel. Raise it when fresh
    /// tasks are short and many cores are busy with them: about one
    /// zygote per 2–4 cores. Reuse mode forks rarely and needs it less.
    ///
    /// Every guarantee holds per zygote: each one has its own ring, slots
    /// and parked workers, dies with the parent, and if one dies, only the
    /// tasks it was running fail with [`ErrorKind::ZygoteDied`]; later
    /// tasks go to the others. [`max_in_flight`](Builder::max_in_flight) is
    /// divided among them.
    pub fn zygotes(mut self, n: usize) -> Builder {
        self.zygotes = n;
        self
    }

    /// Runs `hook` in each zygote right after it is forked and before it
    /// serves, so that every worker inherits what it prepared, copy-on-write:
    /// preload tables, parse configuration, pre-fault pages.
    /// [`start`](Builder::start) waits for every hook to return.
    ///
    /// The hook runs in the zygote, which must stay single-threaded: it must
    /// not start threads (nor a tokio runtime), and `start` fails if one is
    /// left running or the hook panics. State it builds is part of every
    /// worker's memory, so `fork` copies its page tables: a large private
    /// heap makes each fork slower, while data in a shared or file-backed
    /// mapping does not (see the README's warm-up figures).
    pub fn warm_up(mut self, hook: fn()) -> Builder {
        self.warm_up = Some(hook);
        self
    }

    /// Replaces a zygote that died with a fresh one (default false).
    ///
    /// Without it, a zygote that dies (killed, or out of memory) fails its
    /// tasks in flight with [`ErrorKind::ZygoteDied`] and every later task
    /// it is picked for, for ever. With it, the tasks in flight still fail
    /// with `ZygoteDied`, but the next call picked for that zygote starts a
    /// new one and runs on it. The next call, lazily: a death is noticed
    /// by a task of that zygote failing, or by a `poll` of the zygote's
    /// pidfd at each call (one system call per zygote and task, paid only
    /// with `respawn(true)`). That call pays for the respawn: a fork of a
    /// small process and the warm-up hook, if any.
    ///
    /// The new zygote cannot be forked from this process, which has threads
    /// by then (see [`ErrorKind::MultiThreaded`]): [`start`](Builder::start)
    /// forks a *template* first, a copy of this process as it was at
    /// start-up that never starts a thread nor runs user code, and asks it
    /// for each new zygote, which then runs the
    /// [`warm_up`](Builder::warm_up) hook as the first ones did. The
    /// template costs one more idle process (about as much memory as an
    /// idle zygote) and two fds.
    ///
    /// Respawn is possible while the template lives: it dies with this
    /// process, and if it is killed, zygotes it respawned die with it and
    /// later calls fail with `ZygoteDied`, as without this option. A
    /// respawn that fails (the warm-up hook panics, the fork fails) fails
    /// the call that attempted it, with the reason; each later call that is
    /// left only dead zygotes tries once more, and with
    /// [`zygotes`](Builder::zygotes) above 1 the others serve in the
    /// meantime. Nothing retries in a loop. [`Zygote::stats`] counts the
    /// tasks of a zygote and of those that replace it together.
    pub fn respawn(mut self, respawn: bool) -> Builder {
        self.respawn = respawn;
        self
    }

    fn check(&self) -> Result<()> {
        if self.reuse == 0 {
            return Err(Error::invalid(
                "reuse(0): a worker must serve at least one task (1 is a fresh process per task)",
            ));
        }
        if self.zygotes == 0 {
            return Err(Error::invalid("zygotes(0): at least one zygote is needed"));
        }
        if self.max_in_flight == 0 {
            return Err(Error::invalid(
                "max_in_flight(0): at least one task must be able to run",
            ));
        }
        if self.zygotes > self.max_in_flight as usize {
            return Err(Error::invalid(format!(
                "zygotes({}) is more than max_in_flight({}): each zygote needs a slot",
                self.zygotes, self.max_in_flight
            )));
        }
        Ok(())
    }

    /// Forks the zygote (or zygotes), and waits for their warm-up hooks.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::InvalidInput`] if an option is out of range (see each
    /// option); [`ErrorKind::MultiThreaded`] if the process already runs more
    /// than one thread (start the zygote at the top of `main`, before any
    /// runtime); [`ErrorKind::ZygoteDied`] if a warm-up hook panicked or
    /// left a thread running; [`ErrorKind::Io`] if a system call fails.
    pub fn start(self) -> Result<Zygote> {
        self.check()?;
        let n = self.zygotes as u32;
        let idle_ms = u64::try_from(self.idle_timeout.as_millis())
            .unwrap_or(u64::MAX)
            .max(u64::from(!self.idle_timeout.is_zero()));
        let all: Vec<Limits> = (0..n)
            .map(|i| {
                // `max_in_flight` divided among the zygotes, the remainder to
                // the first ones.
                let slots = self.max_in_flight / n + u32::from(i < self.max_in_flight % n);
                let parked = if self.reuse > 1 {
                    self.parked.max(slots.min(1024))
                } else {
                    self.parked
                };
                Limits {
                    slots,
                    slot_bytes: self.slot_size,
                    max_payload: self.max_payload,
                    parked,
                    reuse: self.reuse,
                    idle_ms,
                    warm_up: self.warm_up,
                }
            })
            .collect();
        // First, so that it copies nothing of the zygotes (it closes what
        // it inherits anyway).
        let template = match self.respawn {
            true => Some(Arc::new(template::spawn(all.clone())?)),
            false => None,
        };
        let mut members = Vec::with_capacity(self.zygotes);
        for &limits in &all {
            // Each zygote is forked from this still single-threaded process
            // (`spawn` checks), never from another zygote. A failure drops
            // the ones already started, which shuts them down.
            let process = zygote::spawn(limits)?;
            let mut inner = Inner::new(process, limits, self.confinement);
            inner.capture_limit = self.capture_limit;
            members.push(Arc::new(inner));
        }
        let members_len = members.len();
        if self.warm_up.is_some() {
            // The hooks run in parallel; wait for each.
            for member in &members {
                member.process.wait_ready()?;
            }
        }
        Ok(Zygote {
            group: Arc::new(Group {
                members: members.into_iter().map(RwLock::new).collect(),
                next: AtomicUsize::new(0),
                respawn: template.map(|t| Respawn::new(t, members_len)),
            }),
        })
    }
}

impl Zygote {
    /// Starts a zygote with default options; see [`Builder::start`].
    ///
    /// # Errors
    ///
    /// As [`Builder::start`].
    pub fn start() -> Result<Zygote> {
        Builder::default().start()
    }

    /// Options for a zygote.
    ///
    /// ```no_run
    /// let zygote = run_in_process::Zygote::builder().max_in_flight(8).start()?;
    /// # Ok::<(), run_in_process::Error>(())
    /// ```
    pub fn builder() -> Builder {
        Builder::default()
    }

    /// The zygote's process id (the first one's, with
    /// [`Builder::zygotes`]; see [`pids`](Zygote::pids)).
    pub fn pid(&self) -> u32 {
        self.group.member(0).pid()
    }

    /// How many tasks may run at once ([`Builder::max_in_flight`]).
    pub fn max_in_flight(&self) -> usize {
        self.group
            .members()
            .iter()
            .map(|m| m.limits.slots as usize)
            .sum()
    }

    /// Task counters and a moment's view of the workers, summed over the
    /// zygotes; see [`Stats`] for which figures are exact. Cheap: a few
    /// atomic loads and one short lock per zygote.
    pub fn stats(&self) -> Stats {
        let mut stats = Stats::default();
        for member in &self.group.members() {
            member.counters.add_to(&mut stats);
            let in_flight = member.slots.in_use() as u64;
            let (parked, reused) = member.mailboxes.ready();
            let parked = parked as u64;
            stats.in_flight += in_flight;
            stats.parked += parked;
            stats.reused += reused as u64;
            stats.workers += in_flight + parked;
        }
        stats
    }

    /// The process ids of all the zygotes, in start order.
    pub fn pids(&self) -> Vec<u32> {
        self.group.members().iter().map(|m| m.pid()).collect()
    }

    /// Runs `f(arg)` in a fresh worker process and returns its result.
    ///
    /// `f` must be a function item or a closure that captures nothing: the
    /// worker is a fork of the same program, so the function travels as an
    /// address, never as data. `arg` and the result travel through serde.
    ///
    /// ```compile_fail,E0080
    /// let zygote = run_in_process::Zygote::start().unwrap();
    /// let offset = 7u64;
    /// // Does not compile: the closure captures `offset`.
    /// let task = zygote.task(move |x: u64| x + offset, 1);
    /// ```
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Panicked`], [`ErrorKind::Signaled`] or [`ErrorKind::Exited`]
    /// if the task panicked, crashed or exited; [`ErrorKind::Codec`] if `arg`
    /// cannot be encoded (reported before any process is forked) or the result
    /// cannot be encoded or decoded; [`ErrorKind::ZygoteDied`] if the zygote is
    /// gone; [`ErrorKind::Io`] if a system call fails;
    /// [`ErrorKind::WrongProcess`] in a worker, through a handle it inherited.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future kills the worker (if it has not finished) and frees
    /// its resources in the background, without blocking. The task may or may
    /// not have run, and its side effects may have happened.
    pub async fn run<F, A, R>(&self, f: F, arg: A) -> Result<R>
    where
        F: Fn(A) -> R + Copy + 'static,
        A: Serialize + DeserializeOwned,
        R: Serialize + DeserializeOwned,
    {
        self.task(f, arg).run().await
    }

    /// Runs `f(arg).await` in a fresh worker process, on a single-threaded
    /// tokio runtime created in the worker, and returns its result.
    ///
    /// # Errors
    ///
    /// As [`Zygote::run`].
    ///
    /// # Cancel safety
    ///
    /// As [`Zygote::run`].
    pub async fn run_async<F, Fut, A, R>(&self, f: F, arg: A) -> Result<R>
    where
        F: Fn(A) -> Fut + Copy + 'static,
        Fut: Future<Output = R>,
        A: Serialize + DeserializeOwned,
        R: Serialize + DeserializeOwned,
    {
        self.task_async(f, arg).run().await
    }

    /// Starts `f(arg)` in a fresh worker and returns a handle to it once the
    /// worker process exists.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Codec`] if `arg` cannot be encoded, [`ErrorKind::ZygoteDied`]
    /// if the zygote is gone, [`ErrorKind::Io`] if the fork fails.
    ///
    /// # Cancel safety
    ///
    /// As [`Zygote::run`].
    pub async fn open<F, A, R>(&self, f: F, arg: A) -> Result<Process<R>>
    where
        F: Fn(A) -> R + Copy + 'static,
        A: Serialize + DeserializeOwned,
        R: Serialize + DeserializeOwned,
    {
        self.task(f, arg).open().await
    }

    /// A task with options (timeout, grace period), to [`run`](Task::run) or
    /// [`open`](Task::open).
    ///
    /// ```no_run
    /// # async fn demo(zygote: run_in_process::Zygote) {
    /// use std::time::Duration;
    /// fn spin(_: ()) -> u64 { loop {} }
    /// let r = zygote.task(spin, ()).timeout(Duration::from_millis(100)).run().await;
    /// assert_eq!(r.unwrap_err().kind(), run_in_process::ErrorKind::TimedOut);
    /// # }
    /// ```
    pub fn task<F, A, R>(&self, f: F, arg: A) -> Task<R>
    where
        F: Fn(A) -> R + Copy + 'static,
        A: Serialize + DeserializeOwned,
        R: Serialize + DeserializeOwned,
    {
        assert_zero_sized(&f);
        Task::new(self, entry::<F, A, R>, std::any::type_name::<F>(), &arg)
    }

    /// Like [`task`](Zygote::task), for an async function.
    pub fn task_async<F, Fut, A, R>(&self, f: F, arg: A) -> Task<R>
    where
        F: Fn(A) -> Fut + Copy + 'static,
        Fut: Future<Output = R>,
        A: Serialize + DeserializeOwned,
        R: Serialize + DeserializeOwned,
    {
        assert_zero_sized(&f);
        Task::new(
            self,
            entry_async::<F, Fut, A, R>,
            std::any::type_name::<F>(),
            &arg,
        )
    }

    /// Number of tasks whose worker has not been reaped yet (running, or
    /// exiting). Idle parked workers are not counted.
    pub fn workers(&self) -> usize {
        self.group.members().iter().map(|m| m.slots.in_use()).sum()
    }

    /// Waits until the worker of every task started so far has exited and
    /// been reaped, then closes the spare report sockets kept for reuse by
    /// later tasks: after it returns, no task holds a file descriptor. Idle
    /// parked workers stay. In a process other than the one that started
    /// the zygote (see [`ErrorKind::WrongProcess`]) it returns at once.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: it only observes until it returns.
    pub async fn wait_idle(&self) {
        for member in &self.group.members() {
            if member.check_process().is_err() {
                return;
            }
            member.slots.wait_idle().await;
            member.report_pool.clear();
        }
    }
}

impl fmt::Debug for Zygote {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Zygote")
            .field("pid", &self.pid())
            .field("workers", &self.workers())
            .finish()
    }
}

/// One task to run, with its options. Made by [`Zygote::task`].
#[must_use = "a task does nothing until `run` or `open` is awaited"]
pub struct Task<R> {
    inner: Arc<Inner>,
    /// With respawn: the group and the member `inner` is (`Builder::respawn`).
    member: Option<(Arc<Group>, usize)>,
    entry: Entry,
    /// The task function's type name, for its span (`crate::trace`).
    name: &'static str,
    arg: Result<Payload>,
    timeout: Option<Duration>,
    grace: Duration,
    fresh: bool,
    /// Limits and sandbox (`crate::confine`).
    pub(crate) confinement: Confinement,
    /// Environment and working directory (`crate::env`).
    pub(crate) env: EnvSettings,
    /// Stdout and stderr (`crate::output`).
    pub(crate) output: OutputSettings,
    _result: PhantomData<fn() -> R>,
}

impl<R: DeserializeOwned> Task<R> {
    fn new<A: Serialize>(zygote: &Zygote, entry: Entry, name: &'static str, arg: &A) -> Task<R> {
        let (index, inner) = zygote.group.pick();
        let member = zygote
            .group
            .respawn
            .is_some()
            .then(|| (Arc::clone(&zygote.group), index));
        let limit = inner.limits.max_payload;
        // Large arguments are streamed into a sealed memfd as they are
        // encoded; the limit stops the encoding as soon as it is passed.
        let arg = Payload::encode(arg, "run-in-process-arg", zygote::INLINE_ARG_MAX, limit)
            .map_err(|e| match e {
                PayloadError::OverLimit(limit) => {
                    Error::codec(format!("the argument is over the limit of {limit} bytes"))
                }
                PayloadError::Codec(message) => {
                    Error::codec(format!("cannot encode the argument: {message}"))
                }
                PayloadError::Sys(e) => e.into(),
            });
        Task {
            confinement: inner.confinement,
            env: EnvSettings::default(),
            output: OutputSettings::new(inner.capture_limit),
            inner,
            member,
            entry,
            name,
            arg,
            timeout: None,
            grace: DEFAULT_GRACE,
            fresh: false,
            _result: PhantomData,
        }
    }

    /// Stops the task if it runs longer than `timeout`: it is asked to stop
    /// (see [`stop_requested`](crate::stop_requested)), then killed after the
    /// grace period. The result is then [`ErrorKind::TimedOut`], unless a
    /// cooperative task returned its value during the grace period.
    pub fn timeout(mut self, timeout: Duration) -> Task<R> {
        self.timeout = Some(timeout);
        self
    }

    /// How long a task that was asked to stop may take before it is killed
    /// with `SIGKILL` (default 2 s). Applies to the timeout and to
    /// [`Process::terminate`].
    pub fn grace(mut self, grace: Duration) -> Task<R> {
        self.grace = grace;
        self
    }

    /// In reuse mode ([`Builder::reuse`]), runs this task in a worker that
    /// has run no other task before it. (The worker may serve later tasks,
    /// which then see what this one left behind.) Without reuse every task
    /// is fresh, and this changes nothing. A task with confinement, env,
    /// working directory or output settings is always fresh, and its worker
    /// serves no other task: none of them can be undone.
    pub fn fresh(mut self) -> Task<R> {
        self.fresh = true;
        self
    }

    async fn start(self, want_started: bool) -> Result<(TaskIo, Streams)> {
        // The span opens at submission, and closes at once if the argument
        // could not be encoded.
        let trace = TaskTrace::new(self.name);
        let arg = self.arg?;
        // Bad env input fails here, before anything is sent or forked.
        let io = crate::output::prepare(&self.env, &self.output)?;
        let inner = match self.member {
            Some((group, index)) => group.alive(index, self.inner).await?,
            None => self.inner,
        };
        let open = want_started;
        // A timeout signals the worker, which needs its pidfd.
        let want_started = want_started || self.timeout.is_some();
        let deadlines = Deadlines {
            stop_at: self.timeout.map(|t| Instant::now() + t),
            kill_at: None,
            grace: self.grace,
            timeout: self.timeout,
        };
        let task = TaskIo::start(
            inner,
            Launch {
                entry: self.entry as usize as u64,
                arg: &arg,
                deadlines,
                want_started,
                fresh: self.fresh,
                // A `Process` waits for its worker's exit.
                last: open,
                confinement: self.confinement,
                io: io.plan,
                io_fds: io.fds().collect(),
                trace,
            },
        )
        .await?;
        Ok((task, io.start()?))
    }

    /// `run`, for `run_captured`.
    pub(crate) async fn run_with_output(self) -> Result<Captured<R>> {
        let (io, output) = self.start(false).await?;
        let mut process = Process::<R>::new(io, output);
        let value = process.result_of().await?;
        Ok(process.output.captured(value))
    }

    /// Runs the task to completion and returns its result.
    ///
    /// # Errors
    ///
    /// As [`Zygote::run`], plus [`ErrorKind::TimedOut`].
    ///
    /// # Cancel safety
    ///
    /// As [`Zygote::run`].
    pub async fn run(self) -> Result<R> {
        let (io, output) = self.start(false).await?;
        Process::<R>::new(io, output).result_of().await
    }

    /// Starts the task and returns a handle once its worker process exists.
    ///
    /// # Errors
    ///
    /// As [`Zygote::open`].
    ///
    /// # Cancel safety
    ///
    /// As [`Zygote::run`].
    pub async fn open(self) -> Result<Process<R>> {
        let (io, output) = self.start(true).await?;
        let mut process = Process::new(io, output);
        process.wait_started().await?;
        Ok(process)
    }
}

/// Where a [`Process`] is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    /// The request is sent; the worker process may not exist yet.
    Starting,
    /// The worker process exists and has not delivered a result.
    Running,
    /// The worker delivered its result, or exited, or can no longer be
    /// watched.
    Finished,
}

/// A running task: its worker's pid, signals, exit status and result.
///
/// Made by [`Zygote::open`] or [`Task::open`]. Dropping it kills the worker if
/// it is still running.
pub struct Process<R> {
    io: TaskIo,
    /// Taken by `terminate` from `&self`; moved into `io` by the next await.
    stop_requested: AtomicBool,
    /// Captured stdout and stderr (`crate::output`).
    output: Streams,
    _result: PhantomData<fn() -> R>,
}

impl<R: DeserializeOwned> fmt::Debug for Process<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Process")
            .field("pid", &self.io.pid)
            .field("state", &self.state())
            .finish()
    }
}

impl<R: DeserializeOwned> Process<R> {
    fn new(io: TaskIo, output: Streams) -> Process<R> {
        Process {
            io,
            stop_requested: AtomicBool::new(false),
            output,
            _result: PhantomData,
        }
    }

    /// The task's captured stdout, if it was set to
    /// [`Output::Capture`](crate::Output::Capture) and not taken yet, as a
    /// tokio [`AsyncRead`](tokio::io::AsyncRead) (compare tokio's
    /// `Child::stdout`). It yields the first
    /// [`capture_limit`](Task::capture_limit) bytes, then end-of-file when
    /// the stream ends; the task never waits for it to be read.
    ///
    /// ```no_run
    /// # async fn demo(zygote: run_in_process::Zygote) -> Result<(), Box<dyn std::error::Error>> {
    /// use run_in_process::Output;
    /// use tokio::io::AsyncReadExt;
    /// fn hello(_: ()) { println!("hello") }
    /// let mut process = zygote.task(hello, ()).stdout(Output::Capture).open().await?;
    /// let mut text = String::new();
    /// process.take_stdout().unwrap().read_to_string(&mut text).await?;
    /// assert_eq!(text, "hello\n");
    /// # Ok(()) }
    /// ```
    pub fn take_stdout(&mut self) -> Option<OutputReader> {
        self.output.take_reader(false)
    }

    /// The task's captured stderr; as [`take_stdout`](Process::take_stdout).
    /// Taking it does not take it from the task's [`Error::stderr`].
    pub fn take_stderr(&mut self) -> Option<OutputReader> {
        self.output.take_reader(true)
    }

    /// Waits, once the task is over, for its captured streams to end: so a
    /// result or an error has all the output.
    async fn collect_output(&mut self) {
        while !self.output.done() {
            if self.io.ended() {
                self.output.worker_exited();
                self.output.wait_done().await;
                return;
            }
            tokio::select! {
                () = self.output.wait_done() => return,
                () = self.io.pump() => {}
            }
        }
    }

    async fn wait_started(&mut self) -> Result<()> {
        loop {
            if self.io.pid.is_some() {
                return Ok(());
            }
            if let Some(errno) = self.io.spawn_errno {
                return Err(Error::io("fork", std::io::Error::from_raw_os_error(errno)));
            }
            if self.io.zygote_gone {
                return Err(Error::zygote_died());
            }
            self.io.pump().await;
        }
    }

    /// The worker's process id.
    pub fn pid(&self) -> u32 {
        self.io.pid.unwrap_or(0)
    }

    /// Where the task is in its life. Cheap: one atomic load of shared memory.
    pub fn state(&self) -> State {
        if self.io.ended() || self.io.committed() {
            State::Finished
        } else if self.io.pid.is_some() {
            State::Running
        } else {
            State::Starting
        }
    }

    /// Sends signal `sig` to the worker.
    ///
    /// Goes through the worker's pidfd, so it can never reach an unrelated
    /// process that reused the pid. Sending to a worker that already exited
    /// does nothing.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Io`] if `sig` is not a valid signal number or the call
    /// fails; [`ErrorKind::WrongProcess`] in a worker, through a `Process` it
    /// inherited.
    pub fn send_signal(&self, sig: i32) -> Result<()> {
        let sig = sys::signal_from_raw(sig).ok_or_else(|| {
            Error::io(
                "pidfd_send_signal",
                std::io::Error::from_raw_os_error(libc::EINVAL),
            )
        })?;
        self.send(sig)
    }

    fn send(&self, sig: Signal) -> Result<()> {
        self.io.inner.check_process()?;
        // `open` returns only once the pidfd has arrived, so it is there.
        self.io.send_now(sig).map(drop)
    }

    /// Asks the task to stop: `SIGTERM` now, and `SIGKILL` if it is still
    /// running after the grace period (escalated while [`wait`](Process::wait)
    /// or [`result`](Process::result) is being awaited, or on drop). A task
    /// that never calls [`stop_requested`](crate::stop_requested) ends at once,
    /// by `SIGTERM`.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Io`] if the signal cannot be sent;
    /// [`ErrorKind::WrongProcess`] as for [`send_signal`](Process::send_signal).
    pub fn terminate(&self) -> Result<()> {
        self.stop_requested.store(true, Ordering::Relaxed);
        self.send(Signal::TERM)
    }

    /// Kills the worker with `SIGKILL`.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Io`] if the signal cannot be sent;
    /// [`ErrorKind::WrongProcess`] as for [`send_signal`](Process::send_signal).
    pub fn kill(&self) -> Result<()> {
        self.send(Signal::KILL)
    }

    fn sync_stop_request(&mut self) {
        let requested = self.stop_requested.swap(false, Ordering::Relaxed);
        if requested && self.io.deadlines.kill_at.is_none() {
            self.io.deadlines.kill_at = Some(Instant::now() + self.io.deadlines.grace);
        }
    }

    /// Waits for the worker to exit and returns its exit status. Can be called
    /// again; it returns the same status.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::ZygoteDied`] if the zygote died first, so the status is
    /// unknown; [`ErrorKind::Io`] if the worker was never forked;
    /// [`ErrorKind::WrongProcess`] as for [`send_signal`](Process::send_signal).
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: dropping the future loses nothing, and the worker keeps
    /// running until the `Process` itself is dropped.
    pub async fn wait(&mut self) -> Result<ExitStatus> {
        self.io.inner.check_process()?;
        loop {
            self.sync_stop_request();
            if let Some(status) = self.io.exit {
                return Ok(ExitStatus::from_raw(status.0));
            }
            if let Some(errno) = self.io.spawn_errno {
                return Err(Error::io("fork", std::io::Error::from_raw_os_error(errno)));
            }
            if self.io.zygote_gone {
                return Err(Error::zygote_died());
            }
            self.io.pump().await;
        }
    }

    /// Waits for the task's result.
    ///
    /// # Errors
    ///
    /// As [`Zygote::run`], plus [`ErrorKind::TimedOut`].
    ///
    /// # Cancel safety
    ///
    /// Dropping the future drops the `Process`, which kills the worker.
    pub async fn result(mut self) -> Result<R> {
        self.io.inner.check_process()?;
        self.result_of().await
    }

    /// Waits for the result. The caller has already checked the process
    /// ([`Inner::check_process`](crate::shared::Inner::check_process)):
    /// `Process::result` does so itself, while `Task::run` and
    /// `run_with_output` rely on the check `TaskIo::start` made in the same
    /// call, which saves a `getpid` per task.
    async fn result_of(&mut self) -> Result<R> {
        let result = self.result_only().await;
        result.map_err(|e| self.output.annotate(e))
    }

    async fn result_only(&mut self) -> Result<R> {
        loop {
            self.sync_stop_request();
            if (self.io.record.is_some() || self.io.ended()) && !self.output.done() {
                self.collect_output().await;
            }
            if let Some(record) = self.io.record.take() {
                return self.decode(record);
            }
            if let Some(status) = self.io.exit {
                return Err(self.exit_error(status));
            }
            if let Some(errno) = self.io.spawn_errno {
                return Err(Error::io("fork", std::io::Error::from_raw_os_error(errno)));
            }
            if self.io.zygote_gone {
                return Err(Error::zygote_died());
            }
            self.io.pump().await;
        }
    }

    fn exit_error(&self, status: WaitStatus) -> Error {
        if self.io.timed_out {
            return Error::timed_out(self.io.deadlines.timeout.unwrap_or_default());
        }
        if let Some(limit) = crate::confine::exit_error(&self.io.confinement, status) {
            return limit;
        }
        match (status.signal(), status.code()) {
            (Some(sig), _) => Error::signaled(sig),
            (None, Some(code)) => Error::exited(code),
            (None, None) => Error::exited(-1),
        }
    }

    fn decode(&mut self, record: Record) -> Result<R> {
        let limit = usize::try_from(self.io.inner.limits.max_payload).unwrap_or(usize::MAX);
        let taken = match record {
            Record::Taken(t) => t,
            Record::Invalid(e) => return Err(Error::codec(format!("invalid result record: {e}"))),
        };
        let text = || String::from_utf8_lossy(&taken.payload).into_owned();
        match taken.kind {
            RecordKind::Value => codec::decode(&taken.payload, limit)
                .map_err(|e| Error::codec(format!("cannot decode the result: {e}"))),
            RecordKind::Panic => {
                let (message, backtrace) = crate::panic_report::split(&taken.payload);
                Err(Error::panicked(message).with_backtrace(backtrace))
            }
            RecordKind::Setup => Err(crate::output::setup_error(&taken.payload)),
            RecordKind::EncodeFailed => Err(Error::codec(text())),
            RecordKind::Unconfined => Err(crate::confine::unconfined_error(&taken.payload)),
            RecordKind::Spilled => {
                let fd = self
                    .io
                    .take_spill(taken.len)
                    .ok_or_else(|| Error::codec("the spilled result did not arrive"))?;
                let bytes =
                    SealedBytes::open(fd.as_fd(), taken.len, self.io.inner.limits.max_payload)
                        .map_err(|e| Error::codec(format!("spilled result refused: {e}")))?;
                // A `Blob` in the result borrows the mapping instead of copying.
                let value = blob::decoding_from(&bytes, || codec::decode(bytes.bytes(), limit))
                    .map_err(|e| Error::codec(format!("cannot decode the result: {e}")));
                // Unmapping and freeing the memfd's pages is left to the
                // reaper, after the caller has the value, unless a `Blob` in
                // the value still holds the mapping: then its last drop does.
                self.io.keep_until_reaped(bytes, fd);
                value
            }
        }
    }
}

impl<R> Drop for Process<R> {
    fn drop(&mut self) {
        // A worker known to have exited writes no more: its streams end
        // after one last drain, even if a process it left holds them open.
        // (A running worker is killed as the `TaskIo` drops, which ends them.)
        // The process check last: it is a system call (`getpid`), needed
        // only by an ended task that captures output.
        if self.io.ended() && !self.output.done() && self.io.inner.check_process().is_ok() {
            self.output.worker_exited();
        }
    }
}

/// Fails to compile (when instantiated) unless `F` is zero-sized: a fn item
/// or a closure that captures nothing.
fn assert_zero_sized<F>(_: &F) {
    const {
        assert!(
            std::mem::size_of::<F>() == 0,
            "run-in-process: the function must be a fn item or a closure that captures nothing"
        )
    };
}

/// Conjures the zero-sized function value `F`.
fn conjure<F: Copy + 'static>() -> F {
    const { assert!(std::mem::size_of::<F>() == 0) };
    // SAFETY: SAFETY.md F2. `F` is zero-sized (checked at compile time above)
    // and `Copy`, so a value of `F` has no bytes to get wrong and may be
    // duplicated freely: producing one here is a bitwise copy of the value the
    // caller passed to `Zygote::task` in the parent, of which this process is
    // a fork. Fn items and non-capturing closures are inhabited and have no
    // validity invariant beyond their (empty) bytes.
    unsafe { std::mem::zeroed() }
}

fn entry<F, A, R>(arg: &[u8], out: Output) -> Outcome
where
    F: Fn(A) -> R + Copy + 'static,
    A: DeserializeOwned,
    R: Serialize,
{
    let f = conjure::<F>();
    match decode_arg(arg, out.limit) {
        Ok(arg) => encode_result(&f(arg), out),
        Err(failed) => failed,
    }
}

fn decode_arg<A: DeserializeOwned>(arg: &[u8], limit: usize) -> Result<A, Outcome> {
    codec::decode(arg, limit)
        .map_err(|e| Outcome::CodecFailed(format!("cannot decode the argument: {e}")))
}

fn entry_async<F, Fut, A, R>(arg: &[u8], out: Output) -> Outcome
where
    F: Fn(A) -> Fut + Copy + 'static,
    Fut: Future<Output = R>,
    A: DeserializeOwned,
    R: Serialize,
{
    let f = conjure::<F>();
    let arg: A = match decode_arg(arg, out.limit) {
        Ok(a) => a,
        Err(failed) => return failed,
    };
    // A runtime of the worker's own, created after the fork: the zygote never
    // starts one (SAFETY.md F1), and this process is disposable.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("cannot start a tokio runtime in the worker");
    encode_result(&runtime.block_on(f(arg)), out)
}

/// Encodes the result where the worker will publish it: inline if it fits
/// the ring slot (`inline_max`), else straight into a sealed memfd.
fn encode_result<R: Serialize>(value: &R, out: Output) -> Outcome {
    let result = Payload::encode_in(
        out.buf,
        value,
        "run-in-process-result",
        out.inline_max,
        out.limit as u64,
    );
    // The value first, on its own: a `match` over all five outcomes compiles
    // to a jump table in `.rodata`, a page a fresh worker has not mapped yet,
    // so every task would take one more fault to read it.
    let error = match result {
        Ok(payload) => return Outcome::Value(payload),
        Err(error) => error,
    };
    Outcome::CodecFailed(match error {
        PayloadError::OverLimit(limit) => format!("the result is over the limit of {limit} bytes"),
        PayloadError::Codec(message) => format!("cannot encode the result: {message}"),
        e @ PayloadError::Sys(_) => format!("cannot spill the result: {e}"),
    })
}

/// Checks, at compile time, that the public types are thread-safe.
#[allow(dead_code)] // reason: compile-time assertion only
fn assert_send_sync() {
    fn check<T: Send + Sync>() {}
    check::<Zygote>();
    check::<Process<u64>>();
    check::<Task<u64>>();
    check::<Error>();
    check::<ErrorKind>();
    check::<State>();
}
