//! Thin, syscall-named wrappers: the only module that talks to the kernel.
//!
//! Each wrapper is named after the call it makes and returns owned fds. Errors
//! come back as [`SysError`], which remembers which call failed, so the
//! [`Error`](crate::Error) a user sees says `"pidfd_open failed: ..."` rather
//! than a bare errno. rustix supplies safe wrappers for almost everything, and
//! nix the signalfd; the few calls neither covers (`fork`, `_exit`,
//! `close_range`, `fflush`, `sigaction`, `rt_sigprocmask`, and `waitid` with
//! the pid it reports) are the `unsafe` blocks of this file, each proved
//! against SAFETY.md.

use std::io::{self, IoSlice, IoSliceMut, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};

use nix::sys::signal::{SigSet, Signal as NixSignal};
use nix::sys::signalfd::SfdFlags;
pub(crate) use nix::sys::signalfd::SignalFd;
use rustix::event::{EventfdFlags, eventfd as rustix_eventfd};
use rustix::fs::{MemfdFlags, SealFlags};
use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags,
    SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketFlags, SocketType,
};
use rustix::process::{Pid, PidfdFlags, Signal, WaitId, WaitIdOptions};

use crate::error::Error;

/// A failed system call: its name and the OS error.
#[derive(Debug)]
pub(crate) struct SysError {
    pub(crate) call: &'static str,
    pub(crate) source: io::Error,
}

impl SysError {
    pub(crate) fn new(call: &'static str, source: impl Into<io::Error>) -> SysError {
        SysError {
            call,
            source: source.into(),
        }
    }

    pub(crate) fn errno(&self) -> Option<i32> {
        self.source.raw_os_error()
    }

    pub(crate) fn is_would_block(&self) -> bool {
        self.source.kind() == io::ErrorKind::WouldBlock
    }
}

impl From<SysError> for Error {
    fn from(e: SysError) -> Error {
        Error::io(e.call, e.source)
    }
}

pub(crate) type SysResult<T> = Result<T, SysError>;

/// Attaches a call name to a rustix result.
trait Call<T> {
    fn call(self, name: &'static str) -> SysResult<T>;
}

impl<T> Call<T> for rustix::io::Result<T> {
    fn call(self, name: &'static str) -> SysResult<T> {
        self.map_err(|e| SysError::new(name, e))
    }
}

/// What [`fork`] returns in each of the two processes.
pub(crate) enum Forked {
    /// We are the new child process.
    Child,
    /// We are the parent; this is the child's pid.
    Parent(Pid),
}

/// `fork()`—duplicates the calling process; see `fork(2)`.
///
/// Uses libc's `fork`, not a raw `clone`, so that glibc's own fork handlers
/// (malloc arena locks, stdio list lock, thread-id cache) and those registered
/// with `pthread_atfork` by C libraries (OpenSSL's RNG fork detection) run.
///
/// # Safety
///
/// The calling process must have exactly one thread (SAFETY.md F1): in the
/// child, only the calling thread exists, so any lock another thread held at
/// the moment of the fork would stay locked forever.
pub(crate) unsafe fn fork() -> SysResult<Forked> {
    debug_assert_eq!(thread_count().ok(), Some(1));
    // SAFETY: the caller guarantees the process is single-threaded (SAFETY.md
    // F1), which is the only precondition for running arbitrary code in the
    // child of `fork`; `fork` itself has no memory-safety preconditions.
    let pid = unsafe { libc::fork() };
    match pid {
        -1 => Err(SysError::new("fork", io::Error::last_os_error())),
        0 => Ok(Forked::Child),
        pid => Ok(Forked::Parent(
            Pid::from_raw(pid).expect("fork returned a positive pid"),
        )),
    }
}

/// `pthread_atfork(NULL, NULL, child)`: runs `child` in the child of every
/// later `fork` of this process (libc's, which is what `fork` above and
/// the `fork` of most other code call).
///
/// `child` must be async-signal-safe: it runs in a child that may have been
/// forked from a multi-threaded process.
pub(crate) fn atfork_child(child: extern "C" fn()) -> SysResult<()> {
    // SAFETY: SAFETY.md S1. `pthread_atfork` only records the function
    // pointers it is given; `child` is a plain `extern "C" fn` that lives for
    // the whole program, and the caller passes one that is async-signal-safe
    // (`epoch::forked` does one atomic add), as the child of a threaded
    // process requires.
    match unsafe { libc::pthread_atfork(None, None, Some(child)) } {
        0 => Ok(()),
        errno => Err(SysError::new(
            "pthread_atfork",
            io::Error::from_raw_os_error(errno),
        )),
    }
}

/// `_exit(code)`—ends the process at once, without atexit handlers, stdio
/// flushing or destructors; see `_exit(2)`.
///
/// This is the only way a zygote or worker leaves (SAFETY.md F4).
pub(crate) fn exit_now(code: i32) -> ! {
    // SAFETY: `_exit` has no preconditions; it never returns and runs no user
    // code, which is exactly why forked children use it (SAFETY.md F4).
    unsafe { libc::_exit(code) }
}

/// Flushes Rust's stdout and every C stdio stream (`fflush(NULL)`).
///
/// Called before a fork so a child cannot write out the parent's buffered
/// output a second time, and by a worker before `_exit`, which does not flush.
/// Rust's stderr is unbuffered: flushing it would only take its lock, a
/// copy-on-write fault in a fresh worker.
pub(crate) fn flush_stdio() {
    // Flushing can fail if stdout is closed; there is nothing useful to do then.
    let _ = io::stdout().flush();
    // SAFETY: `fflush(NULL)` flushes all open C output streams and takes only
    // libc's own stdio locks, free in a single-threaded process; passing a
    // null pointer is explicitly allowed by fflush(3) (SAFETY.md F5).
    unsafe { libc::fflush(std::ptr::null_mut()) };
}

/// Counts the threads of the calling process once it has settled: while the
/// count is above one, reads it again, with growing sleeps, for up to 100 ms.
///
/// A thread that was just joined can still be counted. The kernel wakes the
/// joiner when it clears the exiting thread's tid (`CLONE_CHILD_CLEARTID`),
/// before it removes the thread from the group; on a busy machine the gap can
/// last a scheduler tick. Such a thread runs no more user code and holds no
/// lock, but nothing signals when it is gone, so this polls. A count of one
/// is final: only the calling thread exists, and only it could start another.
/// A process that really has more threads pays the 100 ms on its way to an
/// error.
pub(crate) fn settled_thread_count() -> SysResult<usize> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(100);
    let mut pause = std::time::Duration::from_micros(50);
    loop {
        let threads = thread_count()?;
        if threads <= 1 || std::time::Instant::now() >= deadline {
            return Ok(threads);
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(std::time::Duration::from_millis(10));
    }
}

/// Counts the threads of the calling process, from `/proc/self/status`.
pub(crate) fn thread_count() -> SysResult<usize> {
    let status = std::fs::read_to_string("/proc/self/status")
        .map_err(|e| SysError::new("read /proc/self/status", e))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|n| n.trim().parse().ok())
        .ok_or_else(|| {
            SysError::new(
                "read /proc/self/status",
                io::Error::new(io::ErrorKind::InvalidData, "no Threads: line"),
            )
        })
}

/// `close_range(first, last, 0)` over every gap between the fds in `keep`:
/// closes every descriptor above 2 except those in `keep`; see `close_range(2)`.
///
/// Falls back to closing the entries of `/proc/self/fd` one by one on kernels
/// older than 5.9.
///
/// # Safety
///
/// Only for a single-threaded child of ours (a zygote or worker that has not
/// yet run any code of a task) that owns every fd it holds (SAFETY.md F3):
/// closing fds owned by live Rust objects elsewhere in the process would
/// break I/O safety, so the caller must not use any object that owned a
/// closed fd afterwards (it never returns to them; it leaves through `_exit`).
pub(crate) unsafe fn close_fds_except(keep: &[RawFd]) {
    // A worker keeps at most seven fds (doorbell, spill socket, argument,
    // job socket, env memfd, stdout and stderr pipes): sort them on the
    // stack. A heap allocation in a fresh worker costs about five
    // copy-on-write faults in the allocator's state and the heap (measured
    // with `perf record -e page-faults -d`), more than the rest of this call;
    // only the zygote, which keeps two fds per mailbox, may need the heap.
    let mut small = [0u32; 8];
    let mut large = Vec::new();
    let wanted = keep.iter().filter(|&&fd| fd > 2).map(|&fd| fd as u32);
    let keep: &mut [u32] = if keep.len() <= small.len() {
        let mut n = 0;
        for fd in wanted {
            small[n] = fd;
            n += 1;
        }
        &mut small[..n]
    } else {
        large.extend(wanted);
        &mut large
    };
    keep.sort_unstable();
    let mut first = 3u32;
    let mut ok = true;
    // By value: `once(&u32::MAX)` would read a constant from `.rodata`, a
    // page a fresh worker has not mapped yet (one more fault per task).
    for k in keep.iter().copied().chain(std::iter::once(u32::MAX)) {
        if k > first {
            // SAFETY: SYS_close_range takes three integers and touches no
            // memory; the caller owns every fd in the range (SAFETY.md F3).
            let r = unsafe { libc::syscall(libc::SYS_close_range, first, k - 1, 0u32) };
            ok &= r == 0;
        }
        first = k.saturating_add(1);
    }
    if !ok {
        // SAFETY: our caller's contract is the same as the callee's (SAFETY.md F3).
        unsafe { close_fds_except_slow(keep) };
    }
}

/// The `/proc/self/fd` fallback of [`close_fds_except`].
///
/// # Safety
///
/// As [`close_fds_except`].
unsafe fn close_fds_except_slow(keep: &[u32]) {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    let fds: Vec<u32> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    for fd in fds {
        if fd > 2 && !keep.contains(&fd) {
            // SAFETY: same argument as in `close_fds_except`, whose caller
            // owns every inherited fd (SAFETY.md F3). Closing the directory's
            // own fd (already dropped above) is harmless: EBADF is ignored.
            unsafe { libc::close(fd as i32) };
        }
    }
}

/// Runs the body of a freshly forked child and never returns into the
/// caller's frames: a panic that escaped `f` would otherwise unwind back into
/// the code that called `fork`, which is the parent's `main`, running it a
/// second time in the child (SAFETY.md F4).
pub(crate) fn contain_child(f: impl FnOnce() -> std::convert::Infallible) -> ! {
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    exit_now(EXIT_CHILD_PANICKED)
}

/// Exit code of a zygote or worker whose own code (not the task) panicked.
pub(crate) const EXIT_CHILD_PANICKED: i32 = 120;

/// Blocks every signal on the calling thread; returns the previous mask for
/// [`restore_signal_mask`].
pub(crate) fn block_all_signals() -> libc::sigset_t {
    let mut all = MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: `sigfillset` initialises the set it is given (sigsetops(3));
    // the pointer is valid for writes (SAFETY.md F5).
    unsafe { libc::sigfillset(all.as_mut_ptr()) };
    // SAFETY: initialised by `sigfillset` just above (SAFETY.md F5).
    let all = unsafe { all.assume_init() };
    let mut old = MaybeUninit::<libc::sigset_t>::zeroed();
    // SAFETY: both pointers are valid sigsets (`old` is zeroed, so fully
    // initialised whatever the call writes); changing our own mask breaks no
    // Rust invariant (pthread_sigmask(3), SAFETY.md F5).
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &all, old.as_mut_ptr()) };
    // SAFETY: zero-initialised above, and filled by `pthread_sigmask`.
    unsafe { old.assume_init() }
}

/// Restores a mask saved by [`block_all_signals`].
pub(crate) fn restore_signal_mask(mask: libc::sigset_t) {
    // SAFETY: `mask` is a valid sigset and the old-set pointer may be null
    // (pthread_sigmask(3), SAFETY.md F5).
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &mask, std::ptr::null_mut()) };
}

/// Restores the signal state an `exec` would give: every signal unblocked and
/// every *caught* signal back to its default action. Ignored signals stay
/// ignored (as across `execve(2)`), which keeps Rust's `SIGPIPE = SIG_IGN`,
/// except `SIGCHLD`: ignoring it makes the kernel reap children on its own,
/// which would break `waitid` and the race-freedom of `pidfd_open`
/// (SAFETY.md P2), so it always goes back to its default.
///
/// Called once, first thing in the zygote; workers inherit the result.
///
/// A handler inherited from the parent would run the parent's code, written for
/// the parent's threads and fds, inside a worker; resetting it is the
/// post-fork hygiene Android's zygote and CPython's forkserver also do.
pub(crate) fn reset_signals() {
    for sig in 1..=libc::SIGRTMAX() {
        // SIGKILL and SIGSTOP cannot be caught; the numbers between the
        // classic signals and SIGRTMIN() are glibc's own (thread cancellation,
        // setxid broadcast), whose handlers must stay.
        let reserved = (32..libc::SIGRTMIN()).contains(&sig);
        // SIGSEGV and SIGBUS carry Rust's stack-overflow reporter, which a
        // fresh Rust program would install again at start-up.
        let rust_runtime = sig == libc::SIGSEGV || sig == libc::SIGBUS;
        if sig == libc::SIGKILL || sig == libc::SIGSTOP || reserved || rust_runtime {
            continue;
        }
        let mut old = MaybeUninit::<libc::sigaction>::zeroed();
        // SAFETY: querying (null new action) writes only into `old`, a valid,
        // zero-initialised `sigaction` (sigaction(2), SAFETY.md F5).
        let r = unsafe { libc::sigaction(sig, std::ptr::null(), old.as_mut_ptr()) };
        if r != 0 {
            continue;
        }
        // SAFETY: `sigaction` returned 0, so it filled `old` (and `zeroed` made
        // every byte initialised regardless) (SAFETY.md F5).
        let old = unsafe { old.assume_init() };
        let caught = old.sa_sigaction != libc::SIG_DFL && old.sa_sigaction != libc::SIG_IGN;
        if caught || sig == libc::SIGCHLD {
            // SAFETY: installing SIG_DFL runs no code of ours, so there is no
            // handler whose async-signal-safety we would have to prove; this
            // process is single-threaded (SAFETY.md F1, F5).
            unsafe { libc::signal(sig, libc::SIG_DFL) };
        }
    }
    // Every signal was blocked across the fork; unblock them all now that no
    // inherited handler is left to run.
    let mut empty = MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: `sigemptyset` initialises the set it is given; see
    // sigsetops(3) and SAFETY.md F5.
    unsafe { libc::sigemptyset(empty.as_mut_ptr()) };
    // SAFETY: initialised by `sigemptyset` just above (SAFETY.md F5).
    let empty = unsafe { empty.assume_init() };
    restore_signal_mask(empty);
}

/// `eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)`; see `eventfd(2)`.
pub(crate) fn eventfd() -> SysResult<OwnedFd> {
    rustix_eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK).call("eventfd")
}

/// Adds `value` to an eventfd counter (`write(fd, &value, 8)`); see `eventfd(2)`.
pub(crate) fn eventfd_add(fd: BorrowedFd<'_>, value: u64) -> SysResult<()> {
    rustix::io::write(fd, &value.to_ne_bytes())
        .map(drop)
        .call("write(eventfd)")
}

/// Reads and resets an eventfd counter; `Ok(0)` when it was zero.
pub(crate) fn eventfd_drain(fd: BorrowedFd<'_>) -> SysResult<u64> {
    let mut buf = [0u8; 8];
    match rustix::io::read(fd, &mut buf) {
        Ok(_) => Ok(u64::from_ne_bytes(buf)),
        Err(rustix::io::Errno::AGAIN) => Ok(0),
        Err(e) => Err(SysError::new("read(eventfd)", e)),
    }
}

/// `socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC | SOCK_NONBLOCK)`.
///
/// SEQPACKET keeps message boundaries (one frame per `sendmsg`) and reports
/// the peer's last close as a zero-length read, which is how every side of this
/// crate learns that another has died.
pub(crate) fn seqpacket_pair() -> SysResult<(OwnedFd, OwnedFd)> {
    rustix::net::socketpair(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
        None,
    )
    .call("socketpair")
}

/// Most fds that one frame carries (a spawn request: socket, eventfd,
/// argument, env memfd, stdout and stderr pipes, trace buffer).
pub(crate) const MAX_FRAME_FDS: usize = 7;

/// `sendmsg(sock, frame, SCM_RIGHTS(fds), MSG_NOSIGNAL | MSG_DONTWAIT)`.
///
/// One call sends one whole frame or nothing. `MSG_NOSIGNAL` turns a dead peer
/// into `EPIPE` instead of a process-killing `SIGPIPE`.
pub(crate) fn send_frame(
    sock: BorrowedFd<'_>,
    frame: &[u8],
    fds: &[BorrowedFd<'_>],
) -> SysResult<()> {
    debug_assert!(fds.len() <= MAX_FRAME_FDS);
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FRAME_FDS))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() {
        let pushed = control.push(SendAncillaryMessage::ScmRights(fds));
        debug_assert!(pushed);
    }
    let sent = rustix::net::sendmsg(
        sock,
        &[IoSlice::new(frame)],
        &mut control,
        SendFlags::NOSIGNAL | SendFlags::DONTWAIT,
    )
    .call("sendmsg")?;
    if sent != frame.len() {
        return Err(SysError::new(
            "sendmsg",
            io::Error::new(io::ErrorKind::WriteZero, "short send on a SEQPACKET socket"),
        ));
    }
    Ok(())
}

/// One frame received by [`recv_frame`].
pub(crate) struct Received {
    /// Bytes written into the caller's buffer.
    pub(crate) len: usize,
    /// The frame was longer than the buffer, or carried more fds than allowed.
    pub(crate) truncated: bool,
    /// Descriptors that came with the frame, already `CLOEXEC`.
    pub(crate) fds: Fds,
}

/// The descriptors of one received frame, held without a heap allocation:
/// the zygote and parked workers receive one such frame per task, and in a
/// freshly forked process an allocation costs copy-on-write faults.
#[derive(Default)]
pub(crate) struct Fds([Option<OwnedFd>; MAX_FRAME_FDS]);

impl Fds {
    /// Adds `fd`, or gives it back if the frame already has
    /// [`MAX_FRAME_FDS`].
    fn push(&mut self, fd: OwnedFd) -> Result<(), OwnedFd> {
        match self.0.iter_mut().find(|slot| slot.is_none()) {
            Some(slot) => {
                *slot = Some(fd);
                Ok(())
            }
            None => Err(fd),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.0.iter().flatten().count()
    }
}

impl IntoIterator for Fds {
    type Item = OwnedFd;
    type IntoIter = std::iter::Flatten<std::array::IntoIter<Option<OwnedFd>, MAX_FRAME_FDS>>;

    /// The fds in the order they were sent.
    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter().flatten()
    }
}

/// `recvmsg(sock, buf, MSG_CMSG_CLOEXEC | MSG_DONTWAIT)`: one frame and its fds.
///
/// Returns `Ok(None)` at end of stream (every holder of the peer end closed it).
/// Received fds are `CLOEXEC` from the first instant, so no concurrent fork or
/// exec in another thread can leak them.
pub(crate) fn recv_frame(sock: BorrowedFd<'_>, buf: &mut [u8]) -> SysResult<Option<Received>> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FRAME_FDS))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let msg = rustix::net::recvmsg(
        sock,
        &mut [IoSliceMut::new(buf)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC | RecvFlags::DONTWAIT,
    )
    .call("recvmsg")?;
    let mut fds = Fds::default();
    // The control buffer's padding can fit one fd more than a frame may
    // carry; such an fd is closed here and the frame counts as truncated.
    let mut too_many = false;
    for m in control.drain() {
        if let RecvAncillaryMessage::ScmRights(rights) = m {
            for fd in rights {
                too_many |= fds.push(fd).is_err();
            }
        }
    }
    if msg.bytes == 0 && fds.len() == 0 {
        return Ok(None);
    }
    let truncated = too_many
        || msg
            .flags
            .intersects(ReturnFlags::TRUNC | ReturnFlags::CTRUNC);
    Ok(Some(Received {
        len: msg.bytes.min(buf.len()),
        truncated,
        fds,
    }))
}

/// `poll([fd, POLLIN], timeout)`: blocks until `fd` is readable (or hung up)
/// or `timeout` passes; returns whether it is readable. `None` waits forever.
/// See `poll(2)`. For code without an event loop: the zygote's children, and
/// clean-up that runs outside any runtime.
pub(crate) fn poll_readable(
    fd: BorrowedFd<'_>,
    timeout: Option<std::time::Duration>,
) -> SysResult<bool> {
    let timeout = timeout.map(|t| rustix::time::Timespec {
        tv_sec: t.as_secs() as i64,
        tv_nsec: t.subsec_nanos().into(),
    });
    let mut fds = [rustix::event::PollFd::new(
        &fd,
        rustix::event::PollFlags::IN,
    )];
    loop {
        match rustix::event::poll(&mut fds, timeout.as_ref()) {
            Ok(n) => return Ok(n > 0),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(SysError::new("poll", e)),
        }
    }
}

/// How a [`futex_wait`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(loom, allow(dead_code))] // reason: no futex under loom (`job_cell`)
pub(crate) enum Woken {
    /// Woken, or the word no longer held the expected value (`EAGAIN`), or
    /// a signal interrupted the wait: look at the word again.
    Look,
    /// `timeout` passed with the word unchanged.
    TimedOut,
}

/// `futex(word, FUTEX_WAIT, expected, timeout)`, shared (not
/// `FUTEX_PRIVATE_FLAG`): the word lies in a mapping another process
/// writes (`crate::job_cell`). Sleeps while `word` holds `expected`, for
/// at most `timeout` (`None`: for ever). The kernel checks the value and
/// queues the waiter atomically, so a wake that follows a store of another
/// value is never missed. The word may be in a read-only mapping: the call
/// only reads it. See `futex(2)`.
#[cfg(not(loom))]
pub(crate) fn futex_wait(
    word: &std::sync::atomic::AtomicU32,
    expected: u32,
    timeout: Option<std::time::Duration>,
) -> SysResult<Woken> {
    use rustix::thread::futex;
    let timeout = timeout.map(|t| futex::Timespec {
        tv_sec: t.as_secs() as i64,
        tv_nsec: t.subsec_nanos().into(),
    });
    match futex::wait(word, futex::Flags::empty(), expected, timeout.as_ref()) {
        Ok(()) | Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INTR) => Ok(Woken::Look),
        Err(rustix::io::Errno::TIMEDOUT) => Ok(Woken::TimedOut),
        Err(e) => Err(SysError::new("futex", e)),
    }
}

/// `futex(word, FUTEX_WAKE, 1)`, shared: wakes the one process that may be
/// waiting on `word` in [`futex_wait`].
#[cfg(not(loom))]
pub(crate) fn futex_wake(word: &std::sync::atomic::AtomicU32) -> SysResult<()> {
    use rustix::thread::futex;
    futex::wake(word, futex::Flags::empty(), 1)
        .map(drop)
        .call("futex")
}

/// `pipe2(O_CLOEXEC)`, then `O_NONBLOCK` on the read end only; see
/// `pipe(2)`. Returns `(read, write)`. The write end stays blocking: it
/// becomes a worker's stdout or stderr, where `EAGAIN` would fail a print.
pub(crate) fn pipe_nonblocking_reader() -> SysResult<(OwnedFd, OwnedFd)> {
    let (read, write) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).call("pipe2")?;
    rustix::io::ioctl_fionbio(&read, true).call("ioctl(FIONBIO)")?;
    Ok((read, write))
}

/// `dup2(fd, 1)` or `dup2(fd, 2)` (`stream` 1 or 2); see `dup2(2)`. The new
/// fd 1 or 2 is not `CLOEXEC`, as stdio must not be.
pub(crate) fn redirect_stdio(fd: BorrowedFd<'_>, stream: i32) -> SysResult<()> {
    match stream {
        1 => rustix::stdio::dup2_stdout(fd).call("dup2"),
        _ => rustix::stdio::dup2_stderr(fd).call("dup2"),
    }
}

/// `memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING)`; see `memfd_create(2)`.
pub(crate) fn memfd_create(name: &str) -> SysResult<OwnedFd> {
    rustix::fs::memfd_create(name, MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)
        .call("memfd_create")
}

/// `ftruncate(fd, len)`; see `ftruncate(2)`.
pub(crate) fn ftruncate(fd: BorrowedFd<'_>, len: u64) -> SysResult<()> {
    rustix::fs::ftruncate(fd, len).call("ftruncate")
}

/// `fcntl(fd, F_ADD_SEALS, seals)`; see `memfd_create(2)`, "File sealing".
pub(crate) fn add_seals(fd: BorrowedFd<'_>, seals: SealFlags) -> SysResult<()> {
    rustix::fs::fcntl_add_seals(fd, seals).call("fcntl(F_ADD_SEALS)")
}

/// `fcntl(fd, F_GET_SEALS)`.
pub(crate) fn get_seals(fd: BorrowedFd<'_>) -> SysResult<SealFlags> {
    rustix::fs::fcntl_get_seals(fd).call("fcntl(F_GET_SEALS)")
}

/// `pidfd_open(pid, 0)`; see `pidfd_open(2)`.
///
/// Race-free only on an unreaped child of the caller: nobody else can reap it,
/// so the pid cannot have been recycled (SAFETY.md P2).
pub(crate) fn pidfd_open(pid: Pid) -> SysResult<OwnedFd> {
    rustix::process::pidfd_open(pid, PidfdFlags::empty()).call("pidfd_open")
}

/// [`pidfd_open`] on a child forked a moment ago, for a caller that cannot
/// go on without the pidfd (the parent's view of its zygote, a worker whose
/// pidfd the parent asked for); if that fails, kills and reaps the child at
/// once, so that nothing is left running that nobody will use.
pub(crate) fn pidfd_open_child(pid: Pid) -> SysResult<OwnedFd> {
    pidfd_open(pid).inspect_err(|_| {
        let _ = kill_child(pid);
        let _ = reap(pid);
    })
}

/// Converts a user-supplied signal number into rustix's [`Signal`].
///
/// Named signals and the real-time range libc reports as free for applications
/// are accepted; libc's reserved signals and out-of-range numbers are not.
pub(crate) fn signal_from_raw(sig: i32) -> Option<Signal> {
    if let Some(s) = Signal::from_named_raw(sig) {
        return Some(s);
    }
    if (libc::SIGRTMIN()..=libc::SIGRTMAX()).contains(&sig) {
        // SAFETY: `from_raw_unchecked` requires a valid signal number that
        // libc does not reserve; `SIGRTMIN()..=SIGRTMAX()` is by definition the
        // range libc leaves to applications (signal(7), SAFETY.md F5).
        return Some(unsafe { Signal::from_raw_unchecked(sig) });
    }
    None
}

/// `pidfd_send_signal(pidfd, sig, NULL, 0)`; see `pidfd_send_signal(2)`.
///
/// Unlike `kill(pid)`, this cannot hit an unrelated process that reused the pid.
pub(crate) fn pidfd_send_signal(pidfd: BorrowedFd<'_>, sig: Signal) -> SysResult<()> {
    rustix::process::pidfd_send_signal(pidfd, sig).call("pidfd_send_signal")
}

/// `kill(pid, SIGKILL)` for a child of the caller that it has not reaped:
/// until then the pid cannot name another process; see `kill(2)`.
pub(crate) fn kill_child(pid: Pid) -> SysResult<()> {
    rustix::process::kill_process(pid, Signal::KILL).call("kill")
}

/// `kill(-pgid, SIGKILL)`: kills a whole process group; see `kill(2)`.
pub(crate) fn kill_process_group(pgid: Pid) -> SysResult<()> {
    rustix::process::kill_process_group(pgid, Signal::KILL).call("kill(-pgid)")
}

/// A reaped process's raw wait status, as `waitpid(2)` encodes it, so that
/// [`std::process::ExitStatus`] can be built from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct WaitStatus(pub(crate) i32);

impl WaitStatus {
    pub(crate) fn exited(code: i32) -> WaitStatus {
        WaitStatus((code & 0xff) << 8)
    }

    pub(crate) fn signaled(sig: i32, core_dumped: bool) -> WaitStatus {
        WaitStatus((sig & 0x7f) | if core_dumped { 0x80 } else { 0 })
    }

    pub(crate) fn code(self) -> Option<i32> {
        (self.0 & 0x7f == 0).then_some((self.0 >> 8) & 0xff)
    }

    pub(crate) fn signal(self) -> Option<i32> {
        let sig = self.0 & 0x7f;
        (sig != 0).then_some(sig)
    }
}

/// `waitid(P_PIDFD, pidfd, WEXITED)`: waits for a child to exit and reaps
/// it; see `waitid(2)`.
pub(crate) fn waitid_pidfd(pidfd: BorrowedFd<'_>) -> SysResult<WaitStatus> {
    wait_exited(WaitId::PidFd(pidfd), "waitid(P_PIDFD)")
}

/// Blocks `SIGCHLD` on the calling thread and returns a non-blocking
/// signalfd that is readable while one is pending; see `signalfd(2)`.
///
/// For the zygote, which learns of its workers' exits this way instead of
/// through a pidfd per worker (opening, watching and closing one cost it
/// about 10 µs per task). Workers inherit the blocked mask and unblock it
/// first thing ([`unblock_sigchld`]).
pub(crate) fn sigchld_fd() -> SysResult<SignalFd> {
    let set = sigchld_set();
    set.thread_block()
        .map_err(|e| SysError::new("pthread_sigmask", e))?;
    SignalFd::with_flags(&set, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
        .map_err(|e| SysError::new("signalfd", e))
}

/// Reads every pending signal from `fd`, so that it is not readable again
/// until the next one.
pub(crate) fn drain_signalfd(fd: &SignalFd) {
    while let Ok(Some(_)) = fd.read_signal() {}
}

/// Unblocks `SIGCHLD`, which a worker inherits blocked from the zygote
/// ([`sigchld_fd`]): its task may wait for children of its own.
///
/// `rt_sigprocmask(2)` straight through `syscall(2)`, whose page of libc
/// a worker has already mapped for `close_range`: `sigemptyset`,
/// `sigaddset` and `pthread_sigmask` would each be a page of code more to
/// fault in, about 4 µs each per task here. The kernel's signal set is one
/// 64-bit word, bit `n - 1` for signal `n`, on every 64-bit Linux but MIPS.
#[cfg(all(target_pointer_width = "64", not(target_arch = "mips64")))]
pub(crate) fn unblock_sigchld() -> SysResult<()> {
    let set: u64 = 1 << (libc::SIGCHLD - 1);
    // SAFETY: rt_sigprocmask reads `size_of_val(&set)` bytes at the first
    // pointer, which is that many readable bytes, and writes nothing (the
    // old-set pointer is null); changing our own mask breaks no Rust
    // invariant (rt_sigprocmask(2), SAFETY.md F5).
    let r = unsafe {
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_UNBLOCK,
            &set as *const u64,
            std::ptr::null_mut::<u64>(),
            std::mem::size_of_val(&set),
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(SysError::new("rt_sigprocmask", io::Error::last_os_error()))
    }
}

/// Unblocks `SIGCHLD`; see the 64-bit version.
#[cfg(not(all(target_pointer_width = "64", not(target_arch = "mips64"))))]
pub(crate) fn unblock_sigchld() -> SysResult<()> {
    sigchld_set()
        .thread_unblock()
        .map_err(|e| SysError::new("pthread_sigmask", e))
}

/// The signal set of `SIGCHLD` alone.
fn sigchld_set() -> SigSet {
    let mut set = SigSet::empty();
    set.add(NixSignal::SIGCHLD);
    set
}

/// `waitid(P_ALL, 0, WEXITED | WNOHANG | WNOWAIT)`: the pid of a child that
/// has exited and is not reaped yet, which it leaves a zombie (so that its
/// pid, and the process group named after it, cannot be reused before the
/// caller reaps it); `None` if no child has exited.
pub(crate) fn exited_child() -> SysResult<Option<Pid>> {
    let mut info = MaybeUninit::<libc::siginfo_t>::zeroed();
    loop {
        // SAFETY: `info` points to a writable `siginfo_t`, the one pointer
        // `waitid` takes; peeking at our own children changes no Rust state
        // (waitid(2), SAFETY.md P1).
        let r = unsafe {
            libc::waitid(
                libc::P_ALL,
                0,
                info.as_mut_ptr(),
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            )
        };
        if r == 0 {
            break;
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::ECHILD) => return Ok(None),
            _ => return Err(SysError::new("waitid(P_ALL)", e)),
        }
    }
    // SAFETY: zeroed before the call, so every byte is initialised whether
    // or not `waitid` wrote the struct (SAFETY.md P1).
    let info = unsafe { info.assume_init() };
    // SAFETY: `si_pid` reads the pid of a `SIGCHLD`-style record, which is
    // what `waitid` fills in; with `WNOHANG` and no exited child it leaves
    // the zeroed record, whose pid is 0 (waitid(2), SAFETY.md P1).
    let pid = unsafe { info.si_pid() };
    Ok(Pid::from_raw(pid))
}

/// `waitid(P_PID, pid, WEXITED)`: reaps the child `pid`, which the caller
/// knows has exited; see `waitid(2)`.
pub(crate) fn reap(pid: Pid) -> SysResult<WaitStatus> {
    wait_exited(WaitId::Pid(pid), "waitid(P_PID)")
}

/// `waitid(id, WEXITED)`, retried on `EINTR`.
fn wait_exited(id: WaitId<'_>, call: &'static str) -> SysResult<WaitStatus> {
    loop {
        match rustix::process::waitid(id.clone(), WaitIdOptions::EXITED) {
            Ok(Some(st)) => return Ok(wait_status(&st)),
            // Without WNOHANG, waitid returns only with a status.
            Ok(None) => return Err(SysError::new(call, io::Error::other("no status"))),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(SysError::new(call, e)),
        }
    }
}

/// The raw wait status of an exited child's `waitid` record.
fn wait_status(st: &rustix::process::WaitIdStatus) -> WaitStatus {
    match (st.exit_status(), st.terminating_signal()) {
        (Some(code), _) => WaitStatus::exited(code),
        (None, Some(sig)) => WaitStatus::signaled(sig, st.dumped()),
        // With only WEXITED requested nothing else can be reported.
        (None, None) => WaitStatus::exited(-1),
    }
}

/// `prctl(PR_SET_PDEATHSIG, SIGKILL)`, then checks that the parent is still
/// `parent`: a parent that died between `fork` and the `prctl` would never
/// deliver the signal, so the caller must exit at once if this returns false.
pub(crate) fn die_with_parent(parent: Pid) -> bool {
    if rustix::process::set_parent_process_death_signal(Some(Signal::KILL)).is_err() {
        return false;
    }
    rustix::process::getppid() == Some(parent)
}

/// `setpgid(0, 0)`: makes the caller the leader of a new process group, so
/// terminal signals (Ctrl-C) aimed at the parent's group miss it and its whole
/// group can be killed at once.
pub(crate) fn setpgid_self() -> SysResult<()> {
    rustix::process::setpgid(None, None).call("setpgid")
}

/// `getpid()`.
pub(crate) fn getpid() -> Pid {
    rustix::process::getpid()
}

/// `getpid()`, cached in a page that every fork of this process, however it
/// is made (`fork`, a raw `clone` that runs no `pthread_atfork` handler),
/// finds zero-filled (`MADV_WIPEONFORK`, Linux 4.14; SAFETY.md F6). So it
/// never answers with the pid of the process a fork was copied from, and
/// after its first call in a process it makes no system call: a task's
/// `Inner::check_process` calls it twice. A `CLONE_VM` child shares the page
/// with its parent, as it shares all of its memory, and gets its answer.
/// Where the page cannot be made, every call is a `getpid()`.
pub(crate) fn getpid_cached() -> Pid {
    static PAGE: std::sync::OnceLock<Option<PidPage>> = std::sync::OnceLock::new();
    let Some(page) = PAGE.get_or_init(PidPage::new) else {
        return getpid();
    };
    let word = page.word();
    if let Some(pid) = Pid::from_raw(word.load(std::sync::atomic::Ordering::Relaxed)) {
        return pid;
    }
    // First call here: this is the process that made the page, or a fork
    // of it, whose copy of the page the kernel zero-filled.
    let pid = getpid();
    word.store(
        pid.as_raw_nonzero().get(),
        std::sync::atomic::Ordering::Relaxed,
    );
    pid
}

/// The page of [`getpid_cached`]: one private anonymous page, never unmapped.
struct PidPage(memmap2::MmapRaw);

impl PidPage {
    fn new() -> Option<PidPage> {
        let map =
            memmap2::MmapRaw::from(memmap2::MmapMut::map_anon(rustix::param::page_size()).ok()?);
        // SAFETY: SAFETY.md F6. The range is exactly this new private
        // mapping, which nothing else references. `MADV_WIPEONFORK` changes
        // nothing in this process: it only has the kernel give every child a
        // zero-filled copy of these pages.
        unsafe {
            rustix::mm::madvise(
                map.as_mut_ptr().cast(),
                map.len(),
                rustix::mm::Advice::LinuxWipeOnFork,
            )
        }
        .ok()?;
        Some(PidPage(map))
    }

    fn word(&self) -> &std::sync::atomic::AtomicI32 {
        // SAFETY: SAFETY.md F6. The pointer is the start of a live,
        // writable, page-aligned (so AtomicI32-aligned) mapping owned by
        // `self`, which lives in a static and is never dropped, so it is
        // valid for the returned lifetime. The page is only ever accessed
        // through this `AtomicI32`, so there are no non-atomic accesses to
        // race with; every bit pattern is a valid i32, including the zeros
        // a fork finds.
        unsafe { std::sync::atomic::AtomicI32::from_ptr(self.0.as_mut_ptr().cast()) }
    }
}

/// 64 random bits from `getrandom(2)`.
pub(crate) fn random_u64() -> SysResult<u64> {
    let mut buf = [0u8; 8];
    let mut filled = 0;
    while filled < buf.len() {
        filled +=
            rustix::rand::getrandom(&mut buf[filled..], rustix::rand::GetRandomFlags::empty())
                .call("getrandom")?;
    }
    Ok(u64::from_ne_bytes(buf))
}

/// Raw fd number of an owned or borrowed fd, for wire frames and `close_range`.
pub(crate) fn raw(fd: impl AsFd) -> RawFd {
    fd.as_fd().as_raw_fd()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame with more fds than [`MAX_FRAME_FDS`] counts as truncated, and
    /// keeps the first ones in the order they were sent.
    #[test]
    fn a_frame_with_too_many_fds_is_truncated() {
        let (a, b) = seqpacket_pair().unwrap();
        // memfds: each has an inode of its own, so the order can be checked.
        let sent: Vec<OwnedFd> = (0..=MAX_FRAME_FDS)
            .map(|_| memfd_create("test").unwrap())
            .collect();
        let borrowed: Vec<BorrowedFd<'_>> = sent.iter().map(|fd| fd.as_fd()).collect();
        // Room for one fd more than `send_frame` allows.
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FRAME_FDS + 1))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        assert!(control.push(SendAncillaryMessage::ScmRights(&borrowed)));
        rustix::net::sendmsg(&a, &[IoSlice::new(b"x")], &mut control, SendFlags::empty()).unwrap();

        let mut buf = [0u8; 8];
        let frame = recv_frame(b.as_fd(), &mut buf).unwrap().unwrap();
        assert!(frame.truncated);
        assert_eq!(frame.fds.len(), MAX_FRAME_FDS);
        let inode = |fd: BorrowedFd<'_>| rustix::fs::fstat(fd).unwrap().st_ino;
        let received: Vec<u64> = frame.fds.into_iter().map(|fd| inode(fd.as_fd())).collect();
        let expected: Vec<u64> = borrowed[..MAX_FRAME_FDS]
            .iter()
            .map(|&fd| inode(fd))
            .collect();
        assert_eq!(received, expected);
    }

    #[test]
    fn a_frame_within_the_limit_is_whole() {
        let (a, b) = seqpacket_pair().unwrap();
        let fd = eventfd().unwrap();
        send_frame(a.as_fd(), b"hello", &[fd.as_fd()]).unwrap();
        let mut buf = [0u8; 8];
        let frame = recv_frame(b.as_fd(), &mut buf).unwrap().unwrap();
        assert!(!frame.truncated);
        assert_eq!((&buf[..frame.len], frame.fds.len()), (&b"hello"[..], 1));
    }
}
