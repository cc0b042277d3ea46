#!/usr/bin/env bash
# Instructions per operation of the core (the lock-free manager beside
# governor), counted by callgrind: see benches/instructions.rs. From a
# fresh clone: installs valgrind if it is missing, then builds and runs the
# bench. Arguments go to it: --ops N --runs N --only NAME --cache.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v valgrind >/dev/null || (apt-get update && apt-get install -y valgrind)
exec cargo bench --bench instructions -- "$@"
