#!/usr/bin/env bash
# Flower simulation on a multi-node Ray cluster: a Ray head and a second Ray node (here both on
# this machine; on two machines see README "Simulation on a Ray cluster"), then `flwr run` with
# its simulation pointed at that cluster (RAY_ADDRESS: Flower 1.42 has no setting for Ray's
# address, and ray.init() joins the cluster RAY_ADDRESS names). ClientApps run as Ray actors on
# either node; the step stream listens on every interface and is advertised at the head's address.
# Only this cluster's processes are stopped afterwards (`ray stop` would stop every Ray on the machine).
#
#   scripts/ray_cluster.sh [--run-config FILE] [--set 'k=v k2=v2'] [--supernodes N]
#                          [--cpus-per-node C] [--head-ip IP] [--flwr-home DIR]
#
# --head-ip is the address ClientApps on other nodes reach the step stream at (default 127.0.0.1).
set -euo pipefail
cd "$(dirname "$0")/.."

RUN_CONFIG="sim_configs/smoke_tiny.toml" SETS="" SUPERNODES=2 CPUS=1 HEAD_IP=127.0.0.1 FLWR_HOME_DIR=""
while [ $# -gt 0 ]; do
  case "$1" in
    --run-config) RUN_CONFIG=$2; shift 2 ;;
    --set) SETS=$2; shift 2 ;;
    --supernodes) SUPERNODES=$2; shift 2 ;;
    --cpus-per-node) CPUS=$2; shift 2 ;;
    --head-ip) HEAD_IP=$2; shift 2 ;;
    --flwr-home) FLWR_HOME_DIR=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done

free_port() { python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
export FLWR_HOME="${FLWR_HOME_DIR:-$(mktemp -d /tmp/hosl-ray.XXXXXX)}"
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=$(free_port) FLWR_LOCAL_CONTROL_API_PORT=$(free_port)
RAY_PORT=$(free_port)
RAY_TMP=$(mktemp -d /tmp/rayc-XXXXXX)  # short: Ray's socket paths must fit in 107 bytes
mkdir -p "$FLWR_HOME/logs"
LOGS="$FLWR_HOME/logs"
PIDS=()
cleanup() {
  # the SuperLink `flwr run` started (found by this FLWR_HOME), then each `ray start --block`
  # (SIGTERM makes it stop what it started), then any leftover of this cluster (by its temp dir)
  for pid in $(pgrep -f flower-superlink || true); do
    tr '\0' '\n' < "/proc/$pid/environ" 2>/dev/null | grep -qx "FLWR_HOME=$FLWR_HOME" && kill "$pid" 2>/dev/null || true
  done
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  for pid in $(pgrep -f -- "$RAY_TMP" || true); do kill "$pid" 2>/dev/null || true; done
  rm -rf "$RAY_TMP"
}
trap cleanup EXIT INT TERM

NODE_ARGS=(--num-cpus "$CPUS" --num-gpus 0 --object-store-memory 300000000 --min-worker-port 0 --max-worker-port 0
           --disable-usage-stats --block)
ray start --head --node-ip-address "$HEAD_IP" --port "$RAY_PORT" --ray-client-server-port "$(free_port)" \
  --include-dashboard=false --temp-dir "$RAY_TMP" "${NODE_ARGS[@]}" > "$LOGS/ray-head.log" 2>&1 &
PIDS+=($!)
echo "head $!" > "$FLWR_HOME/ray-pids"
for _ in $(seq 1 240); do
  (exec 3<>"/dev/tcp/$HEAD_IP/$RAY_PORT") 2>/dev/null && break
  kill -0 "${PIDS[0]}" 2>/dev/null || { echo "Ray head exited; see $LOGS/ray-head.log" >&2; exit 1; }
  sleep 0.5
done
# The second node: on another machine run the same with --node-ip-address <its own address>.
ray start --address "$HEAD_IP:$RAY_PORT" --node-ip-address "$HEAD_IP" --include-log-monitor=false \
  "${NODE_ARGS[@]}" > "$LOGS/ray-node.log" 2>&1 &
PIDS+=($!)
echo "node $!" >> "$FLWR_HOME/ray-pids"
# Flower sizes its actor pool from the cluster when the run starts: wait for both raylets.
for _ in $(seq 1 240); do
  [ "$(pgrep -f -- "raylet.*$RAY_TMP" | wc -l)" -ge 2 ] && break
  kill -0 "${PIDS[1]}" 2>/dev/null || { echo "Ray node exited; see $LOGS/ray-node.log" >&2; exit 1; }
  sleep 0.5
done
sleep 3  # the second raylet registers with the head
echo "Ray cluster at $HEAD_IP:$RAY_PORT (2 nodes x $CPUS CPUs, temp dir $RAY_TMP); logs in $LOGS"

# shellcheck disable=SC2086
python -m fl_app.config "$RUN_CONFIG" stream-host=0.0.0.0 stream-advertise-host="$HEAD_IP" $SETS \
  > "$FLWR_HOME/run-config.toml"
RAY_ADDRESS="$HEAD_IP:$RAY_PORT" flwr run . --stream --run-config "$FLWR_HOME/run-config.toml" \
  --federation-config "num-supernodes=$SUPERNODES client-resources-num-cpus=$CPUS" 2>&1 | tee "$LOGS/run.log"
# `flwr run --stream` can return before the run ends: keep the cluster up until the run finishes.
RUN_ID=$(grep -o 'Successfully started run [0-9]*' "$LOGS/run.log" | grep -o '[0-9]*$' || true)
if [ -n "$RUN_ID" ]; then
  for _ in $(seq 1 1800); do
    flwr ls --run-id "$RUN_ID" --format json > "$LOGS/ls.json" 2>&1 || true
    grep -q '"status": "finished' "$LOGS/ls.json" && break
    sleep 2
  done
fi
