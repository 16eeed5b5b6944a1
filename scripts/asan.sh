#!/usr/bin/env bash
# AddressSanitizer over the unit tests and the fork suites (docs/verification.md).
#
#   bash scripts/asan.sh                 # lib + hostile + lifecycle + fork + blob
#   bash scripts/asan.sh --test hostile  # any `cargo test` selection
#
# Runs on the stable toolchain: RUSTC_BOOTSTRAP=1 unlocks `-Zsanitizer`, as
# for the fuzz targets in .ci/run. `--target` keeps build scripts and proc
# macros uninstrumented. The standard library is not rebuilt, so only this
# crate and its dependencies are instrumented. CI runs the unit tests and the
# hostile suite this way (`.ci/run`).
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
# hangs). On a loaded machine lifecycle's 32 MiB round trip (37 s alone
# under ASan) can outlast the suites' 60 s hang guard: rerun it alone.
cargo test --target "$target" --test hostile -- --skip no_worker_inherits_an_earlier_argument
for suite in lifecycle fork blob; do
  cargo test --target "$target" --test "$suite"
done
