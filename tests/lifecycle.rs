//! Process-lifecycle tests: large payloads, parent death, Ctrl-C, fd hygiene,
//! descendants of workers, post-fork hygiene. A `harness = false` target, so
//! zygotes start while the process has one thread and trials run on `main`.
//!
//! Scenarios that need their own parent process (a parent that gets
//! SIGKILLed, a process group that gets SIGINT, stdout and atexit behaviour,
//! inherited signal state) run this same binary again in a *child mode*,
//! selected by the `RIP_LIFECYCLE_CHILD` environment variable.

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::pin::Pin;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, Instant};

use common::{TestResult, checked, ensure};
use libtest_mimic::Trial;
use run_in_process::{Blob, ErrorKind, Process, Task, Zygote};

const CHILD_MODE: &str = "RIP_LIFECYCLE_CHILD";

fn main() {
    if let Ok(mode) = std::env::var(CHILD_MODE) {
        child_mode(&mode);
        return;
    }
    let zygote = Zygote::builder()
        .max_in_flight(8)
        .start()
        .expect("start the shared zygote");
    let small = Zygote::builder()
        .max_payload(1 << 20)
        .parked(0)
        .start()
        .expect("start the small-limit zygote");

    let args = common::harness_args();
    let mut trials = Vec::new();
    macro_rules! trial {
        ($name:ident) => {{
            let z = zygote.clone();
            trials.push(Trial::test(stringify!($name), move || checked(&z, $name)));
        }};
    }
    trial!(payloads_from_zero_bytes_to_256_mib_round_trip);
    trial!(worker_sees_only_stdio_and_its_own_fds);
    trial!(worker_with_large_argument_also_sees_its_memfd);
    trial!(every_fd_the_crate_creates_is_cloexec);
    trial!(descendant_of_cancelled_worker_is_killed);
    trial!(descendant_left_by_finished_worker_is_killed);
    trial!(workers_lead_their_own_process_group);
    let z = small.clone();
    trials.push(Trial::test(
        "oversize_payloads_are_codec_errors",
        move || checked(&z, oversize_payloads_are_codec_errors),
    ));
    trials.push(Trial::test(
        "parent_sigkill_takes_zygote_and_workers_down",
        parent_sigkill_takes_zygote_and_workers_down,
    ));
    trials.push(Trial::test(
        "ctrl_c_reaches_the_parent_only",
        ctrl_c_reaches_the_parent_only,
    ));
    trials.push(Trial::test(
        "stdout_is_not_duplicated_and_atexit_runs_once",
        stdout_is_not_duplicated_and_atexit_runs_once,
    ));
    trials.push(Trial::test(
        "worker_signal_state_is_reset",
        worker_signal_state_is_reset,
    ));
    trials.push(Trial::test(
        "running_out_of_fds_fails_the_task_and_loses_nothing",
        running_out_of_fds_fails_the_task_and_loses_nothing,
    ));
    trials.push(Trial::test(
        "a_parked_worker_whose_pidfd_is_lost_is_replaced",
        a_parked_worker_whose_pidfd_is_lost_is_replaced,
    ));
    trials.push(Trial::test(
        "an_fd_shortage_dismisses_only_the_worker_whose_pidfd_was_lost",
        an_fd_shortage_dismisses_only_the_worker_whose_pidfd_was_lost,
    ));
    trials.push(Trial::test(
        "a_final_report_whose_fd_cannot_be_received_still_counts",
        a_final_report_whose_fd_cannot_be_received_still_counts,
    ));
    trials.push(Trial::test(
        "a_later_zygotes_workers_can_touch_what_the_parent_held",
        a_later_zygotes_workers_can_touch_what_the_parent_held,
    ));
    trials.push(Trial::test(
        "a_plain_fork_can_touch_a_process_handle",
        a_plain_fork_can_touch_a_process_handle,
    ));
    trials.push(Trial::test(
        "a_plain_fork_child_cannot_hide_a_zygotes_death",
        a_plain_fork_child_cannot_hide_a_zygotes_death,
    ));
    trials.push(Trial::test(
        "a_raw_clone_child_cannot_use_the_parents_zygote",
        a_raw_clone_child_cannot_use_the_parents_zygote,
    ));
    trials.push(Trial::test(
        "a_later_worker_can_drop_a_run_paused_in_sending",
        a_later_worker_can_drop_a_run_paused_in_sending,
    ));
    trials.push(Trial::test(
        "a_later_worker_can_drop_a_runtime_with_a_reaper",
        a_later_worker_can_drop_a_runtime_with_a_reaper,
    ));
    libtest_mimic::run(&args, trials).exit();
}

// ---------------------------------------------------------------------------
// Task functions.

fn reverse_bytes(mut v: Vec<u8>) -> Vec<u8> {
    v.reverse();
    v
}

fn make_bytes(len: u64) -> Vec<u8> {
    vec![0xab; len as usize]
}

fn make_blob(len: u64) -> Blob {
    vec![0xcd; len as usize].into()
}

fn sum_bytes(v: Blob) -> u64 {
    v.iter().map(|&b| b as u64).sum()
}

/// What the parent holds where any code of this program can reach it,
/// workers included: each item owns a mapping or fds of the parent.
struct Held {
    /// A large result, mapped.
    blob: Blob,
    /// A running task.
    task: Process<u64>,
    /// A task not yet started, whose argument is in a sealed memfd.
    unstarted: Task<u64>,
    /// The only handle of the zygote the others belong to.
    zygote: Zygote,
}

static HELD: Mutex<Option<Held>> = Mutex::new(None);

/// Sums the bytes of the held `Blob`.
fn sum_of_held_blob(_: ()) -> u64 {
    let held = HELD.lock().unwrap_or_else(|p| p.into_inner());
    held.as_ref()
        .map_or(0, |held| held.blob.iter().map(|&b| b as u64).sum())
}

/// Asks the held task where it is in its life (which reads its ring slot).
fn state_of_held_task(_: ()) -> String {
    let held = HELD.lock().unwrap_or_else(|p| p.into_inner());
    format!("{:?}", held.as_ref().map(|held| held.task.state()))
}

/// Takes the 64 lowest free fd numbers, where the parent's fds were, drops
/// what the parent held, and returns those of its fds that the drop closed.
fn drop_what_is_held(_: ()) -> Vec<i32> {
    fds_closed_by(64, || {
        drop(HELD.lock().unwrap_or_else(|p| p.into_inner()).take());
    })
}

/// Takes the `count` lowest free fd numbers (as eventfds), runs `f`, and
/// returns those of them that `f` closed.
fn fds_closed_by(count: usize, f: impl FnOnce()) -> Vec<i32> {
    // SAFETY: eventfd(2) with valid flags; each fd is closed below, once.
    let mine: Vec<i32> = (0..count)
        .map(|_| unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) })
        .collect();
    assert!(!mine.contains(&-1), "eventfd failed");
    f();
    // SAFETY: fcntl(F_GETFD) only asks about a plain fd number.
    let open = |fd: i32| unsafe { libc::fcntl(fd, libc::F_GETFD) } != -1;
    let (still, closed): (Vec<i32>, Vec<i32>) = mine.into_iter().partition(|&fd| open(fd));
    for fd in still {
        // SAFETY: one of the eventfds made above, still open, closed once.
        unsafe { libc::close(fd) };
    }
    closed
}

/// A `run` future of the parent's, paused while it sends its request, held
/// where a later zygote's workers can reach it.
type HeldRun = Pin<Box<dyn Future<Output = run_in_process::Result<u64>> + Send>>;
static PAUSED: Mutex<Option<HeldRun>> = Mutex::new(None);

/// A runtime of the parent's with a reaper task on it, held where a later
/// zygote's workers can reach it.
static RUNTIME: Mutex<Option<tokio::runtime::Runtime>> = Mutex::new(None);

/// Takes every fd number up to the highest of `reaper` (the fds the reaper
/// held in the parent), drops the held runtime, and returns those of the
/// reaper's numbers that the drop closed. (Dropping the runtime also closes
/// the numbers of its own fds, which is tokio's business, not ours.)
fn drop_held_runtime(reaper: Vec<i32>) -> Vec<i32> {
    let highest = reaper.iter().copied().max().unwrap_or(0);
    let closed = fds_closed_by(highest as usize + 1, || {
        drop(RUNTIME.lock().unwrap_or_else(|p| p.into_inner()).take());
    });
    closed
        .into_iter()
        .filter(|fd| reaper.contains(fd))
        .collect()
}

/// Takes every fd number up to the highest of `owned` (the fds the paused
/// future held in the parent), drops the paused future, and returns those
/// of its fds that the drop closed.
fn drop_paused_run(owned: Vec<i32>) -> Vec<i32> {
    let highest = owned.iter().copied().max().unwrap_or(0);
    fds_closed_by(highest as usize + 1, || {
        drop(PAUSED.lock().unwrap_or_else(|p| p.into_inner()).take());
    })
}

/// Tries to kill the held task (through its pidfd, in the parent).
fn kill_held_task(_: ()) -> String {
    let held = HELD.lock().unwrap_or_else(|p| p.into_inner());
    format!(
        "{:?}",
        held.as_ref()
            .map(|held| held.task.kill().map_err(|e| e.kind()))
    )
}

/// The link targets of this process's fds above 2.
fn own_fds(_: Vec<u8>) -> Vec<String> {
    let dir = std::fs::read_dir("/proc/self/fd").expect("list fds");
    let mut out: Vec<String> = dir
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .parse::<u32>()
                .is_ok_and(|n| n > 2)
        })
        .filter_map(|e| Some(std::fs::read_link(e.path()).ok()?.display().to_string()))
        // The directory handle of this very listing.
        .filter(|t| !t.starts_with("/proc/"))
        .collect();
    out.sort();
    out
}

fn square(x: u64) -> u64 {
    x * x
}

fn sleep_forever(_: ()) -> u64 {
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Starts `sleep 1000` in the background, publishes its pid, then waits.
#[allow(clippy::zombie_processes)] // reason: leaving a descendant behind is the point
fn spawn_sleeper_and_wait(marker: PathBuf) -> u64 {
    let child = Command::new("sleep")
        .arg("1000")
        .spawn()
        .expect("spawn sleep");
    std::fs::write(&marker, child.id().to_string()).expect("write marker");
    sleep_forever(())
}

/// Starts `sleep 1000` in the background and returns its pid at once.
#[allow(clippy::zombie_processes)] // reason: leaving a descendant behind is the point
fn spawn_sleeper_and_return(_: ()) -> u32 {
    let child = Command::new("sleep")
        .arg("1000")
        .spawn()
        .expect("spawn sleep");
    child.id()
}

fn my_pgid(_: ()) -> (u32, i32) {
    // SAFETY: getpgid(0) has no preconditions.
    (std::process::id(), unsafe { libc::getpgid(0) })
}

// ---------------------------------------------------------------------------
// Trials in the main harness.

async fn payloads_from_zero_bytes_to_256_mib_round_trip(z: Zygote) -> TestResult {
    // 256 MiB through the debug build's serde path takes long; the release
    // run of this suite (`cargo test --release` in CI) covers the full size.
    let top = if cfg!(debug_assertions) {
        32 << 20
    } else {
        256 << 20
    };
    let mut len = 0usize;
    loop {
        let input: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let out = z.run(reverse_bytes, input.clone()).await?;
        ensure(
            out.len() == len && out.iter().rev().eq(input.iter()),
            format!("round trip of {len} bytes"),
        )?;
        if len >= top {
            break;
        }
        len = if len == 0 { 1 } else { (len * 16).min(top) };
    }
    Ok(())
}

async fn oversize_payloads_are_codec_errors(z: Zygote) -> TestResult {
    // This zygote's limit is 1 MiB.
    let e = z.run(reverse_bytes, vec![0u8; 2 << 20]).await.unwrap_err();
    ensure(
        e.kind() == ErrorKind::Codec && e.to_string().contains("over the limit"),
        format!("argument: {e}"),
    )?;
    // The worker stops encoding at the limit rather than after 2 MiB.
    let e = z.run(make_bytes, 2 << 20).await.unwrap_err();
    ensure(
        e.kind() == ErrorKind::Codec && e.to_string().contains("over the limit"),
        format!("result: {e}"),
    )?;
    // And the zygote keeps serving.
    ensure(
        z.run(reverse_bytes, vec![1, 2]).await? == vec![2, 1],
        "still serving",
    )
}

async fn worker_sees_only_stdio_and_its_own_fds(z: Zygote) -> TestResult {
    let fds = z.run(own_fds, Vec::new()).await?;
    let eventfds = fds.iter().filter(|t| t.contains("[eventfd]")).count();
    let sockets = fds.iter().filter(|t| t.starts_with("socket:")).count();
    ensure(
        fds.len() == 2 && eventfds == 1 && sockets == 1,
        format!("worker fds above 2: {fds:?}"),
    )
}

async fn worker_with_large_argument_also_sees_its_memfd(z: Zygote) -> TestResult {
    let fds = z.run(own_fds, vec![7u8; 100_000]).await?;
    let memfds = fds
        .iter()
        .filter(|t| t.contains("memfd:run-in-process-arg"))
        .count();
    // The memfd twice: the fd the worker received, and the duplicate that
    // its mapping keeps so that a `Blob` in it can be forwarded.
    ensure(
        fds.len() == 4 && memfds == 2,
        format!("worker fds above 2: {fds:?}"),
    )
}

async fn every_fd_the_crate_creates_is_cloexec(z: Zygote) -> TestResult {
    // While a task runs, the parent holds its report socket, eventfd and
    // pidfd, besides the zygote's command and spill sockets and pidfd.
    let p = z.open(sleep_forever, ()).await?;
    let mut checked_fds = 0;
    for entry in std::fs::read_dir("/proc/self/fd")?.flatten() {
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue;
        };
        let target = target.display().to_string();
        let ours = target.contains("[pidfd]")
            || target.contains("[eventfd]")
            || target.starts_with("socket:")
            || target.contains("memfd:");
        if !ours {
            continue;
        }
        let fd = entry.file_name().to_string_lossy().into_owned();
        let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))?;
        let flags = info
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .and_then(|f| u32::from_str_radix(f.trim(), 8).ok())
            .unwrap_or(0);
        ensure(
            flags & libc::O_CLOEXEC as u32 != 0,
            format!("fd {fd} ({target}) lacks O_CLOEXEC"),
        )?;
        checked_fds += 1;
    }
    drop(p);
    ensure(checked_fds >= 6, format!("only {checked_fds} fds checked"))
}

async fn descendant_of_cancelled_worker_is_killed(z: Zygote) -> TestResult {
    let marker = std::env::temp_dir().join(format!("rip-sleeper-{}", std::process::id()));
    let _ = std::fs::remove_file(&marker);
    let p = z.open(spawn_sleeper_and_wait, marker.clone()).await?;
    // Wait for the task to publish its child's pid (the file appears once).
    let deadline = Instant::now() + Duration::from_secs(10);
    let sleeper: u32 = loop {
        if let Some(pid) = std::fs::read_to_string(&marker)
            .ok()
            .and_then(|s| s.parse().ok())
        {
            break pid;
        }
        ensure(
            Instant::now() < deadline,
            "the task never started its child",
        )?;
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    std::fs::remove_file(&marker)?;
    ensure(is_running(sleeper), "sleep runs while the worker lives")?;
    drop(p);
    z.wait_idle().await;
    ensure(
        wait_until_not_running(sleeper),
        "sleep outlived its cancelled worker",
    )
}

async fn descendant_left_by_finished_worker_is_killed(z: Zygote) -> TestResult {
    let sleeper = z.run(spawn_sleeper_and_return, ()).await?;
    z.wait_idle().await;
    ensure(
        wait_until_not_running(sleeper),
        "sleep outlived its finished worker",
    )
}

async fn workers_lead_their_own_process_group(z: Zygote) -> TestResult {
    let (pid, pgid) = z.run(my_pgid, ()).await?;
    // SAFETY: getpgid(0) has no preconditions.
    let ours = unsafe { libc::getpgid(0) };
    ensure(pgid == pid as i32, format!("worker {pid} in group {pgid}"))?;
    ensure(pgid != ours, "worker shares the parent's process group")?;
    // SAFETY: getpgid has no preconditions.
    let zygote_group = unsafe { libc::getpgid(z.pid() as i32) };
    ensure(
        zygote_group != ours,
        "zygote shares the parent's process group",
    )
}

/// True if `pid` exists and is not a zombie.
fn is_running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rfind(')').map(|i| s[i + 2..].starts_with('Z')))
        .is_some_and(|zombie| !zombie)
}

/// Waits up to 5 s for `pid` to stop running. The process is not our child,
/// so there is no event to wait on without racing pid reuse; poll.
fn wait_until_not_running(pid: u32) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if !is_running(pid) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}

// ---------------------------------------------------------------------------
// Trials that run this binary again as a separate parent.

fn child(mode: &str) -> Command {
    let mut cmd = Command::new(std::env::current_exe().expect("current exe"));
    cmd.env(CHILD_MODE, mode)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    cmd
}

/// Reads one line of the child's stdout.
fn read_line(out: &mut impl BufRead) -> Result<String, String> {
    let mut line = String::new();
    out.read_line(&mut line).map_err(|e| e.to_string())?;
    Ok(line.trim_end().to_string())
}

fn parse_pids(line: &str) -> Vec<u32> {
    line.split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect()
}

fn parent_sigkill_takes_zygote_and_workers_down() -> TestResult {
    let mut c = child("parent-death").spawn()?;
    let mut out = BufReader::new(c.stdout.take().ok_or("no stdout")?);
    let pids = parse_pids(&read_line(&mut out)?);
    ensure(
        pids.len() == 3,
        format!("expected zygote and two workers, got {pids:?}"),
    )?;
    ensure(
        pids.iter().all(|&p| is_running(p)),
        "all running before the kill",
    )?;
    c.kill()?; // SIGKILL: no destructor, no atexit, nothing runs in the parent.
    c.wait()?;
    let killed = Instant::now();
    for &pid in &pids {
        ensure(
            wait_until_not_running(pid),
            format!("process {pid} survived its parent's death"),
        )?;
    }
    let took = killed.elapsed();
    ensure(
        took < Duration::from_secs(1),
        format!("zygote and workers took {took:?} to go"),
    )
}

fn ctrl_c_reaches_the_parent_only() -> TestResult {
    // A terminal sends SIGINT to its foreground process group; make the child
    // lead its own group and do the same.
    let mut c = child("ctrl-c").process_group(0).spawn()?;
    let mut out = BufReader::new(c.stdout.take().ok_or("no stdout")?);
    let pids = parse_pids(&read_line(&mut out)?);
    ensure(pids.len() == 2, format!("pids {pids:?}"))?;
    // SAFETY: kill(2) has no memory-safety preconditions.
    let r = unsafe { libc::kill(-(c.id() as i32), libc::SIGINT) };
    ensure(r == 0, "kill(-pgid, SIGINT)")?;
    let mut rest = String::new();
    out.read_to_string(&mut rest)?;
    let status = c.wait()?;
    ensure(
        status.success(),
        format!("child {status:?}, output {rest:?}"),
    )?;
    ensure(
        rest.contains("parent got SIGINT") && rest.contains("worker survived SIGINT"),
        format!("output {rest:?}"),
    )
}

/// Runs a child mode to completion; its stdout, if it exited successfully.
fn child_stdout(mode: &str) -> Result<String, String> {
    let out = child(mode).output().map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        return Err(format!("child {:?}: {text}", out.status));
    }
    Ok(text)
}

fn stdout_is_not_duplicated_and_atexit_runs_once() -> TestResult {
    let text = child_stdout("stdio")?;
    ensure(
        text == "before-start|task\nafter\nATEXIT\n",
        format!("output {text:?}"),
    )
}

fn worker_signal_state_is_reset() -> TestResult {
    let text = child_stdout("signals")?;
    ensure(
        text == "handler reset\nmask empty\nchild wait works\n",
        format!("output {text:?}"),
    )
}

fn running_out_of_fds_fails_the_task_and_loses_nothing() -> TestResult {
    failed_then_served_by_the_parked_worker("emfile", "the parked worker was lost")
}

/// The checks of a child mode that ends in `served_by_parked`: its task
/// failed for want of fds, the worker parked then served the next task, and
/// nothing was left. `lost` says what it means if that worker did not.
fn failed_then_served_by_the_parked_worker(mode: &str, lost: &str) -> TestResult {
    let text = child_stdout(mode)?;
    let line = |key: &str| line_of(&text, key);
    ensure(line("error:") == "Io", format!("output {text:?}"))?;
    let served = parse_pids(&line("parked, then served by:"));
    ensure(
        served.len() == 2 && served[0] == served[1],
        format!("{lost}: {text:?}"),
    )?;
    nothing_left(&text)
}

/// A child mode's closing lines: no slot still held once its tasks were
/// reaped, and no fd left open that was not open before.
fn nothing_left(text: &str) -> TestResult {
    ensure(
        line_of(text, "workers after:") == "0",
        format!("leaked a slot: {text:?}"),
    )?;
    ensure(
        line_of(text, "fds leaked:") == "[]",
        format!("leaked an fd: {text:?}"),
    )
}

/// The rest of the line of `text` that starts with `key`, trimmed; empty if
/// there is none.
fn line_of(text: &str, key: &str) -> String {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .map(str::trim)
        .unwrap_or("")
        .to_string()
}

fn a_parked_worker_whose_pidfd_is_lost_is_replaced() -> TestResult {
    let text = child_stdout("ctrunc")?;
    let line = |key: &str| line_of(&text, key);
    ensure(line("error:") == "Io", format!("output {text:?}"))?;
    ensure(
        line("old parked worker:") == "gone",
        format!("the parked worker was kept, unusable: {text:?}"),
    )?;
    let served = parse_pids(&line("replaced by, then served by:"));
    ensure(
        served.len() == 2 && served[0] == served[1],
        format!("the replacement did not serve the next task: {text:?}"),
    )?;
    nothing_left(&text)
}

/// A parked worker's `Started` report whose pidfd was cut gets that worker
/// dismissed, and the claim stops there: the reports queued after it, here a
/// replacement's `Started`, whose pidfd would be cut as well while fds are
/// still short, wait for the next claim. Read at once, they dismissed the
/// replacement too, and so on while the zygote kept up.
fn an_fd_shortage_dismisses_only_the_worker_whose_pidfd_was_lost() -> TestResult {
    failed_then_served_by_the_parked_worker(
        "ctrunc-queued",
        "the replacement was dismissed as well",
    )
}

/// A cold task's final report hands back the far end of its pooled report
/// socket. When no fd is free to receive it, the kernel cuts the control
/// message; the report must still count (here: `wait` returns the exit
/// status rather than taking the cut for a dead zygote), the pair is not
/// reused, and nothing leaks.
fn a_final_report_whose_fd_cannot_be_received_still_counts() -> TestResult {
    let text = child_stdout("final-report-ctrunc")?;
    let line = |key: &str| line_of(&text, key);
    ensure(
        line("status:") == format!("Ok(Some({}))", libc::SIGKILL),
        format!("the exit status was lost: {text:?}"),
    )?;
    // Final reports carry no fd any more, so nothing can be cut: the pair
    // is kept, the parent holding its one end (the zygote the other).
    ensure(
        line("fds kept after the task:") == "1",
        format!("the task's pair was not kept, or more was left open: {text:?}"),
    )?;
    ensure(
        line("next task:") == "Ok(9)",
        format!("the zygote did not serve the next task: {text:?}"),
    )?;
    nothing_left(&text)
}

/// A zygote started later is a fork of the parent, as are its workers: they
/// inherit whatever the parent's statics hold, here a mapped `Blob` result,
/// a running task and an unstarted one of an earlier zygote, and safe code in
/// a task may use them. The `Blob`'s bytes must be there; the running task,
/// whose ring the parent keeps out of later forks, must answer without
/// touching memory that is not mapped (a worker would die of `SIGSEGV`); and
/// dropping them there must leave the worker's own fds open.
fn a_later_zygotes_workers_can_touch_what_the_parent_held() -> TestResult {
    let text = child_stdout("held-by-the-parent")?;
    let blob_sum = format!("Ok({})", 0xcd * (1 << 20));
    let unstarted_sum = format!("Ok({})", 0xef * (1 << 20));
    lines_say(
        &text,
        &[
            ("the held blob, summed in a later worker:", &blob_sum),
            (
                "the held task, asked in a later worker:",
                "Ok(\"Some(Running)\")",
            ),
            // Its pidfd is the parent's: in the worker that fd number is
            // closed, or is another fd of the task's.
            (
                "the held task, killed in a later worker:",
                "Ok(\"Some(Err(WrongProcess))\")",
            ),
            ("the held task after that:", "Running"),
            // Dropped there, they must leave the fds that now have their
            // numbers alone, and the zygote and its task running.
            ("fds of a later worker that dropping them closed:", "Ok([])"),
            ("the held task after that drop:", "Running"),
            ("the held unstarted task, run by its owner:", &unstarted_sum),
        ],
    )
}

/// The same for a `fork` of the user's own (through libc, as most code
/// forks): every fork starts a new epoch, not only a zygote's, so a handle
/// that crossed it is inert there too.
fn a_plain_fork_can_touch_a_process_handle() -> TestResult {
    let text = child_stdout("plain-fork")?;
    lines_say(
        &text,
        &[
            ("in a plain fork:", "Running Err(WrongProcess)"),
            ("the plain fork exited:", "Some(0)"),
        ],
    )
}

/// A plain fork of the parent, alive while the parent runs a task, inherits
/// the parent's fds. None of them may keep the task's report stream open
/// once the zygote dies: the task must fail with `ZygoteDied`, not hang.
fn a_plain_fork_child_cannot_hide_a_zygotes_death() -> TestResult {
    let text = child_stdout("fork-holds-pool")?;
    lines_say(&text, &[("after the zygote died:", "Ok(Err(ZygoteDied))")])
}

/// A child made by a raw `clone` system call runs no fork handler, so it
/// stays in its parent's epoch: the process check must still refuse it, and
/// the parent's task must be untouched by what it tried.
fn a_raw_clone_child_cannot_use_the_parents_zygote() -> TestResult {
    let text = child_stdout("raw-clone")?;
    lines_say(
        &text,
        &[
            ("in a raw clone:", "Err(WrongProcess) Err(WrongProcess)"),
            ("the raw clone exited:", "Some(0)"),
            ("the task afterwards:", "Running"),
        ],
    )
}

/// A `run` future that found the command socket full (the zygote stopped)
/// waits with the fds of its request in hand. Held in a static and dropped
/// in a later zygote's worker, it must close none of the worker's fds that
/// have those numbers; back in the parent, it and the runs sent before it
/// finish once the zygote goes on.
fn a_later_worker_can_drop_a_run_paused_in_sending() -> TestResult {
    let text = child_stdout("paused-send")?;
    ensure(
        line_of(&text, "runs sent before the socket filled:")
            .parse::<usize>()
            .is_ok_and(|n| n > 0),
        format!("no run was sent before the socket filled; output {text:?}"),
    )?;
    lines_say(
        &text,
        &[
            (
                "fds of a later worker that dropping the paused run closed:",
                "Ok([])",
            ),
            ("the paused run, finished by its owner:", "Ok(9)"),
            ("runs sent before it that failed:", "0"),
        ],
    )
}

/// A dropped task's reaper waits on the runtime for its worker's exit. A
/// runtime held in a static with a reaper on it, dropped in a later zygote's
/// worker, drops the reaper there, which must close none of the worker's
/// fds that have the numbers of its own; in the parent the reaper still
/// frees the task's slot.
fn a_later_worker_can_drop_a_runtime_with_a_reaper() -> TestResult {
    let text = child_stdout("held-runtime")?;
    ensure(
        line_of(&text, "fds the reaper holds:") != "[]",
        format!("no reaper fds seen; output {text:?}"),
    )?;
    lines_say(
        &text,
        &[
            (
                "of them, fds of a later worker that dropping the runtime closed:",
                "Ok([])",
            ),
            ("workers after the parent dropped the runtime:", "0"),
        ],
    )
}

/// Checks that each line of `text` that starts with a key says what it
/// should after the key.
fn lines_say(text: &str, expected: &[(&str, &str)]) -> TestResult {
    for &(key, want) in expected {
        let got = line_of(text, key);
        ensure(
            got == want,
            format!("{key:?} says {got:?}, not {want:?}; output {text:?}"),
        )?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Child modes.

fn child_mode(mode: &str) {
    match mode {
        "parent-death" => parent_death_child(),
        "ctrl-c" => ctrl_c_child(),
        "stdio" => stdio_child(),
        "signals" => signals_child(),
        "emfile" => emfile_child(),
        "ctrunc" => ctrunc_child(),
        "final-report-ctrunc" => final_report_ctrunc_child(),
        "ctrunc-queued" => ctrunc_queued_child(),
        "held-by-the-parent" => held_by_the_parent_child(),
        "plain-fork" => plain_fork_child(),
        "fork-holds-pool" => fork_holds_pool_child(),
        "raw-clone" => raw_clone_child(),
        "paused-send" => paused_send_child(),
        "held-runtime" => held_runtime_child(),
        other => panic!("unknown child mode {other}"),
    }
}

fn parent_death_child() {
    let z = Zygote::start().expect("start zygote");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let a = z.open(sleep_forever, ()).await.expect("open a");
        let b = z.open(sleep_forever, ()).await.expect("open b");
        println!("{} {} {}", z.pid(), a.pid(), b.pid());
        // Wait to be killed.
        std::future::pending::<()>().await;
    });
}

fn ctrl_c_child() {
    let z = Zygote::start().expect("start zygote");
    let got = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(libc::SIGINT, got.clone()).expect("SIGINT handler");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let p = z.open(sleep_forever, ()).await.expect("open");
        println!("{} {}", z.pid(), p.pid());
        while !got.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        println!("parent got SIGINT");
        // Give a stray SIGINT time to land before looking (it is sent
        // before the parent's, if at all, by the same kill(2) call).
        tokio::time::sleep(Duration::from_millis(50)).await;
        if is_running(p.pid()) && is_running(z.pid()) {
            println!("worker survived SIGINT");
        }
    });
}

extern "C" fn say_atexit() {
    let msg = b"ATEXIT\n";
    // SAFETY: writing a valid buffer to fd 1 has no memory-safety
    // preconditions.
    unsafe { libc::write(1, msg.as_ptr().cast(), msg.len()) };
}

fn print_task(_: ()) -> u64 {
    println!("task");
    0
}

fn stdio_child() {
    // SAFETY: registering a plain extern "C" function with atexit is sound;
    // the function only calls write(2).
    unsafe { libc::atexit(say_atexit) };
    // Buffered in the parent's stdout when the zygote is forked.
    print!("before-start|");
    let z = Zygote::start().expect("start zygote");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        z.run(print_task, ()).await.expect("run");
        z.wait_idle().await;
    });
    println!("after");
    // Leaving main runs the atexit handler here, and must not have in workers.
}

fn raise_usr1(_: ()) -> u64 {
    // SAFETY: raising a signal has no memory-safety preconditions.
    unsafe { libc::raise(libc::SIGUSR1) };
    0
}

/// The signals blocked in the calling thread: none in a fresh worker, which
/// inherits neither the parent's SIGUSR2 nor the zygote's SIGCHLD.
fn blocked_signals(_: ()) -> Vec<i32> {
    let mut set = std::mem::MaybeUninit::<libc::sigset_t>::zeroed();
    // SAFETY: querying the mask writes into a valid, zeroed sigset.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, std::ptr::null(), set.as_mut_ptr()) };
    // SAFETY: zero-initialised and filled by pthread_sigmask.
    let set = unsafe { set.assume_init() };
    (1..=libc::SIGRTMAX())
        // SAFETY: `set` is a valid, initialised sigset.
        .filter(|&sig| unsafe { libc::sigismember(&set, sig) } == 1)
        .collect()
}

fn run_child_process(_: ()) -> bool {
    Command::new("true").status().is_ok_and(|s| s.success())
}

fn signals_child() {
    // Inherited state that a worker must not keep: a caught SIGUSR1, a blocked
    // SIGUSR2 and an ignored SIGCHLD.
    let flag = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(libc::SIGUSR1, flag).expect("SIGUSR1 handler");
    let mut set = std::mem::MaybeUninit::<libc::sigset_t>::zeroed();
    // SAFETY: sigemptyset initialises the zeroed set.
    unsafe { libc::sigemptyset(set.as_mut_ptr()) };
    // SAFETY: initialised just above.
    let mut set = unsafe { set.assume_init() };
    // SAFETY: `set` is a valid sigset.
    unsafe { libc::sigaddset(&mut set, libc::SIGUSR2) };
    // SAFETY: valid set; null old-set pointer is allowed.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    // SAFETY: ignoring SIGCHLD installs no handler code.
    unsafe { libc::signal(libc::SIGCHLD, libc::SIG_IGN) };

    let z = Zygote::start().expect("start zygote");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let e = z.run(raise_usr1, ()).await.unwrap_err();
        if e.signal() == Some(libc::SIGUSR1) {
            println!("handler reset");
        }
        match z.run(blocked_signals, ()).await.expect("mask") {
            blocked if blocked.is_empty() => println!("mask empty"),
            blocked => println!("blocked: {blocked:?}"),
        }
        if z.run(run_child_process, ()).await.expect("child") {
            println!("child wait works");
        }
    });
}

/// Runs a task while the process can open only two more fds: enough for the
/// task's eventfd and the parked worker's pidfd, not for the rest. The task
/// must fail with `Io`, and afterwards no slot, fd or parked worker may be
/// missing.
fn emfile_child() {
    short_of_fds_child(2, |_, parked| parked, served_by_parked);
}

/// Runs a task on the parked worker `parked` (or not) and says which served it.
async fn served_by_parked(z: Zygote, parked: u32) {
    let p = z.open(reverse_bytes, vec![3]).await.expect("open after");
    println!("parked, then served by: {parked} {}", p.pid());
    p.result().await.expect("result after");
}

/// Runs a task while the process can open no more fd, so that the parked
/// worker's `Started` report, read when the task claims the worker, arrives
/// without its pidfd (`MSG_CTRUNC`). That worker could never be
/// killed if its task were dropped, so it must not get a task; it must not
/// stay parked for nothing either: it has to leave and be replaced.
fn ctrunc_child() {
    // No fd free: the claim reads the parked worker's `Started` first (a
    // task claims a worker before it makes its doorbell, which a reused
    // worker does not need), and its pidfd is cut.
    short_of_fds_child(
        0,
        |_, parked| parked,
        |z, parked| async move {
            let replacement = wait_for_parked(z.pid(), Some(parked));
            let kept = if replacement.is_some() {
                "gone"
            } else {
                "kept"
            };
            println!("old parked worker: {kept}");
            let p = z.open(reverse_bytes, vec![3]).await.expect("open after");
            let replacement = replacement.unwrap_or(0);
            println!("replaced by, then served by: {replacement} {}", p.pid());
            p.result().await.expect("result after");
        },
    );
}

/// Kills the parked worker before a task claims it, so that its `Started`,
/// its `Exited` and its replacement's `Started` are all queued when the task
/// claims the mailbox while one fd is free.
fn ctrunc_queued_child() {
    let kill_parked = |zygote, first: u32| {
        // SAFETY: kill(2) with a plain pid and signal. The worker is parked,
        // so alive and not reaped: the pid is still its own.
        unsafe { libc::kill(first as i32, libc::SIGKILL) };
        wait_for_parked(zygote, Some(first)).expect("the zygote did not park a replacement")
    };
    short_of_fds_child(0, kill_parked, served_by_parked);
}

/// The shared frame of the fd-shortage modes. With one worker parked, and
/// after `prepare` (given the zygote's and that worker's pids, it returns the
/// pid of the worker parked now), runs a task while the process can open only
/// `free` more fds, and prints the task's error kind and the slots still held
/// once it is reaped. Then runs `after` with the zygote and the pid `prepare`
/// returned, and prints the fds left open that were not open before.
fn short_of_fds_child<F: Future<Output = ()>>(
    free: usize,
    prepare: impl FnOnce(u32, u32) -> u32,
    after: impl FnOnce(Zygote, u32) -> F,
) {
    on_small_zygote(1, |z| async move {
        z.run(reverse_bytes, vec![1]).await.expect("first task");
        z.wait_idle().await;
        // The replacement parked worker, with its `Started` report queued.
        let parked = wait_for_parked(z.pid(), None).expect("the zygote did not park a worker");
        let parked = prepare(z.pid(), parked);
        let before = common::open_fds();
        let free_fds = lowest_free_fds(free);
        // The limit just above the last fd left free: with none free, at
        // the lowest free number.
        let first_taken = match free_fds.last() {
            Some(&last) => last + 1,
            None => lowest_free_fds(1)[0],
        };
        let limit = set_fd_limit(first_taken as u64);
        let e = z.run(reverse_bytes, vec![2]).await.expect_err("out of fds");
        set_fd_limit(limit);
        println!("error: {:?}", e.kind());
        eprintln!("    fds {free_fds:?} were free; the task failed with: {e}");
        z.wait_idle().await;
        println!("workers after: {}", z.workers());
        after(z.clone(), parked).await;
        z.wait_idle().await;
        let leaked: Vec<_> = common::open_fds().difference(&before).cloned().collect();
        println!("fds leaked: {leaked:?}");
    });
}

/// Runs `body` on a new zygote with `parked` parked workers and two slots,
/// on a current-thread runtime (which opens no fd of its own meanwhile).
fn on_small_zygote<F: Future<Output = ()>>(parked: u32, body: impl FnOnce(Zygote) -> F) {
    let z = Zygote::builder()
        .parked(parked)
        .max_in_flight(2)
        .start()
        .expect("start zygote");
    let rt = current_thread();
    rt.block_on(body(z));
}

/// Kills a cold task while no fd is free, so that its final report arrives
/// without the socket end it carries; prints what `wait` returned, the
/// result of a next task, the slots still held, and the fds left open.
fn final_report_ctrunc_child() {
    on_small_zygote(0, |z| async move {
        let before = common::open_fds();
        let mut p = z.open(sleep_forever, ()).await.expect("open");
        let limit = set_fd_limit(lowest_free_fds(1)[0] as u64);
        p.kill().expect("kill");
        let status = p.wait().await.map(|s| s.signal());
        set_fd_limit(limit);
        println!("status: {status:?}");
        drop(p);
        // The final report carries no fd, so the pair is kept: our end of
        // it stays open until `wait_idle`.
        let kept = common::open_fds().difference(&before).count();
        println!("fds kept after the task: {kept}");
        println!("next task: {:?}", z.run(square, 3).await);
        z.wait_idle().await;
        println!("workers after: {}", z.workers());
        let leaked: Vec<_> = common::open_fds().difference(&before).cloned().collect();
        println!("fds leaked: {leaked:?}");
    });
}

/// Holds a mapped `Blob` result and a running task of one zygote in `HELD`,
/// starts a second zygote, and prints what two of its tasks make of them.
fn held_by_the_parent_child() {
    let first = Zygote::builder().parked(0).start().expect("start zygote");
    let rt = current_thread();
    let (blob, task) = rt.block_on(async {
        let blob = first.run(make_blob, 1 << 20).await.expect("a large result");
        let task = first.open(sleep_forever, ()).await.expect("open");
        (blob, task)
    });
    assert!(blob.is_mapped(), "a result this large is mapped");
    // An argument this large goes in a sealed memfd, made when the task is.
    let unstarted = first.task(sum_bytes, Blob::from(vec![0xef; 1 << 20]));
    *HELD.lock().expect("lock") = Some(Held {
        blob,
        task,
        unstarted,
        zygote: first,
    });
    // A current-thread runtime: once it is gone, this process has one thread
    // again, as `start` requires.
    drop(rt);
    let later = cold_zygote();
    let rt = current_thread();
    rt.block_on(async {
        let sum = later.run(sum_of_held_blob, ()).await.map_err(|e| e.kind());
        println!("the held blob, summed in a later worker: {sum:?}");
        let state = later
            .run(state_of_held_task, ())
            .await
            .map_err(|e| e.kind());
        println!("the held task, asked in a later worker: {state:?}");
        let killed = later.run(kill_held_task, ()).await.map_err(|e| e.kind());
        println!("the held task, killed in a later worker: {killed:?}");
        let state = || {
            HELD.lock()
                .expect("lock")
                .as_ref()
                .map(|held| held.task.state())
                .expect("held")
        };
        println!("the held task after that: {:?}", state());
        let closed = later.run(drop_what_is_held, ()).await.map_err(|e| e.kind());
        println!("fds of a later worker that dropping them closed: {closed:?}");
        println!("the held task after that drop: {:?}", state());
        let Held {
            unstarted, zygote, ..
        } = HELD.lock().expect("lock").take().expect("held");
        // Its memfd is the parent's, untouched by the drop in the worker.
        let sum = unstarted.run().await.map_err(|e| e.kind());
        println!("the held unstarted task, run by its owner: {sum:?}");
        // Dropped here, on a runtime, by their owner: the held task's worker
        // is killed and the first zygote exits.
        drop(zygote);
    });
}

/// Stops a zygote with room for 4,096 tasks and starts runs on it, polling
/// each once, until one is paused in sending its request (it holds more
/// fds than the doorbell and report socket of a sent one); holds that one in
/// `PAUSED`, has a later zygote's worker drop it, then lets the first zygote
/// go on and finishes every run.
fn paused_send_child() {
    let first = Zygote::builder()
        .max_in_flight(4096)
        .parked(0)
        .start()
        .expect("start zygote");
    let zygote_pid = first.pid() as libc::pid_t;
    // SAFETY: kill(2) on our own child, which is not reaped until `first`
    // is dropped.
    unsafe { libc::kill(zygote_pid, libc::SIGSTOP) };
    let rt = current_thread();
    // Unconstrained: tokio's cooperative budget would otherwise make every
    // poll after the first 128 or so pend before it does anything.
    let found = rt.block_on(tokio::task::unconstrained(async {
        let mut sent = Vec::new();
        for _ in 0..4000 {
            let mut run: HeldRun = Box::pin(first.task(square, 3).run());
            let before = fd_numbers();
            let polled = std::future::poll_fn(|cx| Poll::Ready(run.as_mut().poll(cx))).await;
            if let Poll::Ready(result) = polled {
                return Err(format!("a run on a stopped zygote finished: {result:?}"));
            }
            // A run whose request went out holds its doorbell and its report
            // socket; one paused in sending also holds the socket's far end
            // and a duplicate of the command socket.
            let owned: Vec<i32> = fd_numbers().difference(&before).copied().collect();
            match owned.len() {
                2 => sent.push(run),
                4 => {
                    *PAUSED.lock().expect("lock") = Some(run);
                    return Ok((sent, owned));
                }
                n => return Err(format!("a pending run holds {n} new fds")),
            }
        }
        Err("the command socket never filled".to_string())
    }));
    let (sent, owned) = found.unwrap_or_else(|e| {
        // SAFETY: as above. Killed first, so that the runs dropped while
        // unwinding see its end at once instead of waiting on it.
        unsafe { libc::kill(zygote_pid, libc::SIGKILL) };
        panic!("{e}")
    });
    println!("runs sent before the socket filled: {}", sent.len());
    // A current-thread runtime runs no thread, so this process still has
    // one, as `start` requires.
    let later = cold_zygote();
    rt.block_on(async {
        let closed = later
            .run(drop_paused_run, owned)
            .await
            .map_err(|e| e.kind());
        println!("fds of a later worker that dropping the paused run closed: {closed:?}");
        // SAFETY: as above.
        unsafe { libc::kill(zygote_pid, libc::SIGCONT) };
        let paused = PAUSED.lock().expect("lock").take().expect("held");
        let finished = paused.await.map_err(|e| e.kind());
        println!("the paused run, finished by its owner: {finished:?}");
        let mut failed = 0;
        for run in sent {
            if run.await.ok() != Some(9) {
                failed += 1;
            }
        }
        println!("runs sent before it that failed: {failed}");
    });
}

/// Drops a task of a stopped zygote on a runtime, which leaves a reaper
/// waiting there for the worker's exit; holds that runtime in `RUNTIME` and
/// has a later zygote's worker drop it; then lets the zygote go on and drops
/// the runtime in the parent, whose reaper then frees the task's slot.
fn held_runtime_child() {
    let first = Zygote::builder().parked(0).start().expect("start zygote");
    let zygote_pid = first.pid() as libc::pid_t;
    let rt = current_thread();
    let reaper: Vec<i32> = rt.block_on(async {
        let before = fd_numbers();
        let task = first.open(sleep_forever, ()).await.expect("open");
        // Stopped, the zygote reports no exit, so the reaper keeps waiting
        // (it is not even polled: this future returns first).
        // SAFETY: kill(2) on our own child, not reaped until `first` drops.
        unsafe { libc::kill(zygote_pid, libc::SIGSTOP) };
        drop(task);
        // What the task opened and its drop left open is its reaper's.
        fd_numbers().difference(&before).copied().collect()
    });
    println!("fds the reaper holds: {reaper:?}");
    *RUNTIME.lock().expect("lock") = Some(rt);
    // A current-thread runtime runs no thread, so this process still has
    // one, as `start` requires.
    let later = cold_zygote();
    let rt = current_thread();
    let closed = rt
        .block_on(later.run(drop_held_runtime, reaper))
        .map_err(|e| e.kind());
    println!("of them, fds of a later worker that dropping the runtime closed: {closed:?}");
    // SAFETY: as above.
    unsafe { libc::kill(zygote_pid, libc::SIGCONT) };
    drop(RUNTIME.lock().expect("lock").take());
    println!(
        "workers after the parent dropped the runtime: {}",
        first.workers()
    );
}

/// A current-thread runtime: it runs no thread of its own, so a zygote can
/// still be started while it exists.
fn current_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// A zygote without parked workers.
fn cold_zygote() -> Zygote {
    Zygote::builder().parked(0).start().expect("start zygote")
}

/// The numbers of this process's open fds.
fn fd_numbers() -> BTreeSet<i32> {
    common::open_fds()
        .iter()
        .filter_map(|fd| fd.split("->").next()?.parse().ok())
        .collect()
}

/// Opens a task, forks this process with libc's `fork`, and has the child
/// ask the task's state and try to kill it.
fn plain_fork_child() {
    on_small_zygote(0, |z| async move {
        let task = z.open(sleep_forever, ()).await.expect("open");
        // SAFETY: this process has one thread (a current-thread runtime), so
        // the child may run ordinary code; it leaves through `_exit`.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            let killed = task.kill().map_err(|e| e.kind());
            println!("in a plain fork: {:?} {killed:?}", task.state());
            let _ = std::io::Write::flush(&mut std::io::stdout());
            // SAFETY: `_exit` has no preconditions.
            unsafe { libc::_exit(0) };
        }
        let mut status = 0;
        // SAFETY: waits for our own child, into a valid int.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        let status = std::process::ExitStatus::from_raw(status);
        println!("the plain fork exited: {:?}", status.code());
        drop(task);
        z.wait_idle().await;
    });
}

fn fork_holds_pool_child() {
    on_small_zygote(0, |z| async move {
        // Puts the report socket pair this used back into the pool (`wait`
        // reads the final report, which hands back its far end; `wait_idle`
        // would empty the pool).
        let mut first = z.open(square, 2).await.expect("first task");
        first.wait().await.expect("first exit");
        drop(first);
        // SAFETY: this process has one thread (a current-thread runtime), so
        // the child may run ordinary code; it waits for its signal, then
        // leaves through `_exit`.
        let holder = unsafe { libc::fork() };
        if holder == 0 {
            loop {
                // SAFETY: pause(2) has no preconditions.
                unsafe { libc::pause() };
            }
        }
        let mut task = z.open(sleep_forever, ()).await.expect("open");
        // SAFETY: kill(2) with our own zygote's pid, which we have not reaped.
        unsafe { libc::kill(z.pid() as i32, libc::SIGKILL) };
        let waited = tokio::time::timeout(Duration::from_secs(20), task.wait()).await;
        println!(
            "after the zygote died: {:?}",
            waited.map(|r| r.map_err(|e| e.kind()))
        );
        // SAFETY: kill(2) and waitpid(2) on our own child.
        unsafe {
            libc::kill(holder, libc::SIGKILL);
        }
        let mut status = 0;
        // SAFETY: waits for our own child, into a valid int.
        unsafe { libc::waitpid(holder, &mut status, 0) };
    });
}

fn raw_clone_child() {
    on_small_zygote(0, |z| async move {
        let task = z.open(sleep_forever, ()).await.expect("open");
        // SAFETY: clone(2) with only SIGCHLD is fork without glibc's fork
        // handlers. This process has one thread (a current-thread runtime),
        // so the child may run ordinary code; it leaves through `_exit`.
        let pid =
            unsafe { libc::syscall(libc::SYS_clone, libc::SIGCHLD as libc::c_long, 0, 0, 0, 0) }
                as libc::pid_t;
        if pid == 0 {
            let killed = task.kill().map_err(|e| e.kind());
            // Refused before it awaits anything.
            let ran = z.run(square, 3).await.map_err(|e| e.kind());
            println!("in a raw clone: {killed:?} {ran:?}");
            let _ = std::io::Write::flush(&mut std::io::stdout());
            // SAFETY: `_exit` has no preconditions.
            unsafe { libc::_exit(0) };
        }
        let mut status = 0;
        // SAFETY: waits for our own child, into a valid int.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        let status = std::process::ExitStatus::from_raw(status);
        println!("the raw clone exited: {:?}", status.code());
        println!("the task afterwards: {:?}", task.state());
        drop(task);
        z.wait_idle().await;
    });
}

/// The zygote's one child, if it is not `other_than`, once the zygote has
/// also gone back to waiting in `epoll_wait`: it sends a parked worker's
/// `Started` report right after the fork, before it waits again, so the
/// report is queued by then. `None` if there is no such child after a
/// generous wait.
fn wait_for_parked(zygote: u32, other_than: Option<u32>) -> Option<u32> {
    let path = format!("/proc/{zygote}/task/{zygote}/children");
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let pids = parse_pids(&std::fs::read_to_string(&path).unwrap_or_default());
        if let [pid] = pids[..] {
            if Some(pid) != other_than && waiting_in_epoll(zygote) {
                return Some(pid);
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    None
}

/// Is `pid` blocked in `epoll_pwait` or `epoll_pwait2`? (`/proc/<pid>/syscall`
/// starts with the number of the call it is blocked in.) Where that file
/// cannot be read (Yama `ptrace_scope` 2 or more, gVisor), this says yes:
/// the callers then only wait for the fork, as they did before, and the
/// report may, rarely, not be queued yet.
fn waiting_in_epoll(pid: u32) -> bool {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/syscall")) else {
        return true;
    };
    let nr: Option<libc::c_long> = text.split_whitespace().next().and_then(|n| n.parse().ok());
    matches!(nr, Some(n) if n == libc::SYS_epoll_pwait || n == libc::SYS_epoll_pwait2)
}

/// The `n` lowest fd numbers not in use.
fn lowest_free_fds(n: usize) -> Vec<i32> {
    // `open_fds` leaves out the listing's own fd, which is free again after.
    let used: Vec<i32> = common::open_fds()
        .iter()
        .filter_map(|entry| entry.split_once("->")?.0.parse().ok())
        .collect();
    (0..).filter(|fd| !used.contains(fd)).take(n).collect()
}

/// Sets the soft `RLIMIT_NOFILE`; returns the previous soft limit.
fn set_fd_limit(soft: u64) -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read or write one valid struct.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    let previous = limit.rlim_cur;
    limit.rlim_cur = soft;
    // SAFETY: as above.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) };
    previous
}
