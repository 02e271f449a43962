#!/usr/bin/env bash
# Benchmarks that print figures (not timed tests). Each throughput figure is
# the median of RUNS runs (default 5); memory is peak RSS of one run.
#   bench/run.sh            everything (about 15 minutes on 2 cores)
#   bench/run.sh quick      the throughput figures only
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-5}
cargo build --release --quiet --bin prefsync --example bench
B=target/release/examples/bench
P=target/release/prefsync

median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

echo "== sandbox: simple requests per second (GET one user, 32 connections, limits off)"
out=$(for i in $(seq "$RUNS"); do $B sandbox-rps 5 32; done); echo "$out"
echo "$out" | awk '{print $2}' | median | sed 's/^/median requests\/s: /'

echo "== limiter: testers-list utilisation against the sandbox enforcing 60/min at --rate-scale 60"
$B limiter 300

echo "== import: 100,000 rows vs a bare HTTP load of the same creates (concurrency 8, limits off, sandbox in its own process)"
out=$(for i in $(seq "$RUNS"); do $B import 100000 8; done); echo "$out"
echo "$out" | awk '/^import:/ {print $2}' | median | sed 's/^/median import rows\/s: /'
echo "$out" | awk '/^bare-http:/ {print $2}' | median | sed 's/^/median bare requests\/s: /'
echo "$out" | awk '/ratio/ {print $3}' | median | sed 's/^/median ratio: /'
if command -v valgrind >/dev/null; then
  # Instructions do not drift with the machine's speed as timings do (one
  # pair's ratio ranges ±0.1 here), so they show small changes that the
  # timed ratio cannot. Whole client process, setup included.
  echo "== client instructions per row, 5,000 creates under callgrind (the sandbox runs natively)"
  for half in import-only bare-only; do
    n=$(valgrind --tool=callgrind --callgrind-out-file=/dev/null $B $half 5000 8 2>&1 | awk '/Collected/ {print $4}')
    echo "$half: $((n / 5000)) instructions a row"
  done
fi
echo "== the same creates through prefsync's client alone (limiter, retries, decoding the id; no CSV, no checkpoint)"
out=$(for i in $(seq "$RUNS"); do $B client-only 100000 8; done); echo "$out"
echo "$out" | awk '{print $2}' | median | sed 's/^/median client requests\/s: /'

echo "== checkpoint alone (rows/s it absorbs)"
out=$(for i in $(seq "$RUNS"); do $B checkpoint 100000; done); echo "$out"
echo "$out" | awk '{print $2}' | median | sed 's/^/median checkpoint rows\/s: /'

echo "== sync: API calls per input row, 10,000 rows of which 10% changed (fresh mirror, stale mirror, import --resolve list)"
$B sync 10000

echo "== export: local cost per page (writing, outside the network), 100,000 users"
$B export-local 100000

if [ "${1:-}" = quick ]; then exit 0; fi

work=$(mktemp -d)
trap 'kill $(cat "$work/pids" 2>/dev/null) 2>/dev/null || true; rm -rf "$work"' EXIT
start_sandbox() { # seed-testers
  rm -f "$work/port"
  $P sandbox --port 0 --port-file "$work/port" --rate-scale 0 --seed-testers "$1" 2>/dev/null &
  echo $! >> "$work/pids"
  while [ ! -s "$work/port" ]; do sleep 0.2; done
  export PREFINERY_API_KEY=sandbox-key PREFINERY_BASE_URL="http://127.0.0.1:$(cat "$work/port")/api/v2"
}
FAST=(--rate testers-list=100000/1s --rate account-list=100000/1s --rate betas=100000/1s)

echo "== import: peak memory for a 1,000,000-row file"
python3 - "$work/big.csv" <<'PY'
import sys
with open(sys.argv[1], "w") as f:
    f.write("email,first_name,last_name,country,custom_var1\n")
    m = (1 << 64) - 1
    for i in range(1_000_000):
        h = (i * 0x9E3779B97F4A7C15) & m          # distinct, in no order
        h = ((h << 29) | (h >> 35)) & m
        f.write(f"p{h:016x}@example.com,First{i},\"Last, {i}\",NO,wave-{i%7}\n")
PY
ls -la "$work/big.csv" | awk '{print "input bytes:", $5}'
start_sandbox 0
/usr/bin/time -f "import 1M rows: %e s elapsed, peak RSS %M KB" \
  $P -q import testers --beta 2 --file "$work/big.csv" --checkpoint "$work/ck.sqlite" "${FAST[@]}"

echo "== export: peak memory for 1,000,000 users, each format"
start_sandbox 1000000
for fmt in csv jsonl sqlite; do
  /usr/bin/time -f "export 1M users to $fmt: %e s elapsed, peak RSS %M KB" \
    $P -q export testers --beta 1 --format $fmt --out "$work/users.$fmt" "${FAST[@]}"
done
