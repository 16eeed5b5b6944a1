//! The template: a small process, forked from the parent while it is still
//! single-threaded, that forks a fresh zygote in place of one that died
//! ([`Builder::respawn`](crate::Builder::respawn)).
//!
//! By the time a zygote dies the parent has threads, and may never fork into
//! Rust code again (SAFETY.md F1). The template is a copy of the parent as it
//! was at start-up, like the zygotes, but it never serves tasks, never runs
//! user code (a zygote it forks runs the warm-up hook, not the template) and
//! never starts a thread, so it can fork a zygote at any time.
//!
//! # Protocol
//!
//! One `SEQPACKET` control socket, frames of [`FRAME`] bytes: a tag and two
//! little-endian `u32`s.
//!
//! * parent → template: `Start(index, n)`, then the `n` fds a new zygote of
//!   member `index` is started with ([`ZygoteEnds`]), at most
//!   [`sys::MAX_FRAME_FDS`] per frame: on `Start` and on the `More` frames
//!   that follow it. The parent sends the next request only after the reply.
//! * template → parent: `Spawned(pid)` with the zygote's pidfd (opened by the
//!   template, its parent, before it can reap it: race-free), or
//!   `Failed(errno)`; and `Exited(pid, status)` whenever it reaps a zygote,
//!   which the parent reads only to tell why a warm-up failed.
//! * end of stream from the parent (its last handle dropped, or it died):
//!   the template kills and reaps its zygotes and exits.
//!
//! The template dies with the parent (`PR_SET_PDEATHSIG`), and each zygote
//! it forks dies with the template, as the parent's own zygotes die with the
//! parent; such a zygote also exits on end of stream from its command
//! socket, whose other end only the parent holds.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags};
use rustix::process::{Pid, Signal};

use crate::epoch::ForkLocal;
use crate::error::{Error, ErrorKind, Result};
use crate::shared::Inner;
use crate::sys::{self, Forked};
use crate::zygote::{self, Limits, ZygoteEnds, ZygoteProcess};

/// A zygote group's side of respawn: the template, and per member a lock
/// (one respawn at a time) and whether its last respawn failed.
pub(crate) struct Respawn {
    template: Arc<Template>,
    members: Vec<(Mutex<()>, AtomicBool)>,
}

impl Respawn {
    pub(crate) fn new(template: Arc<Template>, members: usize) -> Respawn {
        Respawn {
            template,
            members: (0..members)
                .map(|_| (Mutex::new(()), AtomicBool::new(false)))
                .collect(),
        }
    }

    /// Should the next task go to member `index`, `inner`, and respawn it?
    /// Yes if it is dead and its last respawn did not fail.
    pub(crate) fn wants(&self, index: usize, inner: &Inner) -> bool {
        !self.members[index].1.load(Ordering::Relaxed) && noticed_dead(inner)
    }

    /// Replaces member `index`, `old`, which lives in `slot`, by a new
    /// zygote from the template; or returns the zygote that another call
    /// replaced it with meanwhile. Blocks.
    pub(crate) fn respawn(
        &self,
        index: usize,
        slot: &RwLock<Arc<Inner>>,
        old: &Arc<Inner>,
    ) -> Result<Arc<Inner>> {
        let (lock, failed) = &self.members[index];
        let _one = lock.lock().unwrap_or_else(|p| p.into_inner());
        let current = Arc::clone(&slot.read().unwrap_or_else(|p| p.into_inner()));
        if !Arc::ptr_eq(&current, old) {
            return Ok(current);
        }
        match self.template.respawn(index, old.limits) {
            Ok(mut process) => {
                process.template = Some(Arc::clone(&self.template));
                let mut new = Inner::new(process, old.limits, old.confinement);
                new.capture_limit = old.capture_limit;
                // The old zygote's tasks still in flight count there too.
                new.counters = Arc::clone(&old.counters);
                let new = Arc::new(new);
                *slot.write().unwrap_or_else(|p| p.into_inner()) = Arc::clone(&new);
                failed.store(false, Ordering::Relaxed);
                Ok(new)
            }
            Err(e) => {
                failed.store(true, Ordering::Relaxed);
                Err(e)
            }
        }
    }
}

/// Is this zygote known to be dead, or has it exited? One `poll` of its
/// pidfd, which is readable once it has (our child or the template's).
fn noticed_dead(inner: &Inner) -> bool {
    if inner.is_dead() {
        return true;
    }
    if inner.check_process().is_err() {
        return false;
    }
    let exited = matches!(
        sys::poll_readable(inner.process.pidfd.as_fd(), Some(Duration::ZERO)),
        Ok(true)
    );
    if exited {
        inner.mark_dead();
    }
    exited
}

/// Bytes in every frame: a tag and two `u32`s.
const FRAME: usize = 9;

const START: u8 = 1;
const MORE: u8 = 2;
const SPAWNED: u8 = 3;
const FAILED: u8 = 4;
const EXITED: u8 = 5;

/// How long the parent waits for the template's reply, which comes right
/// after a fork: only a stopped or stuck template takes this long.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

fn frame(tag: u8, a: u32, b: u32) -> [u8; FRAME] {
    let mut f = [0u8; FRAME];
    f[0] = tag;
    f[1..5].copy_from_slice(&a.to_le_bytes());
    f[5..9].copy_from_slice(&b.to_le_bytes());
    f
}

/// A frame's tag and numbers; `None` unless it is exactly [`FRAME`] bytes.
fn parse(bytes: &[u8]) -> Option<(u8, u32, u32)> {
    let bytes: &[u8; FRAME] = bytes.try_into().ok()?;
    let word = |i: usize| u32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
    Some((bytes[0], word(1), word(5)))
}

/// The parent's handle on the template process.
pub(crate) struct Template {
    pid: Pid,
    /// Our child: reaped through this in `Drop`.
    pidfd: ForkLocal<OwnedFd>,
    /// Our end of the control socket; one request at a time.
    control: Mutex<ForkLocal<OwnedFd>>,
    /// The process that forked the template.
    owner: Pid,
}

/// Forks the template, which can later fork a zygote of each member's
/// `limits`. Must be called while the process has one thread.
pub(crate) fn spawn(limits: Vec<Limits>) -> Result<Template> {
    zygote::check_single_threaded()?;
    let (control, theirs) = sys::seqpacket_pair()?;
    let parent = sys::getpid();
    sys::flush_stdio();
    // As for a zygote: no handler of the parent's may run in the child.
    let blocked = sys::block_all_signals();
    // SAFETY: SAFETY.md F1. `check_single_threaded` counted one thread, and
    // the calls since are plain syscalls on this thread.
    let forked = unsafe { sys::fork() };
    if let Ok(Forked::Child) = forked {
        sys::contain_child(|| serve(theirs.as_fd(), parent, &limits))
    }
    sys::restore_signal_mask(blocked);
    match forked? {
        Forked::Child => unreachable!("the child never returns from contain_child"),
        Forked::Parent(pid) => {
            drop(theirs);
            // Race-free: the template is our unreaped child (SAFETY.md P2).
            let pidfd = sys::pidfd_open_child(pid)?;
            Ok(Template {
                pid,
                pidfd: ForkLocal::new(pidfd),
                control: Mutex::new(ForkLocal::new(control)),
                owner: parent,
            })
        }
    }
}

/// Why a respawn failed, for the caller's error.
fn gone() -> Error {
    Error::new(
        ErrorKind::ZygoteDied,
        "the zygote died and cannot be respawned: its template process is gone",
    )
}

impl Template {
    fn is_own(&self) -> bool {
        self.pidfd.is_own() && sys::getpid() == self.owner
    }

    /// Has the template fork a new zygote for member `index`, with
    /// `limits`, and waits for its warm-up hook if it has one. Blocks.
    pub(crate) fn respawn(&self, index: usize, limits: Limits) -> Result<ZygoteProcess> {
        if !self.is_own() {
            return Err(gone());
        }
        let control = self.control.lock().unwrap_or_else(|p| p.into_inner());
        let control = control.as_fd();
        let (parts, ends) = zygote::parts(limits)?;
        let fds = ends.fds();
        let mut chunks = fds.chunks(sys::MAX_FRAME_FDS);
        send(
            control,
            &frame(START, index as u32, fds.len() as u32),
            chunks.next().unwrap_or(&[]),
        )?;
        for chunk in chunks {
            send(control, &frame(MORE, 0, 0), chunk)?;
        }
        drop(fds);
        // The zygote's ends are the template's now; ours would hide the
        // zygote's death from the parent (its command socket's end of
        // stream).
        drop(ends);
        let deadline = Instant::now() + REPLY_TIMEOUT;
        let (pid, pidfd) = loop {
            match receive(control, deadline)? {
                (SPAWNED, pid, _, Some(pidfd)) => match Pid::from_raw(pid as i32) {
                    Some(pid) => break (pid, pidfd),
                    None => return Err(gone()),
                },
                (FAILED, errno, _, _) => {
                    return Err(Error::io(
                        "fork",
                        std::io::Error::from_raw_os_error(errno as i32),
                    ));
                }
                // A zygote reaped earlier, or a malformed frame: not a reply.
                _ => continue,
            }
        };
        let process = parts.into_process(pid, pidfd);
        if limits.warm_up.is_some() {
            process.wait_ready_or(|| {
                // The template reports the zygote's exit once it reaps it.
                let deadline = Instant::now() + REPLY_TIMEOUT;
                loop {
                    if let (EXITED, p, status, _) = receive(control, deadline)? {
                        if p as i32 == pid.as_raw_nonzero().get() {
                            return Ok(sys::WaitStatus(status as i32).code());
                        }
                    }
                }
            })?;
        }
        Ok(process)
    }
}

/// Sends one frame, waiting for room in the socket if need be.
fn send(sock: BorrowedFd<'_>, frame: &[u8], fds: &[BorrowedFd<'_>]) -> Result<()> {
    loop {
        match sys::send_frame(sock, frame, fds) {
            Ok(()) => return Ok(()),
            Err(e) if e.is_would_block() => {
                let mut poll = [PollFd::new(&sock, PollFlags::OUT)];
                let _ = rustix::event::poll(&mut poll, None);
            }
            Err(_) => return Err(gone()),
        }
    }
}

/// Receives one frame from the template, by `deadline`.
fn receive(sock: BorrowedFd<'_>, deadline: Instant) -> Result<(u8, u32, u32, Option<OwnedFd>)> {
    let mut buf = [0u8; FRAME + 1];
    loop {
        match sys::recv_frame(sock, &mut buf) {
            Ok(Some(frame)) => {
                let fd = frame.fds.into_iter().next();
                return Ok(match parse(&buf[..frame.len]) {
                    Some((tag, a, b)) => (tag, a, b, fd),
                    None => (0, 0, 0, None),
                });
            }
            Err(e) if e.is_would_block() => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(Error::new(
                        ErrorKind::ZygoteDied,
                        "the zygote died, and its template did not respawn it in time",
                    ));
                }
                sys::poll_readable(sock, Some(left))?;
            }
            Ok(None) | Err(_) => return Err(gone()),
        }
    }
}

impl Drop for Template {
    fn drop(&mut self) {
        if !self.is_own() {
            // A copy in a fork: the fds are not ours to shut down or wait on.
            return;
        }
        // End of stream tells the template to kill its zygotes and exit;
        // then reap it, bounded as for a zygote (`shared::Inner`).
        let control = self.control.get_mut().unwrap_or_else(|p| p.into_inner());
        let _ = rustix::net::shutdown(&**control, rustix::net::Shutdown::Write);
        let pidfd = self.pidfd.as_fd();
        if !matches!(
            sys::poll_readable(pidfd, Some(Duration::from_secs(1))),
            Ok(true)
        ) {
            let _ = sys::pidfd_send_signal(pidfd, Signal::KILL);
        }
        let _ = sys::waitid_pidfd(pidfd);
    }
}

impl std::fmt::Debug for Template {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Template").field("pid", &self.pid).finish()
    }
}

/// The template process: waits for requests and reaps its zygotes.
fn serve(control: BorrowedFd<'_>, parent: Pid, limits: &[Limits]) -> std::convert::Infallible {
    // Own process group, as a zygote: Ctrl-C reaches the parent only.
    let _ = sys::setpgid_self();
    if !sys::die_with_parent(parent) {
        sys::exit_now(0);
    }
    sys::reset_signals();
    // SAFETY: SAFETY.md F3. We are the just-forked, single-threaded
    // template; the fds closed here are the parent's, inherited, and no
    // object that owns one is used again (`serve` never returns).
    unsafe { sys::close_fds_except(&[sys::raw(control)]) };
    let Ok(exits) = sys::sigchld_fd() else {
        sys::exit_now(1)
    };
    let me = sys::getpid();
    let mut zygotes: Vec<Pid> = Vec::new();
    // A request whose fds are still arriving: member, fds expected, fds.
    let mut pending: Option<(usize, usize, Vec<OwnedFd>)> = None;
    let mut buf = [0u8; FRAME + 1];
    loop {
        let mut polled = [
            PollFd::new(&control, PollFlags::IN),
            PollFd::new(&exits, PollFlags::IN),
        ];
        match rustix::event::poll(&mut polled, None) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(_) => shutdown(&zygotes),
        }
        sys::drain_signalfd(&exits);
        while let Ok(Some(pid)) = sys::exited_child() {
            let Ok(status) = sys::reap(pid) else { break };
            zygotes.retain(|&z| z != pid);
            let exited = frame(EXITED, pid.as_raw_nonzero().get() as u32, status.0 as u32);
            let _ = sys::send_frame(control, &exited, &[]);
        }
        loop {
            let received = match sys::recv_frame(control, &mut buf) {
                Ok(Some(frame)) => frame,
                Err(e) if e.is_would_block() => break,
                // The parent is gone, or dropped its last handle.
                Ok(None) | Err(_) => shutdown(&zygotes),
            };
            let parsed = parse(&buf[..received.len]).filter(|_| !received.truncated);
            match (parsed, pending.as_mut()) {
                (Some((START, index, n)), _) => {
                    pending = Some((
                        index as usize,
                        n as usize,
                        received.fds.into_iter().collect(),
                    ));
                }
                (Some((MORE, _, _)), Some((_, _, fds))) => fds.extend(received.fds),
                _ => {
                    pending = None;
                    let _ = sys::send_frame(control, &frame(FAILED, libc::EINVAL as u32, 0), &[]);
                    continue;
                }
            }
            if let Some((index, n, fds)) = pending.take_if(|(_, n, fds)| fds.len() >= *n) {
                let ends = limits
                    .get(index)
                    .filter(|_| fds.len() == n)
                    .and_then(|l| Some((*l, ZygoteEnds::from_fds(l, fds)?)));
                let reply = match ends {
                    Some((limits, ends)) => fork_zygote(me, limits, ends, &mut zygotes),
                    None => Err(libc::EINVAL),
                };
                let _ = match reply {
                    Ok((pid, pidfd)) => sys::send_frame(
                        control,
                        &frame(SPAWNED, pid.as_raw_nonzero().get() as u32, 0),
                        &[pidfd.as_fd()],
                    ),
                    Err(errno) => sys::send_frame(control, &frame(FAILED, errno as u32, 0), &[]),
                };
            }
        }
    }
}

/// Forks a zygote from the template and opens its pidfd for the parent.
fn fork_zygote(
    me: Pid,
    limits: Limits,
    ends: ZygoteEnds,
    zygotes: &mut Vec<Pid>,
) -> Result<(Pid, OwnedFd), i32> {
    // SAFETY: SAFETY.md F1. The template is single-threaded for its whole
    // life: it is forked from a single-threaded parent, never starts a
    // thread and never runs user code.
    let forked = unsafe { sys::fork() };
    match forked {
        Ok(Forked::Child) => sys::contain_child(|| zygote::serve_respawned(limits, me, ends)),
        Ok(Forked::Parent(pid)) => {
            drop(ends);
            // Race-free: our unreaped child; on failure it is killed and reaped.
            let pidfd = sys::pidfd_open_child(pid).map_err(|e| e.errno().unwrap_or(libc::EIO))?;
            zygotes.push(pid);
            Ok((pid, pidfd))
        }
        Err(e) => Err(e.errno().unwrap_or(libc::EAGAIN)),
    }
}

/// Kills and reaps every zygote the template forked, then exits.
fn shutdown(zygotes: &[Pid]) -> ! {
    for &pid in zygotes {
        let _ = sys::kill_child(pid);
    }
    for &pid in zygotes {
        let _ = sys::reap(pid);
    }
    sys::exit_now(0)
}
