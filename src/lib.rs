//! Run an ordinary Rust function in a fresh, disposable process and await its
//! result from tokio, at close to the cost of a `fork`.
//!
//! ```no_run
//! use run_in_process::Zygote;
//!
//! fn square(x: u64) -> u64 {
//!     x * x
//! }
//!
//! fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     // 1. Start the zygote first, while the process has one thread.
//!     let zygote = Zygote::start()?;
//!     // 2. Then start tokio and run tasks, each in its own process.
//!     tokio::runtime::Runtime::new()?.block_on(async {
//!         let n: u64 = zygote.run(square, 12).await?;
//!         assert_eq!(n, 144);
//!         Ok(())
//!     })
//! }
//! ```
//!
//! # The contract
//!
//! 1. **Call [`Zygote::start`] (or [`init`]) at the top of `main`**, before any
//!    thread or tokio runtime exists. Forking a multi-threaded process into
//!    running Rust code is unsound, so `start` refuses with
//!    [`ErrorKind::MultiThreaded`]. Under `#[tokio::main]` the runtime already
//!    runs, so write a plain `fn main` that starts the zygote and then builds
//!    the runtime; in tests, use a `harness = false` test target (libtest runs
//!    every `#[test]` on a spawned thread).
//! 2. **Functions are fn items or closures that capture nothing.** The worker is
//!    a fork of the same program, so the function travels as an address; a
//!    capturing closure does not compile. Arguments and results travel through
//!    serde; for large binary data, [`Blob`] avoids a copy into the receiver's
//!    heap.
//! 3. **A worker starts with the memory of the zygote**, that is, of your
//!    program at the moment `start` was called: state created later in the
//!    parent is not there, and libraries loaded later with `dlopen` are not
//!    mapped. Random-number generators seeded before `start` produce the same
//!    stream in every worker; reseed in the task (for `rand` ≥ 0.9:
//!    `let mut rng = rand::rngs::StdRng::from_os_rng();`).
//!
//! # The process model
//!
//! ```text
//! parent (your program, tokio) ── command socket ──▶ zygote (one thread, no tokio)
//!    ▲  ▲                                               │ fork per task
//!    │  └─ report socket per task: Started+pidfd, Exited ┤
//!    └──── eventfd per task + result slot in shared memory ◀── worker (fresh process)
//! ```
//!
//! The zygote reaps its workers and reports their exit status; the parent reaps
//! the zygote. The zygote also keeps a few workers forked ahead of time
//! ([`Builder::parked`]): a task goes straight to one through a private
//! socket, skipping the fork, and each still runs exactly one task. A worker commits its result to a shared-memory slot and rings its
//! eventfd *before* it exits, so the parent sees completion without waiting for
//! the exit. If the parent dies, the zygote sees end-of-stream on its command
//! socket (or, as a backstop, `PR_SET_PDEATHSIG`) and kills every worker; if the
//! zygote dies, every worker gets `SIGKILL` and every pending task fails with
//! [`ErrorKind::ZygoteDied`], except one whose worker had already committed
//! its result (that result is delivered), and the dead zygote is reaped.
//! Tasks sent before its death was noticed fail the same way. Each worker leads its own process group: Ctrl-C
//! at a terminal reaches only the parent, and whatever a task leaves behind
//! is killed with its group when the worker is reaped.
//!
//! # Minimum Linux version
//!
//! Linux 5.4: `pidfd_open` (5.3), `pidfd_send_signal` (5.1) and
//! `waitid(P_PIDFD)` (5.4). `close_range` (5.9) is used when present, with a
//! fallback that walks `/proc/self/fd`. See [SAFETY.md] for the invariants
//! behind every `unsafe` block.
//!
//! [SAFETY.md]: https://github.com/run-in-process/run-in-process/blob/main/SAFETY.md

#![cfg(target_os = "linux")]
#![warn(missing_docs)]

mod blob;
mod budget;
mod codec;
mod confine;
mod env;
mod epoch;
mod error;
mod idle;
mod job_cell;
mod limits;
mod mailbox;
mod map;
mod output;
mod panic_report;
mod payload;
mod process;
mod reactor;
mod report_pool;
mod ring;
mod sandbox;
mod shared;
mod shm;
mod slots;
mod spill;
mod stats;
mod sync;
mod sys;
mod template;
mod trace;
mod wire;
mod worker;
mod zygote;

use std::future::Future;
use std::sync::OnceLock;

use serde::Serialize;
use serde::de::DeserializeOwned;

pub use crate::blob::Blob;
pub use crate::error::{Error, ErrorKind, Limit, Result};
pub use crate::output::{Captured, DEFAULT_CAPTURE_LIMIT, Output, OutputReader};
pub use crate::process::{
    Builder, DEFAULT_GRACE, DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_IN_FLIGHT, DEFAULT_MAX_PAYLOAD,
    DEFAULT_PARKED, DEFAULT_SLOT_SIZE, Process, State, Task, Zygote,
};
pub use crate::sandbox::Sandbox;
pub use crate::stats::Stats;
pub use crate::worker::stop_requested;

#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;

static GLOBAL: OnceLock<Zygote> = OnceLock::new();

/// Starts the global zygote used by [`run_in_process`] and [`open_in_process`].
///
/// Call it at the top of `main`, before any thread or runtime starts. Calling
/// it again does nothing.
///
/// ```no_run
/// fn main() -> Result<(), Box<dyn std::error::Error>> {
///     run_in_process::init()?;
///     // ... then build the tokio runtime.
///     Ok(())
/// }
/// ```
///
/// # Errors
///
/// As [`Zygote::start`].
pub fn init() -> Result<()> {
    if GLOBAL.get().is_none() {
        let zygote = Zygote::start()?;
        // Only one thread exists (start checked), so nobody raced us here.
        let _ = GLOBAL.set(zygote);
    }
    Ok(())
}

/// The global zygote, if [`init`] has been called.
pub fn global() -> Option<&'static Zygote> {
    GLOBAL.get()
}

fn global_or_err() -> Result<&'static Zygote> {
    GLOBAL.get().ok_or_else(|| {
        Error::new(
            ErrorKind::NotInitialized,
            "run_in_process::init() was not called at the top of main",
        )
    })
}

/// Runs `f(arg)` in a fresh process forked from the global zygote; see
/// [`Zygote::run`].
///
/// # Errors
///
/// [`ErrorKind::NotInitialized`] without [`init`]; otherwise as [`Zygote::run`].
///
/// # Cancel safety
///
/// As [`Zygote::run`].
pub async fn run_in_process<F, A, R>(f: F, arg: A) -> Result<R>
where
    F: Fn(A) -> R + Copy + 'static,
    A: Serialize + DeserializeOwned,
    R: Serialize + DeserializeOwned,
{
    global_or_err()?.run(f, arg).await
}

/// Starts `f(arg)` in a fresh process forked from the global zygote and
/// returns its handle; see [`Zygote::open`].
///
/// # Errors
///
/// [`ErrorKind::NotInitialized`] without [`init`]; otherwise as [`Zygote::open`].
///
/// # Cancel safety
///
/// As [`Zygote::run`].
pub async fn open_in_process<F, A, R>(f: F, arg: A) -> Result<Process<R>>
where
    F: Fn(A) -> R + Copy + 'static,
    A: Serialize + DeserializeOwned,
    R: Serialize + DeserializeOwned,
{
    global_or_err()?.open(f, arg).await
}

/// Runs the async function `f(arg)` in a fresh process forked from the global
/// zygote; see [`Zygote::run_async`].
///
/// # Errors
///
/// [`ErrorKind::NotInitialized`] without [`init`]; otherwise as [`Zygote::run`].
///
/// # Cancel safety
///
/// As [`Zygote::run`].
pub async fn run_in_process_async<F, Fut, A, R>(f: F, arg: A) -> Result<R>
where
    F: Fn(A) -> Fut + Copy + 'static,
    Fut: Future<Output = R>,
    A: Serialize + DeserializeOwned,
    R: Serialize + DeserializeOwned,
{
    global_or_err()?.run_async(f, arg).await
}
