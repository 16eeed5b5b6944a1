//! The wire format: every frame that crosses a process boundary, as pure
//! encode/decode functions over byte slices (no syscalls, no shared memory).
//!
//! All integers are little-endian. Every frame starts with a 4-byte magic and a
//! 2-byte version, so a frame from a different build of this crate is refused
//! rather than misread. Decoders are total: for every input they return a value
//! or a [`WireError`], never panic, and never allocate or loop in proportion
//! to a number read from the input.
//!
//! # Frames
//!
//! **Spawn request**, parent → zygote, on the command socket (80-byte header,
//! then the argument bytes when they travel inline). It carries no secret:
//! the zygote's memory is inherited by every later worker.
//!
//! | offset | size | field                                                |
//! |-------:|-----:|------------------------------------------------------|
//! | 0      | 4    | magic `RIPq`                                         |
//! | 4      | 2    | version (1)                                          |
//! | 6      | 2    | kind: 1 = spawn                                      |
//! | 8      | 8    | `generation`: task generation, unique per zygote            |
//! | 16     | 8    | `entry`: address of the monomorphised task function  |
//! | 24     | 4    | `slot`: ring slot the worker must write its result to |
//! | 28     | 4    | flags: bit 0 = argument in a sealed memfd; bit 1 = report `Started`; bit 2 = last task of a reused worker; bit 3 = no doorbell attached, reuse the last; bit 4 = no report socket attached, use the one kept under `pair`; bit 5 = an env/cwd memfd attached; bits 6–7 and 8–9 = stdout and stderr: 0 inherit, 1 `/dev/null`, 2 a pipe attached; bit 10 = a trace buffer attached (the last fd), bits 11–13 = the most verbose level to keep in it (1 = ERROR … 5 = TRACE), only with bit 10 |
//! | 32     | 8    | argument length in bytes                             |
//! | 40     | 4    | `worker`: pid of the parked worker the job is for; 0 = the worker the zygote forks for it |
//! | 44     | 4    | `pair`: number of the task's report socket pair (`report_pool`), 0 = not kept; at most 1024 |
//! | 48     | 8    | memory limit in bytes (`RLIMIT_DATA`); `u64::MAX` = none |
//! | 56     | 8    | CPU limit in seconds (`RLIMIT_CPU`); `u64::MAX` = none |
//! | 64     | 8    | open files limit (`RLIMIT_NOFILE`); `u64::MAX` = none |
//! | 72     | 4    | confinement flags: bit 0 = keep core dumps; bit 1 = sandbox; bits 8–10 = the sandbox's denials (network, exec, fs writes), only with bit 1 |
//! | 76     | 4    | reserved, 0                                          |
//!
//! Bytes 48–80 are the task's [`Confinement`]: a plain value, applied by
//! the worker before the task's code runs (`crate::confine`).
//!
//! It carries two fds (the zygote's end of the task's report socket, the
//! task's eventfd) and a third, the argument memfd, when flag bit 0 is set;
//! then, in this order, the env/cwd memfd (bit 5, `crate::env`) and the
//! write ends of the stdout and stderr pipes (mode 2, `crate::output`).
//! A job sent straight to a parked worker carries no report socket, and no
//! eventfd either when flag bit 3 is set. Flag bit 10 adds the task's trace
//! buffer, a memfd (`crate::trace`), after all the others.
//!
//! **Report**, zygote → parent, on the task's own report socket (16 bytes):
//! magic `RIPr`, version, kind (1 = started, 2 = exited, 3 = spawn failed),
//! then a `u64`: the worker's pid, its raw wait status, or the `fork` errno.
//! A *started* report carries one fd, the worker's pidfd; the others carry
//! none. After an *exited* report on a task's own report socket (the last
//! one), the zygote keeps its end of that socket under the request's `pair`
//! number, for a later task to reuse the pair (see `report_pool`).
//!
//! **Spill notice**, worker → parent, on the shared spill socket (24 bytes):
//! magic `RIPs`, version, kind 1, `generation`, and a tag `mac(key, ...)` that
//! proves the sender knew the task's key. It carries the sealed memfd that
//! holds a result too large for the worker's ring slot.
//!
//! **Result record**, worker → parent, in the worker's ring slot; see
//! [`crate::ring`] for the slot layout and [`decode_record_header`] and
//! [`verify_record`] for its checks.
//!
//! **Key**, worker → parent, through the task's eventfd: after committing its
//! record, the worker adds its 64-bit key (random, drawn after the fork and
//! for every task, never 0 or `u64::MAX`; its low bit is [`KEY_CONTINUES`])
//! to the eventfd, which only it and the parent hold. The
//! record's MAC is keyed with it, so no other process can forge or alter a
//! record the parent will accept.
//!
//! # Version history
//!
//! * 1: first version.
//! * 2: spawn requests name the parked worker a job is for, so a job sent to
//!   a worker that died meanwhile is never run by its replacement.
//! * 3: a task's last report hands its report socket's far end back.
//! * 4: spawn requests carry the task's confinement (resource limits and
//!   sandbox), and a result record may say that it could not be applied; a
//!   request may mark a reused worker's last task, or reuse its last
//!   doorbell; the key's low bit says whether the worker waits for another
//!   task.
//! * 5: spawn requests carry the task's I/O plan (env/cwd memfd, stdout and
//!   stderr modes and pipes); a `Panic` record may carry a backtrace; a
//!   record may say that the task's I/O could not be set up (`Setup`).
//! * 6: ring slots are whole pages (slot isolation, `ring::Ring::isolate`),
//!   so a slot's capacity is its size rounded up to that.
//! * 7: every string of at least 4 KiB in an argument or a result carries a
//!   pad marker (see `codec`), so that each large string of a spilled payload
//!   is aligned with its source, not only the first; the payload starts at
//!   the memfd's first byte.

use std::fmt;

use crate::confine::Confinement;
use crate::sandbox::Sandbox;

/// The version written into, and required of, every frame.
pub(crate) const VERSION: u16 = 7;

const REQUEST_MAGIC: [u8; 4] = *b"RIPq";
const REPORT_MAGIC: [u8; 4] = *b"RIPr";
const SPILL_MAGIC: [u8; 4] = *b"RIPs";
const DISMISS_MAGIC: [u8; 4] = *b"RIPd";

/// Size of a spawn request's fixed header.
pub(crate) const REQUEST_HEADER: usize = 80;
/// Where a spawn request's confinement record starts.
const CONFINEMENT_AT: usize = 48;
/// Size of a report frame.
pub(crate) const REPORT_LEN: usize = 16;
/// Size of a spill notice.
pub(crate) const SPILL_LEN: usize = 24;
/// Size of a dismissal.
pub(crate) const DISMISS_LEN: usize = 16;

/// Request flag: the argument travels in a sealed memfd, not inline.
pub(crate) const FLAG_ARG_MEMFD: u32 = 1;
/// Request flag: send a `Started` report with the worker's pidfd. A plain
/// `run` without a timeout does not need the pidfd (dropping it cancels
/// through the report socket's hang-up), so it saves the parent a wake-up.
pub(crate) const FLAG_WANT_STARTED: u32 = 2;
/// Request flag, for a parked worker in reuse mode: exit after this task
/// instead of waiting for another (the caller holds a `Process`, whose
/// `wait` needs the worker's exit).
pub(crate) const FLAG_LAST: u32 = 4;
/// Request flag, for a reused worker: the job carries no doorbell; ring the
/// one that came with the worker's previous task (the parent kept its end).
pub(crate) const FLAG_SAME_DOORBELL: u32 = 8;
/// Request flag, on the cold path: no report socket attached; use the far
/// end the zygote kept under the request's `pair` number (`report_pool`).
pub(crate) const FLAG_POOLED_REPORT: u32 = 16;
/// Request flag: the env/cwd settings travel in a memfd (`crate::env`).
pub(crate) const FLAG_ENV_MEMFD: u32 = 32;
/// Where the stdout and stderr modes ([`Stdio`]) sit in the flags.
const STDOUT_SHIFT: u32 = 6;
const STDERR_SHIFT: u32 = 8;
/// Request flag: the task's trace buffer (`crate::trace`) is attached,
/// after every other fd; bits 11–13 hold the level to keep.
pub(crate) const FLAG_TRACE: u32 = 1 << 10;
/// Where a traced request's level sits in its flags.
const TRACE_LEVEL_SHIFT: u32 = 11;
/// Largest report-pair number a request may carry.
pub(crate) const MAX_PAIR: u32 = 1024;
/// Report pairs kept for reuse, numbered `1..=KEPT_PAIRS` on both sides.
pub(crate) const KEPT_PAIRS: u32 = 32;

/// The key's low bit: set by a reused worker that will wait for another
/// task after this one. The parent trusts it only for its own bookkeeping
/// (whether to offer the worker the next task); a worker that lies about
/// it harms only the tasks it would run itself.
pub(crate) const KEY_CONTINUES: u64 = 1;

/// Why a frame was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum WireError {
    /// Shorter than its fixed header.
    Short { need: usize, got: usize },
    /// Wrong magic: not a frame of this kind.
    Magic,
    /// A frame from another version of this crate.
    Version(u16),
    /// Unknown kind or flags value.
    Kind(u16),
    /// A length field disagrees with the frame or exceeds its limit.
    Length(u64),
    /// Unknown flag bits.
    Flags(u32),
    /// The record is not the one this task is waiting for.
    Stale { expected: u64, found: u64 },
    /// The record's MAC does not match its contents (or the key is wrong).
    Mac,
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WireError::Short { need, got } => write!(f, "frame too short: {got} of {need} bytes"),
            WireError::Magic => f.write_str("bad frame magic"),
            WireError::Version(v) => write!(f, "unsupported wire version {v}"),
            WireError::Kind(k) => write!(f, "unknown frame kind {k}"),
            WireError::Length(n) => write!(f, "bad length field {n}"),
            WireError::Flags(x) => write!(f, "unknown flags {x:#x}"),
            WireError::Stale { expected, found } => {
                write!(
                    f,
                    "record of task {found} where task {expected} was expected"
                )
            }
            WireError::Mac => f.write_str("record MAC mismatch"),
        }
    }
}

/// A little-endian reader over a byte slice that never panics.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        // Callers check the total length first; a short input yields zeros
        // instead of a panic, and the length check has already failed.
        let mut out = [0u8; N];
        if let Some((head, rest)) = self.0.split_first_chunk::<N>() {
            out = *head;
            self.0 = rest;
        }
        out
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.take())
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take())
    }
}

fn check_header(frame: &[u8], need: usize, magic: [u8; 4]) -> Result<Reader<'_>, WireError> {
    if frame.len() < need {
        return Err(WireError::Short {
            need,
            got: frame.len(),
        });
    }
    let mut r = Reader(frame);
    if r.take::<4>() != magic {
        return Err(WireError::Magic);
    }
    let version = r.u16();
    if version != VERSION {
        return Err(WireError::Version(version));
    }
    Ok(r)
}

/// `check_header` for a frame of exactly `len` bytes.
fn check_fixed(frame: &[u8], len: usize, magic: [u8; 4]) -> Result<Reader<'_>, WireError> {
    let r = check_header(frame, len, magic)?;
    if frame.len() != len {
        return Err(WireError::Length(frame.len() as u64));
    }
    Ok(r)
}

/// A fixed-size frame of `N` bytes with the common header (magic, version,
/// `kind`) written; the caller writes the body from byte 8.
fn fixed_frame<const N: usize>(magic: [u8; 4], kind: u16) -> [u8; N] {
    let mut out = [0u8; N];
    out[0..4].copy_from_slice(&magic);
    out[4..6].copy_from_slice(&VERSION.to_le_bytes());
    out[6..8].copy_from_slice(&kind.to_le_bytes());
    out
}

/// Where a spawn request's argument bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ArgPlace {
    /// Inline, after the header, this many bytes.
    Inline(u64),
    /// In the sealed memfd that travels with the frame, this many bytes.
    Memfd(u64),
}

/// Where a task's stdout or stderr goes (`crate::output`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum Stdio {
    /// The worker's own, inherited from the zygote.
    #[default]
    Inherit,
    /// `/dev/null`, opened by the worker.
    Null,
    /// The write end of a pipe that travels with the request.
    Pipe,
}

impl Stdio {
    fn bits(self) -> u32 {
        match self {
            Stdio::Inherit => 0,
            Stdio::Null => 1,
            Stdio::Pipe => 2,
        }
    }

    fn from_bits(bits: u32) -> Option<Stdio> {
        match bits & 3 {
            0 => Some(Stdio::Inherit),
            1 => Some(Stdio::Null),
            2 => Some(Stdio::Pipe),
            _ => None,
        }
    }
}

/// A task's I/O plan: which of its settings travel with the request, and
/// so which fds follow the argument's (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct IoPlan {
    /// An env/cwd memfd is attached.
    pub(crate) env: bool,
    pub(crate) stdout: Stdio,
    pub(crate) stderr: Stdio,
}

impl IoPlan {
    /// True for a task with no I/O settings. Like confinement, the settings
    /// cannot be undone in a worker (a task may keep the redirected fds or
    /// read the environment later), so a worker that ran a task with any
    /// other plan runs no other task.
    pub(crate) fn is_default(&self) -> bool {
        *self == IoPlan::default()
    }

    fn flags(&self) -> u32 {
        let mut flags = self.stdout.bits() << STDOUT_SHIFT | self.stderr.bits() << STDERR_SHIFT;
        if self.env {
            flags |= FLAG_ENV_MEMFD;
        }
        flags
    }

    fn from_flags(flags: u32) -> Option<IoPlan> {
        Some(IoPlan {
            env: flags & FLAG_ENV_MEMFD != 0,
            stdout: Stdio::from_bits(flags >> STDOUT_SHIFT)?,
            stderr: Stdio::from_bits(flags >> STDERR_SHIFT)?,
        })
    }
}

/// A decoded spawn request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Request {
    pub(crate) generation: u64,
    /// Send a `Started` report (see [`FLAG_WANT_STARTED`]).
    pub(crate) want_started: bool,
    /// Exit after this task, even in reuse mode (see [`FLAG_LAST`]).
    pub(crate) last: bool,
    /// No doorbell attached: reuse the last one (see [`FLAG_SAME_DOORBELL`]).
    pub(crate) same_doorbell: bool,
    /// The report pair's number (0: not kept), and whether the zygote holds
    /// its far end already ([`FLAG_POOLED_REPORT`]).
    pub(crate) pair: u32,
    pub(crate) pooled_report: bool,
    pub(crate) entry: u64,
    pub(crate) slot: u32,
    pub(crate) arg: ArgPlace,
    /// The parked worker this job is for (its pid), or 0 on the cold path.
    pub(crate) worker: u32,
    /// Limits and sandbox to apply before the task runs.
    pub(crate) confinement: Confinement,
    /// Env, cwd and output settings, applied before the confinement.
    pub(crate) io: IoPlan,
    /// 0: no trace buffer; 1 (ERROR) to 5 (TRACE): a trace buffer is
    /// attached, keeping events up to that level ([`FLAG_TRACE`]).
    pub(crate) trace: u8,
}

/// Confinement flag: leave `RLIMIT_CORE` as inherited.
const CONFINE_CORE_DUMPS: u32 = 1;
/// Confinement flag: apply a sandbox, whose denials are in bits 8 and up.
const CONFINE_SANDBOX: u32 = 2;
const CONFINE_DENY_SHIFT: u32 = 8;

/// Encodes a limit: `None` is `u64::MAX`, which is also `RLIM_INFINITY`.
fn limit_word(limit: Option<u64>) -> u64 {
    limit.unwrap_or(u64::MAX)
}

fn word_limit(word: u64) -> Option<u64> {
    (word != u64::MAX).then_some(word)
}

impl Confinement {
    /// The 32 bytes at offset 48 of a spawn request.
    fn encode(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        out[0..8].copy_from_slice(&limit_word(self.memory).to_le_bytes());
        out[8..16].copy_from_slice(&limit_word(self.cpu_secs).to_le_bytes());
        out[16..24].copy_from_slice(&limit_word(self.open_files).to_le_bytes());
        let mut flags = 0;
        if self.core_dumps {
            flags |= CONFINE_CORE_DUMPS;
        }
        if let Some(sandbox) = self.sandbox {
            flags |= CONFINE_SANDBOX | u32::from(sandbox.bits()) << CONFINE_DENY_SHIFT;
        }
        out[24..28].copy_from_slice(&flags.to_le_bytes());
        out
    }

    /// Every limit value is one the kernel accepts (`setrlimit` takes any
    /// `u64`; the worker checks each against its own needs), so only the
    /// flags and the reserved word can be malformed.
    fn decode(r: &mut Reader<'_>) -> Result<Confinement, WireError> {
        let memory = word_limit(r.u64());
        let cpu_secs = word_limit(r.u64());
        let open_files = word_limit(r.u64());
        let flags = r.u32();
        let reserved = r.u32();
        if reserved != 0 {
            return Err(WireError::Flags(reserved));
        }
        let deny = flags >> CONFINE_DENY_SHIFT;
        let known = CONFINE_CORE_DUMPS | CONFINE_SANDBOX;
        if flags & ((1 << CONFINE_DENY_SHIFT) - 1) & !known != 0 {
            return Err(WireError::Flags(flags));
        }
        let sandbox = match (flags & CONFINE_SANDBOX != 0, u8::try_from(deny)) {
            (true, Ok(bits)) => Some(Sandbox::from_bits(bits).ok_or(WireError::Flags(flags))?),
            (false, Ok(0)) => None,
            _ => return Err(WireError::Flags(flags)),
        };
        Ok(Confinement {
            memory,
            cpu_secs,
            open_files,
            core_dumps: flags & CONFINE_CORE_DUMPS != 0,
            sandbox,
        })
    }
}

impl Request {
    /// Encodes the header followed by `inline_arg` (empty for a memfd argument).
    pub(crate) fn encode(&self, inline_arg: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(REQUEST_HEADER + inline_arg.len());
        out.extend_from_slice(&REQUEST_MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&1u16.to_le_bytes());
        out.extend_from_slice(&self.generation.to_le_bytes());
        out.extend_from_slice(&self.entry.to_le_bytes());
        out.extend_from_slice(&self.slot.to_le_bytes());
        let (mut flags, len) = match self.arg {
            ArgPlace::Inline(n) => (0, n),
            ArgPlace::Memfd(n) => (FLAG_ARG_MEMFD, n),
        };
        if self.want_started {
            flags |= FLAG_WANT_STARTED;
        }
        if self.last {
            flags |= FLAG_LAST;
        }
        if self.same_doorbell {
            flags |= FLAG_SAME_DOORBELL;
        }
        if self.pooled_report {
            flags |= FLAG_POOLED_REPORT;
        }
        flags |= self.io.flags();
        if self.trace != 0 {
            flags |= FLAG_TRACE | u32::from(self.trace.min(5)) << TRACE_LEVEL_SHIFT;
        }
        out.extend_from_slice(&flags.to_le_bytes());
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&self.worker.to_le_bytes());
        out.extend_from_slice(&self.pair.to_le_bytes());
        debug_assert_eq!(out.len(), CONFINEMENT_AT);
        out.extend_from_slice(&self.confinement.encode());
        out.extend_from_slice(inline_arg);
        out
    }

    /// Decodes a request frame; returns the header and the inline argument.
    ///
    /// `slots` bounds the slot index and `max_arg` the argument length.
    pub(crate) fn decode(
        frame: &[u8],
        slots: u32,
        max_arg: u64,
    ) -> Result<(Request, &[u8]), WireError> {
        let mut r = check_header(frame, REQUEST_HEADER, REQUEST_MAGIC)?;
        let kind = r.u16();
        if kind != 1 {
            return Err(WireError::Kind(kind));
        }
        let generation = r.u64();
        let entry = r.u64();
        let slot = r.u32();
        let flags = r.u32();
        let len = r.u64();
        let worker = r.u32();
        let pair = r.u32();
        if pair > MAX_PAIR {
            return Err(WireError::Length(pair.into()));
        }
        let confinement = Confinement::decode(&mut r)?;
        if slot >= slots {
            return Err(WireError::Length(slot.into()));
        }
        if len > max_arg {
            return Err(WireError::Length(len));
        }
        let inline = &frame[REQUEST_HEADER..];
        let known = FLAG_ARG_MEMFD
            | FLAG_WANT_STARTED
            | FLAG_LAST
            | FLAG_SAME_DOORBELL
            | FLAG_POOLED_REPORT
            | FLAG_ENV_MEMFD
            | 3 << STDOUT_SHIFT
            | 3 << STDERR_SHIFT
            | FLAG_TRACE
            | 7 << TRACE_LEVEL_SHIFT;
        let io = IoPlan::from_flags(flags).ok_or(WireError::Flags(flags))?;
        // A pooled report socket is named by its number, which is never 0.
        if flags & !known != 0 || (flags & FLAG_POOLED_REPORT != 0 && pair == 0) {
            return Err(WireError::Flags(flags));
        }
        // A level with the trace flag, and only then.
        let trace = (flags >> TRACE_LEVEL_SHIFT & 7) as u8;
        if (flags & FLAG_TRACE != 0) != (1..=5).contains(&trace) {
            return Err(WireError::Flags(flags));
        }
        let arg = match flags & FLAG_ARG_MEMFD {
            0 if inline.len() as u64 == len => ArgPlace::Inline(len),
            FLAG_ARG_MEMFD if inline.is_empty() => ArgPlace::Memfd(len),
            _ => return Err(WireError::Length(len)),
        };
        Ok((
            Request {
                generation,
                want_started: flags & FLAG_WANT_STARTED != 0,
                last: flags & FLAG_LAST != 0,
                same_doorbell: flags & FLAG_SAME_DOORBELL != 0,
                pair,
                pooled_report: flags & FLAG_POOLED_REPORT != 0,
                entry,
                slot,
                arg,
                worker,
                confinement,
                io,
                trace,
            },
            inline,
        ))
    }
}

/// A report from the zygote about one task's worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Report {
    /// The worker exists; its pidfd travels with the frame.
    Started { pid: u32 },
    /// The worker was reaped with this raw wait status.
    Exited { status: i32 },
    /// `fork` failed with this errno.
    SpawnFailed { errno: i32 },
}

impl Report {
    pub(crate) fn encode(&self) -> [u8; REPORT_LEN] {
        let (kind, value): (u16, u64) = match *self {
            Report::Started { pid } => (1, pid.into()),
            Report::Exited { status } => (2, status as u32 as u64),
            Report::SpawnFailed { errno } => (3, errno as u32 as u64),
        };
        let mut out = fixed_frame::<REPORT_LEN>(REPORT_MAGIC, kind);
        out[8..16].copy_from_slice(&value.to_le_bytes());
        out
    }

    /// The last report about a worker: nothing follows it on its socket.
    pub(crate) fn is_final(&self) -> bool {
        matches!(self, Report::Exited { .. } | Report::SpawnFailed { .. })
    }

    pub(crate) fn decode(frame: &[u8]) -> Result<Report, WireError> {
        let mut r = check_fixed(frame, REPORT_LEN, REPORT_MAGIC)?;
        let kind = r.u16();
        let value = r.u64();
        let small = u32::try_from(value).map_err(|_| WireError::Length(value))?;
        match kind {
            1 if small != 0 => Ok(Report::Started { pid: small }),
            1 => Err(WireError::Length(0)),
            2 => Ok(Report::Exited {
                status: small as i32,
            }),
            3 => Ok(Report::SpawnFailed {
                errno: small as i32,
            }),
            k => Err(WireError::Kind(k)),
        }
    }
}

/// Sent by the parent on a mailbox's job socket instead of a job: the parked
/// worker `worker` is to exit without running anything (its pidfd never
/// reached the parent; see `mailbox::read_parked`). It names the worker, as
/// a job does, so that it cannot dismiss a successor if it arrives late.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Dismissal {
    pub(crate) worker: u32,
}

impl Dismissal {
    pub(crate) fn encode(&self) -> [u8; DISMISS_LEN] {
        let mut out = fixed_frame::<DISMISS_LEN>(DISMISS_MAGIC, 1);
        out[8..12].copy_from_slice(&self.worker.to_le_bytes());
        out
    }

    pub(crate) fn decode(frame: &[u8]) -> Result<Dismissal, WireError> {
        let mut r = check_fixed(frame, DISMISS_LEN, DISMISS_MAGIC)?;
        let kind = r.u16();
        if kind != 1 {
            return Err(WireError::Kind(kind));
        }
        Ok(Dismissal { worker: r.u32() })
    }
}

/// A spill notice: "the result of task `generation` is in the memfd attached".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SpillNotice {
    pub(crate) generation: u64,
    pub(crate) tag: u64,
}

impl SpillNotice {
    pub(crate) fn encode(&self) -> [u8; SPILL_LEN] {
        let mut out = fixed_frame::<SPILL_LEN>(SPILL_MAGIC, 1);
        out[8..16].copy_from_slice(&self.generation.to_le_bytes());
        out[16..24].copy_from_slice(&self.tag.to_le_bytes());
        out
    }

    pub(crate) fn decode(frame: &[u8]) -> Result<SpillNotice, WireError> {
        let mut r = check_fixed(frame, SPILL_LEN, SPILL_MAGIC)?;
        let kind = r.u16();
        if kind != 1 {
            return Err(WireError::Kind(kind));
        }
        Ok(SpillNotice {
            generation: r.u64(),
            tag: r.u64(),
        })
    }

    /// The tag a worker that knows `key` computes for a spilled result.
    pub(crate) fn tag_for(key: u64, generation: u64, len: u64) -> u64 {
        mac(key, &[generation, RecordKind::Spilled as u64, len], &[])
    }
}

/// What a result record holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u64)]
pub(crate) enum RecordKind {
    /// The encoded return value.
    Value = 1,
    /// A UTF-8 panic message.
    Panic = 2,
    /// The worker could not encode the return value; a UTF-8 message.
    EncodeFailed = 3,
    /// The encoded value is in a sealed memfd announced by a spill notice.
    Spilled = 4,
    /// The worker could not apply the task's confinement, so the task did
    /// not run: a one-byte [`ConfineFailure`] code, then a UTF-8 message.
    Unconfined = 5,
    /// The worker could not set up the task's I/O (its working directory,
    /// its output), so the task did not run: a UTF-8 message
    /// (`crate::output::SetupFailure`).
    Setup = 6,
}

/// What an [`RecordKind::Unconfined`] record's first byte names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum ConfineFailure {
    Sandbox = 0,
    Memory = 1,
    CpuTime = 2,
    OpenFiles = 3,
}

impl ConfineFailure {
    /// Splits an `Unconfined` payload into its code and message; an unknown
    /// or missing code reads as `Sandbox` (the payload is the worker's word,
    /// and only the message is shown).
    pub(crate) fn split(payload: &[u8]) -> (ConfineFailure, &[u8]) {
        let code = match payload.first() {
            Some(1) => ConfineFailure::Memory,
            Some(2) => ConfineFailure::CpuTime,
            Some(3) => ConfineFailure::OpenFiles,
            _ => ConfineFailure::Sandbox,
        };
        (code, payload.get(1..).unwrap_or(&[]))
    }
}

impl RecordKind {
    fn from_word(w: u64) -> Option<RecordKind> {
        Some(match w {
            1 => RecordKind::Value,
            2 => RecordKind::Panic,
            3 => RecordKind::EncodeFailed,
            4 => RecordKind::Spilled,
            5 => RecordKind::Unconfined,
            6 => RecordKind::Setup,
            _ => return None,
        })
    }
}

/// Number of header words of a result record (see [`crate::ring`]).
pub(crate) const RECORD_HEADER_WORDS: usize = 4;

/// The header words of a result record, in slot order after the commit word:
/// `[generation, kind, len, mac]`.
///
/// `len` is `payload.len()`, except for a [`RecordKind::Spilled`] record, whose
/// payload is empty and whose `len` is that of the spilled bytes.
pub(crate) fn encode_record_header(
    key: u64,
    generation: u64,
    kind: RecordKind,
    len: u64,
    payload: &[u8],
) -> [u64; RECORD_HEADER_WORDS] {
    debug_assert!(kind == RecordKind::Spilled || len == payload.len() as u64);
    [
        generation,
        kind as u64,
        len,
        mac(key, &[generation, kind as u64, len], payload),
    ]
}

/// A record header that passed [`decode_record_header`]'s checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RecordHeader {
    pub(crate) kind: RecordKind,
    pub(crate) len: u64,
    pub(crate) mac: u64,
}

/// Validates the header words of a record copied out of slot memory.
///
/// `capacity` is the slot's payload capacity in bytes; `spill_limit` bounds
/// the length a spilled record may announce.
pub(crate) fn decode_record_header(
    words: [u64; RECORD_HEADER_WORDS],
    generation: u64,
    capacity: u64,
    spill_limit: u64,
) -> Result<RecordHeader, WireError> {
    let [found, kind, len, mac] = words;
    if found != generation {
        return Err(WireError::Stale {
            expected: generation,
            found,
        });
    }
    let kind = RecordKind::from_word(kind).ok_or(WireError::Kind(kind as u16))?;
    let limit = if kind == RecordKind::Spilled {
        spill_limit
    } else {
        capacity
    };
    if len > limit {
        return Err(WireError::Length(len));
    }
    Ok(RecordHeader { kind, len, mac })
}

/// Checks a record's payload (already copied out) against its header.
pub(crate) fn verify_record(
    key: u64,
    generation: u64,
    header: &RecordHeader,
    payload: &[u8],
) -> Result<(), WireError> {
    let expected_len = if header.kind == RecordKind::Spilled {
        0
    } else {
        header.len
    };
    if payload.len() as u64 != expected_len {
        return Err(WireError::Length(payload.len() as u64));
    }
    let sum = if header.kind == RecordKind::Spilled {
        mac(key, &[generation, header.kind as u64, header.len], &[])
    } else {
        mac(key, &[generation, header.kind as u64, header.len], payload)
    };
    if sum != header.mac {
        return Err(WireError::Mac);
    }
    Ok(())
}

/// SipHash-1-3 of some header words and a byte payload, keyed with the
/// task's key: a MAC that no process without the key can forge, and that
/// does not reveal the key (SAFETY.md S3). SipHash is a PRF; unlike a
/// multiply-xor mac, its output cannot be inverted to recover the key
/// from a record a neighbouring worker can read.
pub(crate) fn mac(key: u64, words: &[u64], payload: &[u8]) -> u64 {
    use std::hash::Hasher;
    // The second key word only separates this use of SipHash from others.
    let mut h = siphasher::sip::SipHasher13::new_with_keys(key, 0x7269_702d_7265_636f);
    for &w in words {
        h.write_u64(w);
    }
    h.write(payload);
    h.write_u64(payload.len() as u64);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trips_inline_and_memfd() {
        let req = Request {
            generation: 7,
            want_started: true,
            last: false,
            same_doorbell: false,
            pair: 0,
            pooled_report: false,
            entry: 0x5555_0000,
            slot: 3,
            arg: ArgPlace::Inline(5),
            worker: 0,
            trace: 0,
            confinement: Confinement::default(),
            io: IoPlan::default(),
        };
        let frame = req.encode(b"hello");
        assert_eq!(
            Request::decode(&frame, 4, 1 << 20),
            Ok((req, &b"hello"[..]))
        );
        let big = Request {
            arg: ArgPlace::Memfd(1 << 30),
            ..req
        };
        assert_eq!(
            Request::decode(&big.encode(&[]), 4, 1 << 31),
            Ok((big, &[][..]))
        );
    }

    #[test]
    fn request_rejects_bad_slot_length_and_truncation() {
        let req = Request {
            generation: 1,
            want_started: false,
            last: false,
            same_doorbell: false,
            pair: 0,
            pooled_report: false,
            entry: 3,
            slot: 9,
            arg: ArgPlace::Inline(2),
            worker: 77,
            trace: 0,
            confinement: Confinement::default(),
            io: IoPlan::default(),
        };
        let frame = req.encode(b"ab");
        assert_eq!(Request::decode(&frame, 4, 100), Err(WireError::Length(9)));
        assert!(Request::decode(&frame[..frame.len() - 1], 16, 100).is_err());
        assert!(Request::decode(&frame[..10], 16, 100).is_err());
    }

    #[test]
    fn request_carries_confinement_and_rejects_unknown_bits() {
        let req = Request {
            generation: 2,
            want_started: false,
            last: true,
            same_doorbell: true,
            pair: 0,
            pooled_report: false,
            entry: 0x5555_0000,
            slot: 1,
            arg: ArgPlace::Inline(0),
            worker: 0,
            trace: 0,
            confinement: Confinement {
                memory: Some(64 << 20),
                cpu_secs: Some(1),
                open_files: Some(16),
                core_dumps: true,
                sandbox: Some(Sandbox::new().deny_network().deny_fs_writes()),
            },
            io: IoPlan {
                env: true,
                stdout: Stdio::Null,
                stderr: Stdio::Pipe,
            },
        };
        let frame = req.encode(&[]);
        assert_eq!(Request::decode(&frame, 4, 100), Ok((req, &[][..])));
        let flags_at = CONFINEMENT_AT + 24;
        let with = |at: usize, word: u32| {
            let mut f = frame.clone();
            f[at..at + 4].copy_from_slice(&word.to_le_bytes());
            Request::decode(&f, 4, 100).map(|(r, _)| r)
        };
        // An unknown flag, an unknown denial, a denial without a sandbox,
        // and a non-zero reserved word.
        assert!(with(flags_at, 1 << 5).is_err());
        assert!(with(flags_at, CONFINE_SANDBOX | 1 << 15).is_err());
        assert!(with(flags_at, 1 << CONFINE_DENY_SHIFT).is_err());
        assert!(with(flags_at + 4, 1).is_err());
        // A sandbox that denies nothing is still a sandbox.
        assert_eq!(
            with(flags_at, CONFINE_SANDBOX).map(|r| r.confinement.sandbox),
            Ok(Some(Sandbox::new()))
        );
    }

    #[test]
    fn unconfined_payload_splits_into_code_and_message() {
        assert_eq!(
            ConfineFailure::split(b"\x01too low"),
            (ConfineFailure::Memory, &b"too low"[..])
        );
        assert_eq!(
            ConfineFailure::split(b""),
            (ConfineFailure::Sandbox, &b""[..])
        );
        assert_eq!(
            ConfineFailure::split(b"\xffx"),
            (ConfineFailure::Sandbox, &b"x"[..])
        );
    }

    #[test]
    fn report_round_trips_and_rejects_zero_pid() {
        for r in [
            Report::Started { pid: 42 },
            Report::Exited { status: 0x0300 },
            Report::SpawnFailed { errno: 11 },
        ] {
            assert_eq!(Report::decode(&r.encode()), Ok(r));
        }
        let mut zero = Report::Started { pid: 1 }.encode();
        zero[8] = 0;
        assert!(Report::decode(&zero).is_err());
    }

    #[test]
    fn dismissal_round_trips_and_is_never_a_job() {
        let d = Dismissal { worker: 4242 };
        assert_eq!(Dismissal::decode(&d.encode()), Ok(d));
        assert!(Request::decode(&d.encode(), 8, 1 << 20).is_err());
        let job = Request {
            generation: 1,
            want_started: false,
            last: false,
            same_doorbell: false,
            pair: 0,
            pooled_report: false,
            entry: 0x5555_0000,
            slot: 0,
            arg: ArgPlace::Inline(0),
            worker: 4242,
            trace: 0,
            confinement: Confinement::default(),
            io: IoPlan::default(),
        }
        .encode(&[]);
        assert!(Dismissal::decode(&job).is_err());
    }

    #[test]
    fn record_checksum_detects_any_flipped_bit() {
        let payload = b"some payload bytes!";
        let [generation, kind, len, sum] =
            encode_record_header(11, 5, RecordKind::Value, payload.len() as u64, payload);
        let h = decode_record_header([generation, kind, len, sum], 5, 64, 0).unwrap();
        assert_eq!(verify_record(11, 5, &h, payload), Ok(()));
        for i in 0..payload.len() * 8 {
            let mut p = payload.to_vec();
            p[i / 8] ^= 1 << (i % 8);
            assert_eq!(verify_record(11, 5, &h, &p), Err(WireError::Mac));
        }
        assert_eq!(verify_record(12, 5, &h, payload), Err(WireError::Mac));
    }

    #[test]
    fn record_header_rejects_stale_generation_and_oversize() {
        let w = encode_record_header(1, 5, RecordKind::Value, 100, &[0; 100]);
        assert_eq!(
            decode_record_header(w, 6, 1000, 0),
            Err(WireError::Stale {
                expected: 6,
                found: 5
            })
        );
        assert_eq!(
            decode_record_header(w, 5, 99, 0),
            Err(WireError::Length(100))
        );
    }

    mod properties {
        use super::super::*;
        use proptest::prelude::*;

        fn arg_place() -> impl Strategy<Value = ArgPlace> {
            prop_oneof![
                (0u64..2048).prop_map(ArgPlace::Inline),
                any::<u64>().prop_map(ArgPlace::Memfd),
            ]
        }

        fn confinement() -> impl Strategy<Value = Confinement> {
            let limit = || proptest::option::of(0u64..u64::MAX);
            (
                limit(),
                limit(),
                limit(),
                any::<bool>(),
                proptest::option::of(0u8..8),
            )
                .prop_map(|(memory, cpu_secs, open_files, core_dumps, sandbox)| {
                    Confinement {
                        memory,
                        cpu_secs,
                        open_files,
                        core_dumps,
                        sandbox: sandbox.and_then(Sandbox::from_bits),
                    }
                })
        }

        proptest! {
            #[test]
            fn request_round_trips(
                generation in any::<u64>(),
                entry in any::<u64>(),
                slot in any::<u32>(),
                place in arg_place(),
                want_started in any::<bool>(),
                worker in any::<u32>(),
                confinement in confinement(),
                trace in 0..=5u8,
            ) {
                let inline = match place {
                    ArgPlace::Inline(n) => vec![0x5a; n as usize],
                    ArgPlace::Memfd(_) => Vec::new(),
                };
                let req = Request {
                    generation, want_started, last: want_started, same_doorbell: !want_started, pair: 0, pooled_report: false,
                    entry, slot, arg: place, worker, confinement, io: IoPlan::default(), trace,
                };
                let frame = req.encode(&inline);
                let decoded = Request::decode(&frame, u32::MAX, u64::MAX);
                prop_assert_eq!(decoded, Ok((req, &inline[..])));
            }

            #[test]
            fn report_round_trips(kind in 0..3u8, value in any::<u32>()) {
                let report = match kind {
                    0 => Report::Started { pid: value.max(1) },
                    1 => Report::Exited { status: value as i32 },
                    _ => Report::SpawnFailed { errno: value as i32 },
                };
                prop_assert_eq!(Report::decode(&report.encode()), Ok(report));
            }

            #[test]
            fn spill_notice_round_trips(generation in any::<u64>(), tag in any::<u64>()) {
                let n = SpillNotice { generation, tag };
                prop_assert_eq!(SpillNotice::decode(&n.encode()), Ok(n));
            }

            #[test]
            fn record_header_round_trips(
                key in any::<u64>(),
                generation in any::<u64>(),
                payload in proptest::collection::vec(any::<u8>(), 0..256),
            ) {
                let words = encode_record_header(key, generation, RecordKind::Value, payload.len() as u64, &payload);
                let header = decode_record_header(words, generation, 256, 0);
                prop_assert!(header.is_ok());
                let header = header.unwrap();
                prop_assert_eq!(verify_record(key, generation, &header, &payload), Ok(()));
            }

            #[test]
            fn decoders_are_total(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
                // Any result is fine; panicking is not.
                let _ = Request::decode(&bytes, 8, 1 << 20);
                let _ = Report::decode(&bytes);
                let _ = SpillNotice::decode(&bytes);
            }

            #[test]
            fn any_header_words_decode_without_panicking(words in any::<[u64; RECORD_HEADER_WORDS]>(), generation in any::<u64>()) {
                if let Ok(h) = decode_record_header(words, generation, 1 << 16, 1 << 30) {
                    prop_assert!(h.len <= 1 << 30);
                }
            }
        }
    }
}
