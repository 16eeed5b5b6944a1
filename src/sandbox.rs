//! The opt-in sandbox: [`Sandbox`], and how a worker installs it.
//!
//! Two kernel mechanisms, each for what it does best (measured and compared
//! in the README, "Resource limits and the sandbox"):
//!
//! * **seccomp** (a short BPF program built in the worker and installed
//!   with `seccompiler::apply_filter`) for the network, `exec` and a baseline of escape hatches. A filter sees
//!   only syscall numbers and plain arguments, which is all that denying
//!   `socket`, `connect` or `execve` needs, and it covers every socket
//!   family. Landlock's network rights (ABI 4) cover only TCP `bind` and
//!   `connect`, not UDP, raw, netlink or Unix sockets.
//! * **Landlock** (through the `landlock` crate) for filesystem writes. A
//!   filter cannot read the path or tell a write-opening `openat` through
//!   `/proc/self/fd` from any other; Landlock checks rights on the file
//!   itself, at open time, and can later grant writable paths. It also
//!   scopes signals and abstract Unix sockets to the sandbox (ABI 6), where
//!   the kernel has that.
//!
//! Both are inherited by every process the task forks and cannot be
//! removed: a task can only add restrictions of its own. Both are applied
//! with `no_new_privs`, so no `exec` (where allowed) gains privileges.
//!
//! Denied calls fail with `EPERM` (seccomp) or `EACCES` (Landlock), never by
//! killing the task: a task sees an ordinary I/O error it can report.
//!
//! What stays allowed, because the worker's own reporting path uses it: its
//! inherited fds (the ring is a mapping, the doorbell an eventfd, the spill
//! socket already connected), `memfd_create` for a result too large for its
//! ring slot (a memfd is not a path, so Landlock does not see it), and
//! `sendmsg` on the spill socket.

use landlock::{
    ABI, Access, AccessFs, CompatLevel, Compatible, LandlockStatus, Ruleset, RulesetAttr,
    RulesetStatus, Scope,
};
use seccompiler::sock_filter;

/// What a sandboxed task may not do. Made by [`Sandbox::new`]; applied with
/// [`Task::sandbox`](crate::Task::sandbox) or as every task's default with
/// [`Builder::sandbox`](crate::Builder::sandbox).
///
/// Every sandbox, even one that denies nothing more, sets `no_new_privs` and
/// denies a baseline of calls that could reach outside the worker or undo
/// its limits: `ptrace`, `process_vm_readv`/`writev`, `pidfd_getfd`,
/// `io_uring` (whose operations seccomp cannot see), raising resource limits
/// (`setrlimit`, `prlimit64` with a new limit), namespaces and mounts
/// (`unshare`, `setns`, `mount` and the new mount API, `chroot`,
/// `pivot_root`), `bpf`, `perf_event_open`, `userfaultfd`, the kernel
/// keyring, module and `kexec` loading, `open_by_handle_at`, leaving the
/// worker's process group (`setsid`, `setpgid`: the zygote kills that group
/// with the worker, so nothing the task starts outlives it), and terminal
/// input injection (`ioctl` `TIOCSTI`, `TIOCLINUX`). Where the kernel has
/// Landlock ABI 6 (Linux 6.12), it also cannot signal processes outside the
/// sandbox. See the README ("Resource limits and the sandbox") for what a sandboxed task can still do.
///
/// ```no_run
/// # async fn demo(zygote: run_in_process::Zygote) -> run_in_process::Result<()> {
/// use run_in_process::Sandbox;
/// fn parse(input: Vec<u8>) -> usize { input.len() }
/// let sandbox = Sandbox::new().deny_network().deny_exec().deny_fs_writes();
/// let n = zygote.task(parse, vec![1, 2, 3]).sandbox(sandbox).run().await?;
/// assert_eq!(n, 3);
/// # Ok(())
/// # }
/// ```
///
/// # Caveats
///
/// Linux only; seccomp filters are built for x86-64, AArch64 and RISC-V 64,
/// the architectures `seccompiler` supports. A sandbox that cannot be applied
/// in full (no Landlock ABI 3 for [`deny_fs_writes`](Sandbox::deny_fs_writes),
/// another architecture) fails the task with
/// [`ErrorKind::Confinement`](crate::ErrorKind::Confinement) before any of its
/// code runs: it is never run unconfined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Sandbox {
    deny: u8,
}

const DENY_NETWORK: u8 = 1;
const DENY_EXEC: u8 = 2;
const DENY_FS_WRITES: u8 = 4;
const DENY_ALL: u8 = DENY_NETWORK | DENY_EXEC | DENY_FS_WRITES;

impl Sandbox {
    /// A sandbox with only the baseline denials (see [`Sandbox`]).
    pub fn new() -> Sandbox {
        Sandbox { deny: 0 }
    }

    /// No new sockets and no `connect`, `bind`, `listen` or `accept`, for any
    /// address family, Unix sockets included: `TcpStream::connect` fails with
    /// [`PermissionDenied`](std::io::ErrorKind::PermissionDenied).
    /// `socketpair` stays allowed (it reaches nothing outside the task).
    pub fn deny_network(mut self) -> Sandbox {
        self.deny |= DENY_NETWORK;
        self
    }

    /// No `execve` or `execveat`: `std::process::Command` fails with
    /// [`PermissionDenied`](std::io::ErrorKind::PermissionDenied). `fork`
    /// stays allowed; a child inherits the whole sandbox.
    pub fn deny_exec(mut self) -> Sandbox {
        self.deny |= DENY_EXEC;
        self
    }

    /// No writes to the filesystem, anywhere: no opening a file for writing,
    /// creating, removing, renaming, linking or truncating one, and no
    /// `mkdir` (Landlock, ABI 3 or later). `std::fs::write` fails with
    /// [`PermissionDenied`](std::io::ErrorKind::PermissionDenied). Files
    /// opened before the task ran (stdout, stderr) can still be written.
    pub fn deny_fs_writes(mut self) -> Sandbox {
        self.deny |= DENY_FS_WRITES;
        self
    }

    pub(crate) fn bits(self) -> u8 {
        self.deny
    }

    /// The sandbox with these denial bits, if they are all known.
    pub(crate) fn from_bits(bits: u8) -> Option<Sandbox> {
        (bits & !DENY_ALL == 0).then_some(Sandbox { deny: bits })
    }

    fn denies(self, bit: u8) -> bool {
        self.deny & bit != 0
    }
}

/// A sandbox's seccomp filter, built before the worker's limits go on (it
/// allocates) and installed after them (it denies raising them).
pub(crate) struct Filter(Vec<sock_filter>);

/// The audit architecture the filter accepts (`linux/audit.h`:
/// `EM_* | __AUDIT_ARCH_64BIT | __AUDIT_ARCH_LE`). A syscall made through
/// another ABI (`int 0x80` on x86-64) kills the process: no Rust program of
/// this architecture makes one, and its numbers mean other calls.
/// `None` where the filter's offsets and numbers are unchecked: there a
/// sandbox fails the task with a clear error instead.
#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: Option<u32> = Some(0xc000_003e);
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: Option<u32> = Some(0xc000_00b7);
#[cfg(target_arch = "riscv64")]
const AUDIT_ARCH: Option<u32> = Some(0xc000_00f3);
#[cfg(not(any(
    target_arch = "x86_64",
    target_arch = "aarch64",
    target_arch = "riscv64"
)))]
const AUDIT_ARCH: Option<u32> = None;

/// `__X32_SYSCALL_BIT`: an x86-64 process can enter the kernel with x32
/// syscall numbers, which carry the same audit architecture. No x86-64
/// program makes x32 calls, so the filter denies them all, whatever the
/// kernel was built with.
#[cfg(target_arch = "x86_64")]
const X32: u32 = 0x4000_0000;

/// Offsets in `struct seccomp_data`: `nr`, `arch`, then `args[i]` as
/// 64-bit words from 16 (their low halves first on these little-endian
/// architectures).
const NR: u32 = 0;
const ARCH: u32 = 4;
const fn arg_low(i: u32) -> u32 {
    16 + 8 * i
}
const fn arg_high(i: u32) -> u32 {
    16 + 8 * i + 4
}

const DENY: u32 = libc::SECCOMP_RET_ERRNO | libc::EPERM as u32;
/// Denied calls per run of the filter's search (see `build_filter`).
const RUN: usize = 8;
const ALLOW: u32 = libc::SECCOMP_RET_ALLOW;

fn load(offset: u32) -> sock_filter {
    sock_filter {
        code: (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16,
        jt: 0,
        jf: 0,
        k: offset,
    }
}

fn ret(verdict: u32) -> sock_filter {
    sock_filter {
        code: (libc::BPF_RET | libc::BPF_K) as u16,
        jt: 0,
        jf: 0,
        k: verdict,
    }
}

/// `if A == k` (or `A & k` for `BPF_JSET`) skip `jt`, else skip `jf`.
fn jump(op: u32, k: u32, jt: u8, jf: u8) -> sock_filter {
    sock_filter {
        code: (libc::BPF_JMP | op | libc::BPF_K) as u16,
        jt,
        jf,
        k,
    }
}

/// Calls every sandbox denies, plus those its denial bits add.
fn denied_calls(sandbox: Sandbox) -> Vec<libc::c_long> {
    let mut calls = vec![
        libc::SYS_ptrace,
        libc::SYS_process_vm_readv,
        libc::SYS_process_vm_writev,
        libc::SYS_pidfd_getfd,
        libc::SYS_io_uring_setup,
        libc::SYS_io_uring_enter,
        libc::SYS_io_uring_register,
        libc::SYS_setrlimit,
        libc::SYS_unshare,
        libc::SYS_setns,
        libc::SYS_mount,
        libc::SYS_umount2,
        libc::SYS_pivot_root,
        libc::SYS_chroot,
        libc::SYS_open_tree,
        libc::SYS_move_mount,
        libc::SYS_fsopen,
        libc::SYS_fsconfig,
        libc::SYS_fsmount,
        libc::SYS_fspick,
        libc::SYS_mount_setattr,
        libc::SYS_bpf,
        libc::SYS_perf_event_open,
        libc::SYS_userfaultfd,
        libc::SYS_keyctl,
        libc::SYS_add_key,
        libc::SYS_request_key,
        libc::SYS_kexec_load,
        libc::SYS_kexec_file_load,
        libc::SYS_init_module,
        libc::SYS_finit_module,
        libc::SYS_delete_module,
        libc::SYS_open_by_handle_at,
        libc::SYS_name_to_handle_at,
        libc::SYS_swapon,
        libc::SYS_swapoff,
        libc::SYS_reboot,
        // Leaving the worker's process group: the zygote kills that group
        // when it reaps the worker, and a descendant outside it would
        // outlive the task (SAFETY.md P5).
        libc::SYS_setsid,
        libc::SYS_setpgid,
    ];
    if sandbox.denies(DENY_NETWORK) {
        calls.extend([
            libc::SYS_socket,
            libc::SYS_connect,
            libc::SYS_bind,
            libc::SYS_listen,
            libc::SYS_accept,
            libc::SYS_accept4,
        ]);
    }
    if sandbox.denies(DENY_EXEC) {
        calls.extend([libc::SYS_execve, libc::SYS_execveat]);
    }
    calls
}

/// Builds the seccomp filter for `sandbox`: every denied call fails with
/// `EPERM`; everything else is allowed.
///
/// Written as BPF here rather than compiled by `seccompiler`, by
/// measurement: installing a filter costs the kernel about 0.55 µs per
/// instruction on this machine (it JITs the program and runs it once per
/// syscall number to build its cache of always-allowed calls), and
/// `seccompiler` spends five instructions on each call it matches. Its
/// program for this list (with x32 numbers mirrored) was 580 instructions
/// and took 290 µs per worker to install; this one is two instructions a
/// call and one a run, about 130 in all, and decides a call within about 20
/// (the README has the figures).
///
/// The shape: check the architecture; load the syscall number; deny any x32
/// number; the two calls denied only for some arguments; then the plain
/// denials, in sorted runs (see below).
pub(crate) fn build_filter(sandbox: Sandbox) -> Result<Filter, String> {
    let arch = AUDIT_ARCH.ok_or_else(|| {
        format!(
            "the sandbox has no seccomp filter for {}",
            std::env::consts::ARCH
        )
    })?;
    let mut p = vec![
        load(ARCH),
        jump(libc::BPF_JEQ, arch, 1, 0),
        ret(libc::SECCOMP_RET_KILL_PROCESS),
        load(NR),
    ];
    #[cfg(target_arch = "x86_64")]
    p.extend([jump(libc::BPF_JSET, X32, 0, 1), ret(DENY)]);
    let nr = |call: libc::c_long| u32::try_from(call).map_err(|_| format!("syscall number {call}"));
    // prlimit64(pid, resource, new, old): reading a limit (new == NULL) is
    // what getrlimit does and stays allowed; setting one is denied.
    p.extend([
        jump(libc::BPF_JEQ, nr(libc::SYS_prlimit64)?, 0, 6),
        load(arg_low(2)),
        jump(libc::BPF_JEQ, 0, 0, 2),
        load(arg_high(2)),
        jump(libc::BPF_JEQ, 0, 1, 0),
        ret(DENY),
        ret(ALLOW),
    ]);
    // ioctl(fd, TIOCSTI | TIOCLINUX, ..): typing into the terminal that the
    // parent's stdin may be, which a shell would then run outside the
    // sandbox. The kernel compares `cmd` as 32 bits.
    #[allow(clippy::unnecessary_cast)]
    // reason: `libc::Ioctl` is c_ulong on some targets and c_int on others
    let (tiocsti, tioclinux) = (libc::TIOCSTI as u32, libc::TIOCLINUX as u32);
    p.extend([
        jump(libc::BPF_JEQ, nr(libc::SYS_ioctl)?, 0, 5),
        load(arg_low(1)),
        jump(libc::BPF_JEQ, tiocsti, 1, 0),
        jump(libc::BPF_JEQ, tioclinux, 0, 1),
        ret(DENY),
        ret(ALLOW),
    ]);
    // The plain denials, sorted and in runs of `RUN`: a `jge` skips each
    // run that lies wholly below the number, so any call is decided within
    // about `n / RUN + RUN` comparisons instead of `n`. The kernel runs the
    // program once per syscall number when it installs it, so the path
    // length is most of the install's cost.
    let mut calls = denied_calls(sandbox)
        .into_iter()
        .map(nr)
        .collect::<Result<Vec<u32>, String>>()?;
    calls.sort_unstable();
    calls.dedup();
    let runs: Vec<&[u32]> = calls.chunks(RUN).collect();
    for (i, run) in runs.iter().enumerate() {
        // A run's body: `jeq nr → ret EPERM` for each, then allow.
        let body = u8::try_from(2 * run.len() + 1).map_err(|_| "seccomp run too long")?;
        if let Some(next) = runs.get(i + 1) {
            p.push(jump(libc::BPF_JGE, next[0], body, 0));
        }
        for &call in *run {
            p.extend([jump(libc::BPF_JEQ, call, 0, 1), ret(DENY)]);
        }
        p.push(ret(ALLOW));
    }
    if runs.is_empty() {
        p.push(ret(ALLOW));
    }
    Ok(Filter(p))
}

/// Applies the Landlock part of `sandbox` to the calling (single-threaded)
/// worker: filesystem writes if denied (required, ABI 3 or later), and
/// signal and abstract-socket scoping where the kernel has it. Needs one fd for a moment, so it runs before
/// `RLIMIT_NOFILE` is lowered.
pub(crate) fn restrict_fs(sandbox: Sandbox) -> Result<(), String> {
    let mut ruleset = Ruleset::default();
    if sandbox.denies(DENY_FS_WRITES) {
        // ABI 3 and not 1: before it, `truncate` is no right Landlock can
        // deny, so a "read-only" task could still empty any file.
        ruleset = ruleset
            .set_compatibility(CompatLevel::HardRequirement)
            .handle_access(AccessFs::from_write(ABI::V3))
            .map_err(|e| {
                format!(
                    "deny_fs_writes needs Landlock ABI 3 (Linux 6.2) or later, \
                     which this kernel does not offer: {e}"
                )
            })?;
    }
    let created = ruleset
        .set_compatibility(CompatLevel::BestEffort)
        .scope(Scope::from_all(ABI::V6))
        .and_then(|r| r.create())
        .map_err(|e| format!("landlock_create_ruleset failed: {e}"))?;
    let status = created
        .restrict_self()
        .map_err(|e| format!("landlock_restrict_self failed: {e}"))?;
    // `no_new_privs` may be unset here if the kernel has no Landlock at all;
    // `install` sets it before the seccomp filter in any case.
    if sandbox.denies(DENY_FS_WRITES) {
        let abi_ok = matches!(status.landlock, LandlockStatus::Available { effective_abi, .. } if effective_abi >= ABI::V3);
        if status.ruleset == RulesetStatus::NotEnforced || !abi_ok {
            return Err(format!(
                "deny_fs_writes needs Landlock ABI 3 or later; this kernel: {:?}",
                status.landlock
            ));
        }
    }
    Ok(())
}

/// Installs `filter` in the calling (single-threaded) worker, after setting
/// `no_new_privs` (which `seccompiler::apply_filter` does first).
pub(crate) fn install(filter: &Filter) -> Result<(), String> {
    seccompiler::apply_filter(&filter.0).map_err(|e| format!("installing the seccomp filter: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_round_trip_and_unknown_bits_are_refused() {
        let all = Sandbox::new().deny_network().deny_exec().deny_fs_writes();
        assert_eq!(Sandbox::from_bits(all.bits()), Some(all));
        assert_eq!(Sandbox::from_bits(0), Some(Sandbox::new()));
        assert_eq!(Sandbox::from_bits(8), None);
    }

    /// Runs `program` on one `seccomp_data` (the subset of classic BPF the
    /// filter uses), as the kernel would.
    fn verdict(program: &[sock_filter], arch: u32, nr: u32, args: [u64; 6]) -> u32 {
        let mut data = [0u8; 64];
        data[0..4].copy_from_slice(&nr.to_le_bytes());
        data[4..8].copy_from_slice(&arch.to_le_bytes());
        for (i, a) in args.iter().enumerate() {
            data[16 + 8 * i..24 + 8 * i].copy_from_slice(&a.to_le_bytes());
        }
        let (mut pc, mut acc) = (0usize, 0u32);
        loop {
            let ins = &program[pc];
            let code = u32::from(ins.code);
            pc += 1;
            if code == libc::BPF_RET | libc::BPF_K {
                return ins.k;
            } else if code == libc::BPF_LD | libc::BPF_W | libc::BPF_ABS {
                let at = ins.k as usize;
                acc = u32::from_le_bytes(data[at..at + 4].try_into().unwrap());
            } else {
                let taken = match code & !libc::BPF_K {
                    c if c == libc::BPF_JMP | libc::BPF_JEQ => acc == ins.k,
                    c if c == libc::BPF_JMP | libc::BPF_JSET => acc & ins.k != 0,
                    c if c == libc::BPF_JMP | libc::BPF_JGE => acc >= ins.k,
                    _ => panic!("unexpected instruction {code:#x}"),
                };
                pc += usize::from(if taken { ins.jt } else { ins.jf });
            }
        }
    }

    #[test]
    fn the_filter_denies_what_it_lists_and_allows_the_rest() {
        let Some(arch) = AUDIT_ARCH else { return };
        let full = Sandbox::new().deny_network().deny_exec().deny_fs_writes();
        let program = build_filter(full).unwrap().0;
        assert!(program.len() < 160, "{} instructions", program.len());
        let nr = |c: libc::c_long| c as u32;
        let run = |call, args| verdict(&program, arch, nr(call), args);
        // Every listed call is denied and its neighbours are not (unless
        // listed too): the runs' bounds are right.
        let listed = denied_calls(full);
        for &call in &listed {
            assert_eq!(run(call, [0; 6]), DENY, "{call}");
            for near in [call - 1, call + 1] {
                let special = [libc::SYS_prlimit64, libc::SYS_ioctl];
                if !listed.contains(&near) && !special.contains(&near) {
                    assert_eq!(run(near, [0; 6]), ALLOW, "{near}");
                }
            }
        }
        assert_eq!(run(0, [0; 6]), ALLOW);
        assert_eq!(run(1000, [0; 6]), ALLOW);
        for call in [
            libc::SYS_socket,
            libc::SYS_execve,
            libc::SYS_ptrace,
            libc::SYS_setrlimit,
        ] {
            assert_eq!(run(call, [0; 6]), DENY, "{call}");
        }
        for call in [
            libc::SYS_getpid,
            libc::SYS_write,
            libc::SYS_memfd_create,
            libc::SYS_sendmsg,
        ] {
            assert_eq!(run(call, [0; 6]), ALLOW, "{call}");
        }
        // prlimit64: reading is allowed, setting (either half of the
        // pointer non-zero) is not.
        assert_eq!(run(libc::SYS_prlimit64, [0, 7, 0, 0x1000, 0, 0]), ALLOW);
        assert_eq!(run(libc::SYS_prlimit64, [0, 7, 0x1000, 0, 0, 0]), DENY);
        assert_eq!(run(libc::SYS_prlimit64, [0, 7, 1 << 40, 0, 0, 0]), DENY);
        #[allow(clippy::unnecessary_cast)] // reason: as in `build_filter`
        let tiocsti = libc::TIOCSTI as u64;
        assert_eq!(run(libc::SYS_ioctl, [0, tiocsti, 0, 0, 0, 0]), DENY);
        assert_eq!(
            run(
                libc::SYS_ioctl,
                [0, u64::from(libc::FIONREAD as u32), 0, 0, 0, 0]
            ),
            ALLOW
        );
        // Another ABI is killed; on x86-64, x32 numbers are denied.
        assert_eq!(
            verdict(&program, 0x4000_0003, 1, [0; 6]),
            libc::SECCOMP_RET_KILL_PROCESS
        );
        #[cfg(target_arch = "x86_64")]
        assert_eq!(verdict(&program, arch, X32 | 39, [0; 6]), DENY);
        // Without the denials, network and exec are allowed.
        let baseline = build_filter(Sandbox::new()).unwrap().0;
        assert_eq!(
            verdict(&baseline, arch, nr(libc::SYS_socket), [0; 6]),
            ALLOW
        );
        assert_eq!(verdict(&baseline, arch, nr(libc::SYS_ptrace), [0; 6]), DENY);
    }
}
