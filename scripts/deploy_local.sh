#!/usr/bin/env bash
# Real deployment on one machine: a SuperLink and N SuperNodes as separate processes (as they
# would run on separate machines), then the app run on them with `flwr run`. Everything stops
# when the run ends (or on Ctrl-C).
#
#   scripts/deploy_local.sh [--nodes N] [--port P] [--run-config FILE] [--set 'k=v k2=v2']
#                           [--tls-dir DIR | --insecure] [--flwr-home DIR] [--database FILE] [--netns]
#                           [--cold | --idle-poll S]
#
# Each node is started by scripts/start_node.sh (SuperNode + warm worker, state and logs in
# $FLWR_HOME/nodes/<i>: logs/supernode.log, logs/worker.log); --cold starts plain SuperNodes whose
# every message imports torch and loads the bottom, --idle-poll S sets the nodes' idle poll.
#
# --tls-dir DIR expects ca.crt, server.pem and server.key (server cert valid for 127.0.0.1 /
# localhost); scripts/make_certs.sh creates a self-signed set. With it everything is secured:
#   * Flower's links (SuperLink <-> SuperNodes, the flwr CLI) use TLS;
#   * Flower's SuperNode authentication is on: the SuperLink runs with --enable-supernode-auth and
#     each SuperNode gets its own EC key pair ($FLWR_HOME/keys), registered with `flwr supernode register`;
#   * the step stream uses TLS with the same certificate (run config stream-tls-cert / stream-tls-key)
#     and each node trusts only the given CA (node config stream-ca);
#   * step-stream frames are keyed by node keys (run config stream-secret-file, node config
#     stream-key-file): a session token read anywhere is useless without its node's key.
# Without --tls-dir the script refuses to run unless --insecure is given explicitly.
# --port P is the SuperLink's port (default: a free one; a port already in use is refused); each
# SuperNode gets a free port of its own.
# --database FILE keeps the SuperLink's state in FILE, so a restarted SuperLink still knows its nodes.
# --netns (root, iproute2) runs it as separate hosts: the SuperLink, ServerApp and `flwr` CLI in one
# network namespace at 10.77.0.1, SuperNode i in its own at 10.77.0.(i+2), joined by veth pairs on a
# bridge; nothing reaches another namespace's loopback, so every address must be the real one. The
# step stream binds and is advertised at 10.77.0.1 (the certificate must name it:
# scripts/make_certs.sh DIR 10.77.0.1). $FLWR_HOME/netns lists "hub <ns>" and "node <i> <ns> <link>"
# (`ip -n <ns> link set <link> down` cuts a node off). The namespaces go when the script ends.
set -euo pipefail
cd "$(dirname "$0")/.."

NODES=2 PORT="" RUN_CONFIG="" SETS="" TLS_DIR="" INSECURE=0 FLWR_HOME_DIR="" DATABASE="" NETNS=0 NODE_MODE=()
while [ $# -gt 0 ]; do
  case "$1" in
    --nodes) NODES=$2; shift 2 ;;
    --port) PORT=$2; shift 2 ;;
    --run-config) RUN_CONFIG=$2; shift 2 ;;
    --set) SETS=$2; shift 2 ;;
    --tls-dir) TLS_DIR=$2; shift 2 ;;
    --insecure) INSECURE=1; shift ;;
    --flwr-home) FLWR_HOME_DIR=$2; shift 2 ;;
    --database) DATABASE=$2; shift 2 ;;
    --netns) NETNS=1; shift ;;
    --cold) NODE_MODE=(--cold); shift ;;
    --idle-poll) NODE_MODE=(--idle-poll "$2"); shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
if [ -z "$TLS_DIR" ] && [ "$INSECURE" -ne 1 ]; then
  echo "give --tls-dir DIR (ca.crt, server.pem, server.key) or ask for --insecure explicitly" >&2
  exit 2
fi

# Ports: the SuperLink's (--port, else a free one) and one per SuperNode, all free now (another
# user's SuperLink on a fixed port would otherwise answer for ours).
HOST=127.0.0.1
if [ -z "$PORT" ]; then
  read -r PORT < <(python scripts/free_ports.py 1)
elif [ "$NETNS" -eq 0 ] && (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then
  echo "--port $PORT: something already listens on 127.0.0.1:$PORT; give another port or leave --port out" >&2
  exit 2
fi
read -r -a NODE_PORTS < <(python scripts/free_ports.py "$NODES")

export FLWR_HOME="${FLWR_HOME_DIR:-$(mktemp -d /tmp/hosl-deploy.XXXXXX)}"
OWN_HOME=0; [ -n "$FLWR_HOME_DIR" ] || OWN_HOME=1  # a temporary home of ours: removed after a run that ended well
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
KEYS="$FLWR_HOME/keys"
mkdir -p "$FLWR_HOME/logs" "$KEYS" && chmod 700 "$KEYS"
PIDS=() NAMESPACES=()
cleanup() {
  local status=$?
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  for ns in "${NAMESPACES[@]}"; do ip netns del "$ns" 2>/dev/null || true; done
  if [ "$OWN_HOME" -eq 1 ] && [ "$status" -eq 0 ]; then
    rm -rf "$FLWR_HOME"
  elif [ "$OWN_HOME" -eq 1 ]; then
    echo "logs kept in $FLWR_HOME/logs (remove the folder when done)" >&2
  fi
}
trap cleanup EXIT INT TERM

# Where each part runs: here, or (--netns) in its own network namespace.
IN_HUB=() IN_NODE=()
if [ "$NETNS" -eq 1 ]; then
  HOST=10.77.0.1 HUB="hosl$$-hub"
  ip netns add "$HUB" || { echo "--netns: cannot create network namespaces here (needs root and iproute2)" >&2; exit 3; }
  NAMESPACES+=("$HUB")
  ip -n "$HUB" link set lo up
  ip -n "$HUB" link add br0 type bridge
  ip -n "$HUB" addr add "$HOST/24" dev br0
  ip -n "$HUB" link set br0 up
  IN_HUB=(ip netns exec "$HUB")
  echo "hub $HUB" > "$FLWR_HOME/netns"
  for ((i = 0; i < NODES; i++)); do
    ns="hosl$$-n$i"
    ip netns add "$ns" && NAMESPACES+=("$ns")
    ip -n "$ns" link set lo up
    ip link add "eth$i" netns "$ns" type veth peer name "port$i" netns "$HUB"
    ip -n "$ns" addr add "10.77.0.$((i + 2))/24" dev "eth$i"
    ip -n "$ns" link set "eth$i" up
    ip -n "$HUB" link set "port$i" master br0
    ip -n "$HUB" link set "port$i" up
    IN_NODE[i]="ip netns exec $ns"
    echo "node $i $ns eth$i" >> "$FLWR_HOME/netns"
  done
  SETS="stream-host=$HOST $SETS"
fi

NODE_EXTRA=()
if [ -n "$TLS_DIR" ]; then
  TLS_DIR=$(cd "$TLS_DIR" && pwd)
  LINK_SEC=(--ssl-ca-certfile "$TLS_DIR/ca.crt" --ssl-certfile "$TLS_DIR/server.pem" --ssl-keyfile "$TLS_DIR/server.key"
            --enable-supernode-auth)
  NODE_SEC=(--root-certificates "$TLS_DIR/ca.crt")
  CONN_SEC="root-certificates = \"$TLS_DIR/ca.crt\""
  python scripts/supernode_keys.py "$KEYS" "$NODES"
  python -m fl_app.frame_auth secret "$KEYS/stream.secret"
  for ((i = 0; i < NODES; i++)); do
    python -m fl_app.frame_auth node-key "$KEYS/stream.secret" "$i" "$KEYS/stream-node-$i.key"
    NODE_EXTRA[i]="stream-ca='$TLS_DIR/ca.crt' stream-key-file='$KEYS/stream-node-$i.key'"
  done
  SETS="stream-tls-cert=$TLS_DIR/server.pem stream-tls-key=$TLS_DIR/server.key stream-secret-file=$KEYS/stream.secret $SETS"
else
  LINK_SEC=(--insecure) NODE_SEC=(--insecure) CONN_SEC="insecure = true"
fi
LINK_STATE=()
if [ -n "$DATABASE" ]; then LINK_STATE=(--database "$DATABASE"); fi

cat > "$FLWR_HOME/config.toml" <<EOF
[superlink]
default = "deploy"

[superlink.deploy]
address = "$HOST:$PORT"
$CONN_SEC
EOF

# flwr takes a TOML file or key=value pairs, not both: merge them into one checked file.
# shellcheck disable=SC2086
python -m fl_app.config_cli $RUN_CONFIG $SETS > "$FLWR_HOME/run-config.toml"

"${IN_HUB[@]}" flower-superlink "${LINK_SEC[@]}" "${LINK_STATE[@]}" --host "$HOST" --port "$PORT" \
  --disable-runtime-dependency-installation > "$FLWR_HOME/logs/superlink.log" 2>&1 &
PIDS+=($!)
# Wait for the SuperLink to accept connections (a loaded machine can take far longer than a few seconds).
LINK_UP=""
echo "starting the SuperLink on $HOST:$PORT (up to 2 minutes on a loaded machine)"
for tick in $(seq 1 240); do
  "${IN_HUB[@]}" bash -c "exec 3<>/dev/tcp/$HOST/$PORT" 2>/dev/null && { LINK_UP=1; break; }
  kill -0 "${PIDS[0]}" 2>/dev/null || { echo "SuperLink exited; see $FLWR_HOME/logs/superlink.log" >&2; exit 1; }
  [ $((tick % 60)) -eq 0 ] && echo "still waiting for the SuperLink ($((tick / 2)) s)"
  sleep 0.5
done
[ -n "$LINK_UP" ] || { echo "SuperLink not accepting connections on $HOST:$PORT after 120 s; see $FLWR_HOME/logs/superlink.log" >&2; exit 1; }

for ((i = 0; i < NODES; i++)); do
  NODE_AUTH=()
  if [ -n "$TLS_DIR" ]; then  # only registered SuperNodes may connect
    "${IN_HUB[@]}" flwr supernode register "$KEYS/supernode-$i.pub" deploy > "$FLWR_HOME/logs/register-$i.log" 2>&1 \
      || { echo "registering SuperNode $i failed; see $FLWR_HOME/logs/register-$i.log" >&2; exit 1; }
    NODE_AUTH=(--auth-key "$KEYS/supernode-$i")
  fi
  # shellcheck disable=SC2086  # IN_NODE[i]: "ip netns exec <ns>" or nothing
  ${IN_NODE[i]:-} bash scripts/start_node.sh "${NODE_SEC[@]}" "${NODE_AUTH[@]}" "${NODE_MODE[@]}" --superlink "$HOST:$PORT" \
    --port "${NODE_PORTS[i]}" --dir "$FLWR_HOME/nodes/$i" \
    --node-config "partition-id=$i num-partitions=$NODES ${NODE_EXTRA[i]:-}" > "$FLWR_HOME/logs/node-$i.log" 2>&1 &
  PIDS+=($!)
done
sleep 2  # let the SuperNodes register
echo "SuperLink $HOST:$PORT, $NODES SuperNodes, logs in $FLWR_HOME/logs" \
  "$([ "$OWN_HOME" -eq 1 ] && echo '(a temporary folder, removed after a run that ends well; --flwr-home DIR keeps it)')"
"${IN_HUB[@]}" flwr run . deploy --stream --run-config "$FLWR_HOME/run-config.toml" 2>&1 | tee "$FLWR_HOME/logs/run.log"
# `flwr run --stream` can return before the run ends (its log stream may attach late): keep the
# SuperLink and SuperNodes up until the SuperLink reports the run finished.
RUN_ID=$(grep -o 'Successfully started run [0-9]*' "$FLWR_HOME/logs/run.log" | grep -o '[0-9]*$' || true)
if [ -n "$RUN_ID" ]; then
  for _ in $(seq 1 600); do
    "${IN_HUB[@]}" flwr ls deploy --run-id "$RUN_ID" --format json > "$FLWR_HOME/logs/ls.json" 2>&1; grep -q '"status": "finished' "$FLWR_HOME/logs/ls.json" && break
    sleep 2
  done
fi
python scripts/run_finished.py "$FLWR_HOME/logs/run.log" "$FLWR_HOME/run-config.toml"  # non-zero, saying why, unless finished
