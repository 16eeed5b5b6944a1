//! The atomics the result ring's slots and the job cells are built on,
//! swapped for loom's under `--cfg loom` so that `ring::model` and
//! `job_cell::model` can check their protocols over every interleaving
//! (docs/verification.md). In every other build this is
//! `std::sync::atomic`, unchanged.

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicU32, AtomicU64, Ordering, fence};
#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicU32, AtomicU64, Ordering, fence};
