#!/usr/bin/env bash
# Miri over the pure parts: the wire formats, the codec and its element
# budget, and the result ring over heap-backed slots (its loom model's
# scenarios on real threads), docs/verification.md.
#
#   bash scripts/miri.sh
#   bash scripts/miri.sh ring::model   # any libtest filter instead
#
# Needs a nightly toolchain with the miri and rust-src components; it adds
# them if rustup can. Tests that fork, map a memfd or make other system calls
# Miri does not emulate are marked #[cfg_attr(miri, ignore)]. CI runs it (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."

toolchain="${MIRI_TOOLCHAIN:-nightly}"
if ! cargo "+$toolchain" miri --version >/dev/null 2>&1; then
  rustup toolchain install "$toolchain" --profile minimal --component miri,rust-src
fi
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target}/miri"
# Few proptest cases: Miri runs about a thousand times slower than native,
# and the point here is undefined behaviour, not input coverage (the fuzz
# targets and the native proptest runs give that).
export PROPTEST_CASES="${PROPTEST_CASES:-4}"
# proptest's regression files need the working directory, which Miri's
# isolation hides.
export PROPTEST_DISABLE_FAILURE_PERSISTENCE=true
forward="-Zmiri-env-forward=PROPTEST_CASES -Zmiri-env-forward=PROPTEST_DISABLE_FAILURE_PERSISTENCE"
cargo "+$toolchain" miri setup
if [ "$#" -gt 0 ]; then
  MIRIFLAGS="${MIRIFLAGS:-} $forward" exec cargo "+$toolchain" miri test --lib -- "$@"
fi
MIRIFLAGS="${MIRIFLAGS:-} $forward" cargo "+$toolchain" miri test --lib -- wire:: codec:: budget:: ring:: job_cell::
# The ring and job cell scenarios again over eight thread schedules and weak-memory
# outcomes instead of the single default seed.
MIRIFLAGS="${MIRIFLAGS:-} -Zmiri-many-seeds=0..8" cargo "+$toolchain" miri test --lib -- ring::model job_cell::model
