#!/usr/bin/env bash
# The loom models (docs/verification.md): the result ring's publish/take
# protocol (src/ring/model.rs), every interleaving of a parent and its
# workers over a heap-backed two-slot ring; reuse mode's idle handshake
# (src/idle/model.rs), a parent and a worker racing to decide; and its job
# cells' seqlock (src/job_cell/model.rs), a worker's take racing the
# parent's posts. The scenarios are small enough to search without a
# preemption bound (seconds); LOOM_MAX_PREEMPTIONS=N bounds it.
#
#   bash scripts/loom.sh
#
# `--cfg loom` swaps the ring's atomics for loom's (src/sync.rs); it builds
# into its own target directory so that it does not invalidate normal builds.
set -euo pipefail
cd "$(dirname "$0")/.."

export RUSTFLAGS="${RUSTFLAGS:-} --cfg loom"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target}/loom"
exec cargo test --release --lib -- --test-threads=1 ring::model idle::model job_cell::model "$@"
