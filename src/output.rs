//! A task's stdout and stderr: inherited, `/dev/null`, or captured.
//!
//! # How capture works, and why a pipe
//!
//! A captured stream is a pipe: the parent makes it, sends the write end
//! with the spawn request, and the worker `dup2`s it onto its fd 1 or 2
//! before the task's code runs (and before its sandbox, which never denies
//! `write`). In the parent, the read end is non-blocking and drained by a
//! small tokio task of its own into a buffer that keeps the first
//! `capture_limit` bytes and reads and drops the rest. The drain does not
//! wait for anyone to read the stream, so a worker never blocks for longer
//! than the reactor takes to empty a pipe, whether the caller reads the
//! stream slowly, not at all, or has not even awaited the task yet; and the
//! parent never holds more than the limit. A pipe also keeps what a worker
//! wrote just before it crashed: the bytes are in the pipe, not in the dead
//! process.
//!
//! The alternative, a memfd as the worker's fd 1 read after it exits,
//! cannot block either, but cannot be bounded without failing the task's
//! writes: the file grows with the output (64 MiB of it stays in memory
//! until the parent reads it), and a size seal turns every later write into
//! `EPERM`, which makes `println!` panic.
//!
//! A stream ends at end-of-file (when the worker, and every process that
//! inherited the write end, has exited or closed it) or, once the parent
//! knows the worker exited, after one last drain of what the pipe holds:
//! a daemon the task left behind cannot keep it open.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use serde::de::DeserializeOwned;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, Interest, ReadBuf};
use tokio::sync::{Notify, watch};

use crate::env::{self, EnvSettings};
use crate::epoch::ForkLocal;
use crate::error::{Error, Result};
use crate::process::{Builder, Task};
use crate::reactor::register;
use crate::sys;
use crate::wire::{IoPlan, Stdio};

/// Default [`Task::capture_limit`]: bytes kept of each captured stream.
pub const DEFAULT_CAPTURE_LIMIT: usize = 1 << 20;

/// Where a task's stdout or stderr goes; see [`Task::stdout`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Output {
    /// The worker's own, inherited from the zygote: your program's stdout or
    /// stderr when the zygote started (the default).
    #[default]
    Inherit,
    /// Discarded (`/dev/null`).
    Null,
    /// Captured, up to the task's [`capture_limit`](Task::capture_limit):
    /// returned by [`Task::run_captured`], readable from a [`Process`](crate::Process)
    /// ([`Process::take_stdout`](crate::Process::take_stdout)), and kept in the
    /// task's [`Error`] for stderr ([`Error::stderr`]).
    Capture,
}

/// A task's result with what it wrote; see [`Task::run_captured`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Captured<R> {
    /// The task's return value.
    pub value: R,
    /// What it wrote to stdout, up to the capture limit (empty if stdout was
    /// not captured).
    pub stdout: Vec<u8>,
    /// What it wrote to stderr, up to the capture limit (empty if stderr was
    /// not captured).
    pub stderr: Vec<u8>,
}

/// A task's output settings, in the parent.
#[derive(Debug, Clone, Copy)]
pub(crate) struct OutputSettings {
    /// `None`: not set, which is `Inherit`, or `Capture` for `run_captured`.
    stdout: Option<Output>,
    stderr: Option<Output>,
    limit: usize,
}

impl OutputSettings {
    pub(crate) fn new(limit: usize) -> OutputSettings {
        OutputSettings {
            stdout: None,
            stderr: None,
            limit,
        }
    }
}

fn stdio(output: Option<Output>) -> Stdio {
    match output.unwrap_or_default() {
        Output::Inherit => Stdio::Inherit,
        Output::Null => Stdio::Null,
        Output::Capture => Stdio::Pipe,
    }
}

/// A task's I/O, made before its spawn request: the fds that go with it, and
/// the parent's ends of the capture pipes.
pub(crate) struct Prepared {
    pub(crate) plan: IoPlan,
    /// In request order: the env memfd, the stdout and stderr write ends.
    send: Vec<ForkLocal<OwnedFd>>,
    readers: [Option<ForkLocal<OwnedFd>>; 2],
    limit: usize,
}

/// Checks the task's env settings and makes its memfd and pipes. Nothing
/// is forked or sent yet.
pub(crate) fn prepare(env: &EnvSettings, output: &OutputSettings) -> Result<Prepared> {
    env.check()?;
    let mut plan = IoPlan {
        env: false,
        stdout: stdio(output.stdout),
        stderr: stdio(output.stderr),
    };
    let mut send = Vec::new();
    if let Some(fd) = env.to_memfd()? {
        plan.env = true;
        send.push(ForkLocal::new(fd));
    }
    let mut readers = [None, None];
    for (i, mode) in [plan.stdout, plan.stderr].into_iter().enumerate() {
        if mode == Stdio::Pipe {
            let (read, write) = sys::pipe_nonblocking_reader()?;
            readers[i] = Some(ForkLocal::new(read));
            send.push(ForkLocal::new(write));
        }
    }
    Ok(Prepared {
        plan,
        send,
        readers,
        limit: output.limit,
    })
}

impl Prepared {
    /// The fds to attach to the spawn request, after the argument's.
    pub(crate) fn fds(&self) -> impl Iterator<Item = BorrowedFd<'_>> {
        self.send.iter().map(|fd| fd.as_fd())
    }

    /// Once the request is sent: closes the parent's copies of the write
    /// ends (or no stream would ever reach end-of-file) and starts draining
    /// the read ends.
    pub(crate) fn start(self) -> Result<Streams> {
        drop(self.send);
        let limit = self.limit;
        let [stdout, stderr] = self.readers;
        let start =
            |fd: Option<ForkLocal<OwnedFd>>| fd.map(|fd| spawn_drain(fd, limit)).transpose();
        Ok(Streams {
            stdout: start(stdout)?,
            stderr: start(stderr)?,
            taken: [false; 2],
        })
    }
}

/// What the drain task and the readers of one stream share.
struct Shared {
    state: Mutex<State>,
    /// The worker exited: drain what is left, then end.
    stop: Notify,
    /// Set once the drain has closed its fd.
    done: watch::Sender<bool>,
}

struct State {
    /// The first `limit` bytes of the stream.
    buf: Vec<u8>,
    limit: usize,
    /// Bytes read past the limit and dropped.
    dropped: u64,
    ended: bool,
    reader: Option<Waker>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn push(&self, bytes: &[u8]) {
        let waker = {
            let mut state = self.lock();
            let room = state.limit.saturating_sub(state.buf.len());
            let kept = bytes.len().min(room);
            state.buf.extend_from_slice(&bytes[..kept]);
            state.dropped += (bytes.len() - kept) as u64;
            state.reader.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    fn finish(&self) {
        let waker = {
            let mut state = self.lock();
            state.ended = true;
            state.reader.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
        self.done.send_replace(true);
    }

    fn is_done(&self) -> bool {
        *self.done.borrow()
    }

    async fn wait_done(&self) {
        let mut done = self.done.subscribe();
        let _ = done.wait_for(|d| *d).await;
    }
}

/// Registers `fd` and spawns the task that drains it.
fn spawn_drain(fd: ForkLocal<OwnedFd>, limit: usize) -> Result<Arc<Shared>> {
    let fd = register(fd.into_inner(), Interest::READABLE)?;
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            buf: Vec::new(),
            limit,
            dropped: 0,
            ended: false,
            reader: None,
        }),
        stop: Notify::new(),
        done: watch::Sender::new(false),
    });
    // Fork-local, as the reactor's reaper: a runtime held in a static and
    // dropped in a fork drops this task there, where the fd is not ours.
    let mut drain = ForkLocal::new(Drain {
        fd: Some(fd),
        shared: Arc::clone(&shared),
    });
    tokio::spawn(async move { drain.run().await });
    Ok(shared)
}

/// Reads per wake-up before yielding to other tasks: a worker that writes
/// without pause must not monopolise a runtime thread.
const READS_PER_TURN: usize = 16;
/// Most bytes read after the worker exited: what a pipe can hold (its
/// capacity can be raised to 1 MiB without privileges), with room to spare.
const FINAL_DRAIN: usize = 4 << 20;

enum Flow {
    /// The pipe is empty for now.
    Empty,
    /// More may be there; yield, then go on.
    More,
    /// End-of-file, or an error: the stream is over.
    End,
}

struct Drain {
    /// `None` once closed.
    fd: Option<AsyncFd<OwnedFd>>,
    shared: Arc<Shared>,
}

impl Drain {
    async fn run(&mut self) {
        let mut scratch = vec![0u8; 64 * 1024];
        while let Some(fd) = &self.fd {
            tokio::select! {
                biased;
                () = self.shared.stop.notified() => {
                    let mut budget = FINAL_DRAIN / scratch.len();
                    while budget > 0 && matches!(read_some(fd.get_ref().as_fd(), &self.shared, &mut scratch, 1), Flow::More) {
                        budget -= 1;
                    }
                    break;
                }
                ready = fd.readable() => {
                    let Ok(mut guard) = ready else { break };
                    match read_some(guard.get_inner().as_fd(), &self.shared, &mut scratch, READS_PER_TURN) {
                        Flow::Empty => guard.clear_ready(),
                        Flow::More => {
                            drop(guard);
                            tokio::task::yield_now().await;
                        }
                        Flow::End => break,
                    }
                }
            }
        }
        self.close();
    }

    /// Closes the fd, then says the stream is done: a caller that saw
    /// `done` finds no fd of the task left.
    fn close(&mut self) {
        self.fd = None;
        self.shared.finish();
    }
}

impl Drop for Drain {
    fn drop(&mut self) {
        // Dropped unfinished (its runtime shut down): readers see the end.
        if self.fd.is_some() {
            self.close();
        }
    }
}

/// Reads up to `reads` times from the pipe into `shared`.
fn read_some(fd: BorrowedFd<'_>, shared: &Shared, scratch: &mut [u8], reads: usize) -> Flow {
    for _ in 0..reads {
        match rustix::io::read(fd, &mut *scratch) {
            Ok(0) => return Flow::End,
            Ok(n) => shared.push(&scratch[..n]),
            Err(rustix::io::Errno::AGAIN) => return Flow::Empty,
            Err(rustix::io::Errno::INTR) => {}
            Err(_) => return Flow::End,
        }
    }
    Flow::More
}

/// The parent's side of a task's captured streams.
#[derive(Default)]
pub(crate) struct Streams {
    stdout: Option<Arc<Shared>>,
    stderr: Option<Arc<Shared>>,
    /// Which readers were taken: stdout, stderr.
    taken: [bool; 2],
}

impl Streams {
    fn each(&self) -> impl Iterator<Item = &Arc<Shared>> {
        self.stdout.iter().chain(self.stderr.iter())
    }

    /// True once every captured stream has ended.
    pub(crate) fn done(&self) -> bool {
        self.each().all(|s| s.is_done())
    }

    /// Waits until every captured stream has ended.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: it only observes.
    pub(crate) async fn wait_done(&self) {
        for stream in self.each() {
            stream.wait_done().await;
        }
    }

    /// The worker has exited: each stream ends after one last drain.
    pub(crate) fn worker_exited(&self) {
        for stream in self.each() {
            stream.stop.notify_one();
        }
    }

    /// A reader of stdout or stderr, once.
    pub(crate) fn take_reader(&mut self, stderr: bool) -> Option<OutputReader> {
        let shared = if stderr { &self.stderr } else { &self.stdout };
        if std::mem::replace(&mut self.taken[usize::from(stderr)], true) {
            return None;
        }
        shared.as_ref().map(|shared| OutputReader {
            shared: Arc::clone(shared),
            pos: 0,
        })
    }

    fn take(stream: &Option<Arc<Shared>>) -> Vec<u8> {
        stream
            .as_ref()
            .map(|s| std::mem::take(&mut s.lock().buf))
            .unwrap_or_default()
    }

    /// `value` with everything captured so far.
    pub(crate) fn captured<R>(&self, value: R) -> Captured<R> {
        Captured {
            value,
            stdout: Streams::take(&self.stdout),
            stderr: Streams::take(&self.stderr),
        }
    }

    /// `error` with the task's stderr, if it was captured.
    pub(crate) fn annotate(&self, error: Error) -> Error {
        match &self.stderr {
            Some(stderr) => error.with_stderr(stderr.lock().buf.clone()),
            None => error,
        }
    }
}

/// A captured stdout or stderr of a [`Process`](crate::Process), as a tokio
/// [`AsyncRead`]: the first [`capture_limit`](Task::capture_limit) bytes the
/// task wrote, then end-of-file once the stream ended. Made by
/// [`Process::take_stdout`](crate::Process::take_stdout) and
/// [`Process::take_stderr`](crate::Process::take_stderr).
///
/// The stream is drained as the task writes, whether or not this is read,
/// so the task never waits for a reader.
pub struct OutputReader {
    shared: Arc<Shared>,
    pos: usize,
}

impl std::fmt::Debug for OutputReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutputReader")
            .field("pos", &self.pos)
            .finish_non_exhaustive()
    }
}

impl AsyncRead for OutputReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let shared = Arc::clone(&self.shared);
        let mut state = shared.lock();
        let pos = self.pos.min(state.buf.len());
        if pos < state.buf.len() {
            let n = out.remaining().min(state.buf.len() - pos);
            out.put_slice(&state.buf[pos..pos + n]);
            self.pos = pos + n;
            return Poll::Ready(Ok(()));
        }
        if state.ended {
            return Poll::Ready(Ok(()));
        }
        state.reader = Some(cx.waker().clone());
        Poll::Pending
    }
}

/// Set in a worker whose stderr is captured: its panic hook then prints
/// the panic message there, as Rust's default hook would, so that the
/// task's [`Error::stderr`] has it.
static STDERR_CAPTURED: AtomicBool = AtomicBool::new(false);

/// Called by the worker's panic hook with the message it recorded.
pub(crate) fn print_panic(message: &str) {
    if STDERR_CAPTURED.load(Ordering::Relaxed) {
        let thread = std::thread::current();
        eprintln!(
            "thread '{}' panicked: {message}",
            thread.name().unwrap_or("<unnamed>")
        );
    }
}

/// Why a worker could not set up its task's I/O: the call, its errno, and
/// a message naming what it was applied to.
pub(crate) struct SetupFailure {
    pub(crate) call: &'static str,
    pub(crate) errno: i32,
    pub(crate) message: String,
}

/// The calls a [`SetupFailure`] may name, for the parent to map back.
const SETUP_CALLS: [&str; 6] = ["chdir", "open /dev/null", "dup2", "fstat", "read", "setup"];

impl SetupFailure {
    /// The `Setup` record's payload: `call:errno:message`.
    pub(crate) fn encode(&self) -> String {
        format!("{}:{}:{}", self.call, self.errno, self.message)
    }
}

/// The error for a worker's `Setup` record (the worker's word: any bytes).
pub(crate) fn setup_error(payload: &[u8]) -> Error {
    let text = String::from_utf8_lossy(payload);
    let mut parts = text.splitn(3, ':');
    let call = parts.next().unwrap_or("");
    let call = SETUP_CALLS
        .iter()
        .find(|c| **c == call)
        .copied()
        .unwrap_or("setup");
    let errno = parts
        .next()
        .and_then(|e| e.parse::<i32>().ok())
        .unwrap_or(0);
    let message = parts.next().unwrap_or("");
    let kind = io::Error::from_raw_os_error(errno).kind();
    Error::io(
        call,
        io::Error::new(kind, format!("the task did not run: {message}")),
    )
}

/// A task's I/O as a worker receives it: the plan and its fds.
#[derive(Default)]
pub(crate) struct IoFds {
    plan: IoPlan,
    env: Option<OwnedFd>,
    stdout: Option<OwnedFd>,
    stderr: Option<OwnedFd>,
}

impl IoFds {
    /// Takes the fds `plan` says follow the argument's; `None` if one is
    /// missing.
    pub(crate) fn take(plan: IoPlan, fds: &mut impl Iterator<Item = OwnedFd>) -> Option<IoFds> {
        let mut next = |wanted: bool| {
            if wanted {
                fds.next().map(Some)
            } else {
                Some(None)
            }
        };
        Some(IoFds {
            plan,
            env: next(plan.env)?,
            stdout: next(plan.stdout == Stdio::Pipe)?,
            stderr: next(plan.stderr == Stdio::Pipe)?,
        })
    }

    /// Their numbers, for the worker's `close_fds_except` (-1: none).
    pub(crate) fn raw(&self) -> [RawFd; 3] {
        let raw = |fd: &Option<OwnedFd>| fd.as_ref().map_or(-1, sys::raw);
        [raw(&self.env), raw(&self.stdout), raw(&self.stderr)]
    }

    /// In the worker, single-threaded, before the task's code and its
    /// confinement: the environment, the working directory, then stdout
    /// and stderr. The fds close here.
    pub(crate) fn apply(self) -> std::result::Result<(), SetupFailure> {
        if let Some(fd) = self.env {
            env::apply(fd)?;
        }
        for (stream, mode, fd) in [
            (1, self.plan.stdout, self.stdout),
            (2, self.plan.stderr, self.stderr),
        ] {
            let fd = match (mode, fd) {
                (Stdio::Inherit, _) => continue,
                (Stdio::Pipe, Some(fd)) => fd,
                (Stdio::Pipe, None) => {
                    return Err(SetupFailure {
                        call: "setup",
                        errno: libc::EBADF,
                        message: "no pipe came with the task".into(),
                    });
                }
                (Stdio::Null, _) => rustix::fs::open(
                    "/dev/null",
                    rustix::fs::OFlags::WRONLY | rustix::fs::OFlags::CLOEXEC,
                    rustix::fs::Mode::empty(),
                )
                .map_err(|e| SetupFailure {
                    call: "open /dev/null",
                    errno: e.raw_os_error(),
                    message: format!("cannot open /dev/null: {e}"),
                })?,
            };
            sys::redirect_stdio(fd.as_fd(), stream).map_err(|e| SetupFailure {
                call: "dup2",
                errno: e.errno().unwrap_or(0),
                message: format!("cannot redirect fd {stream}: {}", e.source),
            })?;
        }
        if self.plan.stderr == Stdio::Pipe {
            STDERR_CAPTURED.store(true, Ordering::Relaxed);
        }
        Ok(())
    }
}

impl Builder {
    /// The default [`Task::capture_limit`] of every task of this zygote
    /// (1 MiB).
    pub fn capture_limit(mut self, bytes: usize) -> Builder {
        self.capture_limit = bytes;
        self
    }
}

impl<R: DeserializeOwned> Task<R> {
    /// Where the task's stdout goes (default [`Output::Inherit`]), as
    /// [`Command::stdout`](std::process::Command::stdout).
    ///
    /// With [`Output::Capture`], the first
    /// [`capture_limit`](Task::capture_limit) bytes are kept and the rest is
    /// dropped; the task never blocks on its output, whether or not anyone
    /// reads it. A task with any output setting runs in a worker of its own
    /// in reuse mode ([`Builder::reuse`]).
    pub fn stdout(mut self, output: Output) -> Task<R> {
        self.output.stdout = Some(output);
        self
    }

    /// Where the task's stderr goes (default [`Output::Inherit`]); as
    /// [`stdout`](Task::stdout). With [`Output::Capture`], a failed task's
    /// [`Error::stderr`] has what it wrote, its panic message included.
    pub fn stderr(mut self, output: Output) -> Task<R> {
        self.output.stderr = Some(output);
        self
    }

    /// Bytes kept of each captured stream (default 1 MiB, or
    /// [`Builder::capture_limit`]); the rest is read and dropped.
    pub fn capture_limit(mut self, bytes: usize) -> Task<R> {
        self.output.limit = bytes;
        self
    }

    /// Runs the task to completion and returns its result with what it
    /// wrote to stdout and stderr. Streams not set with
    /// [`stdout`](Task::stdout) or [`stderr`](Task::stderr) are captured;
    /// ones set otherwise come back empty.
    ///
    /// ```no_run
    /// # async fn demo(zygote: run_in_process::Zygote) -> run_in_process::Result<()> {
    /// fn greet(name: String) -> usize { println!("hello, {name}"); name.len() }
    /// let out = zygote.task(greet, "world".to_string()).run_captured().await?;
    /// assert_eq!((out.value, &out.stdout[..]), (5, &b"hello, world\n"[..]));
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// As [`run`](Task::run); the error keeps the task's stderr
    /// ([`Error::stderr`]).
    ///
    /// # Cancel safety
    ///
    /// As [`Zygote::run`](crate::Zygote::run).
    pub async fn run_captured(mut self) -> Result<Captured<R>> {
        for stream in [&mut self.output.stdout, &mut self.output.stderr] {
            stream.get_or_insert(Output::Capture);
        }
        self.run_with_output().await
    }
}
