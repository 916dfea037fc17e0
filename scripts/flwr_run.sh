#!/usr/bin/env bash
# `flwr run` of this checkout with a local SuperLink of its own: FLWR_HOME = <checkout>/.flwr unless
# set, no per-run dependency installation (Flower would otherwise install the app's dependencies,
# a multi-GB torch build, for every run), and ports of its own: Flower's defaults, 39091 and 39093,
# are shared by every user of the machine, so without this your run may go to someone else's
# SuperLink. The ports are kept in $FLWR_HOME/local-superlink-ports, so later runs reach the
# SuperLink the first one started (it keeps running in the background); once that SuperLink has
# stopped, fresh free ports are picked. Ports you export yourself are used as they are.
#
#   scripts/flwr_run.sh [flwr run options]   e.g. --stream --run-config sim_configs/smoke_tiny.toml
#   scripts/flwr_run.sh --stop               stops this FLWR_HOME's SuperLink (nobody else's)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
export FLWR_HOME="${FLWR_HOME:-$ROOT/.flwr}"
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
mkdir -p "$FLWR_HOME"
PORTS="$FLWR_HOME/local-superlink-ports"

own_superlinks() {  # flower-superlink processes started with this FLWR_HOME (others' environments are unreadable)
  local pid
  for pid in $(pgrep -f flower-superlink || true); do
    if tr '\0' '\n' < "/proc/$pid/environ" 2>/dev/null | grep -qxF "FLWR_HOME=$FLWR_HOME"; then echo "$pid"; fi
  done
}

if [ "${1:-}" = "--stop" ]; then
  pids=$(own_superlinks)
  if [ -z "$pids" ]; then echo "no SuperLink running with FLWR_HOME=$FLWR_HOME"; exit 0; fi
  kill $pids
  echo "stopped the SuperLink of FLWR_HOME=$FLWR_HOME (pid $(echo $pids))"
  exit 0
fi

if [ -z "${FLWR_LOCAL_SUPERLINK_HTTP_API_PORT:-}" ] || [ -z "${FLWR_LOCAL_CONTROL_API_PORT:-}" ]; then
  if [ -f "$PORTS" ] && [ -n "$(own_superlinks)" ]; then
    read -r http control < "$PORTS"
  else  # two ports free now
    read -r http control < <(python "$ROOT/scripts/free_ports.py" 2)
    echo "$http $control" > "$PORTS"
  fi
  export FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=$http FLWR_LOCAL_CONTROL_API_PORT=$control
fi
echo "[flwr_run] FLWR_HOME=$FLWR_HOME, local SuperLink on ports $FLWR_LOCAL_SUPERLINK_HTTP_API_PORT" \
  "and $FLWR_LOCAL_CONTROL_API_PORT (scripts/flwr_run.sh --stop stops it)"
case " $* " in *" --stream "*) ;; *) exec flwr run "$ROOT" "$@" ;; esac

# With --stream the run's log comes here: exit non-zero unless the run says it finished (flwr run
# itself exits 0 when the ServerApp fails, and its stream can end before the run does).
log="$(mktemp "${TMPDIR:-/tmp}/flwr_run.XXXXXX")"
trap 'rm -f "$log"' EXIT
set +e
flwr run "$ROOT" "$@" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e
[ "$rc" -eq 0 ] || exit "$rc"
python "$ROOT/scripts/run_finished.py" "$log"
