#!/usr/bin/env bash
# Soak (issue 13; recorded in BENCHMARKS.md, not run in CI): ROUNDS x REQUESTS streamed greedy
# requests (16 prompt + 16 output tokens) against one `pagedserve up` of configs/replicas.yaml,
# each round a `pagedserve chaos` run: 20% cancelled at random points and one worker killed
# (SIGKILL) a quarter of the way in, the replicas in turn. Each round line: lost requests, tokens
# against the fault-free run, blocks in use before / after, time to recover, and the engine
# core's RSS (the SchedulerActor process).
#
#   bash cluster/benchmarks/soak.sh [--set model.model=DIR --set model.tokenizer=PATH ...]
#
# Environment: ROUNDS (10), REQUESTS (1000), OUT (a directory for the logs; default a temporary
# one). Run from the checkout's root with .venv installed.
set -uo pipefail
ROUNDS=${ROUNDS:-10}
REQUESTS=${REQUESTS:-1000}
OUT=${OUT:-$(mktemp -d)}
PY=.venv/bin/python
export RAY_USAGE_STATS_ENABLED=0 PAGEDSERVE_STATE_DIR=$OUT/state
mkdir -p "$OUT"
"$PY" -m cluster.cli up -c configs/replicas.yaml --set server.port=0 --set server.http_port=0 \
  "$@" > "$OUT/up.log" 2>&1 &
UP=$!
for _ in $(seq 600); do grep -q "is serving" "$OUT/up.log" 2>/dev/null && break; sleep 1; done
grep "is serving" "$OUT/up.log" || { echo "the cluster did not start: $OUT/up.log"; kill $UP; exit 1; }
core_rss_kb() { ps -o rss= -p "$(pgrep -f SchedulerActor | head -1)" | tr -d ' '; }
echo "engine core RSS before: $(core_rss_kb) kB"
for i in $(seq 0 $((ROUNDS - 1))); do
  start=$(date +%s)
  "$PY" -m cluster.cli chaos --num-requests "$REQUESTS" --prompt-len 16 --max-tokens 16 \
    --cancel-fraction 0.2 --kill "worker:$((i % 2))@$((REQUESTS * 4))t" --seed "$i" \
    --timeout 1200 > "$OUT/round$i.log" 2>&1
  rc=$?
  report=$(grep -E '^requests|^against|^blocks in use|^recovered' "$OUT/round$i.log" | tr '\n' ';')
  echo "round $i: exit $rc, $(( $(date +%s) - start )) s, core RSS $(core_rss_kb) kB | $report"
done
"$PY" -m cluster.cli down
wait $UP
