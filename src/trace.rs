//! Observability through `tracing` (feature `tracing`): a span per task in
//! the parent, and the events a worker emits forwarded into it.
//!
//! # The span
//!
//! Each task gets an INFO span `run_in_process::task` (target
//! `run_in_process`) when it is submitted, with fields `task` (the task
//! function's type name), `pid` (when the parent knows it), `outcome` and
//! `duration_us`. It closes when the parent lets go of the task (its result
//! or error is returned, or its future or `Process` is dropped), so a
//! cancelled task's span closes too, with `outcome = "cancelled"`.
//!
//! # Worker events
//!
//! Only when that span is enabled does the parent attach a **trace buffer**
//! to the request: a memfd of [`BUFFER_BYTES`] that it creates, sizes and
//! seals against resizing, and that only it and the task's worker hold (it
//! travels with the request, like the doorbell). Before the task's code
//! runs, the worker maps it and installs a small subscriber (as this
//! thread's default, and as the global default if the process has none) that
//! encodes each event: level, target, message and fields rendered as text.
//! At most [`MAX_EVENTS`] events and [`BUFFER_BYTES`] bytes are kept; the
//! rest are counted as dropped. Writing is a few atomic stores into the
//! mapping, so the worker never blocks on the parent, and what it wrote
//! before a crash is still there.
//!
//! The parent reads the buffer (with `pread`, copying it out: the worker may
//! be hostile, or still running) once, when the task's span closes, and
//! re-emits each event at its level with the span as parent, target
//! `run_in_process::worker`, the worker's own target in the field
//! `worker.target` (a `tracing` target must be `'static`) and its fields as
//! one text field `worker.fields`; then a WARN event with the dropped count,
//! if any. Spans opened in the worker are not forwarded; events inside them
//! are.
//!
//! # Buffer layout
//!
//! Little-endian. Header (24 bytes): magic `RIPt`, version `u16`, 2 bytes
//! padding, `used: u32` (bytes of records after the header), `count: u32`
//! (records), `dropped: u64`. Each record: `len: u32` (bytes after this
//! word), `level: u8` (1 = ERROR … 5 = TRACE), target, message, a `u8`
//! field count, then each field's name and value; every string a `u16`
//! length and UTF-8 bytes (cut at [`MAX_TEXT`]).
//!
//! Without the feature, [`TaskTrace`] is a zero-sized stand-in whose methods
//! do nothing.

// Without the feature, the buffer format and the outcome names are still
// compiled (and unit-tested), but nothing uses them.
#![cfg_attr(not(feature = "tracing"), allow(dead_code))]

/// Size of a task's trace buffer.
pub(crate) const BUFFER_BYTES: usize = 256 * 1024;
/// Most events kept per task; later ones are dropped and counted.
pub(crate) const MAX_EVENTS: u32 = 1024;
/// Longest string kept (a message, a field's value), in bytes.
pub(crate) const MAX_TEXT: usize = 4096;
/// Most fields kept per event.
const MAX_FIELDS: usize = 32;
const HEADER: usize = 24;
const MAGIC: [u8; 4] = *b"RIPt";
const VERSION: u16 = 1;

#[cfg(feature = "tracing")]
pub(crate) use imp::{TaskTrace, Worker};

#[cfg(not(feature = "tracing"))]
pub(crate) use stub::TaskTrace;

/// How a task ended, as its span's `outcome` field says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TraceOutcome {
    /// The task returned a value (even one that then failed to decode).
    Ok,
    Panicked,
    Signaled,
    Exited,
    TimedOut,
    ResourceLimit,
    Cancelled,
    /// The value could not be encoded, or the argument decoded.
    Codec,
    /// The task's confinement could not be applied.
    Unconfined,
    /// The result record failed its checks.
    InvalidRecord,
    SpawnFailed,
    ZygoteDied,
    /// The request was never sent (the argument could not be encoded, or
    /// the zygote was gone).
    NotStarted,
}

impl TraceOutcome {
    /// Refines the statistics' outcome with what the parent saw.
    pub(crate) fn of(
        outcome: crate::stats::Outcome,
        delivered: Option<Result<crate::wire::RecordKind, ()>>,
        spawn_failed: bool,
        zygote_gone: bool,
    ) -> TraceOutcome {
        use crate::stats::Outcome as O;
        use crate::wire::RecordKind as K;
        match outcome {
            O::Completed => TraceOutcome::Ok,
            O::Panicked => TraceOutcome::Panicked,
            O::Signaled => TraceOutcome::Signaled,
            O::Exited => TraceOutcome::Exited,
            O::TimedOut => TraceOutcome::TimedOut,
            O::ResourceLimit => TraceOutcome::ResourceLimit,
            O::Cancelled => TraceOutcome::Cancelled,
            O::Lost => match delivered {
                Some(Ok(K::Unconfined)) => TraceOutcome::Unconfined,
                Some(Ok(_)) => TraceOutcome::Codec,
                Some(Err(())) => TraceOutcome::InvalidRecord,
                None if spawn_failed => TraceOutcome::SpawnFailed,
                None if zygote_gone => TraceOutcome::ZygoteDied,
                None => TraceOutcome::Cancelled,
            },
        }
    }

    /// The span field's value.
    pub(crate) fn name(self) -> &'static str {
        match self {
            TraceOutcome::Ok => "ok",
            TraceOutcome::Panicked => "panicked",
            TraceOutcome::Signaled => "signaled",
            TraceOutcome::Exited => "exited",
            TraceOutcome::TimedOut => "timed_out",
            TraceOutcome::ResourceLimit => "resource_limit",
            TraceOutcome::Cancelled => "cancelled",
            TraceOutcome::Codec => "codec",
            TraceOutcome::Unconfined => "unconfined",
            TraceOutcome::InvalidRecord => "invalid_record",
            TraceOutcome::SpawnFailed => "spawn_failed",
            TraceOutcome::ZygoteDied => "zygote_died",
            TraceOutcome::NotStarted => "not_started",
        }
    }
}

/// One decoded event, as the parent re-emits it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Event {
    pub(crate) level: u8,
    pub(crate) target: String,
    pub(crate) message: String,
    /// `name=value` pairs separated by spaces.
    pub(crate) fields: String,
}

/// What the parent found in a trace buffer.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Decoded {
    pub(crate) events: Vec<Event>,
    pub(crate) dropped: u64,
    /// The buffer did not decode whole: its header or a record was
    /// malformed (a hostile worker, or one killed while writing).
    pub(crate) malformed: bool,
}

/// Decodes a trace buffer's bytes. Total: never panics, keeps at most
/// [`MAX_EVENTS`] events, and allocates no more than `bytes` holds.
pub(crate) fn decode(bytes: &[u8]) -> Decoded {
    let mut out = Decoded::default();
    let Some(header) = bytes.get(..HEADER) else {
        return out;
    };
    if header[..4] == [0; 4] {
        // The worker never started tracing (it died first, say).
        return out;
    }
    let word = |at: usize| {
        u32::from_le_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]])
    };
    let version = u16::from_le_bytes([header[4], header[5]]);
    let used = word(8) as usize;
    let count = word(12);
    let mut dropped = [0u8; 8];
    dropped.copy_from_slice(&header[16..24]);
    out.dropped = u64::from_le_bytes(dropped);
    let Some(mut records) = bytes.get(HEADER..HEADER.saturating_add(used)) else {
        out.malformed = true;
        return out;
    };
    if header[..4] != MAGIC || version != VERSION || count > MAX_EVENTS {
        out.malformed = true;
        return out;
    }
    for _ in 0..count {
        match Reader(records).record() {
            Some((event, rest)) => {
                out.events.push(event);
                records = rest;
            }
            None => {
                out.malformed = true;
                break;
            }
        }
    }
    out
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.0.len() {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn text(&mut self) -> Option<String> {
        let len = self.take(2)?;
        let len = usize::from(u16::from_le_bytes([len[0], len[1]]));
        Some(String::from_utf8_lossy(self.take(len)?).into_owned())
    }

    /// One record, and what follows it.
    fn record(mut self) -> Option<(Event, &'a [u8])> {
        let len = self.take(4)?;
        let len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
        let rest_after = self.0.get(len..)?;
        let mut body = Reader(self.take(len)?);
        let level = body.take(1)?[0];
        if !(1..=5).contains(&level) {
            return None;
        }
        let target = body.text()?;
        let message = body.text()?;
        let n = body.take(1)?[0];
        let mut fields = String::new();
        for _ in 0..n {
            let name = body.text()?;
            let value = body.text()?;
            if !fields.is_empty() {
                fields.push(' ');
            }
            fields.push_str(&name);
            fields.push('=');
            fields.push_str(&value);
        }
        Some((
            Event {
                level,
                target,
                message,
                fields,
            },
            rest_after,
        ))
    }
}

/// Appends `text` as a `u16` length and at most [`MAX_TEXT`] bytes, cut on a
/// char boundary.
fn push_text(out: &mut Vec<u8>, text: &str) {
    let mut end = text.len().min(MAX_TEXT);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    out.extend_from_slice(&(end as u16).to_le_bytes());
    out.extend_from_slice(&text.as_bytes()[..end]);
}

/// Encodes one record (the worker's side; also used by the tests).
fn encode_record(level: u8, target: &str, message: &str, fields: &[(&str, String)]) -> Vec<u8> {
    let mut out = vec![0u8; 4];
    out.push(level);
    push_text(&mut out, target);
    push_text(&mut out, message);
    let fields = &fields[..fields.len().min(MAX_FIELDS)];
    out.push(fields.len() as u8);
    for (name, value) in fields {
        push_text(&mut out, name);
        push_text(&mut out, value);
    }
    let len = (out.len() - 4) as u32;
    out[..4].copy_from_slice(&len.to_le_bytes());
    out
}

#[cfg(not(feature = "tracing"))]
mod stub {
    use std::os::fd::BorrowedFd;

    use super::TraceOutcome;

    /// Without the feature: nothing to trace.
    pub(crate) struct TaskTrace;

    impl TaskTrace {
        #[inline(always)]
        pub(crate) fn new(_name: &'static str) -> TaskTrace {
            TaskTrace
        }

        /// The level to ask of the worker (0: no trace buffer).
        #[inline(always)]
        pub(crate) fn level(&self) -> u8 {
            0
        }

        #[inline(always)]
        pub(crate) fn buffer(&self) -> Option<BorrowedFd<'_>> {
            None
        }

        #[inline(always)]
        pub(crate) fn finish(&mut self, _outcome: TraceOutcome, _pid: Option<u32>) {}

        #[inline(always)]
        pub(crate) fn leak(&mut self) {}
    }
}

#[cfg(feature = "tracing")]
mod imp {
    use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
    use std::sync::atomic::{AtomicU8, Ordering};
    use std::sync::{Mutex, OnceLock};
    use std::time::Instant;

    use memmap2::{MmapOptions, MmapRaw};
    use rustix::fs::SealFlags;
    use tracing::field::{Field, Visit};
    use tracing::level_filters::LevelFilter;
    use tracing::span::{Attributes, Id, Record};
    use tracing::subscriber::Interest;
    use tracing::{Dispatch, Level, Metadata, Subscriber};

    use super::TraceOutcome;
    use super::{BUFFER_BYTES, HEADER, MAGIC, MAX_EVENTS, MAX_FIELDS, VERSION};
    use crate::sys;

    /// The parent's side of one task: its span, and its trace buffer.
    pub(crate) struct TaskTrace {
        span: tracing::Span,
        submitted: Instant,
        /// The trace buffer, when the span is enabled.
        buffer: Option<OwnedFd>,
        level: u8,
        finished: bool,
    }

    impl TaskTrace {
        /// Opens the task's span; `name` is the task function's type name.
        pub(crate) fn new(name: &'static str) -> TaskTrace {
            let span = tracing::info_span!(
                target: "run_in_process",
                "run_in_process::task",
                task = name,
                pid = tracing::field::Empty,
                outcome = tracing::field::Empty,
                duration_us = tracing::field::Empty,
            );
            let level = if span.is_disabled() {
                0
            } else {
                level_code(LevelFilter::current())
            };
            // No buffer (say, out of fds): the task runs untraced.
            let buffer = (level > 0).then(create_buffer).and_then(Result::ok);
            TaskTrace {
                span,
                submitted: Instant::now(),
                level: if buffer.is_some() { level } else { 0 },
                buffer,
                finished: false,
            }
        }

        /// The most verbose level the worker should keep (1 = ERROR …
        /// 5 = TRACE), or 0 for no trace buffer.
        pub(crate) fn level(&self) -> u8 {
            self.level
        }

        /// The trace buffer to send with the request.
        pub(crate) fn buffer(&self) -> Option<BorrowedFd<'_>> {
            self.buffer.as_ref().map(|fd| fd.as_fd())
        }

        /// Forwards the worker's events into the span, records the outcome,
        /// and closes the span (once; later calls do nothing).
        pub(crate) fn finish(&mut self, outcome: TraceOutcome, pid: Option<u32>) {
            if std::mem::replace(&mut self.finished, true) {
                return;
            }
            if let Some(pid) = pid {
                self.span.record("pid", pid);
            }
            if let Some(fd) = self.buffer.take() {
                forward(&self.span, &read_buffer(fd.as_fd()));
            }
            self.span.record("outcome", outcome.name());
            let micros = u64::try_from(self.submitted.elapsed().as_micros()).unwrap_or(u64::MAX);
            self.span.record("duration_us", micros);
            self.span = tracing::Span::none();
        }
    }

    impl TaskTrace {
        /// For a copy in another process (a worker that inherited a
        /// `Process`): the fd number and the span are not this process's.
        pub(crate) fn leak(&mut self) {
            self.finished = true;
            std::mem::forget(self.buffer.take());
            std::mem::forget(std::mem::replace(&mut self.span, tracing::Span::none()));
        }
    }

    impl Drop for TaskTrace {
        fn drop(&mut self) {
            // Never reached the reactor: the request was not sent.
            self.finish(TraceOutcome::NotStarted, None);
        }
    }

    fn level_code(filter: LevelFilter) -> u8 {
        match filter.into_level() {
            None => 0,
            Some(Level::ERROR) => 1,
            Some(Level::WARN) => 2,
            Some(Level::INFO) => 3,
            Some(Level::DEBUG) => 4,
            Some(_) => 5,
        }
    }

    fn code_level(code: u8) -> Level {
        match code {
            1 => Level::ERROR,
            2 => Level::WARN,
            3 => Level::INFO,
            4 => Level::DEBUG,
            _ => Level::TRACE,
        }
    }

    /// A memfd of [`BUFFER_BYTES`], sealed against shrinking and growing so
    /// that the worker's mapping of it can never fault.
    fn create_buffer() -> sys::SysResult<OwnedFd> {
        let fd = sys::memfd_create("run-in-process-trace")?;
        sys::ftruncate(fd.as_fd(), BUFFER_BYTES as u64)?;
        sys::add_seals(
            fd.as_fd(),
            SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL,
        )?;
        Ok(fd)
    }

    /// Copies the buffer out: the header, then only the bytes it says are
    /// used (at most the buffer).
    fn read_buffer(fd: BorrowedFd<'_>) -> super::Decoded {
        let mut header = [0u8; HEADER];
        if !pread_all(fd, &mut header, 0) {
            return super::Decoded::default();
        }
        let used = u32::from_le_bytes([header[8], header[9], header[10], header[11]]) as usize;
        let used = used.min(BUFFER_BYTES - HEADER);
        let mut bytes = vec![0u8; HEADER + used];
        bytes[..HEADER].copy_from_slice(&header);
        if !pread_all(fd, &mut bytes[HEADER..], HEADER as u64) {
            return super::Decoded {
                malformed: true,
                ..super::Decoded::default()
            };
        }
        super::decode(&bytes)
    }

    fn pread_all(fd: BorrowedFd<'_>, mut buf: &mut [u8], mut at: u64) -> bool {
        while !buf.is_empty() {
            match rustix::io::pread(fd, &mut *buf, at) {
                Ok(0) => return false,
                Ok(n) => {
                    buf = &mut buf[n..];
                    at += n as u64;
                }
                Err(rustix::io::Errno::INTR) => {}
                Err(_) => return false,
            }
        }
        true
    }

    /// Re-emits decoded events with `span` as their parent.
    fn forward(span: &tracing::Span, decoded: &super::Decoded) {
        macro_rules! emit {
            ($level:expr, $event:expr) => {
                tracing::event!(
                    target: "run_in_process::worker",
                    parent: span,
                    $level,
                    worker.target = %$event.target,
                    worker.fields = %$event.fields,
                    "{}",
                    $event.message
                )
            };
        }
        for event in &decoded.events {
            match code_level(event.level) {
                Level::ERROR => emit!(Level::ERROR, event),
                Level::WARN => emit!(Level::WARN, event),
                Level::INFO => emit!(Level::INFO, event),
                Level::DEBUG => emit!(Level::DEBUG, event),
                _ => emit!(Level::TRACE, event),
            }
        }
        if decoded.dropped > 0 {
            tracing::warn!(
                target: "run_in_process::worker",
                parent: span,
                dropped = decoded.dropped,
                "{} worker events dropped (over {} events or {} bytes)",
                decoded.dropped,
                MAX_EVENTS,
                BUFFER_BYTES
            );
        }
        if decoded.malformed {
            tracing::warn!(
                target: "run_in_process::worker",
                parent: span,
                "the worker's trace buffer is malformed after {} events",
                decoded.events.len()
            );
        }
    }

    // ---- The worker's side ----

    /// Where this worker's events go while a traced task runs.
    struct Sink {
        map: MmapRaw,
        used: usize,
        count: u32,
        dropped: u64,
    }

    impl Sink {
        fn bytes(&self) -> &[AtomicU8] {
            let ptr = self.map.as_ptr().cast::<AtomicU8>();
            debug_assert!(self.map.len() == BUFFER_BYTES);
            // SAFETY: SAFETY.md S5. The pointer comes from a live
            // `MAP_SHARED` mapping of exactly `BUFFER_BYTES` owned by `self`
            // (checked against the file's size before mapping), so it is
            // valid for the returned borrow of `self`; `AtomicU8` has the
            // size and alignment of `u8`, and every bit pattern is valid.
            // The memfd is sealed against shrinking, so the pages cannot go
            // away (no SIGBUS). Other processes (the parent's `pread`, a
            // process the task forked) may access them at any time, which
            // `&[AtomicU8]` permits: we only use atomic operations.
            unsafe { std::slice::from_raw_parts(ptr, BUFFER_BYTES) }
        }

        fn write(&self, at: usize, data: &[u8]) {
            if let Some(dest) = self.bytes().get(at..at + data.len()) {
                for (d, &b) in dest.iter().zip(data) {
                    d.store(b, Ordering::Relaxed);
                }
            }
        }

        /// Rewrites the header's counters.
        fn sync(&self) {
            let mut header = [0u8; HEADER];
            header[..4].copy_from_slice(&MAGIC);
            header[4..6].copy_from_slice(&VERSION.to_le_bytes());
            header[8..12].copy_from_slice(&(self.used as u32).to_le_bytes());
            header[12..16].copy_from_slice(&self.count.to_le_bytes());
            header[16..24].copy_from_slice(&self.dropped.to_le_bytes());
            self.write(0, &header);
        }

        fn full(&self) -> bool {
            self.count >= MAX_EVENTS
        }

        fn push(&mut self, record: &[u8]) {
            if self.full() || HEADER + self.used + record.len() > BUFFER_BYTES {
                self.dropped += 1;
            } else {
                // The record first, then the header that counts it.
                self.write(HEADER + self.used, record);
                self.used += record.len();
                self.count += 1;
            }
            self.sync();
        }
    }

    static SINK: Mutex<Option<Sink>> = Mutex::new(None);
    /// The most verbose level kept (as `level_code`), 0 while no task is
    /// traced.
    static LEVEL: AtomicU8 = AtomicU8::new(0);

    fn sink() -> std::sync::MutexGuard<'static, Option<Sink>> {
        SINK.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A traced task in the worker: its events go to the trace buffer until
    /// this is dropped.
    pub(crate) struct Worker {
        _default: tracing::dispatcher::DefaultGuard,
    }

    impl Worker {
        /// Maps the trace buffer and installs the forwarding subscriber.
        /// `None` (the task runs untraced) if the buffer is not as the
        /// parent makes it.
        pub(crate) fn begin(fd: OwnedFd, level: u8) -> Option<Worker> {
            let stat = rustix::fs::fstat(&fd).ok()?;
            if u64::try_from(stat.st_size).ok()? != BUFFER_BYTES as u64 {
                return None;
            }
            let map = MmapOptions::new().len(BUFFER_BYTES).map_raw(&fd).ok()?;
            // The mapping outlives the fd.
            drop(fd);
            let fresh = Sink {
                map,
                used: 0,
                count: 0,
                dropped: 0,
            };
            fresh.sync();
            *sink() = Some(fresh);
            LEVEL.store(level.min(5), Ordering::Relaxed);
            // One per process: a reused worker's later tasks share it.
            static DISPATCH: OnceLock<Dispatch> = OnceLock::new();
            let dispatch = DISPATCH.get_or_init(|| Dispatch::new(Forwarder));
            // Threads the task starts use the global default: ours, unless
            // the parent had set one before it started the zygote (then
            // only this thread's events are forwarded).
            let _ = tracing::dispatcher::set_global_default(dispatch.clone());
            Some(Worker {
                _default: tracing::dispatcher::set_default(dispatch),
            })
        }
    }

    impl Drop for Worker {
        fn drop(&mut self) {
            // A reused worker's next task must not write into this buffer.
            LEVEL.store(0, Ordering::Relaxed);
            *sink() = None;
        }
    }

    /// The worker's subscriber: encodes events into the trace buffer.
    struct Forwarder;

    impl Subscriber for Forwarder {
        fn register_callsite(&self, _: &'static Metadata<'static>) -> Interest {
            // Whether a task is traced changes from task to task.
            Interest::sometimes()
        }

        fn enabled(&self, metadata: &Metadata<'_>) -> bool {
            let max = LEVEL.load(Ordering::Relaxed);
            max > 0 && level_code(LevelFilter::from_level(*metadata.level())) <= max
        }

        fn new_span(&self, _: &Attributes<'_>) -> Id {
            Id::from_u64(1)
        }

        fn record(&self, _: &Id, _: &Record<'_>) {}

        fn record_follows_from(&self, _: &Id, _: &Id) {}

        fn event(&self, event: &tracing::Event<'_>) {
            {
                let mut guard = sink();
                match guard.as_mut() {
                    None => return,
                    Some(s) if s.full() => {
                        // Counted without rendering anything: a flood
                        // costs a lock and a few stores per event.
                        s.dropped += 1;
                        s.sync();
                        return;
                    }
                    Some(_) => {}
                }
            }
            // Rendered outside the lock: a field's `Debug` may itself emit
            // an event.
            let metadata = event.metadata();
            let mut fields = Fields::default();
            event.record(&mut fields);
            let record = super::encode_record(
                level_code(LevelFilter::from_level(*metadata.level())),
                metadata.target(),
                &fields.message,
                &fields
                    .pairs
                    .iter()
                    .map(|(n, v)| (*n, v.clone()))
                    .collect::<Vec<_>>(),
            );
            if let Some(s) = sink().as_mut() {
                s.push(&record);
            }
        }

        fn enter(&self, _: &Id) {}

        fn exit(&self, _: &Id) {}
    }

    #[derive(Default)]
    struct Fields {
        message: String,
        pairs: Vec<(&'static str, String)>,
    }

    impl Fields {
        fn put(&mut self, field: &Field, value: String) {
            if field.name() == "message" {
                self.message = value;
            } else if self.pairs.len() < MAX_FIELDS {
                self.pairs.push((field.name(), value));
            }
        }
    }

    impl Visit for Fields {
        fn record_str(&mut self, field: &Field, value: &str) {
            self.put(field, cut(value).to_owned());
        }

        fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
            self.put(field, format!("{value:?}"));
        }
    }

    fn cut(text: &str) -> &str {
        let mut end = text.len().min(super::MAX_TEXT);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        &text[..end]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn buffer(records: &[Vec<u8>], dropped: u64) -> Vec<u8> {
        let body: Vec<u8> = records.concat();
        let mut out = Vec::new();
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(&(records.len() as u32).to_le_bytes());
        out.extend_from_slice(&dropped.to_le_bytes());
        out.extend_from_slice(&body);
        out
    }

    #[test]
    fn a_buffer_round_trips() {
        let records = [
            encode_record(3, "app", "hello", &[("n", "7".into())]),
            encode_record(1, "app::db", "bad", &[]),
        ];
        let decoded = decode(&buffer(&records, 5));
        assert!(!decoded.malformed);
        assert_eq!(decoded.dropped, 5);
        assert_eq!(decoded.events.len(), 2);
        assert_eq!(decoded.events[0].fields, "n=7");
        assert_eq!(decoded.events[1].target, "app::db");
    }

    #[test]
    fn an_untouched_buffer_holds_nothing() {
        assert_eq!(decode(&[0; HEADER]), Decoded::default());
        assert_eq!(decode(&[]), Decoded::default());
    }

    #[test]
    fn long_text_is_cut_on_a_char_boundary() {
        let long = "é".repeat(MAX_TEXT);
        let decoded = decode(&buffer(&[encode_record(3, "t", &long, &[])], 0));
        let message = &decoded.events[0].message;
        assert!(message.len() <= MAX_TEXT && message.chars().all(|c| c == 'é'));
    }

    #[test]
    fn hostile_buffers_decode_without_panicking() {
        let good = buffer(&[encode_record(3, "t", "m", &[("a", "b".into())])], 0);
        // Every truncation and every single-byte corruption.
        for end in 0..good.len() {
            let _ = decode(&good[..end]);
        }
        for at in 0..good.len() {
            for byte in [0, 1, 0x7f, 0xff] {
                let mut bad = good.clone();
                bad[at] = byte;
                let decoded = decode(&bad);
                assert!(decoded.events.len() <= 1);
            }
        }
        // A count past the limit, and a record longer than the buffer.
        let mut bad = good.clone();
        bad[12..16].copy_from_slice(&(MAX_EVENTS + 1).to_le_bytes());
        assert!(decode(&bad).malformed);
        let mut bad = good;
        bad[HEADER..HEADER + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode(&bad).malformed && decode(&bad).events.is_empty());
    }
}
