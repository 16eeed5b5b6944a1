//! A task's confinement: its resource limits and sandbox, as one plain value
//! that travels in the spawn request from the parent, through the zygote, to
//! the worker, which applies it just before the task's code runs.
//!
//! The public setters are here too, as `impl` blocks on [`Task`] and
//! [`Builder`]; the mechanisms are in `crate::limits` and `crate::sandbox`.

use std::time::Duration;

use rustix::process::Resource;

use crate::error::{Error, Limit};
use crate::limits::{self, EXIT_MEMORY_LIMIT, MEMORY_HEADROOM};
use crate::process::{Builder, Task};
use crate::sandbox::{self, Sandbox};
use crate::sys::WaitStatus;
use crate::wire::ConfineFailure;

/// Limits and sandbox for one task. `Default` is what a task gets with no
/// options: no limits, no sandbox, core dumps off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub(crate) struct Confinement {
    /// `RLIMIT_DATA`, in bytes.
    pub(crate) memory: Option<u64>,
    /// `RLIMIT_CPU`, in whole seconds (rounded up from the caller's duration).
    pub(crate) cpu_secs: Option<u64>,
    /// `RLIMIT_NOFILE`.
    pub(crate) open_files: Option<u64>,
    /// Leave `RLIMIT_CORE` as inherited instead of turning core dumps off.
    pub(crate) core_dumps: bool,
    pub(crate) sandbox: Option<Sandbox>,
}

impl Confinement {
    /// True for the confinement of a task with no options. Confinement
    /// cannot be undone in a process (limits are lowered for good, seccomp
    /// and Landlock only ever add restrictions, and a task may add its
    /// own), so a worker that ran a task with any other confinement must
    /// not run another task.
    #[cfg_attr(not(test), allow(dead_code))] // reason: for reuse mode, which picks a fresh worker unless it holds
    pub(crate) fn is_default(&self) -> bool {
        *self == Confinement::default()
    }
}

/// Applies `confinement` to the calling worker, which is single-threaded and
/// has not run any of the task's code yet. `own_fds` is how many fds the
/// worker holds besides stdio (doorbell, spill socket, argument memfd).
///
/// On failure the worker must not run the task: the error names what could
/// not be applied.
pub(crate) fn apply(
    confinement: &Confinement,
    own_fds: u64,
) -> Result<(), (ConfineFailure, String)> {
    let Confinement {
        memory,
        cpu_secs,
        open_files,
        core_dumps,
        sandbox,
    } = *confinement;
    let sandbox_err = |message| (ConfineFailure::Sandbox, message);
    if let Some(bytes) = memory {
        let used = limits::data_size().map_err(|e| (ConfineFailure::Memory, e))?;
        let needed = used.saturating_add(MEMORY_HEADROOM);
        if bytes < needed {
            return Err((
                ConfineFailure::Memory,
                format!(
                    "memory_limit({bytes}) is below the {needed} bytes the worker needs: \
                     {used} bytes it inherited (data and stack) and {MEMORY_HEADROOM} to report a result"
                ),
            ));
        }
    }
    // The filter is built while allocating is free of any limit, and
    // installed last, since it denies raising limits.
    let filter = match sandbox {
        Some(s) => Some(sandbox::build_filter(s).map_err(sandbox_err)?),
        None => None,
    };
    // Landlock needs an fd for a moment: before `RLIMIT_NOFILE` goes down.
    if let Some(s) = sandbox {
        sandbox::restrict_fs(s).map_err(sandbox_err)?;
    }
    if let Some(n) = open_files {
        // stdio, the worker's own fds, and one for a spilled result's memfd.
        let needed = 3 + own_fds + 1;
        if n < needed {
            return Err((
                ConfineFailure::OpenFiles,
                format!(
                    "open_files_limit({n}) is below the {needed} file descriptors the worker \
                     needs to report a result"
                ),
            ));
        }
        limits::lower(Resource::Nofile, "RLIMIT_NOFILE", n, n)
            .map_err(|e| (ConfineFailure::OpenFiles, e))?;
    }
    if let Some(bytes) = memory {
        // The handler first, so no failed allocation can go unrecognised.
        limits::catch_allocation_failure().map_err(|e| (ConfineFailure::Memory, e))?;
        limits::lower(Resource::Data, "RLIMIT_DATA", bytes, bytes)
            .map_err(|e| (ConfineFailure::Memory, e))?;
    }
    if let Some(secs) = cpu_secs {
        if secs == 0 {
            return Err((
                ConfineFailure::CpuTime,
                "cpu_limit must be at least 1 s: RLIMIT_CPU counts whole seconds".into(),
            ));
        }
        // SIGXCPU at the soft limit; SIGKILL a second later for a task that
        // catches or ignores it.
        limits::lower(Resource::Cpu, "RLIMIT_CPU", secs, secs.saturating_add(1))
            .map_err(|e| (ConfineFailure::CpuTime, e))?;
    }
    // The zygote turned core dumps off for every worker.
    if core_dumps {
        limits::restore_core_dumps().map_err(sandbox_err)?;
    }
    if let Some(filter) = filter {
        sandbox::install(&filter).map_err(sandbox_err)?;
    }
    Ok(())
}

/// The error for a worker that ended with `status` without a result, if its
/// confinement explains it.
///
/// Only the kernel's own signals are read as a limit: `SIGXCPU` under a CPU
/// limit, and the allocation-failure handler's exit code under a memory
/// limit. A task that ignores `SIGXCPU` is killed by `SIGKILL` a second
/// later and reads as [`ErrorKind::Signaled`](crate::ErrorKind::Signaled).
pub(crate) fn exit_error(confinement: &Confinement, status: WaitStatus) -> Option<Error> {
    if let (Some(secs), Some(libc::SIGXCPU)) = (confinement.cpu_secs, status.signal()) {
        return Some(Error::resource_limit(
            Limit::CpuTime,
            format!("killed by SIGXCPU after {secs} s of CPU time"),
        ));
    }
    if let (Some(bytes), Some(EXIT_MEMORY_LIMIT)) = (confinement.memory, status.code()) {
        return Some(Error::resource_limit(
            Limit::Memory,
            format!("an allocation failed under the limit of {bytes} bytes"),
        ));
    }
    None
}

/// The error for a worker's `Unconfined` record.
pub(crate) fn unconfined_error(payload: &[u8]) -> Error {
    let (code, message) = ConfineFailure::split(payload);
    let limit = match code {
        ConfineFailure::Sandbox => None,
        ConfineFailure::Memory => Some(Limit::Memory),
        ConfineFailure::CpuTime => Some(Limit::CpuTime),
        ConfineFailure::OpenFiles => Some(Limit::OpenFiles),
    };
    Error::confinement(
        limit,
        format!("the task did not run: {}", String::from_utf8_lossy(message)),
    )
}

/// Whole seconds of CPU time, rounded up.
fn cpu_secs(limit: Duration) -> u64 {
    limit.as_secs() + u64::from(limit.subsec_nanos() > 0)
}

impl Builder {
    /// The default [`Task::memory_limit`] of every task of this zygote.
    pub fn memory_limit(mut self, bytes: u64) -> Builder {
        self.confinement.memory = Some(bytes);
        self
    }

    /// The default [`Task::cpu_limit`] of every task of this zygote.
    pub fn cpu_limit(mut self, limit: Duration) -> Builder {
        self.confinement.cpu_secs = Some(cpu_secs(limit));
        self
    }

    /// The default [`Task::open_files_limit`] of every task of this zygote.
    pub fn open_files_limit(mut self, n: u64) -> Builder {
        self.confinement.open_files = Some(n);
        self
    }

    /// The default [`Task::core_dumps`] of every task of this zygote (off).
    pub fn core_dumps(mut self, enabled: bool) -> Builder {
        self.confinement.core_dumps = enabled;
        self
    }

    /// The default [`Task::sandbox`] of every task of this zygote.
    pub fn sandbox(mut self, sandbox: Sandbox) -> Builder {
        self.confinement.sandbox = Some(sandbox);
        self
    }
}

impl<R> Task<R> {
    /// Limits the worker's private memory (heap and private mappings,
    /// `RLIMIT_DATA`) to `bytes`, counting what it inherited from the zygote.
    /// A task whose allocation fails past it ends with
    /// [`ErrorKind::ResourceLimit`](crate::ErrorKind::ResourceLimit) and
    /// [`Limit::Memory`]; one that handles the failure itself (`try_reserve`)
    /// just sees the error.
    ///
    /// The worker's shared mappings (its ring slot, a sealed argument or a
    /// spilled result) do not count. A limit below the worker's own footprint
    /// plus 1 MiB, the least it needs to report a result, fails the task with
    /// [`ErrorKind::Confinement`](crate::ErrorKind::Confinement) before it
    /// runs.
    ///
    /// ```no_run
    /// # async fn demo(zygote: run_in_process::Zygote) {
    /// use run_in_process::{ErrorKind, Limit};
    /// fn hog(mb: usize) -> u8 { vec![1u8; mb << 20].iter().fold(0, |a, b| a ^ b) }
    /// let e = zygote.task(hog, 512).memory_limit(64 << 20).run().await.unwrap_err();
    /// assert_eq!((e.kind(), e.limit()), (ErrorKind::ResourceLimit, Some(Limit::Memory)));
    /// # }
    /// ```
    ///
    /// # Caveats
    ///
    /// The worker learns that an abort was an allocation failure from
    /// `errno`, which the failure's message to stderr would overwrite if
    /// that write failed (a closed stderr): then the task reads as
    /// [`ErrorKind::Signaled`](crate::ErrorKind::Signaled) with `SIGABRT`.
    /// For the same reason the worker removes `RUST_BACKTRACE` from its
    /// environment (a backtrace printed before the abort would overwrite
    /// `errno`), so the task does not see it, and the allocation failure's
    /// message carries no backtrace. A
    /// thread that cannot be created for want of memory panics instead, as
    /// `std::thread::spawn` does.
    pub fn memory_limit(mut self, bytes: u64) -> Task<R> {
        self.confinement.memory = Some(bytes);
        self
    }

    /// Limits the CPU time of the worker (`RLIMIT_CPU`, whole seconds,
    /// rounded up; all its threads together). Distinct from
    /// [`timeout`](Task::timeout), which is wall-clock time. Past the limit
    /// the kernel sends `SIGXCPU`, and the task ends with
    /// [`ErrorKind::ResourceLimit`](crate::ErrorKind::ResourceLimit) and
    /// [`Limit::CpuTime`]. A task that catches or ignores `SIGXCPU` is killed
    /// one CPU second later by `SIGKILL`, which reads as
    /// [`ErrorKind::Signaled`](crate::ErrorKind::Signaled). A zero limit fails
    /// the task with [`ErrorKind::Confinement`](crate::ErrorKind::Confinement).
    pub fn cpu_limit(mut self, limit: Duration) -> Task<R> {
        self.confinement.cpu_secs = Some(cpu_secs(limit));
        self
    }

    /// Limits the file descriptors the worker may have open
    /// (`RLIMIT_NOFILE`): past it, the call that would open one more fails
    /// with `EMFILE` inside the task. The worker holds stdio and two or three
    /// fds of its own, and needs one more to spill a large result; a limit
    /// below that fails the task with
    /// [`ErrorKind::Confinement`](crate::ErrorKind::Confinement) before it
    /// runs.
    pub fn open_files_limit(mut self, n: u64) -> Task<R> {
        self.confinement.open_files = Some(n);
        self
    }

    /// Whether the worker may dump core when it crashes (default: off, by
    /// setting the soft `RLIMIT_CORE` to 0; `true` keeps the inherited one).
    pub fn core_dumps(mut self, enabled: bool) -> Task<R> {
        self.confinement.core_dumps = enabled;
        self
    }

    /// Runs the task in `sandbox`: see [`Sandbox`] for what it denies.
    /// Denied calls fail inside the task with `EPERM` or `EACCES`. A sandbox
    /// the kernel cannot provide fails the task with
    /// [`ErrorKind::Confinement`](crate::ErrorKind::Confinement) before it
    /// runs; it never runs unconfined.
    pub fn sandbox(mut self, sandbox: Sandbox) -> Task<R> {
        self.confinement.sandbox = Some(sandbox);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_types_are_thread_safe() {
        fn check<T: Send + Sync + Unpin>() {}
        check::<Sandbox>();
        check::<Limit>();
    }

    #[test]
    fn cpu_limit_rounds_up_to_whole_seconds() {
        assert_eq!(cpu_secs(Duration::ZERO), 0);
        assert_eq!(cpu_secs(Duration::from_millis(1)), 1);
        assert_eq!(cpu_secs(Duration::from_secs(2)), 2);
        assert_eq!(cpu_secs(Duration::from_millis(2001)), 3);
    }

    #[test]
    fn only_the_default_is_default() {
        assert!(Confinement::default().is_default());
        let with = |f: fn(&mut Confinement)| {
            let mut c = Confinement::default();
            f(&mut c);
            c.is_default()
        };
        assert!(!with(|c| c.memory = Some(1)));
        assert!(!with(|c| c.cpu_secs = Some(1)));
        assert!(!with(|c| c.open_files = Some(1)));
        assert!(!with(|c| c.core_dumps = true));
        assert!(!with(|c| c.sandbox = Some(Sandbox::new())));
    }

    #[test]
    fn exit_statuses_read_as_limits_only_under_that_limit() {
        let cpu = Confinement {
            cpu_secs: Some(1),
            ..Confinement::default()
        };
        let mem = Confinement {
            memory: Some(1 << 26),
            ..Confinement::default()
        };
        let xcpu = WaitStatus::signaled(libc::SIGXCPU, false);
        let oom = WaitStatus::exited(EXIT_MEMORY_LIMIT);
        let limit = |c: &Confinement, s| exit_error(c, s).and_then(|e| e.limit());
        assert_eq!(limit(&cpu, xcpu), Some(Limit::CpuTime));
        assert_eq!(limit(&mem, oom), Some(Limit::Memory));
        assert!(exit_error(&Confinement::default(), xcpu).is_none());
        assert!(exit_error(&cpu, oom).is_none());
        assert!(exit_error(&mem, xcpu).is_none());
    }
}
