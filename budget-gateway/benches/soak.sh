#!/bin/sh
# A 10-minute soak of the release binary with a mix of clients (normal,
# streaming, disconnecting, over budget, bogus keys, slow heads), its RSS,
# open descriptors and answers reported every 30 s. Not in CI.
#
#   budget-gateway/benches/soak.sh [SECONDS] [RATE]
#
# SECONDS defaults to 600, RATE (requests a second of each kind) to 5.
set -eu
cd "$(dirname "$0")/../.."
cargo build --release -p budget-gateway --bin budget-gateway
exec nice python3 budget-gateway/benches/soak.py target/release/budget-gateway "${1:-600}" "${2:-5}"
