#!/usr/bin/env bash
# AddressSanitizer over the unit tests and the fork suites (docs/verification.md).
#
#   bash scripts/asan.sh                 # lib + every fork suite but confine
#   bash scripts/asan.sh --test hostile  # any `cargo test` selection
#
# Runs on the stable toolchain: RUSTC_BOOTSTRAP=1 unlocks `-Zsanitizer`, as
# for the fuzz targets in .ci/run. `--target` keeps build scripts and proc
# macros uninstrumented. The standard library is not rebuilt, so only this
# crate and its dependencies are instrumented. CI runs it this way
# (`.ci/run`), all of it.
set -euo pipefail
cd "$(dirname "$0")/.."

export RUSTC_BOOTSTRAP=1
export RUSTFLAGS="${RUSTFLAGS:-} -Zsanitizer=address"
export RUSTDOCFLAGS="${RUSTDOCFLAGS:-} -Zsanitizer=address"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target}/asan"
# LeakSanitizer stays on: it checks each test process at exit. Workers and
# zygotes leave through _exit, which skips its atexit check, so their leaks
# are not reported (the suites' own /proc checks cover fds and processes).
# abort_on_error=1: a report kills the process with SIGABRT, which a suite
# sees as a crash of the worker (or fails the test binary), not as a value.
# handle_segv=0: a task's SIGSEGV stays a SIGSEGV. The suites fault on
# purpose (a write to a slot unmapped by isolation, a null store), and ASan's
# own handler would turn each into a report and SIGABRT. An invalid access
# in instrumented code is still caught by the shadow check before it faults.
export ASAN_OPTIONS="${ASAN_OPTIONS:-abort_on_error=1:handle_segv=0}"

target=x86_64-unknown-linux-gnu
if [ "$#" -gt 0 ]; then
  exec cargo test --target "$target" "$@"
fi
cargo test --target "$target" --lib
# Skipped: no_worker_inherits_an_earlier_argument reads every rw-p mapping
# of a worker, which under ASan includes terabytes of shadow memory (it
# hangs).
cargo test --target "$target" --test hostile -- --skip no_worker_inherits_an_earlier_argument
# Skipped: lifecycle's 256 MiB round trip (37 s alone under ASan) can outlast
# the suites' 60 s hang guard on a loaded machine; run it alone with
# `bash scripts/asan.sh --test lifecycle -- payloads_from`.
cargo test --target "$target" --test lifecycle -- --skip payloads_from_zero_bytes_to_256_mib_round_trip
# Skipped: scale's page-fault bound counts the faults of an uninstrumented
# worker (ASan's shadow memory makes it about 155).
cargo test --target "$target" --test scale -- --skip a_fresh_worker_takes_few_page_faults
for suite in fork fork_child blob taskio respawn; do
  cargo test --target "$target" --test "$suite"
done
# Not here: confine, whose memory limits and seccomp filters refuse what
# ASan's runtime needs (its shadow memory, its own system calls).
