//! Confinement: per-task resource limits and the sandbox, and hostile tasks
//! that try to get out of them. A `harness = false` target (it forks).
//!
//! Each attempt to escape is its own trial, so a failure names the hole.
//! Every trial ends with the shared hygiene check: no zombie, no stray
//! worker, no leaked fd, whatever the confined task did.

mod common;

use std::time::Duration;

use common::{TestResult, checked, ensure};
use libtest_mimic::Trial;
use run_in_process::{ErrorKind, Limit, Sandbox, Zygote};
use serde::{Deserialize, Serialize};

const MIB: u64 = 1 << 20;

fn full_sandbox() -> Sandbox {
    Sandbox::new().deny_network().deny_exec().deny_fs_writes()
}

fn main() {
    let zygote = Zygote::builder()
        .max_in_flight(8)
        .start()
        .expect("start the shared zygote");
    // Every task forked on demand by the zygote, none by a parked worker.
    let cold = Zygote::builder()
        .parked(0)
        .start()
        .expect("start the zygote without parked workers");
    // Defaults for every task, from the builder.
    let limited = Zygote::builder()
        .memory_limit(64 * MIB)
        .open_files_limit(32)
        .sandbox(full_sandbox())
        .start()
        .expect("start the confined zygote");

    let args = common::harness_args();
    let mut trials = Vec::new();
    macro_rules! trial {
        ($z:expr, $name:ident) => {{
            let z = $z.clone();
            trials.push(Trial::test(stringify!($name), move || checked(&z, $name)));
        }};
        ($z:expr, $name:ident, $suffix:literal) => {{
            let z = $z.clone();
            trials.push(Trial::test(
                concat!(stringify!($name), $suffix),
                move || checked(&z, $name),
            ));
        }};
    }
    // Limits.
    trial!(zygote, worker_footprint_is_mostly_not_private_data);
    trial!(
        zygote,
        touching_512_mib_under_a_64_mib_limit_is_a_memory_limit
    );
    trial!(
        cold,
        touching_512_mib_under_a_64_mib_limit_is_a_memory_limit,
        "_cold"
    );
    trial!(zygote, eight_mib_under_a_64_mib_limit_succeeds);
    trial!(zygote, a_task_that_handles_allocation_failure_sees_it);
    trial!(zygote, another_abort_under_a_memory_limit_stays_a_signal);
    trial!(
        zygote,
        a_busy_loop_under_a_1_s_cpu_limit_is_a_cpu_time_limit
    );
    trial!(
        cold,
        a_busy_loop_under_a_1_s_cpu_limit_is_a_cpu_time_limit,
        "_cold"
    );
    trial!(zygote, opening_100_files_under_a_limit_of_16_sees_emfile);
    trial!(zygote, a_memory_limit_below_the_workers_needs_is_refused);
    trial!(
        zygote,
        an_open_files_limit_below_the_workers_needs_is_refused
    );
    trial!(zygote, a_zero_cpu_limit_is_refused);
    trial!(zygote, core_dumps_are_off_by_default_and_can_be_kept);
    trial!(limited, builder_defaults_apply_to_every_task);
    trial!(zygote, unconfined_tasks_keep_the_inherited_limits);
    // Sandbox.
    trial!(zygote, sandboxed_connect_is_permission_denied);
    trial!(zygote, sandboxed_exec_fails);
    trial!(zygote, sandboxed_fs_write_fails);
    trial!(zygote, sandboxed_reads_still_work);
    trial!(zygote, writes_stay_allowed_without_deny_fs_writes);
    trial!(
        zygote,
        a_sandboxed_task_returns_a_spilled_result_and_a_sealed_argument
    );
    trial!(
        cold,
        a_sandboxed_task_returns_a_spilled_result_and_a_sealed_argument,
        "_cold"
    );
    trial!(zygote, a_sandboxed_panic_is_reported);
    trial!(
        zygote,
        a_sandboxed_task_over_its_memory_limit_is_a_memory_limit
    );
    // Hostile: every attempt is denied inside the task.
    for attack in Attack::ALL {
        let z = zygote.clone();
        trials.push(Trial::test(
            format!("hostile_{}", attack.name()),
            move || checked(&z, move |z| hostile(z, attack)),
        ));
    }
    trial!(zygote, hostile_child_of_a_sandboxed_task_is_sandboxed_too);
    trial!(zygote, harmless_attacks_succeed_without_a_sandbox);
    libtest_mimic::run(&args, trials).exit();
}

// ---------------------------------------------------------------------------
// Tasks (they run in workers).

/// `VmSize` and `VmData` of the worker, in bytes.
fn footprint(_: ()) -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|r| r.trim().strip_suffix("kB"))
            .and_then(|kb| kb.trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    (field("VmSize:"), field("VmData:"))
}

/// Allocates `mib` MiB and writes every page, so it is really used.
fn touch(mib: u64) -> u64 {
    let mut v = vec![0u8; (mib << 20) as usize];
    for i in (0..v.len()).step_by(4096) {
        v[i] = 1;
    }
    std::hint::black_box(&v)
        .iter()
        .step_by(4096)
        .map(|&b| u64::from(b))
        .sum()
}

fn try_allocate(mib: u64) -> bool {
    let mut v: Vec<u8> = Vec::new();
    v.try_reserve_exact((mib << 20) as usize).is_err()
}

fn abort(_: ()) -> u8 {
    std::process::abort()
}

fn spin(_: ()) -> u64 {
    let mut x = 0u64;
    loop {
        x = std::hint::black_box(x.wrapping_add(1));
    }
}

/// Opens `/dev/null` `n` times and keeps them all open; returns how many it
/// opened and the errno of the first failure.
fn open_many(n: u32) -> (u32, Option<i32>) {
    let mut files = Vec::new();
    for _ in 0..n {
        match std::fs::File::open("/dev/null") {
            Ok(f) => files.push(f),
            Err(e) => return (files.len() as u32, e.raw_os_error()),
        }
    }
    (files.len() as u32, None)
}

/// The soft and hard limit of `resource` (a `libc::RLIMIT_*`) in the worker.
fn rlimit(resource: i32) -> (u64, u64) {
    let resource = match resource as u32 {
        libc::RLIMIT_CORE => rustix::process::Resource::Core,
        libc::RLIMIT_DATA => rustix::process::Resource::Data,
        libc::RLIMIT_NOFILE => rustix::process::Resource::Nofile,
        _ => rustix::process::Resource::Cpu,
    };
    let r = rustix::process::getrlimit(resource);
    (r.current.unwrap_or(u64::MAX), r.maximum.unwrap_or(u64::MAX))
}

fn errno(e: std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(-1)
}

fn connect(_: ()) -> Result<(), (String, i32)> {
    std::net::TcpStream::connect("127.0.0.1:9")
        .map(drop)
        .map_err(|e| (format!("{:?}", e.kind()), errno(e)))
}

fn exec(_: ()) -> Result<bool, (String, i32)> {
    std::process::Command::new("/bin/true")
        .status()
        .map(|s| s.success())
        .map_err(|e| (format!("{:?}", e.kind()), errno(e)))
}

fn write_file(path: String) -> Result<(), (String, i32)> {
    let outcome = std::fs::write(&path, b"escaped");
    let _ = std::fs::remove_file(&path);
    outcome.map_err(|e| (format!("{:?}", e.kind()), errno(e)))
}

fn read_files(_: ()) -> Result<usize, String> {
    let a = std::fs::read("/proc/self/status").map_err(|e| e.to_string())?;
    let b = std::fs::read("/etc/passwd").map_err(|e| e.to_string())?;
    Ok(a.len() + b.len())
}

fn echo_big(arg: Vec<u8>) -> Vec<u8> {
    let mut out = arg;
    out.extend(std::iter::repeat_n(0xab, 300 * 1024));
    out
}

fn panics(_: ()) -> u8 {
    panic!("sandboxed panic")
}

// ---------------------------------------------------------------------------
// Trials: limits.

async fn worker_footprint_is_mostly_not_private_data(z: Zygote) -> TestResult {
    let (size, data) = z.run(footprint, ()).await?;
    println!(
        "worker footprint: VmSize {} KiB, VmData {} KiB",
        size >> 10,
        data >> 10
    );
    ensure(data > 0 && size > 0, "read VmSize and VmData")?;
    ensure(
        data < size,
        format!("VmData {data} is below VmSize {size}, which RLIMIT_AS would count"),
    )
}

async fn touching_512_mib_under_a_64_mib_limit_is_a_memory_limit(z: Zygote) -> TestResult {
    let e = z
        .task(touch, 512)
        .memory_limit(64 * MIB)
        .run()
        .await
        .expect_err("512 MiB under a 64 MiB limit");
    ensure(
        e.kind() == ErrorKind::ResourceLimit && e.limit() == Some(Limit::Memory),
        format!("a memory limit error, not {e:?}"),
    )
}

async fn eight_mib_under_a_64_mib_limit_succeeds(z: Zygote) -> TestResult {
    let n = z.task(touch, 8).memory_limit(64 * MIB).run().await?;
    ensure(n == 8 * 256, format!("touched every page, got {n}"))
}

async fn a_task_that_handles_allocation_failure_sees_it(z: Zygote) -> TestResult {
    let failed = z
        .task(try_allocate, 512)
        .memory_limit(64 * MIB)
        .run()
        .await?;
    ensure(failed, "try_reserve of 512 MiB fails under a 64 MiB limit")
}

async fn another_abort_under_a_memory_limit_stays_a_signal(z: Zygote) -> TestResult {
    let e = z
        .task(abort, ())
        .memory_limit(64 * MIB)
        .run()
        .await
        .expect_err("abort");
    ensure(
        e.kind() == ErrorKind::Signaled && e.signal() == Some(libc::SIGABRT),
        format!("a plain SIGABRT, not {e:?}"),
    )
}

async fn a_busy_loop_under_a_1_s_cpu_limit_is_a_cpu_time_limit(z: Zygote) -> TestResult {
    let e = z
        .task(spin, ())
        .cpu_limit(Duration::from_secs(1))
        .run()
        .await
        .expect_err("spinning under a CPU limit");
    ensure(
        e.kind() == ErrorKind::ResourceLimit && e.limit() == Some(Limit::CpuTime),
        format!("a CPU time limit error, not {e:?}"),
    )
}

async fn opening_100_files_under_a_limit_of_16_sees_emfile(z: Zygote) -> TestResult {
    let (opened, error) = z.task(open_many, 100).open_files_limit(16).run().await?;
    ensure(
        error == Some(libc::EMFILE) && opened < 16,
        format!("EMFILE after fewer than 16 files, got {opened} and {error:?}"),
    )
}

async fn a_memory_limit_below_the_workers_needs_is_refused(z: Zygote) -> TestResult {
    let e = z
        .task(touch, 0)
        .memory_limit(MIB)
        .run()
        .await
        .expect_err("a 1 MiB limit");
    ensure(
        e.kind() == ErrorKind::Confinement && e.limit() == Some(Limit::Memory),
        format!("a refused memory limit, not {e:?}"),
    )?;
    ensure(
        e.to_string().contains("memory_limit(1048576)"),
        format!("the message names the limit: {e}"),
    )
}

async fn an_open_files_limit_below_the_workers_needs_is_refused(z: Zygote) -> TestResult {
    let e = z
        .task(open_many, 0)
        .open_files_limit(3)
        .run()
        .await
        .expect_err("a limit of 3 fds");
    ensure(
        e.kind() == ErrorKind::Confinement && e.limit() == Some(Limit::OpenFiles),
        format!("a refused open files limit, not {e:?}"),
    )
}

async fn a_zero_cpu_limit_is_refused(z: Zygote) -> TestResult {
    let e = z
        .task(open_many, 0)
        .cpu_limit(Duration::ZERO)
        .run()
        .await
        .expect_err("a zero CPU limit");
    ensure(
        e.kind() == ErrorKind::Confinement && e.limit() == Some(Limit::CpuTime),
        format!("a refused CPU limit, not {e:?}"),
    )
}

async fn core_dumps_are_off_by_default_and_can_be_kept(z: Zygote) -> TestResult {
    let (soft, _) = z.run(rlimit, libc::RLIMIT_CORE as i32).await?;
    ensure(
        soft == 0,
        format!("soft RLIMIT_CORE 0 by default, got {soft}"),
    )?;
    let inherited = rustix::process::getrlimit(rustix::process::Resource::Core)
        .current
        .unwrap_or(u64::MAX);
    let (kept, _) = z
        .task(rlimit, libc::RLIMIT_CORE as i32)
        .core_dumps(true)
        .run()
        .await?;
    ensure(
        kept == inherited,
        format!("core_dumps(true) keeps {inherited}, got {kept}"),
    )
}

async fn builder_defaults_apply_to_every_task(z: Zygote) -> TestResult {
    let data = z.run(rlimit, libc::RLIMIT_DATA as i32).await?;
    ensure(
        data == (64 * MIB, 64 * MIB),
        format!("RLIMIT_DATA {data:?}"),
    )?;
    let files = z.run(rlimit, libc::RLIMIT_NOFILE as i32).await?;
    ensure(files == (32, 32), format!("RLIMIT_NOFILE {files:?}"))?;
    let (kind, _) = z.run(connect, ()).await?.err().ok_or("connected")?;
    ensure(kind == "PermissionDenied", format!("sandboxed: {kind}"))?;
    // A task's own setting overrides the default.
    let files = z
        .task(rlimit, libc::RLIMIT_NOFILE as i32)
        .open_files_limit(20)
        .run()
        .await?;
    ensure(
        files == (20, 20),
        format!("overridden RLIMIT_NOFILE {files:?}"),
    )
}

async fn unconfined_tasks_keep_the_inherited_limits(z: Zygote) -> TestResult {
    for resource in [libc::RLIMIT_DATA, libc::RLIMIT_NOFILE, libc::RLIMIT_CPU] {
        let inherited = rlimit(resource as i32);
        let seen = z.run(rlimit, resource as i32).await?;
        ensure(
            seen == inherited,
            format!("resource {resource}: {seen:?}, inherited {inherited:?}"),
        )?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Trials: sandbox.

async fn sandboxed_connect_is_permission_denied(z: Zygote) -> TestResult {
    let sandbox = Sandbox::new().deny_network();
    let outcome = z.task(connect, ()).sandbox(sandbox).run().await?;
    ensure(
        outcome == Err(("PermissionDenied".into(), libc::EPERM)),
        format!("connect: {outcome:?}"),
    )
}

async fn sandboxed_exec_fails(z: Zygote) -> TestResult {
    let control = z.run(exec, ()).await?;
    ensure(
        control == Ok(true),
        format!("unsandboxed /bin/true: {control:?}"),
    )?;
    let outcome = z
        .task(exec, ())
        .sandbox(Sandbox::new().deny_exec())
        .run()
        .await?;
    ensure(
        outcome == Err(("PermissionDenied".into(), libc::EPERM)),
        format!("exec: {outcome:?}"),
    )
}

fn scratch(name: &str) -> String {
    std::env::temp_dir()
        .join(format!("rip-confine-{}-{name}", std::process::id()))
        .to_string_lossy()
        .into_owned()
}

async fn sandboxed_fs_write_fails(z: Zygote) -> TestResult {
    let path = scratch("write");
    let outcome = z
        .task(write_file, path.clone())
        .sandbox(Sandbox::new().deny_fs_writes())
        .run()
        .await?;
    ensure(
        outcome == Err(("PermissionDenied".into(), libc::EACCES)),
        format!("fs::write: {outcome:?}"),
    )?;
    ensure(!std::path::Path::new(&path).exists(), "no file was created")
}

async fn sandboxed_reads_still_work(z: Zygote) -> TestResult {
    let n = z.task(read_files, ()).sandbox(full_sandbox()).run().await?;
    ensure(n.is_ok(), format!("reads: {n:?}"))
}

async fn writes_stay_allowed_without_deny_fs_writes(z: Zygote) -> TestResult {
    let outcome = z
        .task(write_file, scratch("allowed"))
        .sandbox(Sandbox::new().deny_network().deny_exec())
        .run()
        .await?;
    ensure(outcome.is_ok(), format!("fs::write: {outcome:?}"))
}

async fn a_sandboxed_task_returns_a_spilled_result_and_a_sealed_argument(z: Zygote) -> TestResult {
    // 64 KiB inline at most; the argument is sealed past 32 KiB.
    let arg: Vec<u8> = (0..100 * 1024).map(|i| i as u8).collect();
    let out = z
        .task(echo_big, arg.clone())
        .sandbox(full_sandbox())
        .memory_limit(64 * MIB)
        .open_files_limit(16)
        .run()
        .await?;
    ensure(
        out.len() == arg.len() + 300 * 1024 && out[..arg.len()] == arg[..],
        format!("a {} byte result", out.len()),
    )
}

async fn a_sandboxed_panic_is_reported(z: Zygote) -> TestResult {
    let e = z
        .task(panics, ())
        .sandbox(full_sandbox())
        .run()
        .await
        .expect_err("panics");
    ensure(
        e.panic_message()
            .is_some_and(|m| m.contains("sandboxed panic")),
        format!("the panic message, not {e:?}"),
    )
}

async fn a_sandboxed_task_over_its_memory_limit_is_a_memory_limit(z: Zygote) -> TestResult {
    let e = z
        .task(touch, 512)
        .memory_limit(64 * MIB)
        .sandbox(full_sandbox())
        .run()
        .await
        .expect_err("512 MiB");
    ensure(
        e.limit() == Some(Limit::Memory),
        format!("a memory limit error, not {e:?}"),
    )
}

// ---------------------------------------------------------------------------
// Hostile tasks: one escape attempt each, inside a full sandbox with limits.

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
enum Attack {
    /// Raise `RLIMIT_DATA` back to infinity with `setrlimit`.
    RaiseMemoryLimit,
    /// The same through the raw `setrlimit` syscall, not `prlimit64`.
    RaiseMemoryLimitRawSyscall,
    /// Raise `RLIMIT_NOFILE`.
    RaiseOpenFilesLimit,
    /// Add a seccomp filter that allows everything, then open a socket.
    ReplaceSeccompFilter,
    /// `ptrace(PTRACE_ATTACH)` the zygote (the worker's parent).
    PtraceParent,
    /// Read the zygote's memory with `process_vm_readv`.
    ReadParentMemory,
    /// Open `/proc/self/mem` for writing.
    WriteProcSelfMem,
    /// `unshare(CLONE_NEWUSER)`: a user namespace, where it would be root.
    UnshareUserNamespace,
    /// `io_uring_setup`, whose operations no seccomp filter sees.
    IoUring,
    /// `socket` through the x32 syscall number.
    X32Socket,
    /// An abstract Unix socket (`socket(AF_UNIX)`).
    UnixSocket,
    /// `execveat` instead of `execve`.
    Execveat,
    /// Create a directory.
    Mkdir,
    /// Truncate a file the parent created.
    Truncate,
    /// Remove a file the parent created.
    Unlink,
    /// Rename a file the parent created.
    Rename,
    /// Create a symlink.
    Symlink,
    /// Open a file the parent created with `O_WRONLY | O_APPEND`.
    AppendToExisting,
    /// Signal a process outside the sandbox (the test process, signal 0).
    SignalOutside,
    /// Type into the terminal with `ioctl(TIOCSTI)`.
    Tiocsti,
    /// Leave the worker's process group from a forked child (`setsid`), to
    /// outlive the worker.
    Setsid,
    /// The same with `setpgid(0, 0)`.
    Setpgid,
}

impl Attack {
    const ALL: [Attack; 22] = [
        Attack::RaiseMemoryLimit,
        Attack::RaiseMemoryLimitRawSyscall,
        Attack::RaiseOpenFilesLimit,
        Attack::ReplaceSeccompFilter,
        Attack::PtraceParent,
        Attack::ReadParentMemory,
        Attack::WriteProcSelfMem,
        Attack::UnshareUserNamespace,
        Attack::IoUring,
        Attack::X32Socket,
        Attack::UnixSocket,
        Attack::Execveat,
        Attack::Mkdir,
        Attack::Truncate,
        Attack::Unlink,
        Attack::Rename,
        Attack::Symlink,
        Attack::AppendToExisting,
        Attack::SignalOutside,
        Attack::Tiocsti,
        Attack::Setsid,
        Attack::Setpgid,
    ];

    fn name(self) -> String {
        let debug = format!("{self:?}");
        let mut out = String::new();
        for (i, c) in debug.chars().enumerate() {
            if c.is_uppercase() && i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        }
        out
    }

    /// The errnos that count as "denied" (an attack whose call does not
    /// exist on this kernel is denied too).
    fn denied(self, errno: i32) -> bool {
        match self {
            Attack::X32Socket | Attack::IoUring => {
                matches!(errno, libc::EPERM | libc::ENOSYS | libc::EINVAL)
            }
            Attack::Tiocsti => matches!(errno, libc::EPERM | libc::EIO),
            Attack::SignalOutside | Attack::PtraceParent | Attack::ReadParentMemory => {
                errno == libc::EPERM
            }
            _ => matches!(errno, libc::EPERM | libc::EACCES),
        }
    }
}

/// What the attacker needs from the parent.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Target {
    attack: Attack,
    /// A file the parent created, for the filesystem attacks.
    file: String,
    /// The test process's pid.
    outside: u32,
}

/// Runs one attack; `Ok` means it got through, `Err(errno)` that it was
/// refused.
fn attack(target: Target) -> Result<String, i32> {
    run_attack(&target)
}

fn last_errno() -> i32 {
    errno(std::io::Error::last_os_error())
}

/// A raw syscall's result as `Ok(return value)` or `Err(errno)`.
fn syscall_result(ret: libc::c_long) -> Result<String, i32> {
    if ret < 0 {
        Err(last_errno())
    } else {
        Ok(format!("returned {ret}"))
    }
}

fn run_attack(target: &Target) -> Result<String, i32> {
    use std::os::unix::fs::OpenOptionsExt;
    let io = |r: std::io::Result<()>| r.map(|()| "succeeded".to_string()).map_err(errno);
    match target.attack {
        Attack::RaiseMemoryLimit => io(rustix::process::setrlimit(
            rustix::process::Resource::Data,
            rustix::process::Rlimit {
                current: None,
                maximum: None,
            },
        )
        .map_err(Into::into)),
        Attack::RaiseMemoryLimitRawSyscall => {
            let infinite = libc::rlimit {
                rlim_cur: libc::RLIM_INFINITY,
                rlim_max: libc::RLIM_INFINITY,
            };
            // SAFETY: setrlimit(2) reads one `struct rlimit`, which lives on
            // this stack frame for the whole call.
            let ret = unsafe {
                libc::syscall(
                    libc::SYS_setrlimit,
                    libc::RLIMIT_DATA,
                    &infinite as *const libc::rlimit,
                )
            };
            syscall_result(ret)
        }
        Attack::RaiseOpenFilesLimit => io(rustix::process::setrlimit(
            rustix::process::Resource::Nofile,
            rustix::process::Rlimit {
                current: Some(1 << 16),
                maximum: Some(1 << 16),
            },
        )
        .map_err(Into::into)),
        Attack::ReplaceSeccompFilter => {
            // One instruction: `ret SECCOMP_RET_ALLOW`.
            let allow_all = vec![seccompiler::sock_filter {
                code: (libc::BPF_RET | libc::BPF_K) as u16,
                jt: 0,
                jf: 0,
                k: libc::SECCOMP_RET_ALLOW,
            }];
            // Installing a filter is allowed, but filters stack: the
            // kernel applies the most restrictive verdict of all of them.
            seccompiler::apply_filter(&allow_all).map_err(|_| -3)?;
            io(std::net::TcpStream::connect("127.0.0.1:9").map(drop))
        }
        Attack::PtraceParent => {
            // SAFETY: getppid(2) has no preconditions.
            let parent = unsafe { libc::getppid() };
            // SAFETY: PTRACE_ATTACH takes a pid and ignores `addr` and
            // `data`, passed as null.
            let ret = unsafe {
                libc::ptrace(
                    libc::PTRACE_ATTACH,
                    parent,
                    std::ptr::null_mut::<libc::c_void>(),
                    std::ptr::null_mut::<libc::c_void>(),
                )
            };
            syscall_result(ret)
        }
        Attack::ReadParentMemory => {
            let mut buf = [0u8; 8];
            let local = libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            };
            // Any address: the call must be refused before it is looked at.
            let remote = libc::iovec {
                iov_base: (&raw const buf).cast_mut().cast(),
                iov_len: buf.len(),
            };
            // SAFETY: getppid(2) has no preconditions.
            let parent = unsafe { libc::getppid() };
            // SAFETY: `local` names `buf`, 8 writable bytes on this frame;
            // `remote` is only read by the kernel, in the other process.
            let ret = unsafe { libc::process_vm_readv(parent, &local, 1, &remote, 1, 0) };
            syscall_result(ret as libc::c_long)
        }
        Attack::WriteProcSelfMem => io(std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/proc/self/mem")
            .map(drop)),
        Attack::UnshareUserNamespace => {
            // SAFETY: unshare(2) takes flags only; a new user namespace
            // changes nothing this single-threaded task relies on.
            let ret = unsafe { libc::unshare(libc::CLONE_NEWUSER) };
            syscall_result(ret.into())
        }
        Attack::IoUring => {
            let mut params = [0u8; 120];
            // SAFETY: io_uring_setup(2) writes a `struct io_uring_params`
            // (120 bytes) into `params`, which lives on this frame.
            let ret = unsafe { libc::syscall(libc::SYS_io_uring_setup, 4, params.as_mut_ptr()) };
            if ret >= 0 {
                // SAFETY: `ret` is an fd this task just got and owns.
                unsafe { libc::close(ret as i32) };
            }
            syscall_result(ret)
        }
        Attack::X32Socket => {
            // SAFETY: socket(2) takes three integers; a returned fd is
            // leaked into a process that ends with the task.
            let ret = unsafe {
                libc::syscall(
                    libc::SYS_socket | 0x4000_0000,
                    libc::AF_INET,
                    libc::SOCK_STREAM,
                    0,
                )
            };
            syscall_result(ret)
        }
        Attack::UnixSocket => io(std::os::unix::net::UnixDatagram::unbound().map(drop)),
        Attack::Execveat => {
            let path = c"/bin/true";
            let argv = [path.as_ptr(), std::ptr::null()];
            let envp = [std::ptr::null::<libc::c_char>()];
            // SAFETY: execveat(2) reads a NUL-terminated path and two
            // null-terminated pointer arrays, all alive for the call; if it
            // succeeded the worker would become /bin/true, which the test
            // would see as a missing result.
            let ret = unsafe {
                libc::syscall(
                    libc::SYS_execveat,
                    libc::AT_FDCWD,
                    path.as_ptr(),
                    argv.as_ptr(),
                    envp.as_ptr(),
                    0,
                )
            };
            syscall_result(ret)
        }
        Attack::Mkdir => io(std::fs::create_dir(format!("{}.d", target.file))),
        Attack::Truncate => io(std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&target.file)
            .map(drop)
            .or_else(|_| {
                let path = std::ffi::CString::new(target.file.as_str())?;
                // SAFETY: truncate(2) reads a NUL-terminated path, alive
                // for the call.
                match unsafe { libc::truncate(path.as_ptr(), 0) } {
                    0 => Ok(()),
                    _ => Err(std::io::Error::last_os_error()),
                }
            })),
        Attack::Unlink => io(std::fs::remove_file(&target.file)),
        Attack::Rename => io(std::fs::rename(
            &target.file,
            format!("{}.moved", target.file),
        )),
        Attack::Symlink => io(std::os::unix::fs::symlink(
            "/etc/passwd",
            format!("{}.link", target.file),
        )),
        Attack::AppendToExisting => io(std::fs::OpenOptions::new()
            .append(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&target.file)
            .map(drop)),
        Attack::SignalOutside => io(rustix::process::test_kill_process(
            rustix::process::Pid::from_raw(target.outside as i32).ok_or(-5)?,
        )
        .map_err(Into::into)),
        Attack::Setsid => {
            // The worker leads its process group, where `setsid` fails
            // anyway: try it from a child, which does not.
            // SAFETY: SAFETY.md F1. The worker is single-threaded; the
            // child only calls `setsid` and `_exit`.
            let pid = unsafe { libc::fork() };
            if pid == 0 {
                let code = match rustix::process::setsid() {
                    Ok(_) => 0,
                    Err(e) => e.raw_os_error(),
                };
                // SAFETY: `_exit` has no preconditions (SAFETY.md F4).
                unsafe { libc::_exit(code) };
            }
            if pid < 0 {
                return Err(last_errno());
            }
            let mut status = 0;
            // SAFETY: `pid` is this task's own unreaped child; `status` is
            // a valid out-pointer.
            unsafe { libc::waitpid(pid, &mut status, 0) };
            match libc::WEXITSTATUS(status) {
                0 => Ok("setsid succeeded in a child".into()),
                errno => Err(errno),
            }
        }
        Attack::Setpgid => io(rustix::process::setpgid(None, None).map_err(Into::into)),
        Attack::Tiocsti => {
            let c = b'x';
            // SAFETY: TIOCSTI reads one byte through the pointer, which
            // points at `c` on this frame.
            let ret = unsafe { libc::ioctl(0, libc::TIOCSTI, &c as *const u8) };
            syscall_result(ret as libc::c_long)
        }
    }
}

async fn hostile(z: Zygote, attack_kind: Attack) -> TestResult {
    let file = scratch(&attack_kind.name());
    std::fs::write(&file, b"the parent's")?;
    let target = Target {
        attack: attack_kind,
        file: file.clone(),
        outside: std::process::id(),
    };
    let outcome = z
        .task(attack, target.clone())
        .sandbox(full_sandbox())
        .memory_limit(256 * MIB)
        .open_files_limit(64)
        .run()
        .await;
    // The task ran (the parent got its answer) and was refused.
    let outcome = outcome?;
    let kept = std::fs::read(&file).unwrap_or_default();
    for extra in [".d", ".moved", ".link"] {
        let _ = std::fs::remove_dir(format!("{file}{extra}"));
        let _ = std::fs::remove_file(format!("{file}{extra}"));
    }
    let _ = std::fs::remove_file(&file);
    ensure(
        matches!(outcome, Err(e) if attack_kind.denied(e)),
        format!("{attack_kind:?} was not refused: {outcome:?}"),
    )?;
    ensure(
        kept == b"the parent's",
        format!("{attack_kind:?} left the file intact"),
    )
}

/// Forks inside the sandboxed task and tries every attack in the child,
/// which reports through its exit code how many got through (plus 64).
fn fork_and_attack(file: String) -> Result<i32, String> {
    // SAFETY: SAFETY.md F1. The worker is single-threaded (this task starts
    // no thread), so its child may run Rust code; the child leaves through
    // `_exit`.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(format!("fork: {}", std::io::Error::last_os_error()));
    }
    if pid == 0 {
        // Counted from 64: a successful exec would end the child with
        // /bin/true's 0, which must not read as "nothing got through".
        let mut escaped = 64;
        for attack_kind in Attack::ALL {
            let target = Target {
                attack: attack_kind,
                file: file.clone(),
                outside: 1,
            };
            let outcome = run_attack(&target);
            if !matches!(outcome, Err(e) if attack_kind.denied(e)) {
                eprintln!("from the sandboxed task's child, {attack_kind:?}: {outcome:?}");
                escaped += 1;
            }
        }
        // Exec, network and writes from the child too.
        if std::process::Command::new("/bin/true").status().is_ok() {
            escaped += 1;
        }
        if std::net::TcpStream::connect("127.0.0.1:9").is_ok() {
            escaped += 1;
        }
        // SAFETY: `_exit` has no preconditions (SAFETY.md F4).
        unsafe { libc::_exit(escaped) };
    }
    let mut status = 0;
    // SAFETY: `pid` is this task's own unreaped child; `status` is a valid
    // out-pointer.
    let ret = unsafe { libc::waitpid(pid, &mut status, 0) };
    if ret != pid || !libc::WIFEXITED(status) {
        return Err(format!("child ended with status {status:#x}"));
    }
    Ok(libc::WEXITSTATUS(status))
}

async fn hostile_child_of_a_sandboxed_task_is_sandboxed_too(z: Zygote) -> TestResult {
    let file = scratch("child");
    std::fs::write(&file, b"the parent's")?;
    let escaped = z
        .task(fork_and_attack, file.clone())
        .sandbox(full_sandbox())
        .memory_limit(256 * MIB)
        .run()
        .await?;
    let kept = std::fs::read(&file).unwrap_or_default();
    let _ = std::fs::remove_file(&file);
    ensure(
        escaped == Ok(64),
        format!("attacks from the child: {escaped:?}"),
    )?;
    ensure(kept == b"the parent's", "the child left the file intact")
}

/// The positive control: the attacks that are harmless outside a sandbox
/// do work there, so their refusal above is the sandbox's doing.
async fn harmless_attacks_succeed_without_a_sandbox(z: Zygote) -> TestResult {
    for attack_kind in [
        Attack::Setsid,
        Attack::Setpgid,
        Attack::UnixSocket,
        Attack::Mkdir,
        Attack::Symlink,
        Attack::AppendToExisting,
        Attack::SignalOutside,
    ] {
        let file = scratch(&format!("control-{}", attack_kind.name()));
        std::fs::write(&file, b"the parent's")?;
        let target = Target {
            attack: attack_kind,
            file: file.clone(),
            outside: std::process::id(),
        };
        let outcome = z.run(attack, target).await?;
        for extra in [".d", ".link"] {
            let _ = std::fs::remove_dir(format!("{file}{extra}"));
            let _ = std::fs::remove_file(format!("{file}{extra}"));
        }
        let _ = std::fs::remove_file(&file);
        ensure(
            outcome.is_ok(),
            format!("{attack_kind:?} fails even unsandboxed: {outcome:?}"),
        )?;
    }
    Ok(())
}
