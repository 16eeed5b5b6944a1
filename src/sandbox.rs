//! The opt-in sandbox: [`Sandbox`], and how a worker installs it.
//!
//! Two kernel mechanisms, each for what it does best (measured and compared
//! in `docs/sandbox.md`):
//!
//! * **seccomp** (through `seccompiler`, a BPF program built in the worker)
//!   for the network, `exec` and a baseline of escape hatches. A filter sees
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

use std::collections::BTreeMap;

use landlock::{
    ABI, Access, AccessFs, CompatLevel, Compatible, LandlockStatus, Ruleset, RulesetAttr,
    RulesetStatus, Scope,
};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

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
/// keyring, module and `kexec` loading, `open_by_handle_at`, and terminal
/// input injection (`ioctl` `TIOCSTI`, `TIOCLINUX`). Where the kernel has
/// Landlock ABI 6 (Linux 6.12), it also cannot signal processes outside the
/// sandbox. See `docs/sandbox.md` for what a sandboxed task can still do.
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
pub(crate) struct Filter(BpfProgram);

/// `__X32_SYSCALL_BIT`: an x86-64 process can enter the kernel with x32
/// syscall numbers, which carry the same audit architecture; a filter keyed
/// on x86-64 numbers alone would let `socket | 0x4000_0000` through on a
/// kernel built with x32 support.
#[cfg(target_arch = "x86_64")]
const X32: i64 = 0x4000_0000;

/// x32 numbers that differ from x86-64's for calls denied here (the x32
/// table in the kernel's `syscall_64.tbl`, entries 512 and up).
#[cfg(target_arch = "x86_64")]
const X32_ONLY: &[(i64, u8)] = &[
    (520, DENY_EXEC), // execve
    (545, DENY_EXEC), // execveat
    (521, 0),         // ptrace
    (539, 0),         // process_vm_readv
    (540, 0),         // process_vm_writev
];

/// Calls every sandbox denies, and the denial bit that adds the rest.
fn denied_calls(sandbox: Sandbox) -> Vec<i64> {
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
#[allow(clippy::unnecessary_cast)] // reason: `libc::Ioctl` is `c_ulong`, narrower than u64 on some targets
pub(crate) fn build_filter(sandbox: Sandbox) -> Result<Filter, String> {
    let arch = TargetArch::try_from(std::env::consts::ARCH)
        .map_err(|e| format!("the sandbox's seccomp filter: {e}"))?;
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for call in denied_calls(sandbox) {
        // No rule: the call is denied whatever its arguments.
        rules.insert(call, Vec::new());
        #[cfg(target_arch = "x86_64")]
        rules.insert(call | X32, Vec::new());
    }
    #[cfg(target_arch = "x86_64")]
    for &(call, bit) in X32_ONLY {
        if bit == 0 || sandbox.denies(bit) {
            rules.insert(call | X32, Vec::new());
        }
    }
    let rule = |conditions| {
        SeccompRule::new(conditions).map_err(|e| format!("the sandbox's seccomp filter: {e}"))
    };
    let condition = |arg, len, op, value| {
        SeccompCondition::new(arg, len, op, value)
            .map_err(|e| format!("the sandbox's seccomp filter: {e}"))
    };
    // prlimit64(pid, resource, new, old): reading a limit (new = NULL) is
    // what getrlimit does, and stays allowed; setting one is denied.
    let prlimit = vec![rule(vec![condition(
        2,
        SeccompCmpArgLen::Qword,
        SeccompCmpOp::Ne,
        0,
    )?])?];
    rules.insert(libc::SYS_prlimit64, prlimit.clone());
    #[cfg(target_arch = "x86_64")]
    rules.insert(libc::SYS_prlimit64 | X32, prlimit);
    // ioctl(fd, TIOCSTI | TIOCLINUX, ..): typing into the terminal that the
    // parent's stdin may be, which a shell would then run outside the sandbox.
    let ioctl = vec![
        rule(vec![condition(
            1,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::Eq,
            libc::TIOCSTI as u64,
        )?])?,
        rule(vec![condition(
            1,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::Eq,
            libc::TIOCLINUX as u64,
        )?])?,
    ];
    rules.insert(libc::SYS_ioctl, ioctl.clone());
    #[cfg(target_arch = "x86_64")]
    rules.insert(libc::SYS_ioctl | X32, ioctl);
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch,
    )
    .map_err(|e| format!("the sandbox's seccomp filter: {e}"))?;
    let program =
        BpfProgram::try_from(filter).map_err(|e| format!("the sandbox's seccomp filter: {e}"))?;
    Ok(Filter(program))
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

    #[test]
    fn every_sandbox_filter_builds() {
        for bits in 0..=DENY_ALL {
            let sandbox = Sandbox::from_bits(bits).unwrap();
            assert!(build_filter(sandbox).is_ok(), "{sandbox:?}");
        }
    }
}
