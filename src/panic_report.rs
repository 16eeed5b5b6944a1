//! What a `Panic` record carries: the panic message and, when the worker's
//! environment sets `RUST_BACKTRACE`, the backtrace its panic hook took.
//!
//! The record's payload is UTF-8 (the worker's `publish` keeps it so), so
//! the backtrace follows the message after [`MARKER`], a string no panic
//! message of Rust's formatting contains by accident. A worker may write
//! anything into its own record: [`split`] is total, and caps the
//! backtrace at [`MAX_BACKTRACE`] bytes whatever the worker sent.

use std::sync::Mutex;

/// Separates the message from the backtrace.
const MARKER: &str = "\0run-in-process backtrace\0\n";

/// Most bytes of backtrace a worker sends and the parent keeps. A panic
/// record is also cut at its ring slot's capacity (64 KiB by default),
/// message first.
pub(crate) const MAX_BACKTRACE: usize = 32 * 1024;

/// The backtrace of the last panic in this worker, taken by its hook.
static BACKTRACE: Mutex<Option<String>> = Mutex::new(None);

/// True if `RUST_BACKTRACE` asks for backtraces, read when the panic
/// happens (so that `Task::env` can set it): set, and not `0`. Unlike
/// `Backtrace::capture`, which reads it once per process and caches it.
fn wanted() -> bool {
    std::env::var_os("RUST_BACKTRACE").is_some_and(|v| v != "0")
}

/// Called by the worker's panic hook: takes a backtrace, if wanted.
pub(crate) fn record() {
    if !wanted() {
        return;
    }
    let mut text = std::backtrace::Backtrace::force_capture().to_string();
    truncate(&mut text, MAX_BACKTRACE);
    if let Ok(mut slot) = BACKTRACE.lock() {
        *slot = Some(text);
    }
}

fn truncate(text: &mut String, max: usize) {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
}

/// The payload of a `Panic` record: `message`, then the recorded backtrace
/// if there is one.
pub(crate) fn payload(mut message: String) -> String {
    let taken = BACKTRACE.lock().ok().and_then(|mut b| b.take());
    if let Some(backtrace) = taken {
        message.push_str(MARKER);
        message.push_str(&backtrace);
    }
    message
}

/// Splits a `Panic` record's payload (already copied out of the slot) into
/// the message and the backtrace, capped at [`MAX_BACKTRACE`].
pub(crate) fn split(payload: &[u8]) -> (String, Option<String>) {
    let text = String::from_utf8_lossy(payload);
    match text.split_once(MARKER) {
        Some((message, backtrace)) => {
            let mut backtrace = backtrace.to_string();
            truncate(&mut backtrace, MAX_BACKTRACE);
            (message.to_string(), Some(backtrace))
        }
        None => (text.into_owned(), None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_without_backtrace_is_unchanged() {
        assert_eq!(
            split(b"boom at a.rs:1:2"),
            ("boom at a.rs:1:2".into(), None)
        );
    }

    #[test]
    fn backtrace_is_split_off_and_capped() {
        let big = "x".repeat(MAX_BACKTRACE * 2);
        let payload = format!("boom{MARKER}{big}");
        let (message, backtrace) = split(payload.as_bytes());
        assert_eq!(message, "boom");
        assert_eq!(backtrace.map(|b| b.len()), Some(MAX_BACKTRACE));
    }

    #[test]
    fn truncation_keeps_char_boundaries() {
        let mut s = "é".repeat(10);
        truncate(&mut s, 5);
        assert_eq!(s, "éé");
    }

    proptest::proptest! {
        #[test]
        fn split_is_total(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256)) {
            let (_, backtrace) = split(&bytes);
            proptest::prop_assert!(backtrace.is_none_or(|b| b.len() <= MAX_BACKTRACE));
        }
    }
}
