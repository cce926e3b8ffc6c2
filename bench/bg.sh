#!/usr/bin/env bash
# Jobs on the GPU box that outlive one device call (an 8B export takes ~14 minutes; a call at most 10).
# The box keeps them while it stays held, that is while the next call comes within its idle window.
# Each line is one device command, after `source .whl/setup.sh > /tmp/setup.log` (not piped: a pipe
# would run it in a subshell and lose its environment):
#   bash bench/bg.sh start NAME CMD [ARGS...]   # own session (setsid); output in $BG/NAME.log
#   bash bench/bg.sh wait SECONDS               # until every job ends or SECONDS pass; logs to $OUT/bg
#   bash bench/bg.sh stop                       # kill every job's process group
# Stop jobs through their pid files, never `pkill -f`: its pattern matches the calling command too.
# GPU memory: one 8B CUDA export at a time (it needs more than 71 GiB, docs/PERFORMANCE.md).
set -u
BG=${BG:-/root/bg}
mkdir -p "$BG"
alive() { kill -0 "$(cat "$1")" 2>/dev/null; }
case "${1:-}" in
  start)
    name=$2
    shift 2
    setsid nohup "$@" > "$BG/$name.log" 2>&1 < /dev/null &
    echo $! > "$BG/$name.pid"
    echo "started $name (pid $!)"
    ;;
  wait)
    t0=$(date +%s)
    while [ $(( $(date +%s) - t0 )) -lt "$2" ]; do
      busy=0
      for p in "$BG"/*.pid; do [ -e "$p" ] && alive "$p" && busy=1; done
      [ $busy = 0 ] && break
      sleep 5
    done
    if [ -n "${OUT:-}" ]; then mkdir -p "$OUT/bg" && cp "$BG"/*.log "$OUT/bg/" 2>/dev/null; fi
    for p in "$BG"/*.pid; do
      [ -e "$p" ] || continue
      n=$(basename "$p" .pid)
      if alive "$p"; then s=running; else s=ended; fi
      echo "== $n: $s"
      tail -n 3 "$BG/$n.log"
    done
    ;;
  stop)
    for p in "$BG"/*.pid; do [ -e "$p" ] && kill -- "-$(cat "$p")" 2>/dev/null; done
    echo stopped
    ;;
  *)
    sed -n 2,10p "$0"
    exit 2
    ;;
esac
