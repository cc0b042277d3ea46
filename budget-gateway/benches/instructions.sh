#!/usr/bin/env bash
# Instructions per request of the gateway with the budget layer, without it
# and with tower_governor, counted by callgrind (see benches/instructions.rs).
# From a fresh clone: installs valgrind if it is missing, builds the release
# binary with line tables (the functions' names; the code is the same), and
# prints the tables. Arguments go to the bench: --requests N --batches N
# --warmup N --top N --variants none,budget,governor --keep DIR, and
# --compare budget,limits to break down what the limits add to one window.
set -euo pipefail
cd "$(dirname "$0")/../.."
command -v valgrind >/dev/null || (apt-get update && apt-get install -y valgrind)
command -v callgrind_control >/dev/null || { echo "callgrind_control is missing (valgrind)" >&2; exit 1; }
export CARGO_PROFILE_BENCH_DEBUG=line-tables-only
exec cargo bench -p budget-gateway --bench instructions -- "$@"
