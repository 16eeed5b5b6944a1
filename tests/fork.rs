//! Integration tests that fork: a `harness = false` target, so that every
//! trial runs on the main thread and the zygotes are started while the test
//! process still has exactly one thread (libtest would run each `#[test]` on a
//! spawned thread).
//!
//! After every trial the harness waits for the zygote to report every worker
//! reaped, then checks `/proc`: no zombie children, no process left under the
//! zygote, and the same number of open fds as before the trial.

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use common::{TestResult, checked, ensure, process_exists};
use libtest_mimic::Trial;
use run_in_process::{Blob, ErrorKind, State, Zygote};
use serde::{Deserialize, Serialize};

fn main() {
    // Both zygotes start before anything else can start a thread.
    let zygote = Zygote::builder()
        .max_in_flight(16)
        .start()
        .expect("start the shared zygote");
    let doomed = Zygote::start().expect("start the zygote the zygote-death test kills");
    // Every worker forked on demand: the core trials run on this one too, so
    // both the parked and the cold path are covered.
    let cold = Zygote::builder()
        .parked(0)
        .max_in_flight(16)
        .start()
        .expect("start the zygote without parked workers");
    run_in_process::init().expect("start the global zygote");
    // Started after `init`: its workers inherit the global zygote's handle.
    let after_init = Zygote::builder()
        .parked(0)
        .start()
        .expect("start the zygote that sees the global one");

    let args = common::harness_args();

    let mut trials = Vec::new();
    macro_rules! trial {
        ($name:ident) => {{
            let z = zygote.clone();
            trials.push(Trial::test(stringify!($name), move || checked(&z, $name)));
        }};
        ($name:ident, cold) => {{
            trial!($name);
            let z = cold.clone();
            trials.push(Trial::test(
                concat!(stringify!($name), "_cold"),
                move || checked(&z, $name),
            ));
        }};
    }
    trial!(value_round_trips, cold);
    trial!(side_effect_in_worker_is_visible_to_parent);
    trial!(every_task_runs_in_a_fresh_process, cold);
    trial!(panic_becomes_panicked_with_message_and_location, cold);
    trial!(sigsegv_becomes_signaled);
    trial!(abort_becomes_signaled);
    trial!(stack_overflow_becomes_signaled);
    trial!(process_exit_becomes_exited_with_code);
    trial!(terminate_ends_uncooperative_task_with_sigterm, cold);
    trial!(kill_ends_task_with_sigkill, cold);
    trial!(send_signal_delivers_the_signal);
    trial!(cooperative_task_returns_value_after_terminate);
    trial!(polling_task_that_does_not_stop_is_killed_after_grace);
    trial!(wait_is_idempotent_and_reports_real_status);
    trial!(dropping_run_future_kills_worker, cold);
    trial!(dropping_run_before_worker_starts_kills_it, cold);
    trial!(dropping_process_kills_worker, cold);
    trial!(timeout_gives_timed_out_and_worker_is_gone, cold);
    trial!(cooperative_task_may_return_value_within_grace_after_timeout);
    trial!(thousand_concurrent_runs_complete_with_backpressure, cold);
    trial!(unserializable_argument_fails_before_anything_runs);
    trial!(unserializable_result_is_codec_error);
    trial!(async_function_runs_in_worker);
    trial!(large_argument_and_result_round_trip, cold);
    trial!(large_blobs_cross_without_a_copy_and_outlive_the_task, cold);
    trial!(global_init_and_run_in_process);
    let z = after_init.clone();
    trials.push(Trial::test(
        "a_task_cannot_use_the_parents_zygote",
        move || checked(&z, a_task_cannot_use_the_parents_zygote),
    ));
    trial!(a_task_can_start_a_zygote_of_its_own, cold);
    trial!(start_from_multithreaded_process_is_refused);
    trial!(open_reports_running_then_finished);
    trial!(parked_worker_runs_the_task_and_is_replaced);
    trial!(job_for_a_killed_parked_worker_never_runs_elsewhere);
    let z = cold.clone();
    trials.push(Trial::test(
        "a_worker_maps_only_its_own_zygotes_ring_cold",
        move || checked(&z, a_worker_maps_only_its_own_zygotes_ring),
    ));
    let z = cold.clone();
    trials.push(Trial::test(
        "report_socket_pairs_come_back_from_reapers_but_not_after_a_cancel_cold",
        move || {
            checked(
                &z,
                report_socket_pairs_come_back_from_reapers_but_not_after_a_cancel,
            )
        },
    ));
    let z = cold.clone();
    trials.push(Trial::test(
        "report_sockets_are_reused_by_later_tasks_cold",
        move || checked(&z, report_sockets_are_reused_by_later_tasks),
    ));
    let z = zygote.clone();
    trials.push(Trial::test("zygote_death_fails_tasks_cleanly", move || {
        checked(&z, move |_| zygote_death_fails_tasks_cleanly(doomed))
    }));

    libtest_mimic::run(&args, trials).exit();
}

// ---------------------------------------------------------------------------
// Task functions (they run in workers).

fn square(x: u64) -> u64 {
    x * x
}

fn my_pid(_: ()) -> u32 {
    std::process::id()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Record {
    name: String,
    values: Vec<i64>,
    nested: Option<Box<Record>>,
}

fn echo_record(r: Record) -> Record {
    r
}

fn write_file(path: PathBuf) -> u64 {
    std::fs::write(&path, b"written by the worker").expect("write file");
    std::process::id() as u64
}

fn boom(_: ()) -> u64 {
    panic!("boom {}", 42)
}

fn segfault(_: ()) -> u64 {
    // Rust's own SIGSEGV handler only reports guard-page hits and returns
    // from a raised signal; a crash in foreign code meets the default action.
    // SAFETY: installing SIG_DFL runs no code; raising a signal has no
    // memory-safety preconditions.
    unsafe { libc::signal(libc::SIGSEGV, libc::SIG_DFL) };
    // SAFETY: as above.
    unsafe { libc::raise(libc::SIGSEGV) };
    0
}

fn abort(_: ()) -> u64 {
    std::process::abort()
}

#[allow(unconditional_recursion)] // reason: the point is to overflow the stack
fn recurse(n: u64) -> u64 {
    let frame = [n; 512];
    std::hint::black_box(&frame);
    recurse(n + 1) + frame[7]
}

#[allow(clippy::disallowed_methods)] // reason: tests what a task calling exit() looks like
fn exit_three(_: ()) -> u64 {
    std::process::exit(3)
}

fn sleep_forever(_: ()) -> u64 {
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Counts until asked to stop. Having called `stop_requested` once (which
/// makes it cooperative), it creates `ready`, if given, so the test knows a
/// stop request will now be a request, not a SIGTERM death.
fn count_until_stopped(ready: Option<PathBuf>) -> u64 {
    let mut n = 0u64;
    while !run_in_process::stop_requested() {
        if n == 0 {
            if let Some(path) = &ready {
                std::fs::write(path, b"cooperative").expect("write the ready marker");
            }
        }
        n += 1;
        std::thread::sleep(Duration::from_millis(1));
    }
    n + 1_000_000
}

fn polls_but_never_stops(ready: PathBuf) -> u64 {
    let _ = run_in_process::stop_requested();
    std::fs::write(&ready, b"cooperative").expect("write the ready marker");
    loop {
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits (up to 10 s) for a task to create `path`, then removes it.
async fn wait_for_marker(path: &std::path::Path) -> TestResult {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    // A file has no wake-up to await; poll it with a deadline.
    while !path.exists() {
        ensure(
            std::time::Instant::now() < deadline,
            "the task never became cooperative",
        )?;
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    std::fs::remove_file(path)?;
    Ok(())
}

fn spin(_: ()) -> u64 {
    loop {
        std::hint::spin_loop();
    }
}

struct Unserializable;

impl Serialize for Unserializable {
    fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
        Err(serde::ser::Error::custom("this type refuses to serialize"))
    }
}

impl<'de> Deserialize<'de> for Unserializable {
    fn deserialize<D: serde::Deserializer<'de>>(_: D) -> Result<Self, D::Error> {
        Ok(Unserializable)
    }
}

fn takes_unserializable(_: Unserializable) -> u64 {
    let _ = std::fs::write(marker_path("unserializable-arg"), b"ran");
    0
}

fn returns_unserializable(_: ()) -> Unserializable {
    Unserializable
}

async fn async_double(x: u64) -> u64 {
    tokio::time::sleep(Duration::from_millis(5)).await;
    tokio::task::yield_now().await;
    x * 2
}

fn reverse_bytes(mut v: Vec<u8>) -> Vec<u8> {
    v.reverse();
    v
}

/// Bytes `0, 1, ..., 250, 0, ...` of length `len`, tagged by `seed`.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8 ^ seed).collect()
}

/// Blobs of the given lengths, each with its own pattern.
fn make_blobs(lens: Vec<usize>) -> Vec<Blob> {
    (0..)
        .zip(lens)
        .map(|(k, len)| Blob::from(pattern(len, k)))
        .collect()
}

/// Whether the worker received its argument without a copy, and the bytes.
fn inspect_blob(b: Blob) -> (bool, Vec<u8>) {
    (b.is_mapped(), b.into_vec())
}

/// Lines of `/proc/self/maps` that map a result memfd.
fn result_mappings() -> usize {
    std::fs::read_to_string("/proc/self/maps")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("memfd:run-in-process-result"))
        .count()
}

fn marker_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("run-in-process-test-{}-{name}", std::process::id()))
}

// ---------------------------------------------------------------------------
// Trials.

async fn value_round_trips(z: Zygote) -> TestResult {
    ensure(z.run(square, 12).await? == 144, "square(12)")?;
    let r = Record {
        name: "root".into(),
        values: vec![-1, 0, i64::MAX],
        nested: Some(Box::new(Record {
            name: "leaf ✓".into(),
            values: vec![],
            nested: None,
        })),
    };
    ensure(
        z.run(echo_record, r.clone()).await? == r,
        "struct round trip",
    )?;
    let s: String = z
        .run(|(): ()| "from a unit argument".to_string(), ())
        .await?;
    ensure(s == "from a unit argument", "unit argument")?;
    let empty: Vec<u8> = z.run(|v: Vec<u8>| v, Vec::new()).await?;
    ensure(empty.is_empty(), "empty vector")
}

async fn side_effect_in_worker_is_visible_to_parent(z: Zygote) -> TestResult {
    let path = marker_path("side-effect");
    let _ = std::fs::remove_file(&path);
    let worker = z.run(write_file, path.clone()).await?;
    let content = std::fs::read(&path)?;
    std::fs::remove_file(&path)?;
    ensure(content == b"written by the worker", "file content")?;
    ensure(
        worker != std::process::id() as u64,
        "ran in another process",
    )
}

async fn every_task_runs_in_a_fresh_process(z: Zygote) -> TestResult {
    let mut pids = BTreeSet::new();
    for _ in 0..5 {
        pids.insert(z.run(my_pid, ()).await?);
    }
    ensure(pids.len() == 5, format!("pids {pids:?}"))?;
    ensure(!pids.contains(&std::process::id()), "not the parent")?;
    ensure(!pids.contains(&z.pid()), "not the zygote")
}

async fn panic_becomes_panicked_with_message_and_location(z: Zygote) -> TestResult {
    let e = z.run(boom, ()).await.unwrap_err();
    ensure(e.kind() == ErrorKind::Panicked, format!("{e:?}"))?;
    let m = e.panic_message().unwrap_or_default();
    ensure(
        m.contains("boom 42") && m.contains("tests/fork.rs:"),
        format!("message {m:?}"),
    )
}

async fn sigsegv_becomes_signaled(z: Zygote) -> TestResult {
    let e = z.run(segfault, ()).await.unwrap_err();
    ensure(
        e.kind() == ErrorKind::Signaled && e.signal() == Some(libc::SIGSEGV),
        format!("{e:?}"),
    )
}

async fn abort_becomes_signaled(z: Zygote) -> TestResult {
    let e = z.run(abort, ()).await.unwrap_err();
    ensure(e.signal() == Some(libc::SIGABRT), format!("{e:?}"))
}

async fn stack_overflow_becomes_signaled(z: Zygote) -> TestResult {
    let e = z.run(recurse, 0).await.unwrap_err();
    // Rust's guard-page handler reports the overflow and aborts (SIGABRT);
    // without it the kernel's SIGSEGV is what ends the worker.
    ensure(
        e.kind() == ErrorKind::Signaled
            && matches!(e.signal(), Some(libc::SIGABRT | libc::SIGSEGV)),
        format!("{e:?}"),
    )
}

async fn process_exit_becomes_exited_with_code(z: Zygote) -> TestResult {
    let e = z.run(exit_three, ()).await.unwrap_err();
    ensure(
        e.kind() == ErrorKind::Exited && e.exit_code() == Some(3),
        format!("{e:?}"),
    )
}

async fn terminate_ends_uncooperative_task_with_sigterm(z: Zygote) -> TestResult {
    let mut p = z.open(sleep_forever, ()).await?;
    p.terminate()?;
    let status = p.wait().await?;
    use std::os::unix::process::ExitStatusExt;
    ensure(
        status.signal() == Some(libc::SIGTERM),
        format!("{status:?}"),
    )?;
    let e = p.result().await.unwrap_err();
    ensure(e.signal() == Some(libc::SIGTERM), format!("{e:?}"))
}

async fn kill_ends_task_with_sigkill(z: Zygote) -> TestResult {
    let mut p = z.open(sleep_forever, ()).await?;
    p.kill()?;
    use std::os::unix::process::ExitStatusExt;
    ensure(
        p.wait().await?.signal() == Some(libc::SIGKILL),
        "wait status",
    )?;
    let e = p.result().await.unwrap_err();
    ensure(
        e.kind() == ErrorKind::Signaled && e.signal() == Some(libc::SIGKILL),
        format!("{e:?}"),
    )
}

async fn send_signal_delivers_the_signal(z: Zygote) -> TestResult {
    let p = z.open(sleep_forever, ()).await?;
    p.send_signal(libc::SIGUSR1)?;
    let e = p.result().await.unwrap_err();
    ensure(e.signal() == Some(libc::SIGUSR1), format!("{e:?}"))
}

async fn cooperative_task_returns_value_after_terminate(z: Zygote) -> TestResult {
    let ready = marker_path("cooperative");
    let _ = std::fs::remove_file(&ready);
    let p = z.open(count_until_stopped, Some(ready.clone())).await?;
    wait_for_marker(&ready).await?;
    p.terminate()?;
    let n = p.result().await?;
    ensure(n >= 1_000_000, format!("value {n}"))
}

async fn polling_task_that_does_not_stop_is_killed_after_grace(z: Zygote) -> TestResult {
    let ready = marker_path("polling");
    let _ = std::fs::remove_file(&ready);
    let p = z
        .task(polls_but_never_stops, ready.clone())
        .grace(Duration::from_millis(200))
        .open()
        .await?;
    wait_for_marker(&ready).await?;
    p.terminate()?;
    let e = p.result().await.unwrap_err();
    ensure(e.signal() == Some(libc::SIGKILL), format!("{e:?}"))
}

async fn wait_is_idempotent_and_reports_real_status(z: Zygote) -> TestResult {
    let mut p = z.open(square, 5).await?;
    let a = p.wait().await?;
    let b = p.wait().await?;
    ensure(a.success() && a == b, format!("{a:?} {b:?}"))?;
    ensure(p.result().await? == 25, "result after wait")
}

async fn dropping_run_future_kills_worker(z: Zygote) -> TestResult {
    let r = tokio::time::timeout(Duration::from_millis(100), z.run(sleep_forever, ())).await;
    ensure(r.is_err(), "the run should have been cancelled")?;
    // The harness checks that the worker is gone and reaped.
    Ok(())
}

async fn dropping_run_before_worker_starts_kills_it(z: Zygote) -> TestResult {
    // A zero timeout polls the future once: the request is sent, and the
    // future is dropped before the zygote's Started report (with the pidfd
    // the kill needs) can have been read. The harness then checks that every
    // worker is gone and reaped, which fails if the cancellation was lost.
    for _ in 0..20 {
        let r = tokio::time::timeout(Duration::ZERO, z.run(sleep_forever, ())).await;
        ensure(r.is_err(), "the run should have been cancelled")?;
    }
    Ok(())
}

async fn dropping_process_kills_worker(z: Zygote) -> TestResult {
    let p = z.open(sleep_forever, ()).await?;
    let pid = p.pid();
    ensure(process_exists(pid), "worker exists while the handle lives")?;
    drop(p);
    z.wait_idle().await;
    ensure(!process_exists(pid), "worker gone after drop")
}

async fn timeout_gives_timed_out_and_worker_is_gone(z: Zygote) -> TestResult {
    let start = std::time::Instant::now();
    let e = z
        .task(spin, ())
        .timeout(Duration::from_millis(100))
        .run()
        .await
        .unwrap_err();
    ensure(e.kind() == ErrorKind::TimedOut, format!("{e:?}"))?;
    ensure(
        start.elapsed() < Duration::from_secs(10),
        "timed out promptly",
    )
}

async fn cooperative_task_may_return_value_within_grace_after_timeout(z: Zygote) -> TestResult {
    let n = z
        .task(count_until_stopped, None)
        .timeout(Duration::from_millis(100))
        .run()
        .await?;
    ensure(n >= 1_000_000, format!("value {n}"))
}

async fn thousand_concurrent_runs_complete_with_backpressure(z: Zygote) -> TestResult {
    let mut set = tokio::task::JoinSet::new();
    for i in 0..1000u64 {
        let z = z.clone();
        set.spawn(async move { (i, z.run(square, i).await) });
    }
    let mut done = 0;
    while let Some(joined) = set.join_next().await {
        let (i, r) = joined?;
        let v = r?;
        ensure(v == i * i, format!("task {i} returned {v}"))?;
        done += 1;
    }
    ensure(done == 1000, format!("{done} tasks completed"))
}

async fn unserializable_argument_fails_before_anything_runs(z: Zygote) -> TestResult {
    let marker = marker_path("unserializable-arg");
    let _ = std::fs::remove_file(&marker);
    let e = z
        .run(takes_unserializable, Unserializable)
        .await
        .unwrap_err();
    ensure(e.kind() == ErrorKind::Codec, format!("{e:?}"))?;
    ensure(!marker.exists(), "the task must not have run")
}

async fn unserializable_result_is_codec_error(z: Zygote) -> TestResult {
    let e = z
        .run(returns_unserializable, ())
        .await
        .map(drop)
        .unwrap_err();
    ensure(
        e.kind() == ErrorKind::Codec && e.to_string().contains("encode the result"),
        format!("{e:?}"),
    )
}

async fn async_function_runs_in_worker(z: Zygote) -> TestResult {
    ensure(z.run_async(async_double, 21).await? == 42, "async_double")
}

async fn large_argument_and_result_round_trip(z: Zygote) -> TestResult {
    for len in [0usize, 1, 60 * 1024, 64 * 1024, 1 << 20, 8 << 20] {
        let input: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let mut expected = input.clone();
        expected.reverse();
        let out = z.run(reverse_bytes, input).await?;
        ensure(out == expected, format!("round trip of {len} bytes"))?;
    }
    Ok(())
}

async fn large_blobs_cross_without_a_copy_and_outlive_the_task(z: Zygote) -> TestResult {
    let before = result_mappings();
    // A blob in a spilled result points into the parent's mapping of it if it
    // is at least a page and an eighth of the result; the rest are copied.
    let lens = vec![0, 100, 4095, 4096, 100_000, 1 << 20, 3 << 20];
    let total: usize = lens.iter().sum();
    let blobs = z.run(make_blobs, lens.clone()).await?;
    for (k, (blob, len)) in (0..).zip(blobs.iter().zip(&lens)) {
        ensure(
            blob[..] == pattern(*len, k)[..],
            format!("bytes of blob {k}"),
        )?;
        ensure(
            blob.is_mapped() == (*len >= 4096 && *len * 8 >= total),
            format!("blob {k} of {len} bytes: {blob:?}"),
        )?;
    }
    ensure(
        blobs.iter().filter(|b| b.is_mapped()).count() == 2,
        "the two large blobs are mapped",
    )?;
    let small = z.run(make_blobs, vec![32 * 1024]).await?;
    ensure(
        !small[0].is_mapped(),
        "a result that fits the slot is inline",
    )?;
    // The mapped blobs keep the result's mapping after the worker and the
    // task are gone, and release it when the last of them is dropped.
    z.wait_idle().await;
    ensure(
        result_mappings() == before + 1,
        "one mapping held by the blobs",
    )?;
    let last = blobs[6].clone();
    drop(blobs);
    ensure(
        last[..] == pattern(3 << 20, 6)[..],
        "a clone outlives the others",
    )?;
    drop(last);
    ensure(result_mappings() == before, "the mapping is released")?;
    // A large argument reaches the worker the same way.
    let (mapped, back) = z.run(inspect_blob, Blob::from(pattern(2 << 20, 9))).await?;
    ensure(mapped, "the worker maps a large Blob argument")?;
    ensure(back == pattern(2 << 20, 9), "argument bytes")?;
    let (mapped, _) = z.run(inspect_blob, Blob::from(pattern(64, 9))).await?;
    ensure(!mapped, "a small argument is inline")
}

/// Runs a task on the global zygote from inside a task of a zygote started
/// after it, which is a fork of the parent: the handle is there, its fds are
/// not.
async fn run_on_the_global_zygote(_: ()) -> String {
    match run_in_process::run_in_process(square, 3).await {
        Ok(n) => format!("Ok({n})"),
        Err(e) => format!("{:?}", e.kind()),
    }
}

async fn a_task_cannot_use_the_parents_zygote(z: Zygote) -> TestResult {
    let got = z.run_async(run_on_the_global_zygote, ()).await?;
    ensure(
        got == "WrongProcess",
        format!("a worker used the parent's zygote: {got}"),
    )
}

/// Starts two zygotes inside a task (a worker has one thread), one that
/// parks a worker and one that does not, and runs a task on each; returns
/// the results and the pids involved.
fn square_in_a_zygote_of_its_own(x: u64) -> (u64, u64, u32, u32, u32) {
    let me = std::process::id();
    let nested = Zygote::builder()
        .max_in_flight(2)
        .parked(1)
        .start()
        .expect("start a zygote in a task");
    let cold = Zygote::builder()
        .max_in_flight(2)
        .parked(0)
        .start()
        .expect("start another");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (parked, forked, worker) = rt.block_on(async {
        let parked = nested.run(square, x).await.expect("task of the first");
        let forked = cold.run(square, x + 1).await.expect("task of the second");
        let worker = nested.run(my_pid, ()).await.expect("pid task");
        nested.wait_idle().await;
        cold.wait_idle().await;
        (parked, forked, worker)
    });
    (parked, forked, me, nested.pid(), worker)
}

async fn a_task_can_start_a_zygote_of_its_own(z: Zygote) -> TestResult {
    let (parked, forked, task, nested, worker) = z.run(square_in_a_zygote_of_its_own, 6).await?;
    ensure(
        parked == 36 && forked == 49,
        format!("results {parked} and {forked}"),
    )?;
    ensure(
        ![task, nested].contains(&worker) && task != nested,
        format!("task {task}, its zygote {nested}, that zygote's worker {worker}"),
    )
}

async fn global_init_and_run_in_process(_: Zygote) -> TestResult {
    ensure(
        run_in_process::run_in_process(square, 9).await? == 81,
        "global run",
    )?;
    let p = run_in_process::open_in_process(square, 4).await?;
    ensure(p.result().await? == 16, "global open")?;
    // The global zygote's workers are not the harness zygote's: wait for them.
    if let Some(g) = run_in_process::global() {
        g.wait_idle().await;
    }
    Ok(())
}

async fn start_from_multithreaded_process_is_refused(_: Zygote) -> TestResult {
    // The runtime this trial runs on has already started threads.
    let e = Zygote::start().unwrap_err();
    ensure(e.kind() == ErrorKind::MultiThreaded, format!("{e:?}"))
}

async fn open_reports_running_then_finished(z: Zygote) -> TestResult {
    let mut p = z.open(sleep_forever, ()).await?;
    ensure(
        p.pid() != 0 && p.state() == State::Running,
        format!("{p:?}"),
    )?;
    p.kill()?;
    p.wait().await?;
    ensure(p.state() == State::Finished, format!("{p:?}"))
}

/// Pids of the zygote's children: with no task in flight, its parked workers.
fn zygote_children(z: &Zygote) -> BTreeSet<u32> {
    common::processes()
        .into_iter()
        .filter(|p| p.ppid == z.pid() && p.state != 'Z')
        .map(|p| p.pid)
        .collect()
}

/// Waits (up to 10 s) until the zygote has `n` live children.
async fn wait_for_children(z: &Zygote, n: usize) -> Result<BTreeSet<u32>, String> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let children = zygote_children(z);
        if children.len() == n {
            return Ok(children);
        }
        if std::time::Instant::now() > deadline {
            return Err(format!("zygote has {} children, not {n}", children.len()));
        }
        // The zygote parks a replacement after each reap; there is no event
        // for "parked" visible from here, so poll the process table.
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

async fn parked_worker_runs_the_task_and_is_replaced(z: Zygote) -> TestResult {
    let parked = run_in_process::DEFAULT_PARKED as usize;
    // A worker shows in /proc a moment before the zygote reports it parked;
    // a task arriving in that window rightly runs in a worker forked on
    // demand. So try a few times: if parking works, a task lands in one of
    // the processes that existed before it was sent.
    for _ in 0..20 {
        let before = wait_for_children(&z, parked).await?;
        let p = z.open(my_pid, ()).await?;
        let pid = p.pid();
        ensure(
            p.result().await? == pid,
            "the task ran in the pid it reported",
        )?;
        z.wait_idle().await;
        if before.contains(&pid) {
            let after = wait_for_children(&z, parked).await?;
            return ensure(
                !after.contains(&pid),
                "the worker that ran the task was replaced",
            );
        }
    }
    Err("no task ran in a parked worker in 20 tries".into())
}

/// Appends a line to `path`: how many times a task really ran.
fn append_run(path: PathBuf) -> u64 {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .expect("open the run log");
    f.write_all(b"ran\n").expect("append to the run log");
    0
}

async fn job_for_a_killed_parked_worker_never_runs_elsewhere(z: Zygote) -> TestResult {
    // Kill every parked worker, then send a task at once: it may be claimed
    // for a worker that is dead (or being replaced). Whatever the timing, a
    // task reported killed must not have run anywhere (not in the worker the
    // zygote parks next on that mailbox), and a task that succeeded ran once.
    let parked = run_in_process::DEFAULT_PARKED as usize;
    let log = marker_path("runs");
    for _ in 0..10 {
        let _ = std::fs::remove_file(&log);
        let killed = wait_for_children(&z, parked).await?;
        for &pid in &killed {
            // SAFETY: kill(2) has no memory-safety preconditions.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        let outcome = z.run(append_run, log.clone()).await;
        z.wait_idle().await;
        // SIGKILL lands asynchronously: until the killed workers are reaped,
        // a new task may rightly be claimed for one of them and fail. Wait
        // for them to be gone (the zygote reaps them; no event reaches us).
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while killed.iter().any(|&pid| process_exists(pid)) {
            ensure(
                std::time::Instant::now() < deadline,
                "killed workers never went away",
            )?;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // Give every replacement a chance to (wrongly) pick up the job.
        wait_for_children(&z, parked).await?;
        for _ in 0..2 * parked {
            z.run(my_pid, ()).await?;
        }
        z.wait_idle().await;
        let runs = std::fs::read_to_string(&log).map_or(0, |s| s.lines().count());
        match outcome {
            Ok(_) => ensure(runs == 1, format!("a successful task ran {runs} times"))?,
            Err(e) if e.signal() == Some(libc::SIGKILL) => ensure(
                runs == 0,
                format!("a task reported killed ran {runs} times"),
            )?,
            Err(e) => return Err(format!("unexpected error {e}").into()),
        }
    }
    let _ = std::fs::remove_file(&log);
    Ok(())
}

async fn zygote_death_fails_tasks_cleanly(doomed: Zygote) -> TestResult {
    let p = doomed.open(sleep_forever, ()).await?;
    let worker = p.pid();
    let zygote_pid = doomed.pid();
    // SAFETY: kill(2) has no memory-safety preconditions.
    let killed = unsafe { libc::kill(zygote_pid as i32, libc::SIGKILL) };
    ensure(killed == 0, "kill zygote")?;
    let e = p.result().await.unwrap_err();
    ensure(
        e.kind() == ErrorKind::ZygoteDied,
        format!("in flight: {e:?}"),
    )?;
    let e = doomed.run(square, 2).await.unwrap_err();
    ensure(
        e.kind() == ErrorKind::ZygoteDied,
        format!("later call: {e:?}"),
    )?;
    // The worker dies with its zygote (PR_SET_PDEATHSIG). It was reparented,
    // so someone else reaps it; wait for it to disappear.
    for _ in 0..200 {
        if !process_exists(worker) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    ensure(!process_exists(worker), "worker outlived its zygote")?;
    drop(doomed);
    ensure(
        !process_exists(zygote_pid),
        "dead zygote reaped when dropped",
    )
}

/// A task forked on demand takes its report socket pair from a pool and puts
/// it back once its final report is read: after the first task, later ones
/// open no socket of their own, and `wait_idle` closes the spare pair.
async fn report_sockets_are_reused_by_later_tasks(z: Zygote) -> TestResult {
    z.wait_idle().await;
    let before = sockets();
    let mut pooled = None;
    for x in 0..10u64 {
        let mut p = z.open(square, x).await?;
        // `wait` reads the final report, which returns the pair.
        ensure(p.wait().await?.success(), "the task failed")?;
        drop(p);
        let now = sockets();
        match &pooled {
            None => pooled = Some(now),
            Some(first) => ensure(
                &now == first,
                format!("task {x} left other sockets: {now:?}, not {first:?}"),
            )?,
        }
    }
    let pooled = pooled.unwrap_or_default();
    // The parent keeps its end of the one spare pair; the zygote keeps the
    // far end (a plain fork of the parent must not inherit it).
    ensure(
        pooled.len() == before.len() + 1,
        format!("expected one spare pair's end: {pooled:?} after {before:?}"),
    )?;
    z.wait_idle().await;
    ensure(
        sockets() == before,
        "wait_idle did not close the spare pair",
    )
}

/// The sockets this process holds.
fn sockets() -> BTreeSet<String> {
    common::open_fds()
        .into_iter()
        .filter(|fd| fd.contains("socket:"))
        .collect()
}

/// Waits until every task of `z` has released its slot (which a task does
/// after it returns its report socket pair), without emptying the pool as
/// `wait_idle` does.
async fn until_released(z: &Zygote) -> TestResult {
    let deadline = tokio::time::Instant::now() + common::HANG;
    while z.workers() != 0 {
        ensure(tokio::time::Instant::now() < deadline, "slots not released")?;
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok(())
}

/// A `run` returns on its result, before the exit is reported, so its
/// reaper (or the task itself) puts the pair back once the exit report
/// arrives; a cancelled task's pair was shut down and must not come back.
async fn report_socket_pairs_come_back_from_reapers_but_not_after_a_cancel(
    z: Zygote,
) -> TestResult {
    z.wait_idle().await;
    let before = sockets().len();
    for x in 0..5u64 {
        ensure(z.run(square, x).await? == x * x, "square")?;
    }
    until_released(&z).await?;
    let after_runs = sockets().len();
    ensure(
        after_runs > before,
        format!("no pair came back from 5 runs: {after_runs} sockets, {before} before"),
    )?;
    // Takes one of the pooled pairs; dropping it cancels the task.
    drop(z.open(sleep_forever, ()).await?);
    until_released(&z).await?;
    let after_cancel = sockets().len();
    // The parent's end of the pair is closed (the zygote's is dropped too).
    ensure(
        after_cancel + 1 == after_runs,
        format!("the cancelled task's pair: {after_cancel} sockets, {after_runs} before it"),
    )
}

/// How many result rings this process maps.
fn rings_mapped(_: ()) -> usize {
    std::fs::read_to_string("/proc/self/maps")
        .expect("maps")
        .lines()
        .filter(|l| l.contains("run-in-process-ring"))
        .count()
}

/// `cold` was started after two other zygotes; its workers must map its ring
/// only, not theirs (which they could scribble on).
async fn a_worker_maps_only_its_own_zygotes_ring(z: Zygote) -> TestResult {
    let rings = z.run(rings_mapped, ()).await?;
    ensure(rings == 1, format!("a worker maps {rings} rings"))
}
