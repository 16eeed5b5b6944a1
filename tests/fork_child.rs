//! A plain `fork` of the parent, whose child drops the parent's tokio
//! runtime, must not disturb the parent's tasks; and a task may run a tokio
//! runtime of its own. A `harness = false` target: zygotes start in `main`
//! while the process has one thread, and trials run on `main`.
//!
//! The hazard: the epoll instance of the parent's runtime is shared with the
//! child across `fork` (one open file description). Dropping a registered
//! `AsyncFd` in the child would `epoll_ctl(EPOLL_CTL_DEL)` the parent's
//! registration of that fd, and the parent's task would never wake.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{HANG, TestResult, check_pooled_hygiene, checked_pooled, ensure, open_fds};
use libtest_mimic::Trial;
use run_in_process::Zygote;

fn main() {
    let parked = Zygote::start().expect("start a zygote with parked workers");
    let on_demand = Zygote::builder()
        .parked(0)
        .start()
        .expect("start a zygote without parked workers");
    // Four slots: as many workers as the hygiene check allows idle.
    let reused = Zygote::builder()
        .max_in_flight(4)
        .reuse(8)
        .start()
        .expect("start a reuse-mode zygote");
    let args = common::harness_args();
    let mut trials = Vec::new();
    for (name, z) in [
        ("parked", parked.clone()),
        ("on_demand", on_demand.clone()),
        ("reused", reused.clone()),
    ] {
        trials.push(Trial::test(
            format!("a_fork_that_drops_the_runtime_leaves_the_parents_tasks_alone_{name}"),
            move || fork_drops_the_runtime(&z, name),
        ));
    }
    {
        let z = parked.clone();
        trials.push(Trial::test(
            "a_zygote_starts_right_after_a_dropped_multi_thread_runtime",
            move || checked_pooled(&z, common::REUSED_KEPT, start_after_a_runtime),
        ));
    }
    for (name, z) in [("fresh", parked), ("reused", reused)] {
        trials.push(Trial::test(
            format!("a_task_runs_and_drops_a_multi_thread_runtime_of_its_own_{name}"),
            move || checked_pooled(&z, common::REUSED_KEPT, own_runtime),
        ));
    }
    libtest_mimic::run(&args, trials).exit();
}

fn marker(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("rip-fork-child-{}-{name}", std::process::id()))
}

/// Says it started, then waits for `release` to exist.
fn wait_for_release((started, release): (PathBuf, PathBuf)) -> u64 {
    std::fs::write(&started, b"").expect("write the started marker");
    while !release.exists() {
        std::thread::sleep(Duration::from_millis(1));
    }
    42
}

fn square(x: u64) -> u64 {
    x * x
}

/// Blocks (outside the runtime) until `path` exists.
fn wait_for(rt: &tokio::runtime::Runtime, path: &Path) -> TestResult {
    rt.block_on(async {
        tokio::time::timeout(HANG, async {
            while !path.exists() {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
        .await
    })
    .map_err(|_| format!("{} never appeared", path.display()).into())
}

fn fork_drops_the_runtime(z: &Zygote, name: &str) -> TestResult {
    let fds_before = open_fds();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let started = [marker(&format!("{name}-a")), marker(&format!("{name}-b"))];
    let release = marker(&format!("{name}-release"));
    for p in started.iter().chain([&release]) {
        let _ = std::fs::remove_file(p);
    }
    // Tasks that ran to the end on this runtime first: in reuse mode their
    // workers wait with their fds still registered with it, and a watch
    // task of the runtime's ends those registrations when it shuts down.
    // The fork's drop of the runtime must not run that watch there.
    let squares = |n: u64| {
        let z = z.clone();
        async move { futures_util::future::join_all((0..n).map(|i| z.run(square, i))).await }
    };
    rt.block_on(squares(3))
        .into_iter()
        .collect::<Result<Vec<_>, _>>()?;
    // Two tasks in flight, one awaited by `run`, one through a `Process`.
    let zc = z.clone();
    let arg = (started[0].clone(), release.clone());
    let run = rt.spawn(async move { zc.run(wait_for_release, arg).await });
    let zc = z.clone();
    let arg = (started[1].clone(), release.clone());
    let open = rt.spawn(async move { zc.open(wait_for_release, arg).await?.result().await });
    for s in &started {
        wait_for(&rt, s)?;
    }
    // SAFETY: fork(2); the child only drops the runtime (whose tasks hold
    // this crate's registered fds) and leaves through `_exit`. This process
    // has one thread outside tokio's (the runtime is current-thread).
    let child = unsafe { libc::fork() };
    if child == 0 {
        drop(rt);
        // SAFETY: `_exit` has no preconditions.
        unsafe { libc::_exit(0) };
    }
    ensure(child > 0, "fork")?;
    let mut status = 0;
    // SAFETY: waits for our own child; `status` is a valid out-pointer.
    let waited = unsafe { libc::waitpid(child, &mut status, 0) };
    ensure(
        waited == child && libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        format!("the fork child exited cleanly: {status:#x}"),
    )?;
    std::fs::write(&release, b"")?;
    let outcome = rt.block_on(async {
        let run = tokio::time::timeout(HANG, run).await;
        let open = tokio::time::timeout(HANG, open).await;
        // As many at once as there were workers before the fork, so that
        // every worker kept from before it serves one.
        let later = tokio::time::timeout(HANG, squares(3)).await;
        tokio::time::timeout(HANG, z.wait_idle()).await.ok();
        (run, open, later)
    });
    drop(rt);
    for p in started.iter().chain([&release]) {
        let _ = std::fs::remove_file(p);
    }
    match outcome {
        (Ok(Ok(Ok(42))), Ok(Ok(Ok(42))), Ok(later))
            if later
                .iter()
                .map(|r| r.as_ref().ok())
                .eq([Some(&0), Some(&1), Some(&4)]) => {}
        (run, open, later) => {
            return Err(format!(
                "after the fork: run {run:?}, open {open:?}, a new task {later:?} \
                 (Elapsed is a hang: a registration was lost)"
            )
            .into());
        }
    }
    check_pooled_hygiene(z, &fds_before, common::REUSED_KEPT)
}

/// Builds a multi-thread runtime in the worker, runs tasks on it, drops it,
/// and returns the sum and how many threads are left.
fn multi_thread_sum(n: u64) -> (u64, usize) {
    (sum_on_a_dropped_runtime(n), settled_threads())
}

/// Sums 1..=n in tasks of a multi-thread runtime of three workers, and drops
/// the runtime.
fn sum_on_a_dropped_runtime(n: u64) -> u64 {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(3)
        .enable_all()
        .build()
        .expect("a runtime in the worker");
    let sum = rt.block_on(async {
        let tasks: Vec<_> = (1..=n).map(|i| tokio::spawn(async move { i })).collect();
        let mut sum = 0;
        for t in tasks {
            sum += t.await.expect("a task of the worker's runtime");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
        sum
    });
    drop(rt);
    sum
}

/// The calling process's thread count once it falls to one, or as it is
/// after [`HANG`]. A thread that was just joined can still be counted for a
/// moment: the kernel wakes the joiner before it removes the thread.
fn settled_threads() -> usize {
    let deadline = std::time::Instant::now() + HANG;
    loop {
        let threads = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("Threads:"))
                    .and_then(|n| n.trim().parse().ok())
            })
            .unwrap_or(0);
        if threads == 1 || std::time::Instant::now() >= deadline {
            return threads;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Runs and drops a multi-thread runtime, then at once starts a zygote, as
/// a program that used tokio before `Zygote::start` would; returns how
/// `start` ended.
fn start_right_after_a_runtime(n: u64) -> Result<u64, String> {
    let sum = sum_on_a_dropped_runtime(n);
    Zygote::start().map(|_| sum).map_err(|e| e.to_string())
}

async fn start_after_a_runtime(z: Zygote) -> TestResult {
    for _ in 0..3 {
        let sum = z.run(start_right_after_a_runtime, 100).await??;
        ensure(sum == 5050, format!("sum {sum}"))?;
    }
    Ok(())
}

async fn own_runtime(z: Zygote) -> TestResult {
    for _ in 0..3 {
        let (sum, threads) = z.run(multi_thread_sum, 100).await?;
        ensure(sum == 5050, format!("sum {sum}"))?;
        ensure(
            threads == 1,
            format!("{threads} threads left after the runtime was dropped"),
        )?;
    }
    Ok(())
}
