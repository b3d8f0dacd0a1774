#!/usr/bin/env bash
# Benchmark (issue 3): step throughput of `acr-task run` against the docker CLI, side by side.
#   1. 50 sequential trivial steps (`busybox true`) through `acr-task run`
#      vs a shell loop of `docker run --rm busybox true` (same image, same engine).
#   2. 20 independent steps (`when: ["-"]`) vs the same 20 chained.
# Usage: benches/run-steps.sh [path/to/acr-task]   (default: target/release/acr-task)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-target/release/acr-task}
[ -x "$BIN" ] || cargo build --release --quiet
N=${N:-50}
P=${P:-20}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
data="$tmp/data"

"$BIN" runner build >/dev/null 2>&1

gen() { # gen FILE COUNT WHEN
  { echo "version: v1.1.0"; echo "steps:"
    for i in $(seq 1 "$2"); do
      echo "  - id: s$i"
      [ -n "$3" ] && echo "    when: [\"-\"]"
      echo "    cmd: busybox true"
    done; } > "$1"
}
gen "$tmp/seq.yaml" "$N" ""
gen "$tmp/par.yaml" "$P" "-"
gen "$tmp/chain.yaml" "$P" ""

now() { date +%s.%N; }
secs() { echo "$2 - $1" | bc -l; }

t0=$(now); "$BIN" run "$tmp/seq.yaml" --data "$data" --output json >/dev/null 2>&1; t1=$(now)
ours=$(secs "$t0" "$t1")
t0=$(now); for i in $(seq 1 "$N"); do docker run --rm busybox true; done; t1=$(now)
cli=$(secs "$t0" "$t1")
t0=$(now); "$BIN" run "$tmp/par.yaml" --data "$data" --max-parallel "$P" --output json >/dev/null 2>&1; t1=$(now)
par=$(secs "$t0" "$t1")
t0=$(now); "$BIN" run "$tmp/chain.yaml" --data "$data" --output json >/dev/null 2>&1; t1=$(now)
chain=$(secs "$t0" "$t1")

printf '%-44s %8s\n' "case" "seconds"
printf '%-44s %8.2f\n' "acr-task run, $N sequential steps" "$ours"
printf '%-44s %8.2f\n' "docker run --rm loop, $N times" "$cli"
printf '%-44s %8.2f\n' "ratio acr-task / docker CLI (goal <= 0.7)" "$(echo "$ours / $cli" | bc -l)"
printf '%-44s %8.2f\n' "acr-task run, $P independent steps" "$par"
printf '%-44s %8.2f\n' "acr-task run, $P chained steps" "$chain"
printf '%-44s %8.2f\n' "ratio independent / chained" "$(echo "$par / $chain" | bc -l)"
