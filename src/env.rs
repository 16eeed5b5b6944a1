//! A task's environment and working directory, with `std::process::Command`'s
//! names on [`Task`]: checked in the parent, carried to the worker in a
//! memfd attached to the spawn request, and applied by the worker after the
//! fork and before the task's code (and before its confinement).
//!
//! # The memfd's format
//!
//! A sequence of operations, applied in order, each a tag byte then
//! length-prefixed fields (lengths `u32` little-endian): `1` clear the
//! environment; `2 key value` set a variable; `3 key` remove one; `4 path`
//! change directory (last, at most once). [`decode`] is total and bounded
//! by its input.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::output::SetupFailure;
use crate::process::Task;
use crate::sys;

/// Largest encoded settings a worker reads (Linux's own limit on a
/// process's environment and arguments is a quarter of its stack limit).
pub(crate) const MAX_SETTINGS: u64 = 4 << 20;

const OP_CLEAR: u8 = 1;
const OP_SET: u8 = 2;
const OP_REMOVE: u8 = 3;
const OP_CWD: u8 = 4;

/// A task's env and cwd settings, as `Command` keeps them: a clear flag,
/// then the variables set (`Some`) or removed (`None`) after it.
#[derive(Debug, Default)]
pub(crate) struct EnvSettings {
    clear: bool,
    vars: BTreeMap<OsString, Option<OsString>>,
    cwd: Option<PathBuf>,
    /// The first invalid setting, reported by `run`/`open` before any fork.
    invalid: Option<String>,
}

impl EnvSettings {
    pub(crate) fn is_default(&self) -> bool {
        !self.clear && self.vars.is_empty() && self.cwd.is_none() && self.invalid.is_none()
    }

    /// `Err(InvalidInput)` for the first refused setting.
    pub(crate) fn check(&self) -> Result<()> {
        match &self.invalid {
            Some(message) => Err(Error::invalid(message.clone())),
            None => Ok(()),
        }
    }

    fn refuse(&mut self, message: String) {
        self.invalid.get_or_insert(message);
    }

    fn check_key(&mut self, key: &OsStr) -> bool {
        let bytes = key.as_bytes();
        let problem = if bytes.is_empty() {
            "is empty"
        } else if bytes.contains(&b'=') {
            "contains '='"
        } else if bytes.contains(&0) {
            "contains a NUL byte"
        } else {
            return true;
        };
        self.refuse(format!("Task::env: the variable name {key:?} {problem}"));
        false
    }

    /// The settings in the memfd format; `None` if there are none.
    pub(crate) fn encode(&self) -> Option<Vec<u8>> {
        if self.is_default() {
            return None;
        }
        let mut out = Vec::new();
        let field = |out: &mut Vec<u8>, bytes: &[u8]| {
            out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
            out.extend_from_slice(bytes);
        };
        if self.clear {
            out.push(OP_CLEAR);
        }
        for (key, value) in &self.vars {
            match value {
                Some(value) => {
                    out.push(OP_SET);
                    field(&mut out, key.as_bytes());
                    field(&mut out, value.as_bytes());
                }
                None => {
                    out.push(OP_REMOVE);
                    field(&mut out, key.as_bytes());
                }
            }
        }
        if let Some(cwd) = &self.cwd {
            out.push(OP_CWD);
            field(&mut out, cwd.as_os_str().as_bytes());
        }
        Some(out)
    }

    /// The memfd to attach to the spawn request, if there are settings.
    pub(crate) fn to_memfd(&self) -> Result<Option<OwnedFd>> {
        let Some(bytes) = self.encode() else {
            return Ok(None);
        };
        if bytes.len() as u64 > MAX_SETTINGS {
            return Err(Error::invalid(format!(
                "the task's environment and working directory take {} bytes, over the limit of {MAX_SETTINGS}",
                bytes.len()
            )));
        }
        let mut file = File::from(sys::memfd_create("run-in-process-env")?);
        file.write_all(&bytes)
            .map_err(|e| Error::io("write to the env memfd", e))?;
        Ok(Some(OwnedFd::from(file)))
    }
}

/// One decoded operation.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Op<'a> {
    Clear,
    Set(&'a [u8], &'a [u8]),
    Remove(&'a [u8]),
    Cwd(&'a [u8]),
}

/// Decodes the memfd format. Total: `None` for anything malformed,
/// including a key that `setenv` would refuse or a NUL in any field.
pub(crate) fn decode(mut bytes: &[u8]) -> Option<Vec<Op<'_>>> {
    fn field<'a>(bytes: &mut &'a [u8]) -> Option<&'a [u8]> {
        let (len, rest) = bytes.split_first_chunk::<4>()?;
        let len = u32::from_le_bytes(*len) as usize;
        if len > rest.len() {
            return None;
        }
        let (f, rest) = rest.split_at(len);
        *bytes = rest;
        (!f.contains(&0)).then_some(f)
    }
    let mut ops = Vec::new();
    while let Some((&tag, rest)) = bytes.split_first() {
        bytes = rest;
        let op = match tag {
            OP_CLEAR => Op::Clear,
            OP_SET => Op::Set(field(&mut bytes)?, field(&mut bytes)?),
            OP_REMOVE => Op::Remove(field(&mut bytes)?),
            OP_CWD => Op::Cwd(field(&mut bytes)?),
            _ => return None,
        };
        if let Op::Set(key, _) | Op::Remove(key) = op {
            if key.is_empty() || key.contains(&b'=') {
                return None;
            }
        }
        ops.push(op);
    }
    Some(ops)
}

/// In a worker, single-threaded, before any code of the task: applies the
/// settings in `fd`. On failure, says which call failed and why; the task
/// must not run.
pub(crate) fn apply(fd: OwnedFd) -> std::result::Result<(), SetupFailure> {
    let failed = |call, e: std::io::Error, what: String| SetupFailure {
        call,
        errno: e.raw_os_error().unwrap_or(0),
        message: format!("{what}: {e}"),
    };
    let file = File::from(fd);
    let len = file
        .metadata()
        .map_err(|e| failed("fstat", e, "cannot read the task's settings".into()))?
        .len();
    let malformed = |what: String| SetupFailure {
        call: "read",
        errno: libc::EINVAL,
        message: what,
    };
    if len > MAX_SETTINGS {
        return Err(malformed(format!(
            "the task's settings are {len} bytes long"
        )));
    }
    let mut bytes = vec![0u8; len as usize];
    // At offset 0: the parent's write left the shared offset at the end.
    file.read_exact_at(&mut bytes, 0)
        .map_err(|e| failed("read", e, "cannot read the task's settings".into()))?;
    drop(file);
    let ops = decode(&bytes).ok_or_else(|| malformed("malformed task settings".into()))?;
    for op in ops {
        match op {
            Op::Clear => {
                let keys: Vec<OsString> = std::env::vars_os().map(|(k, _)| k).collect();
                for key in keys {
                    // SAFETY: SAFETY.md C1. Changing the environment is
                    // unsound only while another thread may read it; this
                    // worker is single-threaded (forked from the
                    // single-threaded zygote, and none of the task's code,
                    // which might start threads, has run yet).
                    unsafe { std::env::remove_var(key) };
                }
            }
            Op::Set(key, value) => {
                // SAFETY: SAFETY.md C1, as above. `decode` refused an empty
                // key, a key with '=' and any NUL, for which `set_var`
                // would panic.
                unsafe { std::env::set_var(OsStr::from_bytes(key), OsStr::from_bytes(value)) };
            }
            Op::Remove(key) => {
                // SAFETY: SAFETY.md C1, as above; the key is as for `Set`.
                unsafe { std::env::remove_var(OsStr::from_bytes(key)) };
            }
            Op::Cwd(path) => {
                let path = Path::new(OsStr::from_bytes(path));
                std::env::set_current_dir(path).map_err(|e| {
                    failed(
                        "chdir",
                        e,
                        format!("cannot change the working directory to {path:?}"),
                    )
                })?;
            }
        }
    }
    Ok(())
}

impl<R> Task<R> {
    /// Sets the environment variable `key` to `val` in the task's worker, as
    /// [`Command::env`](std::process::Command::env) does for a child. The
    /// worker is a fork, so the task sees the zygote's environment (that of
    /// your program when the zygote started) with these changes.
    ///
    /// ```no_run
    /// # async fn demo(zygote: run_in_process::Zygote) -> run_in_process::Result<()> {
    /// fn lang(_: ()) -> Option<String> { std::env::var("LANG").ok() }
    /// let lang = zygote.task(lang, ()).env("LANG", "C.UTF-8").run().await?;
    /// assert_eq!(lang.as_deref(), Some("C.UTF-8"));
    /// # Ok(()) }
    /// ```
    ///
    /// A key that is empty or contains `=` or a NUL byte, or a value with a
    /// NUL byte, makes [`run`](Task::run) and [`open`](Task::open) fail with
    /// [`ErrorKind::InvalidInput`](crate::ErrorKind::InvalidInput) before
    /// any process is forked. In reuse mode the task runs in a worker of its
    /// own ([`Builder::reuse`](crate::Builder::reuse)).
    pub fn env<K: AsRef<OsStr>, V: AsRef<OsStr>>(mut self, key: K, val: V) -> Task<R> {
        let (key, val) = (key.as_ref(), val.as_ref());
        if self.env.check_key(key) {
            if val.as_bytes().contains(&0) {
                self.env.refuse(format!(
                    "Task::env: the value of {key:?} contains a NUL byte"
                ));
            } else {
                self.env.vars.insert(key.to_owned(), Some(val.to_owned()));
            }
        }
        self
    }

    /// Removes the environment variable `key` in the task's worker, as
    /// [`Command::env_remove`](std::process::Command::env_remove). Input is
    /// checked as for [`env`](Task::env).
    pub fn env_remove<K: AsRef<OsStr>>(mut self, key: K) -> Task<R> {
        let key = key.as_ref();
        if self.env.check_key(key) {
            self.env.vars.insert(key.to_owned(), None);
        }
        self
    }

    /// Clears the task's environment, except for variables set with
    /// [`env`](Task::env) after this call, as
    /// [`Command::env_clear`](std::process::Command::env_clear).
    pub fn env_clear(mut self) -> Task<R> {
        self.env.clear = true;
        self.env.vars.clear();
        self
    }

    /// Runs the task in the working directory `dir`, as
    /// [`Command::current_dir`](std::process::Command::current_dir). A
    /// relative path is taken from the zygote's working directory (your
    /// program's when the zygote started).
    ///
    /// A directory the worker cannot enter fails the task, which does not
    /// run, with [`ErrorKind::Io`](crate::ErrorKind::Io) and a message that
    /// names the path; a path with a NUL byte fails with
    /// [`ErrorKind::InvalidInput`](crate::ErrorKind::InvalidInput) before any
    /// fork.
    pub fn current_dir<P: AsRef<Path>>(mut self, dir: P) -> Task<R> {
        let dir = dir.as_ref();
        if dir.as_os_str().as_bytes().contains(&0) {
            self.env.refuse(format!(
                "Task::current_dir: the path {dir:?} contains a NUL byte"
            ));
        } else {
            self.env.cwd = Some(dir.to_owned());
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(f: impl FnOnce(&mut EnvSettings)) -> EnvSettings {
        let mut s = EnvSettings::default();
        f(&mut s);
        s
    }

    #[test]
    fn settings_round_trip_in_order() {
        let s = settings(|s| {
            s.clear = true;
            s.vars.insert("A".into(), Some("1".into()));
            s.vars.insert("B".into(), None);
            s.cwd = Some("/tmp".into());
        });
        let bytes = s.encode().unwrap();
        assert_eq!(
            decode(&bytes),
            Some(vec![
                Op::Clear,
                Op::Set(b"A", b"1"),
                Op::Remove(b"B"),
                Op::Cwd(b"/tmp")
            ])
        );
        assert_eq!(EnvSettings::default().encode(), None);
    }

    #[test]
    fn bad_keys_and_nuls_are_refused() {
        for key in ["", "A=B", "A\0"] {
            let mut s = EnvSettings::default();
            assert!(!s.check_key(OsStr::new(key)));
            assert!(s.check().is_err());
        }
        let mut s = EnvSettings::default();
        assert!(s.check_key(OsStr::new("PATH")));
        assert!(s.check().is_ok());
    }

    #[test]
    fn decode_refuses_what_setenv_would() {
        assert_eq!(decode(&[OP_REMOVE, 0, 0, 0, 0]), None);
        assert_eq!(decode(&[OP_REMOVE, 3, 0, 0, 0, b'a', b'=', b'b']), None);
        assert_eq!(decode(&[OP_CWD, 2, 0, 0, 0, b'/', 0]), None);
        assert_eq!(decode(&[OP_CWD, 9, 0, 0, 0, b'/']), None);
        assert_eq!(decode(&[9]), None);
        assert_eq!(decode(&[]), Some(vec![]));
    }

    proptest::proptest! {
        #[test]
        fn decode_is_total(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256)) {
            let _ = decode(&bytes);
        }
    }
}
