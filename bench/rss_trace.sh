#!/bin/bash
# Peak-memory trace: run a command and print "seconds_since_start rss_kB" about every 0.5 s
# (the command's own RSS plus its direct children's), e.g.
#   SSL_LAB_CACHE=$(mktemp -d) bash bench/rss_trace.sh .venv/bin/ssl-lab train seed=2 \
#       run.dir=runs/s8/rss-seed2 > rss.txt
# The command's output goes to ${RSS_TRACE_LOG:-/dev/null}. A sampled peak is a lower bound
# of the true one (/usr/bin/time -v reports that), but the trace shows which phase it is in.
"$@" > "${RSS_TRACE_LOG:-/dev/null}" 2>&1 &
pid=$!
start=$(date +%s.%N)
while kill -0 "$pid" 2>/dev/null; do
  rss=$(ps -o rss= --ppid "$pid" -p "$pid" 2>/dev/null | awk '{s += $1} END {print s}')
  echo "$(echo "$(date +%s.%N) - $start" | bc) $rss"
  sleep 0.5
done
wait "$pid"
