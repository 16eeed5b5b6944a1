#!/usr/bin/env bash
# A/B latency of a default task across commits: builds scripts/ab/probe.rs
# (public API only) at each REV in its own worktree, then runs the builds in
# alternating rounds, so that drifts in the machine's speed hit every build
# alike. Prints each round's medians and, per REV, the median of its round
# medians and of its ratios to the first REV in the same round.
#
#   bash scripts/ab.sh [-r ROUNDS] [-n TASKS] [-p PROBE] REV_A REV_B [REV ...]
#
# `-p tput` builds scripts/ab/tput.rs instead: reuse-mode noop tasks per
# second, 8 in flight (TASKS defaults to 200000 there).
#
# Run it on an otherwise idle machine; RUST_BACKTRACE is unset for the runs.
# Used for issue #18's "defaults keep today's latency within 5%"
# (docs/benchmarks.md, "Default latency across commits").
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=11
tasks=
probe=probe
while getopts "r:n:p:" opt; do
    case $opt in
        r) rounds=$OPTARG ;;
        n) tasks=$OPTARG ;;
        p) probe=$OPTARG ;;
        *) exit 2 ;;
    esac
done
shift $((OPTIND - 1))
[ -f "scripts/ab/$probe.rs" ] || { echo "no probe scripts/ab/$probe.rs" >&2; exit 2; }
if [ -z "$tasks" ]; then
    if [ "$probe" = tput ]; then tasks=200000; else tasks=2000; fi
fi
unit=$([ "$probe" = tput ] && echo "tasks/s" || echo "us")
[ $# -ge 2 ] || { echo "usage: $0 [-r ROUNDS] [-n TASKS] [-p PROBE] REV_A REV_B [REV ...]" >&2; exit 2; }

root=$PWD
work=${AB_DIR:-$root/target/ab}
mkdir -p "$work"
bins=()
for rev in "$@"; do
    id=$(git rev-parse --short=12 "$rev^{commit}")
    bin=$work/$probe-$id
    if [ ! -x "$bin" ]; then
        tree=$work/tree-$id
        [ -d "$tree" ] || git worktree add --detach "$tree" "$id" >/dev/null
        mkdir -p "$tree/examples"
        cp "scripts/ab/$probe.rs" "$tree/examples/ab_probe.rs"
        (cd "$tree" && CARGO_TARGET_DIR=$work/target-$id \
            cargo build --release --quiet --example ab_probe)
        cp "$work/target-$id/release/examples/ab_probe" "$bin"
        git worktree remove --force "$tree"
    fi
    bins+=("$bin")
    echo "$rev = $id"
done

results=$(mktemp)
trap 'rm -f "$results"' EXIT
for ((round = 1; round <= rounds; round++)); do
    line=""
    for bin in "${bins[@]}"; do
        line+="$(env -u RUST_BACKTRACE "$bin" "$tasks") "
    done
    echo "round $round: $line"
    echo "$line" >>"$results"
done

python3 - "$results" "$unit" "$@" <<'PY'
import statistics, sys
rows = [list(map(float, l.split())) for l in open(sys.argv[1]) if l.strip()]
unit = sys.argv[2]
revs = sys.argv[3:]
if not rows:
    sys.exit(0)
for i, rev in enumerate(revs):
    medians = [r[i] for r in rows]
    ratios = [r[i] / r[0] for r in rows]
    print(f"{rev:>24}: median {statistics.median(medians):6.1f} {unit}, "
          f"paired ratio to {revs[0]} {statistics.median(ratios):.3f}")
PY
