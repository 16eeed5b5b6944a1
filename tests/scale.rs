//! Throughput features: reuse mode, several zygotes, bounded maps, warm-up.
//! A `harness = false` target, so every zygote starts while the process has
//! one thread and trials run on `main`.

mod common;

use std::future::Future;
use std::io::Read;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::{HANG, TestResult, ensure, processes};
use futures_util::StreamExt;
use libtest_mimic::Trial;
use run_in_process::{Builder, ErrorKind, Zygote};

/// Tasks this worker process has run, counting the current one.
static RUN_HERE: AtomicU64 = AtomicU64::new(0);
/// Set by the warm-up hook in each zygote; workers inherit it.
static WARMED: AtomicU64 = AtomicU64::new(0);

fn main() {
    let reused = Zygote::builder()
        .max_in_flight(2)
        .reuse(5)
        .start()
        .expect("start the reuse zygote");
    // One worker at a time: `parked(1)` keeps the pool to one worker.
    let one = Zygote::builder()
        .max_in_flight(1)
        .parked(1)
        .reuse(1000)
        .start()
        .expect("start the one-worker reuse zygote");
    let idle = Zygote::builder()
        .max_in_flight(1)
        .parked(1)
        .reuse(1000)
        .idle_timeout(Duration::from_millis(1))
        .start()
        .expect("start the idle-timeout zygote");
    let pair = Zygote::builder()
        .max_in_flight(4)
        .zygotes(2)
        .start()
        .expect("start two zygotes");
    let doomed = Zygote::builder()
        .max_in_flight(4)
        .zygotes(2)
        .start()
        .expect("start two zygotes to kill one of");
    let mapper = Zygote::builder()
        .max_in_flight(4)
        .start()
        .expect("start the map zygote");
    let warm = Zygote::builder()
        .warm_up(warm_up)
        .zygotes(2)
        .start()
        .expect("start the warmed zygotes");
    let plain = Zygote::start().expect("start the default zygote");
    let panicking = Zygote::builder().warm_up(warm_up_panics).start();
    let threaded = Zygote::builder().warm_up(warm_up_starts_a_thread).start();
    let joined = Zygote::builder().warm_up(warm_up_joins_its_threads).start();

    let args = common::harness_args();
    let mut trials = Vec::new();
    macro_rules! trial {
        ($zygote:expr, $name:ident) => {{
            let z = $zygote.clone();
            trials.push(Trial::test(stringify!($name), move || checked(&z, $name)));
        }};
    }
    trial!(reused, a_worker_serves_up_to_reuse_tasks_then_is_replaced);
    trial!(one, a_panic_retires_the_worker);
    trial!(one, a_crash_or_exit_retires_the_worker);
    trial!(one, a_timeout_retires_the_worker);
    trial!(one, a_cancelled_task_retires_the_worker);
    trial!(one, fresh_forces_a_worker_that_ran_nothing);
    trial!(one, a_confined_task_runs_fresh_and_ends_its_worker);
    trial!(one, an_open_process_ends_its_reused_worker);
    trial!(reused, results_are_never_crossed_between_tasks);
    {
        let z = one.clone();
        trials.push(Trial::test(
            "a_reused_worker_follows_its_tasks_between_runtimes",
            move || a_reused_worker_follows_its_tasks_between_runtimes(&z),
        ));
    }
    trial!(one, stats_count_each_outcome_once);
    trial!(one, a_reused_worker_takes_jobs_of_every_size);
    trial!(idle, idle_workers_retire_and_no_task_is_lost_to_the_race);
    trial!(pair, tasks_spread_across_zygotes);
    trials.push(Trial::test(
        "one_dead_zygote_fails_only_its_own_tasks",
        move || one_dead_zygote_fails_only_its_own_tasks(doomed),
    ));
    trial!(mapper, map_yields_in_input_order_within_max_in_flight);
    trial!(mapper, map_unordered_yields_every_result);
    trial!(mapper, dropping_a_map_cancels_its_tasks);
    trial!(warm, every_worker_inherits_the_warm_up);
    trial!(plain, a_fresh_worker_takes_few_page_faults);
    trials.push(Trial::test(
        "bad_options_are_refused_before_any_fork",
        bad_options_are_refused_before_any_fork,
    ));
    trials.push(Trial::test(
        "a_warm_up_that_panics_fails_start",
        move || {
            let e = panicking.err().ok_or("start succeeded")?;
            ensure(
                e.kind() == ErrorKind::ZygoteDied && e.to_string().contains("panicked"),
                format!("{e:?}"),
            )
        },
    ));
    trials.push(Trial::test(
        "a_warm_up_that_leaves_a_thread_fails_start",
        move || {
            let e = threaded.err().ok_or("start succeeded")?;
            ensure(
                e.kind() == ErrorKind::ZygoteDied && e.to_string().contains("thread"),
                format!("{e:?}"),
            )
        },
    ));
    trials.push(Trial::test(
        "a_warm_up_that_joins_its_threads_starts",
        move || {
            let z = joined.map_err(|e| format!("{e:?}"))?;
            checked(&z, warmed_by_threads)
        },
    ));
    libtest_mimic::run(&args, trials).exit();
}

/// Runs one trial on a fresh runtime, then checks that nothing is left. An
/// idle reused worker's pidfd, doorbell and report socket duplicate are kept
/// with its mailbox, for its next task; any other new fd is a leak.
fn checked<F, Fut>(zygote: &Zygote, body: F) -> TestResult
where
    F: FnOnce(Zygote) -> Fut,
    Fut: Future<Output = TestResult>,
{
    common::checked_pooled(zygote, common::REUSED_KEPT, body)
}

fn count(_: ()) -> (u32, u64) {
    (
        std::process::id(),
        RUN_HERE.fetch_add(1, Ordering::Relaxed) + 1,
    )
}

fn fail(_: ()) -> u64 {
    panic!("retire me")
}

#[allow(clippy::disallowed_methods)] // reason: the task exits as user code may
fn crash(how: u8) -> u64 {
    match how {
        0 => std::process::abort(),
        _ => std::process::exit(7),
    }
}

fn spin(_: ()) -> u64 {
    loop {
        std::hint::spin_loop();
    }
}

/// Writes this worker's pid into the fifo `path`, then blocks for ever.
fn announce_and_block(path: PathBuf) -> u64 {
    let pid = std::process::id();
    std::fs::write(&path, pid.to_string()).expect("write the fifo");
    loop {
        std::thread::park();
    }
}

fn double(x: u64) -> (u32, u64) {
    (std::process::id(), x * 2)
}

/// The worker's pid, the argument's length and the sum of its bytes.
fn weigh(bytes: serde_bytes::ByteBuf) -> (u32, usize, u64) {
    let sum = bytes.iter().map(|&b| u64::from(b)).sum();
    (std::process::id(), bytes.len(), sum)
}

fn parent_pid(_: ()) -> u32 {
    std::os::unix::process::parent_id()
}

fn block(_: ()) -> u64 {
    loop {
        std::thread::park();
    }
}

/// Sleeps 20 ms and returns when it ran, on the system-wide monotonic clock.
fn timed(i: u64) -> (u64, u64, u64) {
    let now = || {
        let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
        t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
    };
    let start = now();
    std::thread::sleep(Duration::from_millis(20));
    (i, start, now())
}

fn warmed(_: ()) -> u64 {
    WARMED.load(Ordering::Relaxed)
}

fn warm_up() {
    WARMED.store(42, Ordering::Relaxed);
}

fn warm_up_panics() {
    panic!("warm-up failed");
}

/// Leaves its result through threads it has joined: each of them is gone,
/// though the last may still be counted for a moment.
fn warm_up_joins_its_threads() {
    for i in 1..=8 {
        std::thread::spawn(move || WARMED.fetch_add(i, Ordering::Relaxed))
            .join()
            .expect("a warm-up thread");
    }
}

async fn warmed_by_threads(z: Zygote) -> TestResult {
    let warmed = z.run(warmed, ()).await?;
    ensure(warmed == 36, format!("warmed {warmed}"))
}

fn warm_up_starts_a_thread() {
    std::thread::spawn(|| {
        loop {
            std::thread::park();
        }
    });
}

async fn a_worker_serves_up_to_reuse_tasks_then_is_replaced(z: Zygote) -> TestResult {
    // One at a time, so the same worker is offered each task while it lives.
    let mut seen = Vec::new();
    for _ in 0..10 {
        seen.push(z.run(count, ()).await?);
    }
    let first = seen[0].0;
    ensure(
        seen[..5]
            .iter()
            .enumerate()
            .all(|(i, &(pid, n))| pid == first && n == i as u64 + 1),
        format!("the first five tasks share a worker: {seen:?}"),
    )?;
    ensure(
        seen[5].0 != first && seen[5].1 == 1,
        format!("the sixth task gets a new worker: {seen:?}"),
    )
}

/// A reused worker's doorbell and report socket stay registered with the
/// runtime of its last task. A task on another runtime must register them
/// with its own: were it to wait on the old registration, only a poll of the
/// old runtime (idle here) would ever wake it.
fn a_reused_worker_follows_its_tasks_between_runtimes(z: &Zygote) -> TestResult {
    // Generous, to catch a hang: each task takes well under a millisecond.
    const WAKE: Duration = Duration::from_secs(10);
    let fds_before = common::open_fds();
    let runtime = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    };
    let (a, b) = (runtime()?, runtime()?);
    let on = |rt: &tokio::runtime::Runtime, name: &str| -> Result<(u32, u64), String> {
        rt.block_on(async { tokio::time::timeout(WAKE, z.run(count, ())).await })
            .map_err(|_| format!("a task on runtime {name} was never woken"))?
            .map_err(|e| format!("a task on runtime {name}: {e}"))
    };
    let mut seen = Vec::new();
    for name in ["a", "a", "b", "b", "a"] {
        seen.push(on(if name == "a" { &a } else { &b }, name)?);
    }
    drop(a);
    // The kept registration is with a runtime that is gone.
    seen.push(on(&b, "b")?);
    let first = seen[0];
    ensure(
        seen.iter()
            .enumerate()
            .all(|(i, &(pid, n))| pid == first.0 && n == first.1 + i as u64),
        format!("one worker served every task, across both runtimes: {seen:?}"),
    )?;
    b.block_on(async { tokio::time::timeout(HANG, z.wait_idle()).await })
        .map_err(|_| "wait_idle hung")?;
    drop(b);
    common::check_pooled_hygiene(z, &fds_before, common::REUSED_KEPT)
}

/// A reused worker's job comes through its job cell when it fits and
/// carries no fd, else over the socket, with the cell pointing there: an
/// argument inline in the cell, inline but too long for the cell (4 KiB),
/// and in a memfd (over 32 KiB). One worker serves them all, in any order.
async fn a_reused_worker_takes_jobs_of_every_size(z: Zygote) -> TestResult {
    let sizes = [16usize, 6000, 100_000, 16, 100_000, 4000, 6000, 16];
    let mut pids = std::collections::BTreeSet::new();
    for (i, &len) in sizes.iter().enumerate() {
        let bytes: Vec<u8> = (0..len).map(|k| (k * 7 + i) as u8).collect();
        let want = bytes.iter().map(|&b| u64::from(b)).sum::<u64>();
        let (pid, got_len, sum) = z.run(weigh, serde_bytes::ByteBuf::from(bytes)).await?;
        ensure(
            got_len == len && sum == want,
            format!(
                "task {i}: a {len}-byte argument arrived as {got_len} bytes, sum {sum} (want {want})"
            ),
        )?;
        pids.insert(pid);
    }
    ensure(
        pids.len() == 1,
        format!("one reused worker serves every size, not {pids:?}"),
    )
}

async fn a_panic_retires_the_worker(z: Zygote) -> TestResult {
    let (before, _) = z.run(count, ()).await?;
    let e = z.run(fail, ()).await.unwrap_err();
    ensure(e.kind() == ErrorKind::Panicked, format!("{e:?}"))?;
    let (after, runs) = z.run(count, ()).await?;
    ensure(
        after != before && runs == 1,
        format!("{before} then {after} ({runs})"),
    )
}

async fn a_crash_or_exit_retires_the_worker(z: Zygote) -> TestResult {
    for (how, kind) in [(0, ErrorKind::Signaled), (1, ErrorKind::Exited)] {
        let (before, _) = z.run(count, ()).await?;
        let e = z.run(crash, how).await.unwrap_err();
        ensure(e.kind() == kind, format!("{e:?}"))?;
        let (after, runs) = z.run(count, ()).await?;
        ensure(
            after != before && runs == 1,
            format!("{before} then {after} ({runs})"),
        )?;
    }
    Ok(())
}

async fn a_timeout_retires_the_worker(z: Zygote) -> TestResult {
    let (before, _) = z.run(count, ()).await?;
    let e = z
        .task(spin, ())
        .timeout(Duration::from_millis(50))
        .grace(Duration::from_millis(50))
        .run()
        .await
        .unwrap_err();
    ensure(e.kind() == ErrorKind::TimedOut, format!("{e:?}"))?;
    let (after, runs) = z.run(count, ()).await?;
    ensure(
        after != before && runs == 1,
        format!("{before} then {after} ({runs})"),
    )
}

async fn a_cancelled_task_retires_the_worker(z: Zygote) -> TestResult {
    let (before, _) = z.run(count, ()).await?;
    let fifo = std::env::temp_dir().join(format!("rip-scale-{}.fifo", std::process::id()));
    let _ = std::fs::remove_file(&fifo);
    rustix::fs::mknodat(
        rustix::fs::CWD,
        &fifo,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::RUSR | rustix::fs::Mode::WUSR,
        0,
    )?;
    let task = tokio::spawn({
        let (z, fifo) = (z.clone(), fifo.clone());
        async move { z.run(announce_and_block, fifo).await }
    });
    // The worker has the task once it writes its pid: then cancel.
    let reader = fifo.clone();
    let pid = tokio::task::spawn_blocking(move || {
        let mut text = String::new();
        std::fs::File::open(reader)?.read_to_string(&mut text)?;
        Ok::<_, std::io::Error>(text)
    })
    .await??;
    std::fs::remove_file(&fifo)?;
    task.abort();
    ensure(
        task.await.is_err_and(|e| e.is_cancelled()),
        "the task was cancelled",
    )?;
    ensure(
        pid == before.to_string(),
        format!("ran on {pid}, not {before}"),
    )?;
    let (after, runs) = z.run(count, ()).await?;
    ensure(
        after != before && runs == 1,
        format!("{before} then {after} ({runs})"),
    )
}

async fn fresh_forces_a_worker_that_ran_nothing(z: Zygote) -> TestResult {
    let (a, _) = z.run(count, ()).await?;
    let (b, n) = z.run(count, ()).await?;
    ensure(a == b && n >= 2, format!("reused: {a}, {b} ({n})"))?;
    let (c, runs) = z.task(count, ()).fresh().run().await?;
    ensure(c != a && runs == 1, format!("fresh: {c} ran {runs}"))
}

async fn a_confined_task_runs_fresh_and_ends_its_worker(z: Zygote) -> TestResult {
    let (a, _) = z.run(count, ()).await?;
    let (b, n) = z.run(count, ()).await?;
    ensure(a == b && n >= 2, format!("reused: {a}, {b} ({n})"))?;
    let (c, runs) = z.task(count, ()).open_files_limit(64).run().await?;
    ensure(c != a && runs == 1, format!("confined: {c} ran {runs}"))?;
    // Its limit cannot be undone: that worker serves nothing more.
    for _ in 0..3 {
        let (d, _) = z.run(count, ()).await?;
        ensure(
            d != c,
            format!("the confined task's worker {c} ran another task"),
        )?;
    }
    Ok(())
}

async fn an_open_process_ends_its_reused_worker(z: Zygote) -> TestResult {
    let (before, _) = z.run(count, ()).await?;
    let mut process = z.task(count, ()).open().await?;
    let status = process.wait().await?;
    ensure(status.success(), format!("{status:?}"))?;
    let (after, runs) = z.run(count, ()).await?;
    ensure(
        process.pid() == before && after != before && runs == 1,
        format!("{before}, then the process {}, then {after}", process.pid()),
    )
}

async fn stats_count_each_outcome_once(z: Zygote) -> TestResult {
    z.wait_idle().await;
    let before = z.stats();
    z.run(count, ()).await?;
    // Its worker waits for the next task: parked, and reused.
    let waiting = z.stats();
    ensure(
        (waiting.parked, waiting.reused) == (1, 1),
        format!("after one task: {waiting:?}"),
    )?;
    let _ = z.run(fail, ()).await;
    let _ = z.run(crash, 0).await;
    let _ = z.run(crash, 1).await;
    let _ = z
        .task(spin, ())
        .timeout(Duration::from_millis(20))
        .grace(Duration::from_millis(20))
        .run()
        .await;
    let running = z.open(block, ()).await?;
    ensure(z.stats().in_flight == 1, format!("{:?}", z.stats()))?;
    drop(running);
    z.wait_idle().await;
    let after = z.stats();
    let delta = |f: fn(&run_in_process::Stats) -> u64| f(&after) - f(&before);
    let got = [
        delta(|s| s.spawned),
        delta(|s| s.completed),
        delta(|s| s.panicked),
        delta(|s| s.signaled),
        delta(|s| s.exited),
        delta(|s| s.timed_out),
        delta(|s| s.cancelled),
        delta(|s| s.lost),
        after.in_flight,
    ];
    ensure(
        got == [6, 1, 1, 1, 1, 1, 1, 0, 0],
        format!("{got:?}: {after:?}"),
    )?;
    // The open task ended its worker; any worker parked now is fresh.
    ensure(after.reused == 0, format!("after the last task: {after:?}"))
}

async fn results_are_never_crossed_between_tasks(z: Zygote) -> TestResult {
    let results: Vec<_> = z.map(double, 0..2000u64).collect().await;
    let mut pids = std::collections::BTreeSet::new();
    for (i, r) in results.into_iter().enumerate() {
        let (pid, value) = r?;
        ensure(value == i as u64 * 2, format!("task {i} got {value}"))?;
        pids.insert(pid);
    }
    // Up to five tasks per worker: a few hundred workers, not two thousand
    // (a task that finds no worker waiting gets a fresh one of its own).
    ensure(pids.len() < 2000 / 2, format!("{} workers", pids.len()))
}

async fn idle_workers_retire_and_no_task_is_lost_to_the_race(z: Zygote) -> TestResult {
    // With a 1 ms idle timeout, tasks sent at all moments relative to it
    // race the worker's retirement: each must still run exactly once.
    let mut pids = std::collections::BTreeSet::new();
    for i in 0..300u64 {
        let (pid, _) = z.run(count, ()).await?;
        pids.insert(pid);
        tokio::time::sleep(Duration::from_micros(i % 3 * 700)).await;
    }
    ensure(pids.len() > 1, "idle workers retired")?;
    // The last worker retires on its own, without another task.
    let (last, _) = z.run(count, ()).await?;
    let deadline = tokio::time::Instant::now() + HANG;
    while common::process_exists(last) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    ensure(
        !common::process_exists(last),
        "an idle worker retired on its own",
    )
}

async fn tasks_spread_across_zygotes(z: Zygote) -> TestResult {
    let pids = z.pids();
    ensure(pids.len() == 2 && pids[0] != pids[1], format!("{pids:?}"))?;
    let parents: Vec<_> = futures_util::future::join_all((0..4).map(|_| z.run(parent_pid, ())))
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;
    ensure(
        pids.iter().all(|p| parents.contains(p)),
        format!("workers of {parents:?}, zygotes {pids:?}"),
    )
}

fn one_dead_zygote_fails_only_its_own_tasks(z: Zygote) -> TestResult {
    let rt = tokio::runtime::Runtime::new()?;
    let pids = z.pids();
    let outcome = rt.block_on(async {
        // Two tasks at once go one to each zygote (the least busy).
        let mut a = z.task(block, ()).open().await?;
        let mut b = z.task(block, ()).open().await?;
        let parent = |pid: u32| {
            processes()
                .into_iter()
                .find(|p| p.pid == pid)
                .map(|p| p.ppid)
        };
        let (mut doomed, mut survivor) = if parent(a.pid()) == Some(pids[1]) {
            (a, b)
        } else {
            std::mem::swap(&mut a, &mut b);
            (a, b)
        };
        ensure(
            parent(doomed.pid()) == Some(pids[1]),
            "a task on the second zygote",
        )?;
        ensure(
            parent(survivor.pid()) == Some(pids[0]),
            "a task on the first zygote",
        )?;
        rustix::process::kill_process(
            rustix::process::Pid::from_raw(pids[1] as i32).ok_or("pid")?,
            rustix::process::Signal::KILL,
        )?;
        let e = tokio::time::timeout(HANG, doomed.wait())
            .await?
            .unwrap_err();
        ensure(e.kind() == ErrorKind::ZygoteDied, format!("{e:?}"))?;
        // The other zygote's task is untouched, and later tasks go there.
        ensure(
            survivor.state() == run_in_process::State::Running,
            "still running",
        )?;
        survivor.kill()?;
        let status = tokio::time::timeout(HANG, survivor.wait()).await??;
        ensure(
            std::os::unix::process::ExitStatusExt::signal(&status) == Some(libc::SIGKILL),
            format!("{status:?}"),
        )?;
        drop((doomed, survivor));
        for _ in 0..8 {
            ensure(
                z.run(parent_pid, ()).await? == pids[0],
                "later tasks go to the live one",
            )?;
        }
        tokio::time::timeout(HANG, z.wait_idle()).await?;
        Ok::<_, libtest_mimic::Failed>(())
    });
    drop(rt);
    // Dropping the handle reaps both zygotes, the dead one included.
    drop(z);
    outcome?;
    let me = std::process::id();
    let left: Vec<_> = processes()
        .into_iter()
        .filter(|p| {
            pids.contains(&p.pid) || pids.contains(&p.ppid) || (p.ppid == me && p.state == 'Z')
        })
        .collect();
    ensure(left.is_empty(), format!("left behind: {left:?}"))
}

async fn map_yields_in_input_order_within_max_in_flight(z: Zygote) -> TestResult {
    let results: Vec<_> = z.map(timed, 0..24u64).collect().await;
    let mut spans = Vec::new();
    for (i, r) in results.into_iter().enumerate() {
        let (index, start, end) = r?;
        ensure(index == i as u64, format!("item {i} was {index}"))?;
        spans.push((start, end));
    }
    // The most tasks running at any instant: at a task's start, count the
    // tasks that started before and had not ended.
    let most = spans
        .iter()
        .map(|&(s, _)| spans.iter().filter(|&&(s2, e2)| s2 <= s && e2 > s).count())
        .max()
        .unwrap_or(0);
    ensure(
        (2..=4).contains(&most),
        format!("{most} tasks at once, max_in_flight 4"),
    )
}

async fn map_unordered_yields_every_result(z: Zygote) -> TestResult {
    let mut values: Vec<u64> = z
        .map_unordered(double, 0..500u64)
        .map(|r| r.map(|(_, v)| v))
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;
    values.sort_unstable();
    ensure(
        values == (0..500).map(|x| x * 2).collect::<Vec<_>>(),
        "every result, once",
    )
}

async fn dropping_a_map_cancels_its_tasks(z: Zygote) -> TestResult {
    let mut stream = Box::pin(z.map(block, std::iter::repeat_n((), 100)));
    // Poll it until it holds the zygote's four slots, then drop it.
    let deadline = tokio::time::Instant::now() + HANG;
    while z.workers() < 4 && tokio::time::Instant::now() < deadline {
        let _ = tokio::time::timeout(Duration::from_millis(5), stream.next()).await;
    }
    ensure(z.workers() == 4, format!("{} workers", z.workers()))?;
    drop(stream);
    // `checked` then waits for every worker to be reaped.
    Ok(())
}

async fn every_worker_inherits_the_warm_up(z: Zygote) -> TestResult {
    let values: Vec<_> = z.map(warmed, std::iter::repeat_n((), 16)).collect().await;
    for v in values {
        ensure(v? == 42, "the warm-up's value")?;
    }
    ensure(
        WARMED.load(Ordering::Relaxed) == 0,
        "the hook ran in the zygotes, not here",
    )
}

fn bad_options_are_refused_before_any_fork() -> TestResult {
    let cases: [(&str, Builder); 4] = [
        ("reuse(0)", Zygote::builder().reuse(0)),
        ("zygotes(0)", Zygote::builder().zygotes(0)),
        ("max_in_flight(0)", Zygote::builder().max_in_flight(0)),
        ("zygotes(3)", Zygote::builder().zygotes(3).max_in_flight(2)),
    ];
    // Threads run here (the harness started a runtime), so a `start` that
    // got as far as forking would fail with `MultiThreaded` instead.
    for (what, builder) in cases {
        let e = builder.start().err().ok_or(format!("{what} started"))?;
        ensure(
            e.kind() == ErrorKind::InvalidInput && e.to_string().contains(what),
            format!("{what}: {e:?}"),
        )?;
    }
    Ok(())
}

/// Most page faults a fresh worker with default settings may take, on
/// average, from its fork to its exit. Each fault on this VM costs a couple
/// of microseconds of the task's latency, so a change that adds some shows
/// here first. Measured on the dev VM: 29–31 (release) and 59–63
/// (unoptimised; the unoptimised figure moves with the code's layout, a
/// third of a worker's faults being text pages). Without the zygote
/// registering its thread-local destructors for its workers it was 47 and
/// 76; with `close_fds_except` allocating for seven fds, 35.5 (release).
const WORKER_FAULTS_MAX: f64 = if cfg!(debug_assertions) { 70.0 } else { 33.0 };

/// The minor faults of the zygote's reaped children (`cminflt`, field 11 of
/// `/proc/PID/stat`).
fn children_minor_faults(pid: u32) -> Result<u64, String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).map_err(|e| e.to_string())?;
    // "pid (comm) state ppid ...": after the comm, state is field 3.
    let rest = stat.rfind(')').map(|i| &stat[i + 2..]).ok_or("no comm")?;
    rest.split(' ')
        .nth(11 - 3)
        .and_then(|f| f.parse().ok())
        .ok_or_else(|| format!("no cminflt in {stat:?}"))
}

async fn a_fresh_worker_takes_few_page_faults(zygote: Zygote) -> TestResult {
    fn noop(x: u64) -> u64 {
        x
    }
    const TASKS: u64 = 400;
    let pid = zygote.pid();
    // The first tasks fault in what later ones find mapped.
    for i in 0..20 {
        ensure(zygote.run(noop, i).await? == i, "a wrong result")?;
    }
    let before = children_minor_faults(pid)?;
    for i in 0..TASKS {
        ensure(zygote.run(noop, i).await? == i, "a wrong result")?;
    }
    // Every worker counted has been reaped; those parked since (and not yet
    // counted) make up for those parked before and counted now.
    let per_worker = (children_minor_faults(pid)? - before) as f64 / TASKS as f64;
    eprintln!("a fresh worker took {per_worker:.1} page faults");
    ensure(
        per_worker <= WORKER_FAULTS_MAX,
        format!("a fresh worker took {per_worker:.1} page faults, more than {WORKER_FAULTS_MAX}"),
    )
}
