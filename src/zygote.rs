//! The zygote: a small process forked from the parent while the parent is still
//! single-threaded, which forks one fresh worker per task.
//!
//! # Why a zygote
//!
//! `fork` costs page-table and VMA copying proportional to the *forking*
//! process. The parent may grow to gigabytes and dozens of threads; the zygote
//! stays as small as the parent was at start-up, never starts a thread, and so
//! can fork at any time (SAFETY.md F1). It never touches tokio.
//!
//! # Life cycle
//!
//! The zygote serves one command socket from the parent. For each spawn request
//! it forks a worker and, if the parent asked for it, opens the worker's pidfd
//! (race-free: only the zygote can reap its own child, and it has not yet)
//! and reports `Started` with it on the task's private report socket. It
//! watches, with one epoll set:
//!
//! * the command socket: requests, or EOF when the parent is gone or dropped
//!   its last [`Zygote`](crate::Zygote) handle, which makes the zygote kill
//!   every worker, reap them, and `_exit`;
//! * a signalfd for `SIGCHLD`, which it keeps blocked: for each worker that
//!   has exited (`waitid(WNOWAIT)` names it and leaves it a zombie) it kills
//!   the worker's process group (any process the task left behind), reaps
//!   the worker, and reports `Exited` with the status, handing the report
//!   socket's far end back with it for the parent to reuse. (A pidfd per
//!   worker, opened, watched and closed, cost about 10 µs per task.)
//! * each task's report socket: a hang-up means the parent dropped the task
//!   (cancellation), so the worker is killed at once.
//!
//! `PR_SET_PDEATHSIG` backs up the EOF: if the parent dies, the zygote gets
//! `SIGKILL`, and every worker gets `SIGKILL` when the zygote dies.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::event::epoll;
use rustix::process::Pid;

use crate::epoch;
use crate::error::{Error, ErrorKind};
use crate::output::IoFds;
use crate::ring::Ring;
use crate::shm::{PostedWords, SharedWords};
use crate::sys::{self, Forked, SysError, SysResult};
use crate::wire::{self, ArgPlace, Report, Request};
use crate::worker::{self, ArgSource};

/// Largest argument sent inline in a spawn request; larger ones go in a memfd.
pub(crate) const INLINE_ARG_MAX: usize = 32 * 1024;

/// Largest inline argument that the zygote hands a worker on its own stack
/// (see [`Zygote::take_request`]); a larger one goes through the request buffer.
const SMALL_ARG: usize = 256;

/// What the parent keeps of a running zygote.
pub(crate) struct ZygoteProcess {
    pub(crate) pid: Pid,
    /// Our child: reaped through this in `Drop`.
    pub(crate) pidfd: OwnedFd,
    /// Parent end of the command socket.
    pub(crate) command: OwnedFd,
    /// Parent end of the spill socket.
    pub(crate) spill: OwnedFd,
    pub(crate) ring: Ring,
    /// The parent's ends of the parked workers' mailboxes.
    pub(crate) mailboxes: Vec<Mailbox>,
    /// One word per mailbox for the idle handshake of reused workers
    /// (`crate::idle`).
    pub(crate) idle: SharedWords,
    /// One job cell per mailbox, for reused workers (`crate::job_cell`):
    /// the only writable mapping of them.
    pub(crate) cells: PostedWords,
    /// For a zygote forked by the template (`crate::template`): the
    /// template, which must outlive it (it is the zygote's parent, and the
    /// zygote dies with it).
    pub(crate) template: Option<std::sync::Arc<crate::template::Template>>,
}

/// The parent's ends of one mailbox: where a parked worker waits for a task.
pub(crate) struct Mailbox {
    /// Jobs go out here, to whichever worker is parked on the other end.
    pub(crate) jobs: OwnedFd,
    /// The zygote reports here: `Started` when a worker parks, `Exited` when
    /// it has been reaped.
    pub(crate) reports: OwnedFd,
}

/// Sizes the zygote is started with.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    pub(crate) slots: u32,
    pub(crate) slot_bytes: usize,
    pub(crate) max_payload: u64,
    /// Workers to keep forked and parked, ready for a task.
    pub(crate) parked: u32,
    /// Tasks a parked worker serves before it exits (1: one, fresh).
    pub(crate) reuse: u32,
    /// Milliseconds a reused worker waits for its next task before it
    /// exits; 0 waits for ever.
    pub(crate) idle_ms: u64,
    /// Run in the zygote before it serves, for workers to inherit.
    pub(crate) warm_up: Option<fn()>,
}

/// Exit code of a zygote whose warm-up hook panicked.
pub(crate) const EXIT_WARM_UP_PANICKED: i32 = 3;
/// Exit code of a zygote whose warm-up hook left a thread running.
pub(crate) const EXIT_WARM_UP_THREADS: i32 = 4;

/// The ends of a new zygote's sockets and shared memory: the parent's
/// ([`Parts`]) and the zygote's ([`ZygoteEnds`]).
pub(crate) struct Parts {
    ring: Ring,
    idle: SharedWords,
    cells: PostedWords,
    command: OwnedFd,
    spill: OwnedFd,
    mailboxes: Vec<Mailbox>,
}

/// What a zygote is started with, as fds: for a zygote forked by the
/// template (`crate::template`), which receives them over a socket.
pub(crate) struct ZygoteEnds {
    /// The ring's memfd.
    pub(crate) ring: OwnedFd,
    /// The idle words' memfd.
    pub(crate) idle: OwnedFd,
    /// The job cells' memfd, sealed against writes (`shm::PostedWords`).
    pub(crate) cells: OwnedFd,
    /// The zygote's end of the command socket.
    pub(crate) command: OwnedFd,
    /// The workers' end of the spill socket.
    pub(crate) spill: OwnedFd,
    /// Per mailbox: the job socket's worker end, the report socket's zygote end.
    pub(crate) mailboxes: Vec<(OwnedFd, OwnedFd)>,
}

impl ZygoteEnds {
    /// The fds in the order the template receives them.
    pub(crate) fn fds(&self) -> Vec<BorrowedFd<'_>> {
        let mut fds = vec![
            self.ring.as_fd(),
            self.idle.as_fd(),
            self.cells.as_fd(),
            self.command.as_fd(),
            self.spill.as_fd(),
        ];
        for (jobs, reports) in &self.mailboxes {
            fds.extend([jobs.as_fd(), reports.as_fd()]);
        }
        fds
    }

    /// How many fds a zygote of `limits` is started with.
    pub(crate) fn count(limits: &Limits) -> usize {
        5 + 2 * limits.parked as usize
    }

    /// The inverse of [`fds`](ZygoteEnds::fds); `None` unless there are
    /// exactly [`count`](ZygoteEnds::count) of them.
    pub(crate) fn from_fds(limits: &Limits, fds: Vec<OwnedFd>) -> Option<ZygoteEnds> {
        if fds.len() != ZygoteEnds::count(limits) {
            return None;
        }
        let mut fds = fds.into_iter();
        let mut next = || fds.next().expect("counted");
        let (ring, idle, cells) = (next(), next(), next());
        let (command, spill) = (next(), next());
        let mailboxes = (0..limits.parked).map(|_| (next(), next())).collect();
        Some(ZygoteEnds {
            ring,
            idle,
            cells,
            command,
            spill,
            mailboxes,
        })
    }
}

/// Words of the job cells of a zygote of `limits`: one cell per mailbox,
/// each on pages of its own.
fn cell_words(limits: &Limits) -> usize {
    limits.parked.max(1) as usize * crate::job_cell::stride_words()
}

/// The zygote's read-only mapping of the job cells (the parent's writable
/// one is not in its process: `MADV_DONTFORK`). Only in reuse mode, where
/// workers read them: without it, a mapping fewer in the zygote is one
/// fewer for every fork and exit of a worker to copy and tear down.
fn map_cells(ends: &ZygoteEnds, limits: &Limits) -> SysResult<Option<PostedWords>> {
    if limits.reuse <= 1 {
        return Ok(None);
    }
    PostedWords::open(ends.cells.as_fd(), cell_words(limits)).map(Some)
}

/// Creates the ring, the idle words, the job cells and the sockets of a
/// new zygote.
pub(crate) fn parts(limits: Limits) -> Result<(Parts, ZygoteEnds), Error> {
    let (ring, ring_fd) = Ring::create(limits.slots, limits.slot_bytes)?;
    let (idle, idle_fd) =
        SharedWords::create("run-in-process-idle", limits.parked.max(1) as usize)?;
    let (cells, cells_fd) = PostedWords::create("run-in-process-jobs", cell_words(&limits))?;
    let (command, command_zygote) = sys::seqpacket_pair()?;
    let (spill, spill_workers) = sys::seqpacket_pair()?;
    let mut mailboxes = Vec::new();
    let mut mailbox_ends = Vec::new();
    for _ in 0..limits.parked {
        let (jobs, jobs_worker) = sys::seqpacket_pair()?;
        let (reports, reports_zygote) = sys::seqpacket_pair()?;
        mailboxes.push(Mailbox { jobs, reports });
        mailbox_ends.push((jobs_worker, reports_zygote));
    }
    Ok((
        Parts {
            ring,
            idle,
            cells,
            command,
            spill,
            mailboxes,
        },
        ZygoteEnds {
            ring: ring_fd,
            idle: idle_fd,
            cells: cells_fd,
            command: command_zygote,
            spill: spill_workers,
            mailboxes: mailbox_ends,
        },
    ))
}

impl Parts {
    /// The parent's view of the zygote `pid`, once it has its ends.
    pub(crate) fn into_process(self, pid: Pid, pidfd: OwnedFd) -> ZygoteProcess {
        // The zygote has its mapping; no later fork of ours (another
        // zygote) may have one: its workers could scribble on this ring,
        // and every one of their forks and exits would pay for it. (It
        // cannot fail on a live mapping; if it did, the zygote would
        // still work, so it is not worth failing `start` for.)
        let _ = self.ring.keep_from_forks();
        let _ = self.idle.keep_from_forks();
        ZygoteProcess {
            pid,
            pidfd,
            command: self.command,
            spill: self.spill,
            ring: self.ring,
            mailboxes: self.mailboxes,
            idle: self.idle,
            cells: self.cells,
            template: None,
        }
    }
}

/// Checks that the calling process has one thread, for a fork into Rust
/// code (SAFETY.md F1), and makes every later fork start a new epoch.
pub(crate) fn check_single_threaded() -> Result<(), Error> {
    let threads = sys::settled_thread_count()?;
    if threads != 1 {
        return Err(Error::new(
            ErrorKind::MultiThreaded,
            format!(
                "the zygote must be started while the process has one thread, but it has {threads}; \
                 call Zygote::start() at the top of main, before any runtime or thread starts"
            ),
        ));
    }
    // Every later fork of this process starts a new epoch, in which the
    // rings (and zygote handles) it inherits are inert (`crate::epoch`).
    epoch::watch_forks()?;
    Ok(())
}

/// Forks the zygote. Fails with [`ErrorKind::MultiThreaded`] unless the calling
/// process has exactly one thread.
pub(crate) fn spawn(limits: Limits) -> Result<ZygoteProcess, Error> {
    check_single_threaded()?;
    let (parts, ends) = parts(limits)?;
    // The zygote inherits our mappings; nobody maps these files again.
    SharedWords::seal_writes(ends.ring.as_fd())?;
    SharedWords::seal_writes(ends.idle.as_fd())?;
    let parent = sys::getpid();
    // Buffered output flushed now is written once, by us, instead of once by
    // us and once more by every worker that later flushes its inherited copy.
    sys::flush_stdio();
    // Block every signal across the fork: the child must not run a handler
    // the parent installed (it would run the parent's code, for the parent's
    // fds) before it has reset them all (SAFETY.md F5).
    let blocked = sys::block_all_signals();
    // SAFETY: SAFETY.md F1. We counted exactly one thread above, and nothing
    // between that check and here can start one: the calls above are plain
    // syscalls and allocations on this thread.
    let forked = unsafe { sys::fork() };
    if let Ok(Forked::Child) = forked {
        sys::contain_child(|| {
            // Every ring this process inherited but its own is inert here
            // (the parent keeps them out of this fork, see `crate::epoch`).
            parts.ring.adopt();
            parts.idle.adopt();
            let Ok(cells) = map_cells(&ends, &limits) else {
                sys::exit_now(1)
            };
            become_zygote(
                &parts.ring,
                &parts.idle,
                cells.as_ref(),
                &ends,
                parent,
                limits,
            )
        })
    }
    sys::restore_signal_mask(blocked);
    match forked? {
        Forked::Child => unreachable!("the child never returns from contain_child"),
        Forked::Parent(pid) => {
            drop(ends);
            // Race-free: the zygote is our unreaped child (SAFETY.md P2).
            let pidfd = sys::pidfd_open_child(pid)?;
            Ok(parts.into_process(pid, pidfd))
        }
    }
}

/// Serves as a zygote forked by the template (`crate::template`), whose
/// pid is `parent`, from the fds it received: maps the ring and the idle
/// words, then runs as any zygote does.
pub(crate) fn serve_respawned(limits: Limits, parent: Pid, ends: ZygoteEnds) -> ! {
    let ring = Ring::open(ends.ring.as_fd(), limits.slots, limits.slot_bytes);
    let idle = SharedWords::open(ends.idle.as_fd(), limits.parked.max(1) as usize);
    let cells = map_cells(&ends, &limits);
    let (Ok(ring), Ok(idle), Ok(cells)) = (ring, idle, cells) else {
        sys::exit_now(1)
    };
    // Ours is the last mapping made of either file (see `spawn`).
    if SharedWords::seal_writes(ends.ring.as_fd())
        .and_then(|()| SharedWords::seal_writes(ends.idle.as_fd()))
        .is_err()
    {
        sys::exit_now(1)
    }
    match become_zygote(&ring, &idle, cells.as_ref(), &ends, parent, limits) {}
}

/// The zygote's life after the fork that made it.
fn become_zygote(
    ring: &Ring,
    idle: &SharedWords,
    cells: Option<&PostedWords>,
    ends: &ZygoteEnds,
    parent: Pid,
    limits: Limits,
) -> std::convert::Infallible {
    sys::reset_signals();
    worker::install_hooks();
    crate::blob::register_thread_locals();
    let zygote = Zygote {
        ring,
        idle: idle.words(),
        cells,
        command: ends.command.as_fd(),
        spill: ends.spill.as_fd(),
        mailboxes: ends
            .mailboxes
            .iter()
            .map(|(j, r)| (j.as_fd(), r.as_fd()))
            .collect(),
        parent,
        pid: sys::getpid(),
        limits,
    };
    zygote.serve()
}

impl ZygoteProcess {
    /// Blocks until the zygote has run its warm-up hook and says it is
    /// ready; fails if it exited instead.
    pub(crate) fn wait_ready(&self) -> Result<(), Error> {
        self.wait_ready_or(|| Ok(sys::waitid_pidfd(self.pidfd.as_fd())?.code()))
    }

    /// As [`wait_ready`](ZygoteProcess::wait_ready), for a zygote that is
    /// not our child: `exit_code` learns how it exited from its parent.
    pub(crate) fn wait_ready_or(
        &self,
        exit_code: impl FnOnce() -> Result<Option<i32>, Error>,
    ) -> Result<(), Error> {
        let mut buf = [0u8; wire::REPORT_LEN + 1];
        loop {
            match sys::recv_frame(self.command.as_fd(), &mut buf) {
                Ok(Some(frame))
                    if matches!(
                        Report::decode(&buf[..frame.len]),
                        Ok(Report::Started { .. })
                    ) =>
                {
                    return Ok(());
                }
                Ok(Some(_)) => {
                    return Err(Error::new(
                        ErrorKind::ZygoteDied,
                        "the zygote sent a malformed ready report",
                    ));
                }
                Err(e) if e.is_would_block() => {
                    sys::poll_readable(self.command.as_fd(), None)?;
                }
                // End of stream: the zygote exited (it is the only holder
                // of the other end until it parks workers, after this).
                Ok(None) | Err(_) => {
                    let why = match exit_code()? {
                        Some(EXIT_WARM_UP_PANICKED) => "the warm-up hook panicked",
                        Some(EXIT_WARM_UP_THREADS) => {
                            "the warm-up hook left a thread running, and a zygote with \
                             threads cannot fork safely"
                        }
                        _ => "the zygote died during its warm-up",
                    };
                    return Err(Error::new(ErrorKind::ZygoteDied, why));
                }
            }
        }
    }
}

/// The zygote's view of itself, inside the zygote process.
struct Zygote<'a> {
    ring: &'a Ring,
    /// The idle words, one per mailbox (`crate::idle`).
    idle: &'a [std::sync::atomic::AtomicU64],
    /// The job cells, one per mailbox, read-only (`crate::job_cell`); in
    /// reuse mode only.
    cells: Option<&'a PostedWords>,
    command: BorrowedFd<'a>,
    spill: BorrowedFd<'a>,
    /// Per mailbox: the workers' end of its job socket, the zygote's end of
    /// its report socket.
    mailboxes: Vec<(BorrowedFd<'a>, BorrowedFd<'a>)>,
    parent: Pid,
    /// Our own pid, for workers to check that we are still their parent.
    pid: Pid,
    limits: Limits,
}

/// A worker the zygote is watching, by pid: the zygote is its parent and
/// reaps it, so its pid cannot be reused while it is in the table.
struct Child {
    /// The zygote's end of the task's report socket; `None` if the parent
    /// closed its end entirely (nobody is left to report to), and for a
    /// parked worker, which reports through its mailbox.
    report: Option<OwnedFd>,
    /// For a parked worker: its mailbox.
    mailbox: Option<usize>,
    /// The number its report socket pair is kept under (`report_pool`).
    pair: u32,
    /// The parent hung up its report socket: the task was cancelled, and
    /// the pair is not kept.
    cancelled: bool,
}

/// The workers the zygote is watching: a short list, searched linearly.
///
/// Not a hash map: every page the zygote writes after a fork is a
/// copy-on-write fault (the new worker shares it), and a hash map's insert
/// and remove write its control bytes and its slots, often on two pages;
/// this list writes one entry at its end, and one moved into a hole.
struct Children(Vec<(Pid, Child)>);

impl Children {
    fn with_capacity(n: usize) -> Children {
        Children(Vec::with_capacity(n))
    }

    fn insert(&mut self, pid: Pid, child: Child) {
        self.0.push((pid, child));
    }

    fn get_mut(&mut self, pid: Pid) -> Option<&mut Child> {
        self.0.iter_mut().find(|(p, _)| *p == pid).map(|(_, c)| c)
    }

    fn remove(&mut self, pid: Pid) -> Option<Child> {
        let i = self.0.iter().position(|&(p, _)| p == pid)?;
        Some(self.0.swap_remove(i).1)
    }

    fn pids(&self) -> impl Iterator<Item = Pid> + '_ {
        self.0.iter().map(|&(pid, _)| pid)
    }
}

/// Forgets a reaped child: takes its report socket out of the epoll set,
/// then closes it.
///
/// Closing alone is not enough. An fd's registration outlives its close while
/// another fd shares its open file, and a worker forked a moment ago holds
/// copies of all of the zygote's fds until its `close_range`. A hung-up
/// socket stays ready, so the stale registration made the event loop spin,
/// keeping that very worker off the CPU for a scheduler tick (4 ms cold-run
/// tails, and a zygote burning CPU under load).
fn retire(epoll: &OwnedFd, child: &Child) {
    if let Some(report) = &child.report {
        // ENOENT if a cancellation already took it out: harmless.
        let _ = epoll::delete(epoll, report);
    }
}

/// epoll token of the command socket.
const COMMAND: u64 = 0;
/// epoll token of the `SIGCHLD` signalfd; a task's report socket is
/// `REPORT + pid` of its worker.
const CHILD_EXITED: u64 = 1;
const REPORT: u64 = 2;

fn report_token(pid: Pid) -> u64 {
    REPORT + pid.as_raw_nonzero().get() as u64
}

impl Zygote<'_> {
    fn serve(self) -> ! {
        // Own process group: terminal signals aimed at the parent's group do
        // not reach us, so Ctrl-C is delivered to the parent only.
        let _ = sys::setpgid_self();
        if !sys::die_with_parent(self.parent) {
            sys::exit_now(0);
        }
        let mut keep = vec![sys::raw(self.command), sys::raw(self.spill)];
        for (jobs, reports) in &self.mailboxes {
            keep.extend([sys::raw(jobs), sys::raw(reports)]);
        }
        // SAFETY: SAFETY.md F3. We are the just-forked, single-threaded
        // zygote; the fds closed here are the parent's, inherited, and no
        // object that owns one is used again (`serve` never returns).
        unsafe { sys::close_fds_except(&keep) };
        // Once here rather than in each worker (a task asks for them back
        // with `core_dumps(true)`). Failing leaves them as inherited.
        let _ = crate::limits::disable_core_dumps();
        if let Some(hook) = self.limits.warm_up {
            self.warm_up(hook);
        }
        match self.run() {
            Ok(never) => match never {},
            Err(_) => sys::exit_now(1),
        }
    }

    /// Runs the user's warm-up hook, then tells the parent, which waits for
    /// it in `start`, that the zygote is ready. Exits (with a code `start`
    /// turns into an error) if the hook panicked or left a thread running:
    /// a zygote with two threads can no longer fork safely (SAFETY.md F1).
    fn warm_up(&self, hook: fn()) {
        if std::panic::catch_unwind(hook).is_err() {
            sys::exit_now(EXIT_WARM_UP_PANICKED);
        }
        if !matches!(sys::settled_thread_count(), Ok(1)) {
            sys::exit_now(EXIT_WARM_UP_THREADS);
        }
        let ready = Report::Started {
            pid: self.pid.as_raw_nonzero().get() as u32,
        }
        .encode();
        let _ = sys::send_frame(self.command, &ready, &[]);
    }

    fn run(&self) -> Result<std::convert::Infallible, SysError> {
        let epoll = epoll::create(epoll::CreateFlags::CLOEXEC)
            .map_err(|e| SysError::new("epoll_create1", e))?;
        let add = |fd: BorrowedFd<'_>, token: u64, flags: epoll::EventFlags| {
            epoll::add(&epoll, fd, epoll::EventData::new_u64(token), flags)
                .map_err(|e| SysError::new("epoll_ctl", e))
        };
        add(self.command, COMMAND, epoll::EventFlags::IN)?;
        let exits = sys::sigchld_fd()?;
        add(exits.as_fd(), CHILD_EXITED, epoll::EventFlags::IN)?;
        let mut children =
            Children::with_capacity((self.limits.slots + self.limits.parked) as usize);
        // Requests arrive here, in memory no worker inherits (`MADV_DONTFORK`):
        // receiving into it never takes a copy-on-write fault, and what it
        // holds never reaches a worker, so it needs no scrubbing.
        let mut rx = memmap2::MmapMut::map_anon(wire::REQUEST_HEADER + INLINE_ARG_MAX)
            .map_err(|e| SysError::new("mmap", e))?;
        rx.advise(memmap2::Advice::DontFork)
            .map_err(|e| SysError::new("madvise", e))?;
        // Where a worker finds its inline argument: a small one on this
        // stack, whose page the loop writes anyway; a larger one in `buf`,
        // which parked workers also receive their jobs into.
        let mut small = [0u8; SMALL_ARG];
        let mut buf = vec![0u8; wire::REQUEST_HEADER + INLINE_ARG_MAX];
        // Never used here: each worker takes its copy (see RESULT_BUFFER).
        let mut result_buf = Vec::with_capacity(worker::RESULT_BUFFER);
        // On the stack, whose page the loop writes anyway: a heap buffer
        // would be one more page that each fork shares with the new worker,
        // and so one more copy-on-write fault when `epoll_wait` fills it.
        let mut events = [const { std::mem::MaybeUninit::<epoll::Event>::uninit() }; 64];
        // Mailboxes without a parked worker (a failed fork is retried after
        // the next reap, when resources may have come back).
        let mut empty: Vec<usize> = (0..self.mailboxes.len()).collect();
        // Far ends of report socket pairs kept for reuse, by number
        // (`report_pool`): index 0 is never used.
        let mut kept: Vec<Option<OwnedFd>> = std::iter::repeat_with(|| None)
            .take(wire::KEPT_PAIRS as usize + 1)
            .collect();
        loop {
            while let Some(&i) = empty.last() {
                let Some((pid, child)) = self.park(i, &mut buf, &mut result_buf) else {
                    break;
                };
                empty.pop();
                children.insert(pid, child);
            }
            let ready = match epoll::wait(&epoll, &mut events[..], None) {
                Ok((ready, _)) => ready,
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(SysError::new("epoll_wait", e)),
            };
            let mut exited = false;
            for event in ready.iter() {
                match event.data.u64() {
                    COMMAND => loop {
                        match sys::recv_frame(self.command, &mut rx) {
                            Ok(Some(frame)) => {
                                // No reference into `rx` may live across the
                                // fork: a worker does not have that memory.
                                let Some(job) =
                                    self.take_request(&rx, frame, &mut kept, &mut small, &mut buf)
                                else {
                                    continue;
                                };
                                let copied = job.copied();
                                let spawned = self.fork_worker(job, &small, &buf, &mut result_buf);
                                // Scrub the argument's copy: later workers are
                                // forked from this memory and must not find
                                // this task's argument in it.
                                let copy = match copied {
                                    Some(Copied::Small(n)) => &mut small[..n],
                                    Some(Copied::Large(n)) => &mut buf[..n],
                                    None => &mut [],
                                };
                                copy.fill(0);
                                std::hint::black_box(copy);
                                if let Some((pid, child)) = spawned {
                                    if let Some(report) = &child.report {
                                        add(
                                            report.as_fd(),
                                            report_token(pid),
                                            epoll::EventFlags::RDHUP,
                                        )?;
                                    }
                                    children.insert(pid, child);
                                }
                            }
                            Err(e) if e.is_would_block() => break,
                            // EOF (or a broken socket): the parent is gone or
                            // dropped its last handle.
                            Ok(None) | Err(_) => shutdown(children),
                        }
                    },
                    // Reaped after the rest of this batch (below), so that no
                    // pid named by another event here can have been reused.
                    CHILD_EXITED => exited = true,
                    token => {
                        // The parent shut down its end of a report socket for
                        // writing (or closed it): the task was cancelled. Kill
                        // the worker (ours, unreaped: the pid is still its);
                        // keep the socket to report its exit, but stop
                        // watching it (the hang-up is level-triggered).
                        let Some(pid) = Pid::from_raw((token - REPORT) as i32) else {
                            continue;
                        };
                        if let Some(child) = children.get_mut(pid) {
                            let _ = sys::kill_child(pid);
                            child.cancelled = true;
                            if let Some(report) = &child.report {
                                let _ = epoll::delete(&epoll, report);
                            }
                        }
                    }
                }
            }
            if exited {
                self.reap_exited(&exits, &mut children, &mut empty, &mut kept, &epoll)?;
            }
        }
    }

    /// Reaps every worker that has exited and reports it.
    ///
    /// Each is still a zombie when found, so its pid, and its process group
    /// id, cannot be reused yet: what the task left in its group is killed
    /// first, then the worker is reaped.
    fn reap_exited(
        &self,
        exits: &sys::SignalFd,
        children: &mut Children,
        empty: &mut Vec<usize>,
        kept: &mut [Option<OwnedFd>],
        epoll: &OwnedFd,
    ) -> Result<(), SysError> {
        // Drained first: a worker that exits after the last look below
        // makes the signalfd readable again.
        sys::drain_signalfd(exits);
        while let Some(pid) = sys::exited_child()? {
            let _ = sys::kill_process_group(pid);
            let status = sys::reap(pid)?;
            let Some(child) = children.remove(pid) else {
                continue;
            };
            let frame = Report::Exited { status: status.0 }.encode();
            if let Some(report) = &child.report {
                let _ = sys::send_frame(report.as_fd(), &frame, &[]);
            }
            if let Some(i) = child.mailbox {
                let _ = sys::send_frame(self.mailboxes[i].1, &frame, &[]);
                // Refilled at the top of the loop.
                empty.push(i);
            }
            retire(epoll, &child);
            // The parent keeps its end after this report unless it
            // cancelled the task; the far end waits here for the next task
            // that names the pair.
            if let (Some(report), false) = (child.report, child.cancelled) {
                if let Some(slot) = kept
                    .get_mut(child.pair as usize)
                    .filter(|_| child.pair != 0)
                {
                    *slot = Some(report);
                }
            }
        }
        Ok(())
    }

    /// Checks a spawn request received into `rx` and copies its inline
    /// argument where the worker will find it: into `small` if it fits, else
    /// into `buf`. `None` if the request was refused (and reported so).
    fn take_request(
        &self,
        rx: &[u8],
        frame: sys::Received,
        kept: &mut [Option<OwnedFd>],
        small: &mut [u8; SMALL_ARG],
        buf: &mut [u8],
    ) -> Option<Prepared> {
        let mut fds = frame.fds.into_iter();
        let decoded = if frame.truncated {
            None
        } else {
            Request::decode(&rx[..frame.len], self.ring.slots(), self.limits.max_payload).ok()
        };
        // The report socket: attached, or kept here from an earlier task.
        // A pooled one that is not here (which the parent never asks for)
        // leaves the task without a channel: its end of the pair then has
        // no far end left, and reads end-of-stream.
        let report = match &decoded {
            Some((request, _)) if request.pooled_report => {
                kept.get_mut(request.pair as usize)?.take()?
            }
            _ => fds.next()?,
        };
        // A worker forked here has no earlier doorbell to ring.
        let decoded = decoded.filter(|(request, _)| !request.same_doorbell);
        let (Some((request, inline)), Some(doorbell)) = (decoded, fds.next()) else {
            refuse(&report, libc::EINVAL);
            return None;
        };
        let arg = match request.arg {
            ArgPlace::Inline(_) if inline.len() <= SMALL_ARG => {
                small[..inline.len()].copy_from_slice(inline);
                JobArg::Copied(Copied::Small(inline.len()))
            }
            ArgPlace::Inline(_) => {
                buf[..inline.len()].copy_from_slice(inline);
                JobArg::Copied(Copied::Large(inline.len()))
            }
            ArgPlace::Memfd(len) => match fds.next() {
                Some(fd) => JobArg::Memfd(fd, len),
                None => {
                    refuse(&report, libc::EINVAL);
                    return None;
                }
            },
        };
        let Some(io) = IoFds::take(request.io, &mut fds) else {
            refuse(&report, libc::EINVAL);
            return None;
        };
        // The trace buffer (`crate::trace`), last.
        let trace = match (request.trace, fds.next()) {
            (0, _) => None,
            (level, Some(fd)) => Some((fd, level)),
            (_, None) => {
                refuse(&report, libc::EINVAL);
                return None;
            }
        };
        Some(Prepared {
            request,
            report,
            doorbell,
            arg,
            io,
            trace,
        })
    }

    /// Forks the worker for a prepared request and reports it; `small` and
    /// `buf` hold its inline argument as [`Zygote::take_request`] left it. The
    /// caller scrubs that copy afterwards.
    fn fork_worker(
        &self,
        job: Prepared,
        small: &[u8; SMALL_ARG],
        buf: &[u8],
        result_buf: &mut Vec<u8>,
    ) -> Option<(Pid, Child)> {
        let Prepared {
            request,
            report,
            doorbell,
            arg,
            io,
            trace,
        } = job;
        let arg = match arg {
            JobArg::Copied(Copied::Small(n)) => ArgSource::Inline(&small[..n]),
            JobArg::Copied(Copied::Large(n)) => ArgSource::Inline(&buf[..n]),
            JobArg::Memfd(fd, len) => ArgSource::Memfd(fd, len),
        };
        let zygote = self.pid;
        // SAFETY: SAFETY.md F1. The zygote is single-threaded for its whole
        // life: it is forked from a single-threaded parent, never spawns a
        // thread, and never runs user code (only workers do).
        let forked = unsafe { sys::fork() };
        match forked {
            Ok(Forked::Child) => sys::contain_child(|| {
                worker::run(
                    worker::Job {
                        ring: self.ring,
                        slot: request.slot,
                        generation: request.generation,
                        entry: request.entry,
                        arg,
                        limit: self.limits.max_payload,
                        doorbell,
                        spill: self.spill,
                        zygote,
                        result_buf: std::mem::take(result_buf),
                        confinement: request.confinement,
                        io,
                        trace,
                    },
                    self.cells,
                )
            }),
            Ok(Forked::Parent(pid)) => {
                drop(arg);
                drop(doorbell);
                // The capture pipes' write ends above all: a stream reaches
                // end-of-file only once every copy is closed.
                drop(io);
                drop(trace);
                // The zygote itself needs no pidfd (it is the worker's
                // parent: its signals and its reap cannot hit another
                // process); the parent gets one only if it asked.
                let report = if request.want_started {
                    let pidfd = match sys::pidfd_open_child(pid) {
                        Ok(fd) => fd,
                        Err(e) => {
                            // `pidfd_open_child` killed and reaped the worker.
                            refuse(&report, e.errno().unwrap_or(libc::EIO));
                            return None;
                        }
                    };
                    let started = Report::Started {
                        pid: pid.as_raw_nonzero().get() as u32,
                    }
                    .encode();
                    match sys::send_frame(report.as_fd(), &started, &[pidfd.as_fd()]) {
                        Ok(()) => Some(report),
                        Err(_) => None,
                    }
                } else {
                    Some(report)
                };
                if report.is_none() {
                    // The parent already dropped the task: cancel it now.
                    let _ = sys::kill_child(pid);
                }
                Some((
                    pid,
                    Child {
                        report,
                        mailbox: None,
                        pair: request.pair,
                        cancelled: false,
                    },
                ))
            }
            Err(e) => {
                refuse(&report, e.errno().unwrap_or(libc::EAGAIN));
                None
            }
        }
    }
}

/// A checked spawn request, ready to fork for.
struct Prepared {
    request: Request,
    report: OwnedFd,
    doorbell: OwnedFd,
    arg: JobArg,
    /// Env memfd and capture pipes (`crate::output`).
    io: IoFds,
    trace: Option<(OwnedFd, u8)>,
}

enum JobArg {
    /// Inline, copied by [`Zygote::take_request`].
    Copied(Copied),
    /// In a sealed memfd of this many bytes.
    Memfd(OwnedFd, u64),
}

/// Where [`Zygote::take_request`] copied an inline argument, and its length.
#[derive(Clone, Copy)]
enum Copied {
    Small(usize),
    Large(usize),
}

impl Prepared {
    /// The copy of the argument that the zygote must scrub after the fork.
    fn copied(&self) -> Option<Copied> {
        match self.arg {
            JobArg::Copied(copied) => Some(copied),
            JobArg::Memfd(..) => None,
        }
    }
}

/// Reports `SpawnFailed`, a final report. The pair is not kept: the
/// parent puts a pair back only after `Exited`.
fn refuse(report: &OwnedFd, errno: i32) {
    let _ = sys::send_frame(report.as_fd(), &Report::SpawnFailed { errno }.encode(), &[]);
}

impl Zygote<'_> {
    /// Forks a worker to park in mailbox `i` and reports it `Started` there.
    fn park(&self, i: usize, buf: &mut [u8], result_buf: &mut Vec<u8>) -> Option<(Pid, Child)> {
        let (jobs, reports) = self.mailboxes[i];
        // A job sent to the previous occupant that it never read (it died
        // first) must not be run by the next one: the parent sends a job only
        // to a worker it has seen parked, so anything queued now is stale.
        let mut scratch = [0u8; 64];
        while let Ok(Some(_)) = sys::recv_frame(jobs, &mut scratch) {}
        let zygote = self.pid;
        // SAFETY: SAFETY.md F1. The zygote is single-threaded for its whole
        // life (see `fork_worker`).
        let forked = unsafe { sys::fork() };
        match forked {
            Ok(Forked::Child) => sys::contain_child(|| {
                worker::park(worker::Parked {
                    zygote,
                    jobs,
                    spill: self.spill,
                    ring: self.ring,
                    idle: &self.idle[i],
                    cells: self.cells,
                    mailbox: i,
                    reuse: self.limits.reuse,
                    idle_ms: self.limits.idle_ms,
                    limit: self.limits.max_payload,
                    buf,
                    result_buf: std::mem::take(result_buf),
                })
            }),
            Ok(Forked::Parent(pid)) => {
                // For the parent, which kills a parked worker's task through
                // it; on failure the worker is already killed and reaped.
                let pidfd = sys::pidfd_open_child(pid).ok()?;
                let started = Report::Started {
                    pid: pid.as_raw_nonzero().get() as u32,
                }
                .encode();
                let _ = sys::send_frame(reports, &started, &[pidfd.as_fd()]);
                Some((
                    pid,
                    Child {
                        report: None,
                        mailbox: Some(i),
                        pair: 0,
                        cancelled: false,
                    },
                ))
            }
            Err(_) => None,
        }
    }
}

/// Kills and reaps every worker, then exits: the parent is gone.
fn shutdown(children: Children) -> ! {
    for pid in children.pids() {
        let _ = sys::kill_child(pid);
    }
    for pid in children.pids() {
        let _ = sys::kill_process_group(pid);
        let _ = sys::reap(pid);
    }
    sys::exit_now(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `retire` must leave nothing ready behind, even while another fd (a
    /// new worker's inherited copy) keeps the socket open.
    #[test]
    fn retired_fds_leave_the_epoll_set_even_when_shared() {
        let epoll = epoll::create(epoll::CreateFlags::CLOEXEC).unwrap();
        // A stand-in that stays ready forever, as a hung-up report socket
        // does: a socket whose peer is closed.
        let (report, peer) = sys::seqpacket_pair().unwrap();
        drop(peer);
        epoll::add(
            &epoll,
            &report,
            epoll::EventData::new_u64(REPORT + 1),
            epoll::EventFlags::RDHUP,
        )
        .unwrap();
        let copy = report.try_clone().unwrap();
        let ready = |epoll: &OwnedFd| {
            let mut events = Vec::with_capacity(4);
            let timeout = rustix::time::Timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            epoll::wait(
                epoll,
                rustix::buffer::spare_capacity(&mut events),
                Some(&timeout),
            )
            .unwrap();
            events.len()
        };
        assert_eq!(ready(&epoll), 1, "the stand-in is ready");
        retire(
            &epoll,
            &Child {
                report: Some(report),
                mailbox: None,
                pair: 0,
                cancelled: false,
            },
        );
        assert_eq!(
            ready(&epoll),
            0,
            "nothing of a retired child stays registered"
        );
        drop(copy);
    }
}
