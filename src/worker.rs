//! The worker: what runs in the freshly forked child, from the fork to `_exit`.
//!
//! A worker is a fork of the zygote, which never started a thread, so it begins
//! single-threaded with every lock free (SAFETY.md F1). It may therefore
//! allocate and run ordinary Rust code, unlike the child of a fork from a
//! threaded process (compare std's `Command::spawn`, whose child may only make
//! async-signal-safe calls before `exec`). What it must do first is shed the
//! state that belongs to the parent: its process group, its signal handlers and
//! mask, and every fd but its own three (SAFETY.md F3, F5). It leaves only
//! through `_exit`, so no destructor or atexit handler of the parent runs a
//! second time in it (SAFETY.md F4).
//!
//! This module never touches tokio.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd, RawFd};
use std::panic::{self, AssertUnwindSafe};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use rustix::process::Pid;

use crate::confine::{self, Confinement};
use crate::idle;
use crate::job_cell::{self, Cell, Found};
use crate::output::{IoFds, SetupFailure};
use crate::payload::Payload;
use crate::ring::Ring;
use crate::shm::{PostedWords, SealedBytes};
use crate::sys;
use crate::wire::{self, ArgPlace, ConfineFailure, Dismissal, RecordKind, Request, SpillNotice};

/// What a task's monomorphised entry point returns to the worker.
pub(crate) enum Outcome {
    /// The encoded return value: inline if it fits the ring slot.
    Value(Payload),
    /// The argument could not be decoded or the value could not be encoded.
    CodecFailed(String),
}

/// A task's entry point: decodes the argument, calls the user's function,
/// encodes its result as `out` says. Sent to the zygote as an address.
pub(crate) type Entry = fn(arg: &[u8], out: Output) -> Outcome;

/// How and where a task's entry point encodes its result.
pub(crate) struct Output {
    /// Largest argument or result, in bytes.
    pub(crate) limit: usize,
    /// Largest result kept inline: the ring slot's capacity.
    pub(crate) inline_max: usize,
    /// Memory to encode the result into, allocated once in the zygote (see
    /// [`RESULT_BUFFER`]).
    pub(crate) buf: Vec<u8>,
}

/// Capacity of the result buffer that the zygote allocates once and every
/// worker inherits. A result up to this size costs no allocation: a worker's
/// first allocation writes the allocator's state and takes four or five
/// copy-on-write and text faults, as much as the rest of a small task's
/// publishing.
pub(crate) const RESULT_BUFFER: usize = 4096;

/// Where the worker finds its argument bytes.
pub(crate) enum ArgSource<'a> {
    /// In the request buffer: the zygote's, of which this process has a
    /// private copy (the zygote scrubs its own after each request), or for a
    /// parked worker, its own copy that it received the job into.
    Inline(&'a [u8]),
    /// In a sealed memfd, `len` bytes long after its padding.
    Memfd(OwnedFd, u64),
}

/// Everything a worker needs, prepared by the zygote before the fork.
pub(crate) struct Job<'a> {
    pub(crate) ring: &'a Ring,
    pub(crate) slot: u32,
    pub(crate) generation: u64,
    /// Address of an [`Entry`] in this binary, from a trusted request.
    pub(crate) entry: u64,
    pub(crate) arg: ArgSource<'a>,
    /// Largest argument or result, in bytes.
    pub(crate) limit: u64,
    /// The task's eventfd: receives the task's key once the record is
    /// committed.
    pub(crate) doorbell: OwnedFd,
    /// The shared socket for spill notices.
    pub(crate) spill: BorrowedFd<'a>,
    /// The zygote's pid, to detect its death between fork and `prctl`.
    pub(crate) zygote: Pid,
    /// The result buffer, taken from the zygote's (see [`RESULT_BUFFER`]).
    pub(crate) result_buf: Vec<u8>,
    /// Limits and sandbox, applied just before the task's code runs.
    pub(crate) confinement: Confinement,
    /// Env, cwd and output (`crate::output`), applied before the confinement.
    pub(crate) io: IoFds,
    /// The task's trace buffer and level (`crate::trace`), if the parent
    /// traces it.
    pub(crate) trace: Option<(OwnedFd, u8)>,
}

/// Exit code of a worker that found its zygote already gone.
const EXIT_ORPHANED: i32 = 121;
/// Exit code of a worker that could not draw its key from the kernel.
const EXIT_NO_KEY: i32 = 122;
/// Exit code of a parked worker handed a malformed job.
const EXIT_BAD_JOB: i32 = 123;
/// Exit code of a parked worker dismissed by the parent, which could not
/// receive its pidfd (`wire::Dismissal`).
const EXIT_DISMISSED: i32 = 124;
/// Exit code of a worker that could not unblock `SIGCHLD`.
const EXIT_SIGNAL_MASK: i32 = 125;
/// Exit code of a worker that could not give up the other tasks' slots.
const EXIT_NOT_ISOLATED: i32 = 126;

/// True in the zygote and, inherited, in every worker (a store in each
/// worker would cost a copy-on-write fault); false in the parent, where
/// `stop_requested` is always false. The zygote runs no task, so it never
/// reads it.
static IN_CHILD: AtomicBool = AtomicBool::new(false);
/// Set by the first `stop_requested` call: the task handles stop requests.
static COOPERATIVE: AtomicBool = AtomicBool::new(false);
/// Set by the SIGTERM handler of a cooperative task.
static STOP: AtomicBool = AtomicBool::new(false);
/// The message of the last panic, recorded by the worker's panic hook.
static PANIC: Mutex<Option<String>> = Mutex::new(None);

/// Returns true once the parent has asked this task to stop.
///
/// The parent asks through [`Process::terminate`](crate::Process::terminate) or
/// the first phase of a [`Task::timeout`](crate::Task::timeout). A task that
/// calls this function at least once is *cooperative*: the request only sets a
/// flag, and the task may return a value early; it is killed with `SIGKILL` if
/// it has not finished after the grace period. A task that never calls it is
/// terminated by the request's `SIGTERM` at once, as an ordinary process would.
///
/// Outside a worker process this always returns `false`.
///
/// ```
/// fn count_until_stopped(limit: u64) -> u64 {
///     let mut n = 0;
///     while n < limit && !run_in_process::stop_requested() {
///         n += 1;
///     }
///     n
/// }
/// assert_eq!(count_until_stopped(10), 10);
/// ```
pub fn stop_requested() -> bool {
    if !IN_CHILD.load(Ordering::Relaxed) {
        return false;
    }
    COOPERATIVE.store(true, Ordering::Relaxed);
    STOP.load(Ordering::Relaxed)
}

/// Runs one task in the calling process, a worker just forked by the zygote,
/// and exits.
///
/// `cells`: the zygote's read-only mapping of the job cells (reuse mode
/// only), which a worker forked for one task never reads: it gives them all
/// up before the task runs.
pub(crate) fn run(job: Job<'_>, cells: Option<&PostedWords>) -> ! {
    // This fork started a new epoch; the zygote's ring is ours too, and so
    // is its view of the job cells, of which it keeps none.
    job.ring.adopt();
    isolate_cells(cells, None);
    let arg_fd = match &job.arg {
        ArgSource::Memfd(fd, _) => sys::raw(fd),
        // Not an fd: `close_fds_except` ignores it.
        ArgSource::Inline(_) => -1,
    };
    let [env, out, err] = job.io.raw();
    let trace_fd = job.trace.as_ref().map_or(-1, |(fd, _)| sys::raw(fd));
    prepare(
        job.zygote,
        &[
            sys::raw(&job.doorbell),
            sys::raw(job.spill),
            arg_fd,
            env,
            out,
            err,
            trace_fd,
        ],
    );
    isolate(job.ring, job.slot);
    let key = match sys::random_u64() {
        Ok(k) => k,
        Err(_) => sys::exit_now(EXIT_NO_KEY),
    };
    let _ = execute(job, key, None);
    sys::exit_now(0)
}

/// Post-fork hygiene, first thing in a new worker: its own process group,
/// death with the zygote, and no fd but stdio and `keep`.
pub(crate) fn prepare(zygote: Pid, keep: &[RawFd]) {
    // Own process group: Ctrl-C at a terminal reaches the parent's group only,
    // and the zygote can kill the worker's descendants with one kill(-pgid).
    let _ = sys::setpgid_self();
    if !sys::die_with_parent(zygote) {
        sys::exit_now(EXIT_ORPHANED);
    }
    // Signal dispositions need no work here: the zygote reset its own once
    // at start (sys::reset_signals) and has not changed them since, and a
    // forked child inherits exactly those. Its mask has one change since,
    // SIGCHLD blocked for its signalfd, which the task must not inherit.
    if sys::unblock_sigchld().is_err() {
        sys::exit_now(EXIT_SIGNAL_MASK);
    }
    // SAFETY: SAFETY.md F3. This process was forked a moment ago from the
    // single-threaded zygote, so it is single-threaded and nothing else can be
    // using these fds; the objects that owned the closed fds (the zygote's
    // sockets, epoll, other tasks' pidfds) are never used again here, because
    // a worker leaves through `_exit` without returning.
    unsafe { sys::close_fds_except(keep) };
}

/// Slot isolation (SAFETY.md S4): gives up every slot of the ring but
/// `slot`, before the task's code runs; exits if that fails, so no task
/// runs able to reach another's slot.
///
/// Every worker does this before its last task: a fresh worker before its
/// one task, a reused one (`Builder::reuse`) only before the task after
/// which it exits, because it serves each task in whatever slot that
/// task's lease holds. Until then a reused worker keeps the whole ring, and
/// its tasks can reach other tasks' slots, as every worker could before
/// (a forgery still fails the MAC: a `Codec` error, never a wrong value).
fn isolate(ring: &Ring, slot: u32) {
    // SAFETY: SAFETY.md S4. The worker's own code holds no `Slot` here:
    // `execute` and `publish` make theirs when they need them and drop
    // them before returning, and no task's code can reach the ring, which
    // belongs to the zygote's frame (it lies in no static). Later calls of
    // `ring.slot` return `None` for every other slot.
    if unsafe { ring.isolate(slot) }.is_err() {
        sys::exit_now(EXIT_NOT_ISOLATED);
    }
}

/// Cell isolation (SAFETY.md S6): adopts the zygote's mapping of the job
/// cells, if it has one (reuse mode), and gives up every mailbox's cell but
/// `mine`'s (all of them if `None`: a worker forked for one task), before
/// any task runs; exits if that fails, so no task runs able to read another
/// worker's jobs.
///
/// Unlike the ring, the cells are isolated once, when the worker starts: a
/// reused worker only ever reads its own mailbox's cell, whichever slot
/// each of its tasks is given.
fn isolate_cells(cells: Option<&PostedWords>, mine: Option<usize>) {
    let Some(cells) = cells else { return };
    cells.adopt();
    // SAFETY: SAFETY.md S6. No `Cell` exists yet in this worker: `park`
    // makes its one, of mailbox `mine`, only after this call, and `run`
    // makes none; no task's code can reach the cells' mapping, which
    // belongs to the zygote's frame (it lies in no static).
    if unsafe { job_cell::keep_only(cells, mine) }.is_err() {
        sys::exit_now(EXIT_NOT_ISOLATED);
    }
}

/// What a parked worker is given by the zygote.
pub(crate) struct Parked<'a> {
    /// The zygote's pid, to detect its death between fork and `prctl`.
    pub(crate) zygote: Pid,
    /// The workers' end of the mailbox's job socket.
    pub(crate) jobs: BorrowedFd<'a>,
    pub(crate) spill: BorrowedFd<'a>,
    pub(crate) ring: &'a Ring,
    /// The mailbox's idle word (`crate::idle`).
    pub(crate) idle: &'a AtomicU64,
    /// The zygote's read-only mapping of the job cells (reuse mode only),
    /// and the mailbox's number among them (`crate::job_cell`).
    pub(crate) cells: Option<&'a PostedWords>,
    pub(crate) mailbox: usize,
    /// Tasks to serve before exiting (reuse mode when above 1).
    pub(crate) reuse: u32,
    /// Idle timeout between tasks in milliseconds; 0 waits for ever.
    pub(crate) idle_ms: u64,
    /// Largest argument or result, in bytes.
    pub(crate) limit: u64,
    /// The zygote's request buffer, inherited across the fork.
    pub(crate) buf: &'a mut [u8],
    pub(crate) result_buf: Vec<u8>,
}

/// A parked worker: prepared, warmed up, then blocked on its mailbox's job
/// socket until the parent sends it a task (or hangs up), which it runs. In
/// reuse mode it then waits for the next task in its mailbox's job cell
/// (`crate::job_cell`), up to `reuse` tasks in all, for as long as each one
/// returns a value.
///
/// `buf` is the zygote's request buffer, inherited across the fork. Receiving
/// into it rather than into a buffer of our own keeps a parked worker from
/// writing 33 KiB it does not need: every page a worker writes is a
/// copy-on-write fault, a few microseconds each, and under load those are
/// most of what a task costs beyond the fork.
pub(crate) fn park(parked: Parked<'_>) -> ! {
    let Parked {
        zygote,
        jobs,
        spill,
        ring,
        idle,
        cells,
        mailbox,
        reuse,
        idle_ms,
        limit,
        buf,
        mut result_buf,
    } = parked;
    // This fork started a new epoch; the zygote's ring is ours too, and so
    // is its view of the job cells, of which a reused worker keeps its own.
    ring.adopt();
    isolate_cells(cells, (reuse > 1).then_some(mailbox));
    prepare(zygote, &[sys::raw(jobs), sys::raw(spill)]);
    warm_up(buf, &mut result_buf);
    let slots = ring.slots();
    let me = sys::getpid().as_raw_nonzero().get() as u32;
    // After its first task, a reused worker takes its jobs from its cell
    // (one that serves one task kept none): the parent posts there only to
    // a worker it has seen wait, which is after this read, so anything
    // newer is (or names) a later job. (A reused worker without its cell,
    // which cannot happen, serves one task.)
    let cell = cells.and_then(|cells| job_cell::cell(cells, mailbox));
    let reused = cell.is_some();
    let mut seen = cell.as_ref().map_or(0, Cell::current);
    let mut served = 0u32;
    let mut kept_doorbell = None;
    // Drawn now, after the fork: this worker's own.
    let Some(mut keys) = Keys::draw() else {
        sys::exit_now(EXIT_NO_KEY);
    };
    loop {
        // Between tasks of a reused worker, the idle timeout applies.
        let timeout = (served > 0 && idle_ms > 0).then(|| Duration::from_millis(idle_ms));
        let posted = cell.as_ref().filter(|_| served > 0).map(|c| (c, &mut seen));
        let (request, inline_len, fds) =
            receive_job(jobs, posted, buf, slots, limit, me, idle, timeout);
        let mut fds = fds.into_iter();
        // A reused worker's job may ask it to ring its last doorbell again.
        let doorbell = if request.same_doorbell {
            kept_doorbell.take()
        } else {
            fds.next()
        };
        let Some(doorbell) = doorbell else {
            sys::exit_now(EXIT_BAD_JOB);
        };
        let arg_fd = match request.arg {
            ArgPlace::Memfd(_) => fds.next(),
            ArgPlace::Inline(_) => None,
        };
        let Some(io) = IoFds::take(request.io, &mut fds) else {
            sys::exit_now(EXIT_BAD_JOB);
        };
        // The trace buffer, last.
        let trace = (request.trace != 0)
            .then(|| fds.next())
            .flatten()
            .map(|fd| (fd, request.trace));
        drop(fds);
        // Env, cwd and output cannot be undone either.
        let plain = request.confinement.is_default() && request.io.is_default();
        idle::busy(idle);
        if served == 0 {
            // Before any user code runs: nothing this task leaves behind may
            // read the next task's job from this mailbox (unless the worker
            // is reused, when it must keep the socket: the state a reused
            // worker shares between its tasks is what reuse gives up).
            // Closing every fd but the task's own also drops any the job
            // frame carried beyond them.
            let [env, out, err] = io.raw();
            let keep = [
                sys::raw(&doorbell),
                sys::raw(spill),
                arg_fd.as_ref().map_or(-1, sys::raw),
                if reused && plain { sys::raw(jobs) } else { -1 },
                env,
                out,
                err,
                trace.as_ref().map_or(-1, |(fd, _)| sys::raw(fd)),
            ];
            // SAFETY: SAFETY.md F3. Still single-threaded (no code of a task
            // has run yet), and of the fds this closes, the mailbox's job
            // socket is the only one still named by an object (`jobs`, a
            // borrow of the zygote's), which is not used again unless it is
            // in `keep`. A task's user code runs only after this call, so
            // no object of its owns an fd yet. (After the first task, fds
            // are no longer closed here: user code may own them.)
            unsafe { sys::close_fds_except(&keep) };
        }
        let arg = match request.arg {
            ArgPlace::Inline(_) => {
                ArgSource::Inline(&buf[wire::REQUEST_HEADER..wire::REQUEST_HEADER + inline_len])
            }
            ArgPlace::Memfd(len) => match arg_fd {
                Some(fd) => ArgSource::Memfd(fd, len),
                None => sys::exit_now(EXIT_BAD_JOB),
            },
        };
        served += 1;
        // Confinement cannot be undone: a confined task's worker ends with it.
        let may_continue = reused && served < reuse && !request.last && plain;
        if !may_continue {
            // This worker's last task: it will need no other slot.
            isolate(ring, request.slot);
        }
        let outcome = execute(
            Job {
                ring,
                slot: request.slot,
                generation: request.generation,
                entry: request.entry,
                arg,
                limit,
                doorbell,
                spill,
                zygote,
                result_buf,
                confinement: request.confinement,
                io,
                trace,
            },
            keys.next(),
            may_continue.then_some(idle),
        );
        match outcome {
            Some((buf, doorbell)) => {
                result_buf = buf;
                kept_doorbell = Some(doorbell);
            }
            None => sys::exit_now(0),
        }
    }
}

/// The keys of a parked worker's tasks: SipHash-1-3 of a task counter,
/// keyed by 128 bits drawn from the kernel after the fork. Each task still
/// gets a key no other process can guess (the seed exists only in this
/// worker, and the counter never repeats), for one `getrandom` per worker
/// instead of one per task.
struct Keys {
    seed: (u64, u64),
    counter: u64,
}

impl Keys {
    fn draw() -> Option<Keys> {
        Some(Keys {
            seed: (sys::random_u64().ok()?, sys::random_u64().ok()?),
            counter: 0,
        })
    }

    fn next(&mut self) -> u64 {
        use std::hash::Hasher;
        self.counter += 1;
        let mut h = siphasher::sip::SipHasher13::new_with_keys(self.seed.0, self.seed.1);
        h.write_u64(self.counter);
        h.finish()
    }
}

/// Waits for a job addressed to this worker (`me`), into `buf`; returns its
/// request, the inline argument's length, and the fds the frame carried
/// (the doorbell, unless the request says to ring the last one, then the
/// argument's memfd, if any). With `posted` (a reused worker's cell and
/// the `seq` of the job it took last) the job is posted there, or the cell
/// says it is on the socket; otherwise it comes on the mailbox's job
/// socket. Exits if the parent hung up, the job is malformed, the parent
/// dismissed this worker, or `timeout` passed and the idle handshake let
/// this worker retire.
#[allow(clippy::too_many_arguments)] // reason: one call site, all borrowed state
fn receive_job(
    jobs: BorrowedFd<'_>,
    mut posted: Option<(&Cell<'_>, &mut u32)>,
    buf: &mut [u8],
    slots: u32,
    limit: u64,
    me: u32,
    idle: &AtomicU64,
    mut timeout: Option<Duration>,
) -> (Request, usize, sys::Fds) {
    loop {
        if let Some((cell, seen)) = posted.as_mut() {
            // Posted whole, no fds with it; or `None`: on the socket, queued
            // before the post, read below.
            if let Some(len) = wait_posted(cell, seen, buf, idle, &mut timeout) {
                match accept(&buf[..len], slots, limit, me) {
                    Some((request, inline)) => return (request, inline, sys::Fds::default()),
                    None => continue,
                }
            }
        }
        // Waits first: after a task, the next job is seldom there yet, and
        // a receive that finds nothing would be one more system call. (A
        // job the cell announced is queued already.)
        let wait = if posted.is_some() { None } else { timeout };
        match sys::poll_readable(jobs, wait) {
            Ok(true) => {}
            // Idle for the whole timeout. Retire unless the parent has just
            // claimed this worker: then its job is on the way.
            Ok(false) if idle::retire(idle) => sys::exit_now(0),
            Ok(false) => {
                timeout = None;
                continue;
            }
            Err(_) => sys::exit_now(0),
        }
        let frame = match sys::recv_frame(jobs, buf) {
            Ok(Some(frame)) => frame,
            Err(e) if e.is_would_block() => continue,
            // The parent hung up (or the socket broke): nothing to run.
            Ok(None) | Err(_) => sys::exit_now(0),
        };
        if let Ok(dismissal) = Dismissal::decode(&buf[..frame.len]) {
            // Addressed to a predecessor (sent after it died): not ours.
            if dismissal.worker == me {
                sys::exit_now(EXIT_DISMISSED);
            }
            continue;
        }
        if frame.truncated {
            sys::exit_now(EXIT_BAD_JOB);
        }
        // Not ours: its fds close here.
        if let Some((request, inline)) = accept(&buf[..frame.len], slots, limit, me) {
            return (request, inline, frame.fds);
        }
    }
}

/// Decodes a job frame; exits if it is malformed. `None` if it names
/// another worker: a predecessor that died before reading it (the parent
/// sent it to that pid), not ours to run.
fn accept(frame: &[u8], slots: u32, limit: u64, me: u32) -> Option<(Request, usize)> {
    let Ok((request, inline)) = Request::decode(frame, slots, limit) else {
        sys::exit_now(EXIT_BAD_JOB);
    };
    (request.worker == me).then_some((request, inline.len()))
}

/// Sleeps on the cell's futex until a job is posted after `seen`; returns
/// its frame's length in `buf`, or `None` if the cell says the job is on
/// the socket. Exits as [`receive_job`] does at the idle timeout.
fn wait_posted(
    cell: &Cell<'_>,
    seen: &mut u32,
    buf: &mut [u8],
    idle: &AtomicU64,
    timeout: &mut Option<Duration>,
) -> Option<usize> {
    loop {
        match cell.take(*seen, buf) {
            Found::Job { seq, len } => {
                *seen = seq;
                return (len > 0).then_some(len);
            }
            Found::Torn => continue,
            Found::Bad => sys::exit_now(EXIT_BAD_JOB),
            Found::Nothing(now) => match cell.sleep(now, *timeout) {
                Ok(sys::Woken::Look) => {}
                Ok(sys::Woken::TimedOut) if idle::retire(idle) => sys::exit_now(0),
                // Claimed just in time: the job is on its way.
                Ok(sys::Woken::TimedOut) => *timeout = None,
                // `EFAULT` or `EINVAL`: the cell is not the mapping it was,
                // and no job can come through it.
                Err(_) => sys::exit_now(EXIT_BAD_JOB),
            },
        }
    }
}

/// Takes, before parking, the copy-on-write faults that every task's path
/// takes after its job arrives, and only those: on the job's first page of
/// `buf`, on the result buffer's, and in the stdio locks and buffers that
/// `execute` flushes. Each is a few
/// microseconds of the task's latency; the pages are the same ones the task
/// would write, so this costs no extra work. (Touching more, say a large
/// stretch of stack or heap "just in case", only adds faults.)
fn warm_up(buf: &mut [u8], result_buf: &mut Vec<u8>) {
    if let Some(first) = buf.first_mut() {
        *first = std::hint::black_box(0);
    }
    result_buf.push(std::hint::black_box(0));
    result_buf.clear();
    // Nothing is buffered yet (the parent flushed before forking the zygote).
    sys::flush_stdio();
}

/// Runs the task of `job` in this prepared worker and publishes its result.
///
/// `reuse`: the idle word, if this worker may serve another task. Then, if
/// the task returned a value and was not asked to stop, it returns the
/// result buffer and the doorbell for the next task; otherwise it exits.
fn execute(
    mut job: Job<'_>,
    raw_key: u64,
    reuse: Option<&AtomicU64>,
) -> Option<(Vec<u8>, OwnedFd)> {
    // The key exists only in this process and, once sent through the
    // eventfd, in the parent: drawn after the fork (or derived from a seed
    // drawn after it, for each task of a reused worker), it is in no memory
    // that another worker inherited (SAFETY.md S3). Its low bit is left for
    // `wire::KEY_CONTINUES`.
    let key = (raw_key >> 1).clamp(1, (u64::MAX >> 1) - 1) << 1;
    let out = Output {
        limit: usize::try_from(job.limit).unwrap_or(usize::MAX),
        inline_max: job.ring.slot(job.slot).map_or(0, |s| s.capacity()),
        buf: std::mem::take(&mut job.result_buf),
    };
    if reuse.is_some() {
        // A fresh task: the last one's answer to `stop_requested` is not its.
        COOPERATIVE.store(false, Ordering::Relaxed);
    }
    let failed = |kind, message: String| Published::Message(kind, message.into_bytes());
    let published = match load_arg(&job.arg, job.limit) {
        Err(message) => failed(RecordKind::EncodeFailed, message),
        Ok(_) if job.entry == 0 => failed(RecordKind::EncodeFailed, "null task entry".into()),
        Ok(arg) => 'task: {
            // Before confinement (which may forbid `mmap`) and any code of
            // the task; the guard lives until the result is published.
            #[cfg(feature = "tracing")]
            let _trace = job
                .trace
                .take()
                .and_then(|(fd, level)| crate::trace::Worker::begin(fd, level));
            // After everything the worker does for itself, before any code
            // of the task: I/O that cannot be set up, or confinement that
            // cannot be applied, is reported, and the task does not run.
            if let Err(failed) = std::mem::take(&mut job.io).apply() {
                break 'task Published::setup_failed(failed);
            }
            if let Err(refused) = confine::apply(&job.confinement, job.own_fds()) {
                break 'task Published::unconfined(refused);
            }
            let entry = entry_from_address(job.entry);
            // A `Blob` in a sealed argument borrows its mapping.
            let call = || arg.decoding(|| entry(arg.bytes(), out));
            match panic::catch_unwind(AssertUnwindSafe(call)) {
                Ok(Outcome::Value(payload)) => Published::Value(payload),
                Ok(Outcome::CodecFailed(message)) => failed(RecordKind::EncodeFailed, message),
                Err(payload) => {
                    let recorded = PANIC.lock().ok().and_then(|mut m| m.take());
                    let message = recorded.unwrap_or_else(|| payload_text(&payload));
                    failed(RecordKind::Panic, crate::panic_report::payload(message))
                }
            }
        }
    };
    // The task's output reaches the terminal before the parent sees the result.
    sys::flush_stdio();
    // Go on only after a value, and not after a stop request (the parent
    // no longer counts on this worker once it has signalled it).
    let idle =
        reuse.filter(|_| matches!(published, Published::Value(_)) && !STOP.load(Ordering::Relaxed));
    let key = if let Some(word) = idle {
        // Before the result is visible: see `idle::wait`.
        idle::wait(word);
        key | wire::KEY_CONTINUES
    } else {
        key
    };
    publish(&job, key, &published);
    // Ring the doorbell with the key: the eventfd is private to this worker
    // and the parent, and the parent needs the key to check the record.
    let _ = sys::eventfd_add(job.doorbell.as_fd(), key);
    if idle.is_none() {
        // `published` is never dropped: freeing it would only fault the
        // allocator's pages of a process that ends here.
        sys::exit_now(0)
    }
    // The argument's memfd closes with `job`; the doorbell, and the result
    // buffer if the value was inline, serve the next task.
    let Job { doorbell, .. } = job;
    let buf = match published {
        Published::Value(Payload::Inline(mut buf)) => {
            buf.clear();
            buf
        }
        _ => Vec::with_capacity(RESULT_BUFFER),
    };
    Some((buf, doorbell))
}

/// Bytes of the argument, wherever they are.
enum ArgBytes<'a> {
    Inline(&'a [u8]),
    Sealed(SealedBytes),
}

impl ArgBytes<'_> {
    fn bytes(&self) -> &[u8] {
        match self {
            ArgBytes::Inline(b) => b,
            ArgBytes::Sealed(s) => s.bytes(),
        }
    }

    /// Runs `f` with a sealed argument's mapping as the `Blob` source.
    fn decoding<T>(&self, f: impl FnOnce() -> T) -> T {
        match self {
            ArgBytes::Inline(_) => f(),
            ArgBytes::Sealed(s) => crate::blob::decoding_from(s, f),
        }
    }
}

fn load_arg<'a>(arg: &'a ArgSource<'_>, limit: u64) -> Result<ArgBytes<'a>, String> {
    match arg {
        ArgSource::Inline(bytes) => Ok(ArgBytes::Inline(bytes)),
        ArgSource::Memfd(fd, len) => SealedBytes::open(fd.as_fd(), *len, limit)
            .map(ArgBytes::Sealed)
            .map_err(|e| format!("argument: {e}")),
    }
}

fn entry_from_address(address: u64) -> Entry {
    debug_assert_ne!(address, 0, "checked by the caller");
    // SAFETY: SAFETY.md F2. `address` came from the parent over the command
    // socket, which only the parent can write (workers never hold it). The
    // parent produced it as `entry::<F, A, R> as Entry as usize` in the same
    // binary image that this process is a fork of (the zygote was forked from
    // the parent, and fork preserves the address space), so it is the address
    // of a function of exactly type `Entry`. It is non-null (`run` checks).
    unsafe { std::mem::transmute::<usize, Entry>(address as usize) }
}

/// What the worker publishes in its slot.
enum Published {
    /// The encoded value, inline or already in a sealed memfd.
    Value(Payload),
    /// A panic or codec failure message of `kind`.
    Message(RecordKind, Vec<u8>),
}

impl Published {
    /// A `Setup` record: the task's I/O could not be set up.
    fn setup_failed(failure: SetupFailure) -> Published {
        Published::Message(RecordKind::Setup, failure.encode().into_bytes())
    }

    /// An `Unconfined` record: the failure's code byte, then its message.
    fn unconfined((code, message): (ConfineFailure, String)) -> Published {
        let mut payload = vec![code as u8];
        payload.extend_from_slice(message.as_bytes());
        Published::Message(RecordKind::Unconfined, payload)
    }
}

impl Job<'_> {
    /// The fds this worker holds besides stdio: doorbell, spill socket, and
    /// the argument's memfd if it has one.
    fn own_fds(&self) -> u64 {
        2 + u64::from(matches!(self.arg, ArgSource::Memfd(..)))
    }
}

/// Writes the record; a value in a memfd is announced on the spill socket
/// first, and its record only says how long it is.
fn publish(job: &Job<'_>, key: u64, published: &Published) {
    let Some(slot) = job.ring.slot(job.slot) else {
        return;
    };
    match published {
        Published::Value(Payload::Inline(bytes)) if bytes.len() <= slot.capacity() => {
            slot.publish(key, job.generation, RecordKind::Value, bytes);
        }
        Published::Value(Payload::Inline(bytes)) => {
            // `encode_result` keeps inline values within the slot; say so
            // rather than truncate a value.
            let message = format!("an inline result of {} bytes does not fit", bytes.len());
            slot.publish(
                key,
                job.generation,
                RecordKind::EncodeFailed,
                message.as_bytes(),
            );
        }
        Published::Value(Payload::Sealed { fd, len }) => match announce(job, key, fd.as_fd(), *len)
        {
            Ok(()) => slot.publish_spilled(key, job.generation, *len),
            Err(message) => slot.publish(
                key,
                job.generation,
                RecordKind::EncodeFailed,
                message.as_bytes(),
            ),
        },
        Published::Message(kind, text) => {
            // A message too long for the slot: keep its head, on a char boundary.
            let mut end = text.len().min(slot.capacity());
            let text = String::from_utf8_lossy(text);
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            slot.publish(key, job.generation, *kind, &text.as_bytes()[..end]);
        }
    }
}

/// Sends a spilled result's memfd to the parent, tagged with the task's key.
fn announce(job: &Job<'_>, key: u64, fd: BorrowedFd<'_>, len: u64) -> Result<(), String> {
    let notice = SpillNotice {
        generation: job.generation,
        tag: SpillNotice::tag_for(key, job.generation, len),
    };
    sys::send_frame(job.spill, &notice.encode(), &[fd])
        .map_err(|e| format!("spilling result: {} failed: {}", e.call, e.source))
}

/// Installs, in the zygote, the SIGTERM handler behind [`stop_requested`] and
/// the panic hook that records a task's panic message, and sets `IN_CHILD`.
/// Workers inherit all three across the fork, which saves each of them an
/// allocation, a `sigaction` and the copy-on-write faults those would cost.
pub(crate) fn install_hooks() {
    IN_CHILD.store(true, Ordering::Relaxed);
    panic::set_hook(Box::new(|info| {
        let message = match info.location() {
            Some(l) => format!(
                "{} at {}:{}:{}",
                payload_text(info.payload()),
                l.file(),
                l.line(),
                l.column()
            ),
            None => payload_text(info.payload()),
        };
        crate::output::print_panic(&message);
        crate::panic_report::record();
        if let Ok(mut slot) = PANIC.lock() {
            *slot = Some(message);
        }
    }));
    let handler = || {
        // COOPERATIVE is only ever set by a task calling `stop_requested`.
        if IN_CHILD.load(Ordering::Relaxed) && COOPERATIVE.load(Ordering::Relaxed) {
            STOP.store(true, Ordering::Relaxed);
        } else {
            // The zygote, a parked worker, or a task that does not
            // cooperate: die of SIGTERM, as without a handler.
            let _ = signal_hook::low_level::emulate_default_handler(libc::SIGTERM);
        }
    };
    // SAFETY: signal_hook's `register` requires the action to be
    // async-signal-safe. It only loads and stores atomics, or calls
    // `emulate_default_handler`, which signal-hook documents as
    // async-signal-safe (SAFETY.md F5).
    let _ = unsafe { signal_hook::low_level::register(libc::SIGTERM, handler) };
}

fn payload_text(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "Box<dyn Any>".to_string()
    }
}
