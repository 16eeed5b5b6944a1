//! Resource limits in a worker: `setrlimit` before the task runs, and the
//! `SIGABRT` handler that tells a memory limit from any other abort.
//!
//! # Which rlimit for memory
//!
//! `RLIMIT_DATA`, not `RLIMIT_AS`. Measured in a worker of this crate's
//! test binary (`tests/confine.rs`, `worker_footprint_is_mostly_not_private_data`):
//! its address space (`VmSize`) is 9.1 MiB and its private writable memory
//! (`VmData`) 244 KiB, because `RLIMIT_AS` also counts the binary's text, the shared libraries,
//! the ring (a shared mapping sized by `max_in_flight × slot_size`), and the
//! mapping of a sealed argument or a spilled result. A limit on the address
//! space would therefore give a task a budget that depends on the parent's
//! binary and the zygote's options, and would refuse large arguments that
//! cost the task no memory of its own. `RLIMIT_DATA` (Linux 4.7 and later)
//! counts exactly the private writable mappings and the heap, which is what a
//! decoder allocates: `malloc`'s `brk` and `mmap` both fail with `ENOMEM` past
//! it, and Rust's allocation-failure handler aborts.
//!
//! The limit is absolute: it includes what the worker inherited from the
//! zygote (`VmData` at the start of the task: 244 KiB in the tests; more in
//! a program whose parent had a large heap when it started the zygote).
//! A limit below that plus [`MEMORY_HEADROOM`] is refused before the task
//! runs, since the worker could not even report a result.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

use crate::sys;

/// Exit code of a worker whose task's allocation failed under its memory
/// limit (the `SIGABRT` handler's `_exit`). Workers' own codes are 120–125.
pub(crate) const EXIT_MEMORY_LIMIT: i32 = 120;

/// Memory a worker needs beyond its starting footprint to report a result:
/// a panic message, the encoder's buffer of a spilled result (64 KiB
/// chunks), and `malloc`'s own growth step (128 KiB by default).
pub(crate) const MEMORY_HEADROOM: u64 = 1 << 20;

/// Private writable memory of this process in bytes, from the sixth field
/// of `/proc/self/statm`: the pages `RLIMIT_DATA` is checked against, plus
/// the stack's (so it errs by a few hundred KiB on the side of refusing).
///
/// `statm` rather than `status`'s `VmData`, read into a stack buffer: the
/// kernel formats it in a fraction of the time, and a worker's first heap
/// allocation costs it several copy-on-write faults (measured together:
/// 30 µs of a worker's time for `read_to_string("/proc/self/status")`).
pub(crate) fn data_size() -> Result<u64, String> {
    let failed = |call: &str, e: rustix::io::Errno| {
        format!(
            "{call} /proc/self/statm failed: {}",
            io::Error::from_raw_os_error(e.raw_os_error())
        )
    };
    let fd = rustix::fs::open(
        "/proc/self/statm",
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .map_err(|e| failed("open", e))?;
    // Seven numbers of at most 20 digits each, and spaces.
    let mut buf = [0u8; 192];
    let n = rustix::io::read(&fd, &mut buf).map_err(|e| failed("read", e))?;
    parse_statm_data(&buf[..n])
        .map(|pages| pages.saturating_mul(rustix::param::page_size() as u64))
        .ok_or_else(|| "no data field in /proc/self/statm".to_string())
}

/// The sixth field of a `statm` line, in pages.
fn parse_statm_data(statm: &[u8]) -> Option<u64> {
    let field = statm
        .split(|b| b.is_ascii_whitespace())
        .filter(|f| !f.is_empty())
        .nth(5)?;
    std::str::from_utf8(field).ok()?.parse().ok()
}

/// Lowers `resource` to `soft` (and its hard limit to `hard`), never above
/// the inherited hard limit, which only a privileged process could raise.
pub(crate) fn lower(resource: Resource, name: &str, soft: u64, hard: u64) -> Result<(), String> {
    let current = getrlimit(resource);
    let ceiling = current.maximum.unwrap_or(u64::MAX);
    let hard = hard.min(ceiling);
    let new = Rlimit {
        current: Some(soft.min(hard)),
        maximum: Some(hard),
    };
    setrlimit(resource, new).map_err(|e| {
        format!(
            "setrlimit({name}) failed: {}",
            io::Error::from_raw_os_error(e.raw_os_error())
        )
    })
}

/// The zygote's soft `RLIMIT_CORE` before [`disable_core_dumps`] lowered
/// it, encoded as [`core_word`]: what a task that wants core dumps gets back.
static INHERITED_CORE: AtomicU64 = AtomicU64::new(0);

fn core_word(limit: Option<u64>) -> u64 {
    limit.unwrap_or(u64::MAX)
}

/// Turns core dumps off, once, in the zygote: the soft `RLIMIT_CORE` to 0,
/// the hard limit kept (a task that wants a core may raise it again; this
/// is hygiene, not a bound). Every worker inherits it, which spares each
/// task two system calls.
pub(crate) fn disable_core_dumps() -> Result<(), String> {
    let current = getrlimit(Resource::Core);
    INHERITED_CORE.store(core_word(current.current), Ordering::Relaxed);
    set_core(Some(0), current.maximum)
}

/// For a task that asked for core dumps: the soft limit the zygote had.
pub(crate) fn restore_core_dumps() -> Result<(), String> {
    let word = INHERITED_CORE.load(Ordering::Relaxed);
    let soft = (word != u64::MAX).then_some(word);
    set_core(soft, getrlimit(Resource::Core).maximum)
}

fn set_core(current: Option<u64>, maximum: Option<u64>) -> Result<(), String> {
    setrlimit(Resource::Core, Rlimit { current, maximum }).map_err(|e| {
        format!(
            "setrlimit(RLIMIT_CORE) failed: {}",
            io::Error::from_raw_os_error(e.raw_os_error())
        )
    })
}

/// Installs the handler that turns an abort after a failed allocation into
/// `_exit(EXIT_MEMORY_LIMIT)`. Only for a task with a memory limit.
///
/// Rust's default allocation-error handler prints "memory allocation of N
/// bytes failed" and calls `abort`, which raises `SIGABRT`. The handler runs
/// on the thread that aborted, so `errno` is still the `ENOMEM` that `malloc`
/// left (writing the message to stderr does not change it when it succeeds,
/// and `abort` makes no failing call before it raises). Any other abort
/// (`panic = "abort"`, `std::process::abort`, a C library's `assert`) has
/// some other `errno`, and the handler returns: `abort` then restores the
/// default action and the worker dies of `SIGABRT` as it would without it.
///
/// With `RUST_BACKTRACE` set, Rust's handler prints a backtrace between the
/// failure and the abort, and the files it opens on the way leave some
/// other `errno` (measured: `ENOENT`). So the worker clears `RUST_BACKTRACE`
/// from its own environment first: its allocation-failure message then
/// carries no backtrace, and its task sees no `RUST_BACKTRACE`. (A process
/// whose backtrace setting was already read before the zygote started,
/// by a panic through the default hook, keeps it; there a failed
/// allocation may read as `SIGABRT`.)
pub(crate) fn catch_allocation_failure() -> Result<(), String> {
    // SAFETY: SAFETY.md C1. Changing the environment is unsound only while
    // another thread may read it; this worker is single-threaded (forked
    // from the single-threaded zygote, and none of the task's code, which
    // might start threads, has run yet).
    unsafe { std::env::remove_var("RUST_BACKTRACE") };
    let action = SigAction::new(
        SigHandler::Handler(on_abort),
        SaFlags::empty(),
        SigSet::empty(),
    );
    // SAFETY: SAFETY.md C2. `sigaction` is unsafe because the handler runs
    // asynchronously; `on_abort` is async-signal-safe (it reads `errno` and
    // may call `_exit`, nothing else), and no other handler for SIGABRT is
    // replaced: the zygote reset every disposition to the default
    // (`sys::reset_signals`) and the crate sets none for SIGABRT.
    let installed = unsafe { sigaction(Signal::SIGABRT, &action) };
    installed
        .map(drop)
        .map_err(|e| format!("sigaction(SIGABRT) failed: {e}"))
}

/// The `SIGABRT` handler of a memory-limited worker; see
/// [`catch_allocation_failure`]. Reads `errno` first thing, before anything
/// could change it: a plain load from thread-local storage, on the thread
/// that aborted.
extern "C" fn on_abort(_: libc::c_int) {
    if io::Error::last_os_error().raw_os_error() == Some(libc::ENOMEM) {
        sys::exit_now(EXIT_MEMORY_LIMIT);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statm_data_is_the_sixth_field() {
        assert_eq!(parse_statm_data(b"2335 500 400 100 0 61 0\n"), Some(61));
        assert_eq!(parse_statm_data(b"1 2 3"), None);
        assert_eq!(parse_statm_data(b"1 2 3 4 5 x 7"), None);
    }

    #[test]
    fn data_size_reads_this_process() {
        assert!(data_size().unwrap() > 0);
    }
}
