//! Resource limits in a worker: `setrlimit` before the task runs, and the
//! `SIGABRT` handler that tells a memory limit from any other abort.
//!
//! # Which rlimit for memory
//!
//! `RLIMIT_DATA`, not `RLIMIT_AS`. Measured in a worker of this crate's
//! test binary (`tests/confine.rs`, `worker_footprint`): its address space
//! (`VmSize`) is several times its private writable memory (`VmData`),
//! because `RLIMIT_AS` also counts the binary's text, the shared libraries,
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
//! zygote (`VmData` at the start of the task, a few MiB for most programs).
//! A limit below that plus [`MEMORY_HEADROOM`] is refused before the task
//! runs, since the worker could not even report a result.

use std::io;

use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

use crate::sys;

/// Exit code of a worker whose task's allocation failed under its memory
/// limit (the `SIGABRT` handler's `_exit`). Workers' own codes are 120–125.
pub(crate) const EXIT_MEMORY_LIMIT: i32 = 120;

/// Memory a worker needs beyond its starting footprint to report a result:
/// a panic message, the encoder's buffer of a spilled result (64 KiB
/// chunks), and `malloc`'s own growth step (128 KiB by default).
pub(crate) const MEMORY_HEADROOM: u64 = 1 << 20;

/// Private writable memory of this process in bytes: `VmData` of
/// `/proc/self/status`, what `RLIMIT_DATA` is checked against.
pub(crate) fn data_size() -> Result<u64, String> {
    let status = std::fs::read_to_string("/proc/self/status")
        .map_err(|e| format!("reading /proc/self/status failed: {e}"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmData:"))
        .and_then(|rest| rest.trim().strip_suffix("kB"))
        .and_then(|kb| kb.trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .ok_or_else(|| "no VmData line in /proc/self/status".to_string())
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

/// Turns core dumps off: the soft `RLIMIT_CORE` to 0, the hard limit kept (a
/// task that wants a core may raise it again; this is hygiene, not a bound).
pub(crate) fn disable_core_dumps() -> Result<(), String> {
    let current = getrlimit(Resource::Core);
    setrlimit(
        Resource::Core,
        Rlimit {
            current: Some(0),
            maximum: current.maximum,
        },
    )
    .map_err(|e| {
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
    let action = || {
        if io::Error::last_os_error().raw_os_error() == Some(libc::ENOMEM) {
            sys::exit_now(EXIT_MEMORY_LIMIT);
        }
    };
    // SAFETY: SAFETY.md C2. signal_hook's `register` requires the action to
    // be async-signal-safe. It reads `errno` (a load from thread-local
    // storage, which signal-hook's dispatcher saves and restores around its
    // actions, so it is still the interrupted thread's value) and may call
    // `_exit`, which POSIX lists as async-signal-safe. It allocates nothing
    // and takes no lock.
    let registered = unsafe { signal_hook::low_level::register(libc::SIGABRT, action) };
    registered
        .map(drop)
        .map_err(|e| format!("sigaction(SIGABRT) failed: {e}"))
}
