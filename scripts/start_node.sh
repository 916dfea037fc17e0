#!/usr/bin/env bash
# One complete node of a deployment, as it runs on an edge device: Flower's SuperNode and the node's
# warm worker (which keeps torch, transformers and the bottom loaded between messages), bound to one
# node config, with the node's keys, state folder and logs in one folder. Stops both when the
# SuperNode exits, or on SIGTERM / Ctrl-C; the worker is restarted whenever it exits meanwhile.
#
#   scripts/start_node.sh --superlink HOST:PORT --dir NODE_DIR --node-config "partition-id=0 num-partitions=2 ..."
#                         [--root-certificates CA | --insecure] [--auth-key FILE] [--port P]
#                         [--idle-poll S] [--allocator mimalloc|glibc] [--cold]
#
# --node-config is the SuperNode's (partition-id / partitions, num-partitions, stream-ca,
# stream-key-file, ...); this script adds worker-socket and, unless it names one, state-dir.
# NODE_DIR (created, mode 700): run/worker.sock (the worker's socket: only this user can open it),
# state/ (client states kept on this device: node config state-dir), logs/worker.log and
# logs/supernode.log, bin/flwr-clientapp, pids (the SuperNode's pid; run/worker.pid the worker's).
# --root-certificates CA: Flower's link to the SuperLink uses TLS trusting CA; --auth-key FILE: the
# node's SuperNode-authentication private key (its .pub registered on the SuperLink with
# `flwr supernode register FILE.pub <federation>`; python scripts/supernode_keys.py makes pairs).
# --port P: the SuperNode's local ClientAppIo port (default: a free one).
# --idle-poll S: the SuperNode waits at most S s between pulls when idle (default 0.5; Flower's own: 3).
# --allocator: the client process's malloc. mimalloc (the default on Linux, preloaded from the
# cmeel-mimalloc package) keeps a hosl step's peak near inference's at glibc's speed; glibc is the C
# library's own (the default elsewhere). See fl_app/allocator.py. It applies to the worker, and on a
# --cold node to every ClientApp process.
# --cold: no worker, Flower's own waits and flwr-clientapp: every message starts a process that
# imports torch and loads the bottom (what a node was before warm workers; for comparisons).
# Warm nodes also start each message's ClientApp process through client_app/clientapp_process.py
# (Flower's flwr-clientapp without the rest of its CLI package), first on the SuperNode's PATH.
set -euo pipefail
cd "$(dirname "$0")/.."

SUPERLINK="" NODE_DIR="" NODE_CONFIG="" SECURITY=() PORT="" IDLE_POLL=0.5 COLD=0 ALLOCATOR=""
while [ $# -gt 0 ]; do
  case "$1" in
    --superlink) SUPERLINK=$2; shift 2 ;;
    --dir) NODE_DIR=$2; shift 2 ;;
    --node-config) NODE_CONFIG=$2; shift 2 ;;
    --root-certificates) SECURITY+=(--root-certificates "$2"); shift 2 ;;
    --insecure) SECURITY+=(--insecure); shift ;;
    --auth-key) SECURITY+=(--auth-supernode-private-key "$2"); shift 2 ;;
    --port) PORT=$2; shift 2 ;;
    --idle-poll) IDLE_POLL=$2; shift 2 ;;
    --allocator) ALLOCATOR=$2; shift 2 ;;
    --cold) COLD=1; shift ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
[ -n "$SUPERLINK" ] && [ -n "$NODE_DIR" ] && [ -n "$NODE_CONFIG" ] \
  || { echo "give --superlink HOST:PORT, --dir NODE_DIR and --node-config '...'" >&2; exit 2; }
[ ${#SECURITY[@]} -gt 0 ] || { echo "give --root-certificates CA (TLS) or ask for --insecure explicitly" >&2; exit 2; }
[ -n "$PORT" ] || read -r PORT < <(python scripts/free_ports.py 1)

case "$NODE_CONFIG" in *.toml) echo "--node-config: give key=value pairs, not a TOML file ($NODE_CONFIG)" >&2; exit 2 ;; esac
mkdir -p "$NODE_DIR" && chmod 700 "$NODE_DIR" && NODE_DIR=$(cd "$NODE_DIR" && pwd)
mkdir -p -m 700 "$NODE_DIR/run" "$NODE_DIR/state" "$NODE_DIR/logs"
exec 9> "$NODE_DIR/lock"  # held by this script while it runs (its children close it: 9>&-)
flock -w 10 9 || { echo "another node already runs from $NODE_DIR" >&2; exit 3; }
PY=$(python -c 'import sys; print(sys.executable)')  # the interpreter itself, not a pyenv shim
ALLOCATOR_ENV=$("$PY" -m fl_app.allocator ${ALLOCATOR:+--allocator "$ALLOCATOR"}) || exit 2  # export lines (none for glibc)
case " $NODE_CONFIG" in *" state-dir="*) ;; *) NODE_CONFIG="$NODE_CONFIG state-dir='$NODE_DIR/state'" ;; esac
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1

NODE_PID="" SUPERVISOR_PID=""
cleanup() {
  [ -z "$NODE_PID" ] || kill "$NODE_PID" 2>/dev/null || true
  [ -z "$SUPERVISOR_PID" ] || kill "$SUPERVISOR_PID" 2>/dev/null || true
  if [ -f "$NODE_DIR/run/worker.pid" ]; then kill "$(cat "$NODE_DIR/run/worker.pid")" 2>/dev/null || true; fi
  wait 2>/dev/null || true
  rm -f "$NODE_DIR/run/worker.pid" "$NODE_DIR/pids"
}
trap cleanup EXIT INT TERM

if [ "$COLD" -eq 1 ]; then
  (eval "$ALLOCATOR_ENV"; exec flower-supernode "${SECURITY[@]}" --superlink "$SUPERLINK" --port "$PORT" \
    --node-config "$NODE_CONFIG") > "$NODE_DIR/logs/supernode.log" 2>&1 9>&- &
  NODE_PID=$!
else
  SOCK="$NODE_DIR/run/worker.sock"
  [ "${#SOCK}" -le 100 ] || { echo "--dir: $SOCK is too long for a Unix socket (100 bytes at most)" >&2; exit 2; }
  NODE_CONFIG="$NODE_CONFIG worker-socket='$SOCK'"
  (  # the worker, restarted whenever it exits (a message meanwhile waits for it, then reports it down);
     # one that keeps exiting within 30 s is restarted after 1, 2, 4 ... 60 s
    set +e
    exec 9>&-
    eval "$ALLOCATOR_ENV"
    wpid="" delay=1
    trap '[ -z "$wpid" ] || kill "$wpid" 2>/dev/null; exit 0' TERM
    while true; do
      started=$SECONDS
      "$PY" -m client_app.worker --socket "$SOCK" --node-config "$NODE_CONFIG" >> "$NODE_DIR/logs/worker.log" 2>&1 &
      wpid=$!
      echo "$wpid" > "$NODE_DIR/run/worker.pid"
      wait "$wpid"
      code=$?
      if [ $((SECONDS - started)) -ge 30 ]; then delay=1; else delay=$((delay * 2 > 60 ? 60 : delay * 2)); fi
      echo "$(date -u +%FT%TZ) worker exited ($code); restarting in $delay s" >> "$NODE_DIR/logs/worker.log"
      sleep "$delay"
    done
  ) &
  SUPERVISOR_PID=$!
  # Flower starts `flwr-clientapp` for each message: this one skips the rest of Flower's CLI package (0.6 s)
  # (the interpreter's own bin folder next: a pyenv shim would put it before ours for Flower's children)
  mkdir -p "$NODE_DIR/bin"
  printf '#!/bin/sh\nexec %q %q "$@"\n' "$PY" "$PWD/client_app/clientapp_process.py" > "$NODE_DIR/bin/flwr-clientapp"
  chmod 700 "$NODE_DIR/bin/flwr-clientapp"
  PATH="$NODE_DIR/bin:$(dirname "$PY"):$PATH" "$PY" -m client_app.supernode --idle-poll "$IDLE_POLL" "${SECURITY[@]}" \
    --superlink "$SUPERLINK" --port "$PORT" --node-config "$NODE_CONFIG" > "$NODE_DIR/logs/supernode.log" 2>&1 9>&- &
  NODE_PID=$!
fi
echo "supernode $NODE_PID" > "$NODE_DIR/pids"
echo "node up: SuperNode pid $NODE_PID ($SUPERLINK), logs in $NODE_DIR/logs"
wait "$NODE_PID" || true
