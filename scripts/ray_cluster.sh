#!/usr/bin/env bash
# Flower simulation on a multi-node Ray cluster: a Ray head and a second Ray node (here both on
# this machine; on two machines see README "Simulation on a Ray cluster"), then `flwr run` with
# its simulation pointed at that cluster (RAY_ADDRESS: Flower 1.42 has no setting for Ray's
# address, and ray.init() joins the cluster RAY_ADDRESS names). ClientApps run as Ray actors on
# either node; the step stream listens on every interface and is advertised at the head's address.
# Only this cluster's processes are stopped afterwards (`ray stop` would stop every Ray on the machine).
# Two machines: README, "Many clients: the scaling study and a Ray cluster".
# Exits 0 only if the run finished and completed.
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
  # each `ray start --block` (SIGTERM makes it stop what it started), then every process left with
  # this FLWR_HOME in its environment (SuperLink, simulation, actors) or this cluster's temp dir
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  local keep=" " pid=$$
  while [ "$pid" -gt 1 ]; do  # this script and whatever started it may carry the same FLWR_HOME
    keep+="$pid "
    pid=$(sed 's/.*) //' "/proc/$pid/stat" 2>/dev/null | awk '{print $2}' || echo 1)
    pid=${pid:-1}
  done
  for proc in /proc/[0-9]*; do
    pid=${proc#/proc/}
    [[ $keep == *" $pid "* ]] && continue
    if tr '\0' '\n' < "$proc/environ" 2>/dev/null | grep -qxF "FLWR_HOME=$FLWR_HOME" \
       || tr '\0' ' ' < "$proc/cmdline" 2>/dev/null | grep -qF -- "$RAY_TMP"; then
      kill "$pid" 2>/dev/null || true
    fi
  done
  rm -rf "$RAY_TMP"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
fail() { echo "$1" >&2; exit 1; }

NODE_ARGS=(--num-cpus "$CPUS" --num-gpus 0 --object-store-memory 300000000 --min-worker-port 0 --max-worker-port 0
           --disable-usage-stats --block)
ray start --head --node-ip-address "$HEAD_IP" --port "$RAY_PORT" --ray-client-server-port "$(free_port)" \
  --include-dashboard=false --temp-dir "$RAY_TMP" "${NODE_ARGS[@]}" > "$LOGS/ray-head.log" 2>&1 &
PIDS+=($!)
echo "head $!" > "$FLWR_HOME/ray-pids"
HEAD_UP=""
for _ in $(seq 1 240); do
  (exec 3<>"/dev/tcp/$HEAD_IP/$RAY_PORT") 2>/dev/null && { HEAD_UP=1; break; }
  kill -0 "${PIDS[0]}" 2>/dev/null || fail "Ray head exited; see $LOGS/ray-head.log"
  sleep 0.5
done
[ -n "$HEAD_UP" ] || fail "Ray head not listening on $HEAD_IP:$RAY_PORT after 120 s; see $LOGS/ray-head.log"
# The second node: on another machine run the same with --node-ip-address <its own address>.
ray start --address "$HEAD_IP:$RAY_PORT" --node-ip-address "$HEAD_IP" --include-log-monitor=false \
  "${NODE_ARGS[@]}" > "$LOGS/ray-node.log" 2>&1 &
PIDS+=($!)
echo "node $!" >> "$FLWR_HOME/ray-pids"
# Flower sizes its actor pool from the cluster when the run starts: wait until the head counts both nodes.
NODES_UP=""
for _ in $(seq 1 60); do
  kill -0 "${PIDS[1]}" 2>/dev/null || fail "Ray node exited; see $LOGS/ray-node.log"
  ALIVE=$(python -c 'import ray, sys; ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
print(sum(n["Alive"] for n in ray.nodes()))' "$HEAD_IP:$RAY_PORT" 2>/dev/null | tail -1 || echo 0)
  [ "$ALIVE" -ge 2 ] && { NODES_UP=1; break; }
  sleep 1
done
[ -n "$NODES_UP" ] || fail "the head does not count 2 alive nodes after 60 tries; see $LOGS/ray-*.log"
echo "Ray cluster at $HEAD_IP:$RAY_PORT (2 nodes x $CPUS CPUs, temp dir $RAY_TMP); logs in $LOGS"

# shellcheck disable=SC2086
python -m fl_app.config_cli "$RUN_CONFIG" stream-host=0.0.0.0 stream-advertise-host="$HEAD_IP" $SETS \
  > "$FLWR_HOME/run-config.toml"
RAY_ADDRESS="$HEAD_IP:$RAY_PORT" flwr run . --stream --run-config "$FLWR_HOME/run-config.toml" \
  --federation-config "num-supernodes=$SUPERNODES client-resources-num-cpus=$CPUS" 2>&1 | tee "$LOGS/run.log"
# `flwr run --stream` can return before the run ends: keep the cluster up until the run finishes.
RUN_ID=$(grep -o 'Successfully started run [0-9]*' "$LOGS/run.log" | grep -o '[0-9]*$' || true)
[ -n "$RUN_ID" ] || fail "flwr run did not start a run; see $LOGS/run.log"
for _ in $(seq 1 1800); do
  flwr ls --run-id "$RUN_ID" --format json > "$LOGS/ls.json" 2>&1 || true
  grep -q '"status": "finished:completed"' "$LOGS/ls.json" && exit 0
  grep -q '"status": "finished' "$LOGS/ls.json" && fail "run $RUN_ID ended but did not complete; see $LOGS/ls.json"
  sleep 2
done
fail "run $RUN_ID not finished after an hour; see $LOGS/ls.json"
