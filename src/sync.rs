//! The atomics the result ring's slots are built on, swapped for loom's
//! under `--cfg loom` so that `ring::model` can check the publish/take
//! protocol over every interleaving (docs/verification.md). In every other
//! build this is `std::sync::atomic`, unchanged.

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicU64, Ordering, fence};
#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicU64, Ordering, fence};
