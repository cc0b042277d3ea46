#!/usr/bin/env bash
# Throughput of the gateway with the budget layer, without it (--limiter
# none) and with tower_governor, measured by a third-party load generator
# (wrk) on loopback: the mock upstream and the three gateways as processes
# of the release binary, the same chat completion as the other benches
# (benches/support/mod.rs), 1 and 32 connections, the variants' order
# rotated every round; requests/s and latencies are medians of the rounds.
#
#   budget-gateway/benches/wrk.sh                 # 5 rounds of 3 s per variant and concurrency
#   ROUNDS=9 SECONDS_PER_RUN=5 CONNECTIONS="1 32 64" budget-gateway/benches/wrk.sh
#
# From a fresh clone: installs wrk (Debian's package) if it is missing and
# builds the release binary. Every process listens on 127.0.0.1 and is
# stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/../.."

ROUNDS=${ROUNDS:-5}
SECONDS_PER_RUN=${SECONDS_PER_RUN:-3}
CONNECTIONS=${CONNECTIONS:-1 32}
VARIANTS=(none budget governor)

command -v wrk >/dev/null || (apt-get update && apt-get install -y wrk)
cargo build --release -p budget-gateway --bin budget-gateway
BIN=target/release/budget-gateway

dir=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$dir"
}
trap cleanup EXIT

# start VAR COMMAND...: runs COMMAND on 127.0.0.1:0 in the background and
# sets VAR to the port it says it listens on.
start() {
    local var=$1 log="$dir/log.$RANDOM"
    shift
    "$@" --listen 127.0.0.1:0 2>"$log" &
    pids+=($!)
    for _ in $(seq 1 200); do
        local listening
        listening=$(grep -o 'http://127\.0\.0\.1:[0-9]*' "$log" | head -1 || true)
        if [ -n "$listening" ]; then
            printf -v "$var" '%s' "${listening##*:}"
            return 0
        fi
        sleep 0.05
    done
    echo "$* never said where it listens: $(cat "$log")" >&2
    exit 1
}

cat >"$dir/gateway.toml" <<'EOF'
admin_key = "admin"

[[agents]]
api_key = "sk-load"
agent_id = "7f9c24e8-3b1a-4c5d-9e2f-1a2b3c4d5e6f"
token_budget = 1000000000000000
calls_budget = 4000000000
window_secs = 86400
EOF

# The request of benches/support/mod.rs (REQUEST_BODY).
body=$(sed -n 's/^pub const REQUEST_BODY: &str = r#"\(.*\)"#;$/\1/p' budget-gateway/benches/support/mod.rs)
[ -n "$body" ] || { echo "REQUEST_BODY not found in benches/support/mod.rs" >&2; exit 1; }
cat >"$dir/post.lua" <<EOF
wrk.method = "POST"
wrk.headers["Authorization"] = "Bearer sk-load"
wrk.headers["Content-Type"] = "application/json"
wrk.body = [[$body]]
-- Every answer must be a 200: a refusal or an error would be cheap and fast.
response = function(status, headers, body)
    if status ~= 200 then
        io.stderr:write("unexpected status " .. status .. "\n")
        os.exit(1)
    end
end
EOF

start mock_port "$BIN" --mock-upstream
declare -A port
for variant in "${VARIANTS[@]}"; do
    start "port[$variant]" "$BIN" --config "$dir/gateway.toml" \
        --upstream "http://127.0.0.1:$mock_port" --limiter "$variant"
done

url() { echo "http://127.0.0.1:${port[$1]}/v1/chat/completions"; }

# wrk's "Latency" percentile lines, in microseconds.
micros() {
    awk -v p="$1" '$1 == p { v = $2;
        if (v ~ /us$/) { sub(/us$/, "", v); print v }
        else if (v ~ /ms$/) { sub(/ms$/, "", v); print v * 1000 }
        else if (v ~ /s$/) { sub(/s$/, "", v); print v * 1000000 } }'
}

median() { sort -g | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'); load: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "wrk $(wrk --version 2>&1 | head -1 | cut -d' ' -f2), $ROUNDS rounds of $SECONDS_PER_RUN s per variant and concurrency, order rotated each round"

for variant in "${VARIANTS[@]}"; do
    wrk -t1 -c4 -d1s -s "$dir/post.lua" "$(url "$variant")" >/dev/null # warm up
done

for c in $CONNECTIONS; do
    for round in $(seq 0 $((ROUNDS - 1))); do
        for k in 0 1 2; do
            variant=${VARIANTS[$(((round + k) % 3))]}
            out=$(wrk -t1 -c"$c" -d"${SECONDS_PER_RUN}s" --latency -s "$dir/post.lua" "$(url "$variant")")
            awk '/^Requests\/sec:/ { print $2 }' <<<"$out" >>"$dir/$c.$variant.rps"
            micros 50% <<<"$out" >>"$dir/$c.$variant.p50"
            micros 99% <<<"$out" >>"$dir/$c.$variant.p99"
        done
    done
done

echo
echo "| connections | variant | requests/s | vs plain proxy | p50 | p99 |"
echo "|---|---|---|---|---|---|"
for c in $CONNECTIONS; do
    plain=$(median <"$dir/$c.none.rps")
    for variant in "${VARIANTS[@]}"; do
        rps=$(median <"$dir/$c.$variant.rps")
        p50=$(median <"$dir/$c.$variant.p50")
        p99=$(median <"$dir/$c.$variant.p99")
        case $variant in
            none) name="plain proxy (\`--limiter none\`)" ;;
            budget) name="budget layer" ;;
            governor) name="tower_governor" ;;
        esac
        awk -v c="$c" -v n="$name" -v r="$rps" -v b="$plain" -v p50="$p50" -v p99="$p99" \
            'BEGIN { printf "| %s | %s | %.0f | %.1f%% | %.0f µs | %.0f µs |\n", c, n, r, 100 * r / b, p50, p99 }'
    done
done
echo
echo "(requests/s per round, rounds in order:)"
for c in $CONNECTIONS; do
    for variant in "${VARIANTS[@]}"; do
        echo "$c $variant: $(tr '\n' ' ' <"$dir/$c.$variant.rps")"
    done
done
