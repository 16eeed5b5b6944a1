//! Measures the floors under a forked task: `fork` + `_exit` + `waitpid`, fork until the child's eventfd wakes the parent, and an eventfd round trip between two live processes.
//!
//! These are the denominators for `benches/run.rs` and `benches/peers.rs`:
//! nothing the crate does per task can be cheaper than a fork, and nothing that
//! crosses a process boundary can be cheaper than one wake-up each way. They
//! are measured in the same run as the crate because absolute figures move a
//! lot between machines (and between vCPU placements on a VM); ratios measured
//! together do not.
//!
//! No tokio here and no helper threads: the forks must come from a small
//! single-threaded process, as the zygote is. Build criterion without its
//! `rayon` feature (`default-features = false`), or its analysis threads stay
//! alive after the first benchmark and every later fork pays for their stacks;
//! `main` prints a note if it finds more than one thread.
//!
//! `cargo bench --bench floors`

use std::hint::black_box;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use criterion::Criterion;

fn main() {
    // Forked first, while this process certainly has one thread and before
    // criterion has allocated anything: the child then runs a plain
    // read/write loop on memory nobody else touches.
    let echo = EchoChild::fork().expect("cannot fork the eventfd echo child");
    let exit_fd = eventfd().expect("cannot create the eventfd for fork_eventfd_wake");

    let mut c = Criterion::default()
        .sample_size(50)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();

    fork_exit_wait(&mut c);
    fork_eventfd_wake(&mut c, &exit_fd);
    eventfd_ping_pong(&mut c, &echo);

    echo.stop().expect("cannot stop the eventfd echo child");
    c.final_summary();
}

/// `fork()` + child `_exit(0)` + parent `waitpid`: the least a fresh process
/// per task can cost, including observing its exit.
fn fork_exit_wait(c: &mut Criterion) {
    // Check before timing: the child runs and exits with the status we gave.
    let pid = fork_and_exit(7).expect("fork");
    assert_eq!(
        reap(pid).expect("waitpid"),
        7,
        "the child's exit status did not arrive"
    );
    note_threads("fork_exit_wait");

    c.bench_function("floor_fork_exit_waitpid", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            for _ in 0..iters {
                let pid = fork_and_exit(0).expect("fork");
                black_box(reap(pid).expect("waitpid"));
            }
            start.elapsed()
        })
    });
}

/// `fork()`, the child writes an eventfd and `_exit`s, the parent wakes from a
/// blocking `read` of that eventfd. Timed up to the wake-up only: this is how
/// the crate learns a task finished (the worker rings before it exits), so the
/// exit and the reap are not on the caller's path. The reap still happens,
/// untimed, in every iteration, so children never pile up.
fn fork_eventfd_wake(c: &mut Criterion, efd: &OwnedFd) {
    let fd = efd.as_raw_fd();
    let pid = fork_ring_exit(fd).expect("fork");
    assert_eq!(
        read_u64(fd).expect("read eventfd"),
        1,
        "the child's ring did not arrive"
    );
    assert_eq!(reap(pid).expect("waitpid"), 0);
    note_threads("fork_eventfd_wake");

    c.bench_function("floor_fork_eventfd_wake", |b| {
        b.iter_custom(|iters| {
            let mut timed = Duration::ZERO;
            for _ in 0..iters {
                let start = Instant::now();
                let pid = fork_ring_exit(fd).expect("fork");
                let n = read_u64(fd).expect("read eventfd");
                timed += start.elapsed();
                assert_eq!(n, 1);
                reap(pid).expect("waitpid");
            }
            timed
        })
    });
}

/// One eventfd round trip between two processes that are already running: the
/// parent writes eventfd A and blocks reading eventfd B; the child, blocked on
/// A, wakes and writes B. This is the floor for handing work to a parked,
/// pre-forked worker. On a VM a wake-up that crosses vCPUs costs several times
/// one within a vCPU, so it is measured unpinned (what the scheduler gives), on
/// one CPU, and on two different CPUs.
fn eventfd_ping_pong(c: &mut Criterion, echo: &EchoChild) {
    // Check before timing: the child answers, one reply per request.
    for _ in 0..3 {
        echo.round_trip().expect("eventfd round trip");
    }

    let original = affinity(0).expect("sched_getaffinity");
    let cpus: Vec<usize> = (0..libc::CPU_SETSIZE as usize)
        // SAFETY: `original` is an initialised `cpu_set_t` and `cpu` is below
        // CPU_SETSIZE, the bound CPU_ISSET indexes within.
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &original) })
        .collect();

    let mut placements: Vec<(&str, Option<(usize, usize)>)> = vec![("unpinned", None)];
    if let [a, b, ..] = cpus[..] {
        placements.push(("same_cpu", Some((a, a))));
        placements.push(("cross_cpu", Some((a, b))));
    } else {
        eprintln!("floors: only one CPU available, skipping the pinned ping-pong variants");
    }

    let mut g = c.benchmark_group("floor_eventfd_ping_pong");
    for (name, pin) in placements {
        if let Some((parent_cpu, child_cpu)) = pin {
            set_affinity(0, &single_cpu(parent_cpu)).expect("pin the parent");
            set_affinity(echo.pid, &single_cpu(child_cpu)).expect("pin the echo child");
        }
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                for _ in 0..iters {
                    echo.round_trip().expect("eventfd round trip");
                }
                start.elapsed()
            })
        });
        set_affinity(0, &original).expect("unpin the parent");
        set_affinity(echo.pid, &original).expect("unpin the echo child");
    }
    g.finish();
}

/// A child forked at start that echoes: read eventfd `ping`, write eventfd `pong`.
struct EchoChild {
    pid: libc::pid_t,
    ping: OwnedFd,
    pong: OwnedFd,
}

impl EchoChild {
    fn fork() -> io::Result<EchoChild> {
        let ping = eventfd()?;
        let pong = eventfd()?;
        let (ping_raw, pong_raw) = (ping.as_raw_fd(), pong.as_raw_fd());
        // SAFETY: getpid has no preconditions.
        let parent = unsafe { libc::getpid() };
        // SAFETY: `fork` is safe to call; what matters is what the child does.
        // This process has a single thread here (main forks before criterion
        // or anything else can start one), and the child below only makes raw
        // system calls (prctl, getppid, read, write, _exit) on values already
        // in registers or on its stack: it allocates nothing, takes no lock
        // and never returns into Rust code that could.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(io::Error::last_os_error());
        }
        if pid == 0 {
            echo_loop(parent, ping_raw, pong_raw);
        }
        Ok(EchoChild { pid, ping, pong })
    }

    fn round_trip(&self) -> io::Result<()> {
        write_u64(self.ping.as_raw_fd(), 1)?;
        let n = read_u64(self.pong.as_raw_fd())?;
        debug_assert_eq!(n, 1, "one reply per request");
        Ok(())
    }

    fn stop(self) -> io::Result<()> {
        // SAFETY: `self.pid` is our own unreaped child, so the pid cannot have
        // been reused by another process.
        if unsafe { libc::kill(self.pid, libc::SIGKILL) } != 0 {
            return Err(io::Error::last_os_error());
        }
        match reap_raw(self.pid)? {
            status if libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGKILL => {
                Ok(())
            }
            status => Err(io::Error::other(format!(
                "echo child ended with wait status {status:#x}, not SIGKILL"
            ))),
        }
    }
}

/// The echo child's whole life. Only raw system calls; leaves through `_exit`.
fn echo_loop(parent: libc::pid_t, ping: RawFd, pong: RawFd) -> ! {
    // If the benchmark dies without stopping us, die too rather than block on
    // `ping` forever. Re-check the parent afterwards: it may have died before
    // the prctl took effect.
    // SAFETY: prctl(PR_SET_PDEATHSIG) takes a signal number and touches no memory.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    // SAFETY: getppid has no preconditions.
    if unsafe { libc::getppid() } != parent {
        // SAFETY: `_exit` ends the process without running any user-space
        // cleanup, which is what a forked child must do.
        unsafe { libc::_exit(1) };
    }
    let mut buf = 0u64;
    loop {
        // SAFETY: `buf` is a live, writable u64 on this stack and the length
        // passed is its size.
        let n = unsafe { libc::read(ping, (&raw mut buf).cast(), 8) };
        if n != 8 {
            // SAFETY: as above, `_exit` runs no user-space cleanup.
            unsafe { libc::_exit(2) };
        }
        let one = 1u64;
        // SAFETY: `one` is a live u64 on this stack and the length is its size.
        let n = unsafe { libc::write(pong, (&raw const one).cast(), 8) };
        if n != 8 {
            // SAFETY: as above, `_exit` runs no user-space cleanup.
            unsafe { libc::_exit(3) };
        }
    }
}

/// Forks a child that only calls `_exit(code)`; returns its pid.
fn fork_and_exit(code: i32) -> io::Result<libc::pid_t> {
    // SAFETY: the child calls nothing but `_exit`, which is async-signal-safe,
    // so it is sound whatever state other threads (if any) left locks in.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: `_exit` ends the child without running atexit handlers or
        // flushing the parent's stdio buffers a second time.
        unsafe { libc::_exit(code) };
    }
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(pid)
}

/// Forks a child that adds 1 to eventfd `fd` and calls `_exit(0)`; returns its pid.
fn fork_ring_exit(fd: RawFd) -> io::Result<libc::pid_t> {
    // SAFETY: the child calls only `write` and `_exit`, both async-signal-safe,
    // on an fd number and a stack value: no allocation, no lock.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        let one = 1u64;
        // SAFETY: `one` is a live u64 on this stack and the length is its size.
        let n = unsafe { libc::write(fd, (&raw const one).cast(), 8) };
        // SAFETY: `_exit` runs no user-space cleanup; the status tells the
        // parent whether the write worked.
        unsafe { libc::_exit(if n == 8 { 0 } else { 1 }) };
    }
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(pid)
}

/// Waits for child `pid` and returns its exit code (error if it did not exit normally).
fn reap(pid: libc::pid_t) -> io::Result<i32> {
    let status = reap_raw(pid)?;
    if libc::WIFEXITED(status) {
        Ok(libc::WEXITSTATUS(status))
    } else {
        Err(io::Error::other(format!(
            "child {pid} did not exit normally: wait status {status:#x}"
        )))
    }
}

/// `waitpid(pid, &status, 0)`, retried on EINTR; returns the raw wait status.
fn reap_raw(pid: libc::pid_t) -> io::Result<i32> {
    let mut status = 0;
    loop {
        // SAFETY: `status` is a live, writable c_int; `pid` is our child.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            return Ok(status);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// `eventfd(0, EFD_CLOEXEC)`: blocking, counter semantics.
fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: eventfd takes two integers and touches no memory.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by eventfd, so it is open and owned by
    // nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Blocking read of an eventfd's counter.
fn read_u64(fd: RawFd) -> io::Result<u64> {
    let mut buf = 0u64;
    loop {
        // SAFETY: `buf` is a live, writable u64 and the length is its size.
        let n = unsafe { libc::read(fd, (&raw mut buf).cast(), 8) };
        if n == 8 {
            return Ok(buf);
        }
        let err = io::Error::last_os_error();
        if n >= 0 || err.kind() != io::ErrorKind::Interrupted {
            return Err(io::Error::other(format!(
                "eventfd read returned {n}: {err}"
            )));
        }
    }
}

/// Adds `v` to an eventfd's counter.
fn write_u64(fd: RawFd, v: u64) -> io::Result<()> {
    // SAFETY: `v` is a live u64 and the length is its size.
    let n = unsafe { libc::write(fd, (&raw const v).cast(), 8) };
    if n == 8 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn affinity(pid: libc::pid_t) -> io::Result<libc::cpu_set_t> {
    // SAFETY: cpu_set_t is a plain bit array; all zeroes is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a live, writable cpu_set_t and the size passed is its size.
    let r = unsafe { libc::sched_getaffinity(pid, size_of::<libc::cpu_set_t>(), &mut set) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(set)
}

fn set_affinity(pid: libc::pid_t, set: &libc::cpu_set_t) -> io::Result<()> {
    // SAFETY: `set` is a live cpu_set_t and the size passed is its size.
    let r = unsafe { libc::sched_setaffinity(pid, size_of::<libc::cpu_set_t>(), set) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn single_cpu(cpu: usize) -> libc::cpu_set_t {
    // SAFETY: cpu_set_t is a plain bit array; all zeroes is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    debug_assert!(cpu < libc::CPU_SETSIZE as usize);
    // SAFETY: `cpu` comes from a CPU_ISSET scan below CPU_SETSIZE, the bound
    // CPU_SET indexes within, and `set` is a live cpu_set_t.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    set
}

/// Warns if this process is no longer single-threaded: fork then also copies
/// the other threads' stacks and guard pages, so the floor is no longer the
/// zygote's.
fn note_threads(bench: &str) {
    let threads = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Threads:"))
                .and_then(|v| v.trim().parse::<u32>().ok())
        });
    if let Some(n @ 2..) = threads {
        eprintln!(
            "floors: note: {bench} forks from a process with {n} threads \
             (criterion built with rayon?); the figure overstates the zygote's floor"
        );
    }
}
