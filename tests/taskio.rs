//! Task I/O: env and working directory per task, stdout and stderr inherited,
//! discarded or captured (bounded, never blocking the worker), a failed
//! task's stderr and panic backtrace in its `Error`. A `harness = false`
//! target, so zygotes start while the process has one thread.

mod common;

use std::os::fd::{FromRawFd, OwnedFd};
use std::path::PathBuf;

use common::{TestResult, checked, checked_pooled, ensure};
use libtest_mimic::Trial;
use run_in_process::{ErrorKind, Output, Sandbox, Zygote};
use tokio::io::AsyncReadExt;

fn main() {
    // Parked workers (the default), workers forked on demand, reused workers.
    let parked = Zygote::builder()
        .max_in_flight(4)
        .start()
        .expect("start the parked zygote");
    let cold = Zygote::builder()
        .max_in_flight(4)
        .parked(0)
        .start()
        .expect("start the cold zygote");
    let reused = Zygote::builder()
        .max_in_flight(2)
        .reuse(100)
        .start()
        .expect("start the reuse zygote");
    let args = common::harness_args();
    let mut trials = Vec::new();
    macro_rules! on_both {
        ($name:ident) => {{
            for (label, z) in [("parked", parked.clone()), ("cold", cold.clone())] {
                trials.push(Trial::test(
                    format!("{}::{label}", stringify!($name)),
                    move || checked(&z, $name),
                ));
            }
        }};
    }
    on_both!(env_set_remove_and_clear_are_seen_by_the_task);
    on_both!(current_dir_is_applied);
    on_both!(a_bad_current_dir_is_an_io_error_naming_the_path);
    on_both!(bad_env_input_fails_before_any_fork);
    on_both!(stdout_and_stderr_are_captured);
    on_both!(null_discards_output);
    on_both!(a_panicking_tasks_error_keeps_its_stderr);
    on_both!(a_crashing_c_calls_last_words_are_kept);
    on_both!(output_far_past_the_cap_is_truncated_without_blocking);
    on_both!(an_unread_process_stream_does_not_block_the_worker);
    on_both!(a_process_stream_reads_as_async_read);
    on_both!(backtrace_only_with_rust_backtrace);
    on_both!(a_sandboxed_task_can_still_write_its_output);
    let z = reused.clone();
    trials.push(Trial::test(
        "reuse_mode_does_not_leak_settings_into_later_tasks",
        move || {
            checked_pooled(
                &z,
                common::REUSED_KEPT,
                reuse_mode_does_not_leak_settings_into_later_tasks,
            )
        },
    ));
    libtest_mimic::run(&args, trials).exit();
}

// Task functions.

fn env_of(keys: Vec<String>) -> Vec<Option<String>> {
    keys.iter().map(|k| std::env::var(k).ok()).collect()
}

fn env_count(_: ()) -> Vec<(String, String)> {
    std::env::vars().collect()
}

fn cwd(_: ()) -> PathBuf {
    std::env::current_dir().unwrap()
}

fn chatter(n: u32) -> u32 {
    println!("out {n}");
    eprintln!("err {n}");
    n + 1
}

fn panics(_: ()) -> u32 {
    panic!("the task gave up")
}

const LAST_WORDS: &[u8] = b"libfoo: invariant violated, aborting\n";

fn c_abort(_: ()) -> u32 {
    // SAFETY: `write` reads `LAST_WORDS.len()` bytes from a valid static
    // slice; `abort` has no preconditions.
    unsafe { libc::write(2, LAST_WORDS.as_ptr().cast(), LAST_WORDS.len()) };
    // SAFETY: as above.
    unsafe { libc::abort() }
}

fn c_segfault(_: ()) -> u32 {
    // SAFETY: as in `c_abort`.
    unsafe { libc::write(2, LAST_WORDS.as_ptr().cast(), LAST_WORDS.len()) };
    // std's own SIGSEGV handler (for stack overflows) would return from a
    // raised signal: the default action, as a real fault would get.
    // SAFETY: setting a signal's default disposition installs no code.
    unsafe { libc::signal(libc::SIGSEGV, libc::SIG_DFL) };
    // SAFETY: raising a signal has no memory-safety preconditions.
    unsafe { libc::raise(libc::SIGSEGV) };
    0
}

fn flood(mib: usize) -> usize {
    use std::io::Write;
    let chunk = vec![b'x'; 1 << 20];
    let mut out = std::io::stdout().lock();
    for _ in 0..mib {
        out.write_all(&chunk).unwrap();
    }
    out.flush().unwrap();
    mib
}

fn hello(_: ()) -> u32 {
    print!("hello from the worker");
    7
}

fn pid(_: ()) -> (u32, Option<String>) {
    (std::process::id(), std::env::var("RIP_TASKIO").ok())
}

// Trials.

async fn env_set_remove_and_clear_are_seen_by_the_task(z: Zygote) -> TestResult {
    let keys = vec!["RIP_A".to_string(), "HOME".to_string(), "PATH".to_string()];
    let seen = z
        .task(env_of, keys.clone())
        .env("RIP_A", "1")
        .env_remove("HOME")
        .run()
        .await?;
    ensure(
        seen[0].as_deref() == Some("1")
            && seen[1].is_none()
            && seen[2] == std::env::var("PATH").ok(),
        format!("set/remove: {seen:?}"),
    )?;
    let all = z
        .task(env_count, ())
        .env("EARLY", "dropped by the clear")
        .env_clear()
        .env("ONLY", "x")
        .run()
        .await?;
    ensure(
        all == [("ONLY".to_string(), "x".to_string())],
        format!("after env_clear: {all:?}"),
    )?;
    // The parent's environment is untouched.
    ensure(std::env::var("RIP_A").is_err(), "the parent saw RIP_A")
}

async fn current_dir_is_applied(z: Zygote) -> TestResult {
    let dir = std::env::temp_dir().canonicalize()?;
    let seen = z.task(cwd, ()).current_dir(&dir).run().await?;
    ensure(seen == dir, format!("{seen:?} is not {dir:?}"))?;
    let here = z.run(cwd, ()).await?;
    ensure(here == std::env::current_dir()?, "a plain task moved")
}

async fn a_bad_current_dir_is_an_io_error_naming_the_path(z: Zygote) -> TestResult {
    let e = z
        .task(cwd, ())
        .current_dir("/nonexistent/rip-taskio")
        .run()
        .await
        .unwrap_err();
    ensure(e.kind() == ErrorKind::Io, format!("kind: {e:?}"))?;
    ensure(
        e.to_string().contains("/nonexistent/rip-taskio"),
        format!("does not name the path: {e}"),
    )?;
    let io: std::io::Error = e.into();
    ensure(io.kind() == std::io::ErrorKind::NotFound, format!("{io:?}"))
}

async fn bad_env_input_fails_before_any_fork(z: Zygote) -> TestResult {
    let before = z.stats().spawned;
    let tries = [
        z.task(cwd, ()).env("A=B", "x"),
        z.task(cwd, ()).env("", "x"),
        z.task(cwd, ()).env("A\0B", "x"),
        z.task(cwd, ()).env("A", "x\0y"),
        z.task(cwd, ()).env_remove("A=B"),
        z.task(cwd, ()).current_dir("/tmp\0x"),
    ];
    for task in tries {
        let e = task.run().await.unwrap_err();
        ensure(
            e.kind() == ErrorKind::InvalidInput,
            format!("not InvalidInput: {e:?}"),
        )?;
    }
    ensure(
        z.stats().spawned == before,
        "a task with bad input was sent to the zygote",
    )
}

async fn stdout_and_stderr_are_captured(z: Zygote) -> TestResult {
    let out = z.task(chatter, 41).run_captured().await?;
    ensure(out.value == 42, "value")?;
    ensure(
        out.stdout == b"out 41\n",
        format!("stdout {:?}", out.stdout),
    )?;
    ensure(
        out.stderr == b"err 41\n",
        format!("stderr {:?}", out.stderr),
    )?;
    // Only stderr: stdout stays inherited and comes back empty.
    let out = z
        .task(chatter, 1)
        .stdout(Output::Null)
        .stderr(Output::Capture)
        .run_captured()
        .await?;
    ensure(
        out.stdout.is_empty() && out.stderr == b"err 1\n",
        "stderr only",
    )
}

async fn null_discards_output(z: Zygote) -> TestResult {
    let v = z
        .task(chatter, 1)
        .stdout(Output::Null)
        .stderr(Output::Null)
        .run()
        .await?;
    ensure(v == 2, "value")
}

async fn a_panicking_tasks_error_keeps_its_stderr(z: Zygote) -> TestResult {
    let e = z
        .task(panics, ())
        .stderr(Output::Capture)
        .run()
        .await
        .unwrap_err();
    ensure(e.kind() == ErrorKind::Panicked, format!("{e:?}"))?;
    let stderr = String::from_utf8_lossy(e.stderr().unwrap_or_default()).into_owned();
    ensure(
        stderr.contains("panicked") && stderr.contains("the task gave up"),
        format!("stderr: {stderr:?}"),
    )?;
    // Without capture, no stderr.
    let e = z.run(panics, ()).await.unwrap_err();
    ensure(e.stderr().is_none(), "stderr without capture")
}

async fn a_crashing_c_calls_last_words_are_kept(z: Zygote) -> TestResult {
    let abort = z.task(c_abort, ()).stderr(Output::Capture).run().await;
    let segv = z.task(c_segfault, ()).stderr(Output::Capture).run().await;
    for (result, sig) in [(abort, libc::SIGABRT), (segv, libc::SIGSEGV)] {
        let e = result.unwrap_err();
        ensure(e.signal() == Some(sig), format!("{e:?}"))?;
        ensure(e.stderr() == Some(LAST_WORDS), format!("{e:?}"))?;
    }
    Ok(())
}

async fn output_far_past_the_cap_is_truncated_without_blocking(z: Zygote) -> TestResult {
    let out = z.task(flood, 64).run_captured().await?;
    ensure(out.value == 64, "value")?;
    ensure(
        out.stdout.len() == run_in_process::DEFAULT_CAPTURE_LIMIT,
        format!("kept {} bytes", out.stdout.len()),
    )?;
    let out = z.task(flood, 2).capture_limit(1000).run_captured().await?;
    ensure(out.stdout.len() == 1000, "a smaller limit")
}

async fn an_unread_process_stream_does_not_block_the_worker(z: Zygote) -> TestResult {
    let mut process = z.task(flood, 16).stdout(Output::Capture).open().await?;
    // Nobody polls `process` or reads its stdout until the worker is gone:
    // its exit is watched through a pidfd of our own, on a blocking thread.
    let pid = process.pid() as libc::pid_t;
    // SAFETY: `pidfd_open` takes a pid and flags and returns a new fd or -1.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as i32;
    ensure(raw >= 0, "pidfd_open")?;
    // SAFETY: `raw` is a new fd that nothing else owns.
    let pidfd = unsafe { OwnedFd::from_raw_fd(raw) };
    let exited = tokio::task::spawn_blocking(move || {
        let mut fds = [rustix::event::PollFd::new(
            &pidfd,
            rustix::event::PollFlags::IN,
        )];
        let polled = rustix::event::poll(&mut fds, None).is_ok();
        drop(pidfd);
        polled
    })
    .await?;
    ensure(exited, "poll on the pidfd")?;
    let status = process.wait().await?;
    ensure(status.success(), format!("{status:?}"))?;
    let mut out = Vec::new();
    process
        .take_stdout()
        .ok_or("no stdout")?
        .read_to_end(&mut out)
        .await?;
    ensure(
        out.len() == run_in_process::DEFAULT_CAPTURE_LIMIT,
        format!("{} bytes", out.len()),
    )?;
    ensure(process.take_stdout().is_none(), "stdout taken twice")
}

async fn a_process_stream_reads_as_async_read(z: Zygote) -> TestResult {
    let mut process = z.task(hello, ()).stdout(Output::Capture).open().await?;
    ensure(process.take_stderr().is_none(), "stderr was not captured")?;
    let mut text = String::new();
    process
        .take_stdout()
        .ok_or("no stdout")?
        .read_to_string(&mut text)
        .await?;
    ensure(text == "hello from the worker", format!("{text:?}"))?;
    ensure(process.result().await? == 7, "value")
}

async fn backtrace_only_with_rust_backtrace(z: Zygote) -> TestResult {
    let e = z
        .task(panics, ())
        .env("RUST_BACKTRACE", "1")
        .run()
        .await
        .unwrap_err();
    let backtrace = e.backtrace().ok_or("no backtrace with RUST_BACKTRACE=1")?;
    ensure(
        backtrace.contains("panics"),
        format!("the backtrace does not name the task: {backtrace}"),
    )?;
    ensure(
        e.panic_message()
            .is_some_and(|m| m.contains("the task gave up")),
        format!("{e:?}"),
    )?;
    let e = z
        .task(panics, ())
        .env_remove("RUST_BACKTRACE")
        .run()
        .await
        .unwrap_err();
    ensure(
        e.backtrace().is_none(),
        "a backtrace without RUST_BACKTRACE",
    )?;
    let e = z
        .task(panics, ())
        .env("RUST_BACKTRACE", "0")
        .run()
        .await
        .unwrap_err();
    ensure(e.backtrace().is_none(), "a backtrace with RUST_BACKTRACE=0")
}

async fn a_sandboxed_task_can_still_write_its_output(z: Zygote) -> TestResult {
    let out = z
        .task(chatter, 5)
        .sandbox(Sandbox::new().deny_network().deny_exec())
        .run_captured()
        .await;
    match out {
        Ok(out) => ensure(
            out.stdout == b"out 5\n" && out.stderr == b"err 5\n",
            format!("{out:?}"),
        ),
        // A kernel without seccomp: nothing to check here.
        Err(e) if e.kind() == ErrorKind::Confinement => Ok(()),
        Err(e) => Err(e.into()),
    }
}

async fn reuse_mode_does_not_leak_settings_into_later_tasks(z: Zygote) -> TestResult {
    let (first, none) = z.run(pid, ()).await?;
    ensure(none.is_none(), "RIP_TASKIO set in the parent")?;
    let (with_env, seen) = z.task(pid, ()).env("RIP_TASKIO", "1").run().await?;
    ensure(seen.as_deref() == Some("1"), "the env task did not see it")?;
    ensure(with_env != first, "the env task ran in a used worker")?;
    let captured = z.task(pid, ()).run_captured().await?;
    ensure(
        captured.value.0 != with_env,
        "a captured task reused a worker",
    )?;
    for _ in 0..4 {
        let (later, leaked) = z.run(pid, ()).await?;
        ensure(
            later != with_env && later != captured.value.0,
            "a later task ran in a worker with settings",
        )?;
        ensure(leaked.is_none(), "RIP_TASKIO leaked into a later task")?;
    }
    Ok(())
}
