//! The crate's one error type.
//!
//! Modelled on tokio's `JoinError`: small, hand-written, and shaped around the
//! caller's questions ("did it panic? which signal? was it the zygote?").

use std::fmt;
use std::io;
use std::time::Duration;

/// What went wrong, in one word. Returned by [`Error::kind`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The task panicked; [`Error::panic_message`] has the message and location.
    Panicked,
    /// The worker was terminated by a signal (a crash, `kill()`, a cancelled
    /// task's `SIGKILL`); [`Error::signal`] has the number.
    Signaled,
    /// The worker exited (for example through `std::process::exit`) without
    /// returning a result; [`Error::exit_code`] has the code.
    Exited,
    /// The task ran past its [`Task::timeout`](crate::Task::timeout) and was stopped.
    TimedOut,
    /// The zygote process is gone, so the task could not start or could not be
    /// watched to the end.
    ZygoteDied,
    /// An argument or a result could not be encoded or decoded, or the bytes a
    /// worker wrote were malformed, oversized or inconsistent.
    Codec,
    /// A system call failed; the message names it.
    Io,
    /// [`Zygote::start`](crate::Zygote::start) was called from a process that
    /// already runs more than one thread, where forking is unsound.
    MultiThreaded,
    /// A global function such as [`run_in_process`](crate::run_in_process) was
    /// called before [`init`](crate::init).
    NotInitialized,
    /// A [`Zygote`](crate::Zygote) was used in a process other than the one
    /// that started it: typically in a task, through a static or the global
    /// zygote, since a worker is a fork of that process and inherits its
    /// memory but not its file descriptors. A task that needs a process of
    /// its own can start a zygote itself.
    WrongProcess,
    /// An option or argument was refused before anything was started: for
    /// example [`Builder::reuse(0)`](crate::Builder::reuse) or
    /// [`Builder::zygotes(0)`](crate::Builder::zygotes). The message names it.
    InvalidInput,
    /// The task went past one of its resource limits
    /// ([`Task::memory_limit`](crate::Task::memory_limit),
    /// [`Task::cpu_limit`](crate::Task::cpu_limit)); [`Error::limit`] says
    /// which. (Going past [`Task::open_files_limit`](crate::Task::open_files_limit)
    /// is not an error of the task: the call that would open one file too
    /// many fails with `EMFILE` inside it.)
    ResourceLimit,
    /// The worker could not apply the task's resource limits or
    /// [`Sandbox`](crate::Sandbox), so the task did not run: the kernel lacks
    /// a feature the sandbox needs (Landlock, seccomp), or a limit is below
    /// what the worker itself needs to report a result. The message says
    /// which; [`Error::limit`] names the limit, if it was one.
    Confinement,
}

/// Which resource limit a task went past. Returned by [`Error::limit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Limit {
    /// [`Task::memory_limit`](crate::Task::memory_limit): an allocation failed.
    Memory,
    /// [`Task::cpu_limit`](crate::Task::cpu_limit): the kernel sent `SIGXCPU`.
    CpuTime,
    /// [`Task::open_files_limit`](crate::Task::open_files_limit).
    OpenFiles,
}

impl Limit {
    fn name(self) -> &'static str {
        match self {
            Limit::Memory => "memory",
            Limit::CpuTime => "CPU time",
            Limit::OpenFiles => "open files",
        }
    }
}

/// The error returned by every fallible operation of this crate.
///
/// `Error` answers "what happened to my task?": use [`kind`](Error::kind), then
/// the accessor for that kind. Its `Display` form is a lowercase sentence
/// fragment, as the Rust API guidelines ask.
///
/// ```
/// use run_in_process::{Error, ErrorKind};
/// fn describe(e: &Error) -> String {
///     match e.kind() {
///         ErrorKind::Panicked => format!("panic: {}", e.panic_message().unwrap_or("?")),
///         ErrorKind::Signaled => format!("signal {}", e.signal().unwrap_or(0)),
///         _ => e.to_string(),
///     }
/// }
/// ```
pub struct Error {
    kind: ErrorKind,
    repr: Repr,
    /// What a failed task left besides its error, boxed to keep `Error`
    /// small on the success path.
    extra: Option<Box<Extra>>,
}

/// A failed task's captured stderr and panic backtrace.
#[derive(Default)]
struct Extra {
    stderr: Option<Vec<u8>>,
    backtrace: Option<String>,
}

enum Repr {
    Panic(String),
    Signal(i32),
    Exit(i32),
    TimedOut(Duration),
    Message(String),
    Io(&'static str, io::Error),
    Limit(Limit, String),
}

impl Error {
    /// The category of this error.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// For [`ErrorKind::Panicked`]: the panic message, followed by `" at file:line:col"`
    /// when the panic had a location.
    pub fn panic_message(&self) -> Option<&str> {
        match &self.repr {
            Repr::Panic(m) => Some(m),
            _ => None,
        }
    }

    /// For [`ErrorKind::Signaled`]: the signal that terminated the worker.
    pub fn signal(&self) -> Option<i32> {
        match self.repr {
            Repr::Signal(s) => Some(s),
            _ => None,
        }
    }

    /// For [`ErrorKind::Exited`]: the worker's exit code.
    pub fn exit_code(&self) -> Option<i32> {
        match self.repr {
            Repr::Exit(c) => Some(c),
            _ => None,
        }
    }

    /// For [`ErrorKind::ResourceLimit`]: the limit the task went past. For
    /// [`ErrorKind::Confinement`]: the limit that could not be applied, if the
    /// failure was about a limit rather than the sandbox.
    ///
    /// ```no_run
    /// # async fn demo(zygote: run_in_process::Zygote) {
    /// use run_in_process::{ErrorKind, Limit};
    /// fn hog(mb: usize) -> usize { vec![1u8; mb << 20].iter().map(|&b| b as usize).sum() }
    /// let e = zygote.task(hog, 512).memory_limit(64 << 20).run().await.unwrap_err();
    /// assert_eq!(e.kind(), ErrorKind::ResourceLimit);
    /// assert_eq!(e.limit(), Some(Limit::Memory));
    /// # }
    /// ```
    pub fn limit(&self) -> Option<Limit> {
        match self.repr {
            Repr::Limit(limit, _) => Some(limit),
            _ => None,
        }
    }

    /// What the task wrote to stderr before it failed, up to its capture
    /// limit, when its stderr was captured
    /// ([`Task::stderr`](crate::Task::stderr)`(`[`Output::Capture`](crate::Output::Capture)`)`):
    /// the panic message as printed, or a C library's last words before a
    /// crash.
    ///
    /// ```no_run
    /// # async fn demo(zygote: run_in_process::Zygote) {
    /// use run_in_process::Output;
    /// fn fail(_: ()) -> u8 { eprintln!("no config"); std::process::exit(3) }
    /// let e = zygote.task(fail, ()).stderr(Output::Capture).run().await.unwrap_err();
    /// assert_eq!(e.stderr(), Some(&b"no config\n"[..]));
    /// # }
    /// ```
    pub fn stderr(&self) -> Option<&[u8]> {
        self.extra.as_ref()?.stderr.as_deref()
    }

    /// For [`ErrorKind::Panicked`]: the backtrace the worker took when the
    /// task panicked, if `RUST_BACKTRACE` was set (and not `0`) in the
    /// worker's environment, which [`Task::env`](crate::Task::env) can set.
    /// At most 32 KiB, and cut with the panic message to the result slot
    /// ([`Builder::slot_size`](crate::Builder::slot_size)). Under a
    /// [`memory_limit`](crate::Task::memory_limit) the worker clears
    /// `RUST_BACKTRACE`, so there is none.
    pub fn backtrace(&self) -> Option<&str> {
        self.extra.as_ref()?.backtrace.as_deref()
    }

    /// This error with the task's captured stderr.
    pub(crate) fn with_stderr(mut self, stderr: Vec<u8>) -> Error {
        self.extra.get_or_insert_default().stderr = Some(stderr);
        self
    }

    /// This error with a panic's backtrace, if there is one.
    pub(crate) fn with_backtrace(mut self, backtrace: Option<String>) -> Error {
        if backtrace.is_some() {
            self.extra.get_or_insert_default().backtrace = backtrace;
        }
        self
    }

    /// True if this error means the task did not produce its result because the
    /// zygote went away (shorthand for `kind() == ErrorKind::ZygoteDied`).
    pub fn is_zygote_died(&self) -> bool {
        self.kind == ErrorKind::ZygoteDied
    }

    pub(crate) fn panicked(message: String) -> Error {
        Error {
            kind: ErrorKind::Panicked,
            repr: Repr::Panic(message),
            extra: None,
        }
    }

    pub(crate) fn signaled(signal: i32) -> Error {
        Error {
            kind: ErrorKind::Signaled,
            repr: Repr::Signal(signal),
            extra: None,
        }
    }

    pub(crate) fn exited(code: i32) -> Error {
        Error {
            kind: ErrorKind::Exited,
            repr: Repr::Exit(code),
            extra: None,
        }
    }

    pub(crate) fn timed_out(after: Duration) -> Error {
        Error {
            kind: ErrorKind::TimedOut,
            repr: Repr::TimedOut(after),
            extra: None,
        }
    }

    pub(crate) fn new(kind: ErrorKind, message: impl Into<String>) -> Error {
        Error {
            kind,
            repr: Repr::Message(message.into()),
            extra: None,
        }
    }

    pub(crate) fn invalid(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::InvalidInput, message)
    }

    /// A task that went past `limit`; `detail` says by how much, or how the
    /// worker ended.
    pub(crate) fn resource_limit(limit: Limit, detail: String) -> Error {
        Error {
            kind: ErrorKind::ResourceLimit,
            repr: Repr::Limit(limit, detail),
            extra: None,
        }
    }

    /// Confinement that the worker could not apply; `limit` if it was a limit.
    pub(crate) fn confinement(limit: Option<Limit>, message: String) -> Error {
        match limit {
            Some(limit) => Error {
                kind: ErrorKind::Confinement,
                repr: Repr::Limit(limit, message),
                extra: None,
            },
            None => Error::new(ErrorKind::Confinement, message),
        }
    }

    pub(crate) fn zygote_died() -> Error {
        Error::new(ErrorKind::ZygoteDied, "the zygote process died")
    }

    pub(crate) fn codec(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::Codec, message)
    }

    /// An I/O error from the named system call.
    pub(crate) fn io(call: &'static str, source: io::Error) -> Error {
        Error {
            kind: ErrorKind::Io,
            repr: Repr::Io(call, source),
            extra: None,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.repr {
            Repr::Panic(m) => write!(f, "task panicked: {m}"),
            Repr::Signal(s) => write!(f, "worker was killed by signal {s}{}", signal_name(*s)),
            Repr::Exit(c) => write!(f, "worker exited with code {c} without returning a result"),
            Repr::TimedOut(d) => write!(f, "task timed out after {d:?}"),
            Repr::Message(m) => f.write_str(m),
            Repr::Io(call, e) => write!(f, "{call} failed: {e}"),
            Repr::Limit(limit, detail) if self.kind == ErrorKind::ResourceLimit => {
                write!(f, "task exceeded its {} limit: {detail}", limit.name())
            }
            Repr::Limit(_, message) => f.write_str(message),
        }
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Error")
            .field("kind", &self.kind)
            .field("message", &self.to_string())
            .field("stderr", &self.stderr().map(String::from_utf8_lossy))
            .field("backtrace", &self.backtrace().is_some())
            .finish()
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.repr {
            Repr::Io(_, e) => Some(e),
            _ => None,
        }
    }
}

impl From<Error> for io::Error {
    fn from(e: Error) -> io::Error {
        let kind = match e.kind {
            ErrorKind::TimedOut => io::ErrorKind::TimedOut,
            ErrorKind::Codec => io::ErrorKind::InvalidData,
            ErrorKind::InvalidInput => io::ErrorKind::InvalidInput,
            ErrorKind::Io => match &e.repr {
                Repr::Io(_, source) => source.kind(),
                _ => io::ErrorKind::Other,
            },
            _ => io::ErrorKind::Other,
        };
        io::Error::new(kind, e)
    }
}

fn signal_name(signal: i32) -> &'static str {
    match signal {
        libc::SIGHUP => " (SIGHUP)",
        libc::SIGINT => " (SIGINT)",
        libc::SIGQUIT => " (SIGQUIT)",
        libc::SIGILL => " (SIGILL)",
        libc::SIGTRAP => " (SIGTRAP)",
        libc::SIGABRT => " (SIGABRT)",
        libc::SIGBUS => " (SIGBUS)",
        libc::SIGFPE => " (SIGFPE)",
        libc::SIGKILL => " (SIGKILL)",
        libc::SIGUSR1 => " (SIGUSR1)",
        libc::SIGSEGV => " (SIGSEGV)",
        libc::SIGUSR2 => " (SIGUSR2)",
        libc::SIGPIPE => " (SIGPIPE)",
        libc::SIGALRM => " (SIGALRM)",
        libc::SIGTERM => " (SIGTERM)",
        libc::SIGXCPU => " (SIGXCPU)",
        libc::SIGXFSZ => " (SIGXFSZ)",
        libc::SIGSYS => " (SIGSYS)",
        _ => "",
    }
}

/// A shorthand for `std::result::Result<T, run_in_process::Error>`.
pub type Result<T, E = Error> = std::result::Result<T, E>;
