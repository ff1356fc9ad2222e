#!/bin/sh
# Instructions per CreateRoom+DestroyRoom pair in the library, counted by callgrind: exact and
# unaffected by other work on the machine, unlike times. Runs examples/pair_cost with 0 and
# with N pairs after the same set-up and prints the difference divided by N.
#
#   scripts/pair_instructions.sh [PAIRS (100000)] [PROCESSES (10000)]
#
# Needs valgrind. Takes a few minutes.
set -eu
cd "$(dirname "$0")/.."
pairs=${1:-100000}
processes=${2:-10000}
cargo build --quiet --release --example pair_cost
count() {
    valgrind --tool=callgrind --callgrind-out-file=/dev/null \
        "${CARGO_TARGET_DIR:-target}/release/examples/pair_cost" "$processes" "$1" 2>&1 |
        sed -n 's/.*Collected : //p'
}
base=$(count 0)
total=$(count "$pairs")
echo "$(( (total - base) / pairs )) instructions per pair ($processes processes, $pairs pairs)"
