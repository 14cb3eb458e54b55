#!/usr/bin/env bash
# Start a local kdray cluster on loopback addresses only:
#   * a Ray head node and ONE Ray worker node, two separate `ray start` processes on 127.0.0.2
#     (Ray replaces a node address of 127.0.0.1 by the machine's outward IP, so another loopback
#     address is used), with token authentication on;
#   * the Ray dashboard / Jobs API on 127.0.0.1:DASHBOARD_PORT;
#   * an MLflow tracking server on 127.0.0.1:MLFLOW_PORT (SQLite, or $KDRAY_MLFLOW_BACKEND).
#
# It writes $KDRAY_LOCAL_DIR/env.sh (source it to talk to the cluster) and prints the addresses.
# infra/local/stop.sh stops exactly what this started.
#
# Usage: infra/local/start.sh [--free-ports] [--num-cpus N] [--worker-cpus N] [-h|--help]
#
# Environment (all optional):
#   KDRAY_LOCAL_DIR        state folder (default ~/.kdray/local-cluster): token, env.sh, logs, MLflow data
#   KDRAY_NODE_IP          loopback address of both Ray nodes (default 127.0.0.2; not 127.0.0.1)
#   RAY_PORT               GCS port of the head (default 6389)
#   DASHBOARD_PORT         Ray dashboard / Jobs API port on 127.0.0.1 (default 8265)
#   RAY_CLIENT_PORT        Ray Client server port, ray://NODE_IP:PORT (default 10001)
#   MLFLOW_PORT            MLflow server port on 127.0.0.1 (default 5005)
#   HEAD_AGENT_PORT        dashboard agent HTTP port of the head (default 52365)
#   WORKER_AGENT_PORT      dashboard agent HTTP port of the worker (default 52366)
#   KDRAY_FREE_PORTS=1     same as --free-ports: ignore the port defaults and pick free ports
#   KDRAY_NUM_CPUS         CPUs of each node (default 1); KDRAY_HEAD_CPUS / KDRAY_WORKER_CPUS per node
#   KDRAY_OBJECT_STORE_MEMORY  object store bytes per node (default: Ray's choice)
#   KDRAY_MLFLOW_BACKEND   MLflow backend store URI, e.g. postgresql://user:pw@127.0.0.1:5432/mlflow
#                          (default sqlite:///$KDRAY_LOCAL_DIR/mlflow.db)
#   RAY_BIN, MLFLOW_BIN, KDRAY_PYTHON   executables (default: from PATH, else the repo's .venv)
set -Eeuo pipefail  # -E: the ERR trap (undo a half-done start) also fires inside functions

SCRIPT_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd -- "$SCRIPT_DIR/../.." && pwd)

die() { echo "start.sh: error: $*" >&2; exit 1; }
note() { echo "start.sh: $*"; }

usage() { sed -n '2,/^set -Eeuo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'; }

FREE_PORTS=${KDRAY_FREE_PORTS:-0}
NUM_CPUS=${KDRAY_NUM_CPUS:-1}
HEAD_CPUS=${KDRAY_HEAD_CPUS:-}
WORKER_CPUS=${KDRAY_WORKER_CPUS:-}
while [[ $# -gt 0 ]]; do
    case $1 in
        --free-ports) FREE_PORTS=1 ;;
        --num-cpus) [[ $# -ge 2 ]] || die "--num-cpus needs a value"; NUM_CPUS=$2; shift ;;
        --worker-cpus) [[ $# -ge 2 ]] || die "--worker-cpus needs a value"; WORKER_CPUS=$2; shift ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
    shift
done
HEAD_CPUS=${HEAD_CPUS:-$NUM_CPUS}
WORKER_CPUS=${WORKER_CPUS:-$NUM_CPUS}
for n in "$HEAD_CPUS" "$WORKER_CPUS"; do
    [[ $n =~ ^[0-9]+$ ]] || die "CPU counts must be whole numbers >= 0, got '$n'"
done

STATE_DIR=${KDRAY_LOCAL_DIR:-$HOME/.kdray/local-cluster}
NODE_IP=${KDRAY_NODE_IP:-127.0.0.2}
[[ $NODE_IP =~ ^127\.[0-9]+\.[0-9]+\.[0-9]+$ && $NODE_IP != 127.0.0.1 ]] ||
    die "KDRAY_NODE_IP must be a loopback address other than 127.0.0.1 (e.g. 127.0.0.2), got '$NODE_IP'"

# --- executables -------------------------------------------------------------------------------
find_bin() {  # NAME: from PATH, else the repo's virtual environment
    local found
    if found=$(command -v "$1" 2>/dev/null); then
        echo "$found"
    elif [[ -x $REPO_DIR/.venv/bin/$1 ]]; then
        echo "$REPO_DIR/.venv/bin/$1"
    else
        return 1
    fi
}
RAY_BIN=${RAY_BIN:-$(find_bin ray)} || die "no 'ray' executable: activate the kdray environment or set RAY_BIN"
MLFLOW_BIN=${MLFLOW_BIN:-$(find_bin mlflow)} || die "no 'mlflow' executable: activate the kdray environment or set MLFLOW_BIN"
[[ -x $RAY_BIN ]] || die "RAY_BIN=$RAY_BIN is not an executable"
[[ -x $MLFLOW_BIN ]] || die "MLFLOW_BIN=$MLFLOW_BIN is not an executable"
if [[ -z ${KDRAY_PYTHON:-} ]]; then
    KDRAY_PYTHON=$(dirname -- "$RAY_BIN")/python
    [[ -x $KDRAY_PYTHON ]] || KDRAY_PYTHON=$(command -v python3) || die "no python3 found; set KDRAY_PYTHON"
fi
# The Jobs API (`ray job submit`) needs the full dashboard, i.e. `ray[default]`; the Ray Client server
# needs `ray[client]` (grpcio). Without them the cluster still runs (`kdray search --address ...`).
deps=$("$KDRAY_PYTHON" - <<'PY'
from ray._private.utils import get_dashboard_dependency_error, get_ray_client_dependency_error
print("dashboard" if get_dashboard_dependency_error() is None else "no-dashboard")
print("client" if get_ray_client_dependency_error() is None else "no-client")
PY
) || die "cannot import ray with $KDRAY_PYTHON (set KDRAY_PYTHON to the Python of the environment of $RAY_BIN)"
HAVE_JOBS_API=1 HAVE_CLIENT=1
if [[ $deps == *no-dashboard* ]]; then
    HAVE_JOBS_API=0
    note "warning: ray[default] is not installed: the dashboard runs in minimal mode, without the Jobs API" \
         "(ray job submit) and without metrics; install it with: pip install 'ray[default]==<your ray version>'"
fi
if [[ $deps == *no-client* ]]; then
    HAVE_CLIENT=0
    note "warning: ray[client] (grpcio) is not installed: no Ray Client server (ray://) is started"
fi
command -v curl >/dev/null || die "curl is needed to wait for the MLflow server"
command -v setsid >/dev/null || die "setsid (util-linux) is needed to run the MLflow server in its own process group"

# --- refuse to start twice -----------------------------------------------------------------------
mkdir -p -- "$STATE_DIR"
chmod 700 -- "$STATE_DIR"
STATE_DIR=$(cd -- "$STATE_DIR" && pwd)
if [[ -f $STATE_DIR/ray_temp_dir || -f $STATE_DIR/mlflow.pid ]]; then
    die "a local cluster of $STATE_DIR seems to be running (or was not stopped cleanly); run infra/local/stop.sh first (KDRAY_LOCAL_DIR=$STATE_DIR)"
fi

# --- ports -------------------------------------------------------------------------------------
# One Python call checks (or, with --free-ports, picks) every port at once. A port counts as free
# when it can be bound on 0.0.0.0, i.e. on no address is anything listening on it (Ray's GCS binds
# all interfaces). With --free-ports the sockets stay open until all are picked, so they differ.
if [[ $FREE_PORTS == 1 ]]; then
    RAY_PORT=0 DASHBOARD_PORT=0 RAY_CLIENT_PORT=0 MLFLOW_PORT=0 HEAD_AGENT_PORT=0 WORKER_AGENT_PORT=0
fi
PORT_NAMES=(RAY_PORT DASHBOARD_PORT RAY_CLIENT_PORT MLFLOW_PORT HEAD_AGENT_PORT WORKER_AGENT_PORT)
PORT_VALUES=("${RAY_PORT:-6389}" "${DASHBOARD_PORT:-8265}" "${RAY_CLIENT_PORT:-10001}" "${MLFLOW_PORT:-5005}"
             "${HEAD_AGENT_PORT:-52365}" "${WORKER_AGENT_PORT:-52366}")
port_args=()
for i in "${!PORT_NAMES[@]}"; do port_args+=("${PORT_NAMES[$i]}=${PORT_VALUES[$i]}"); done
if ! port_lines=$("$KDRAY_PYTHON" - "${port_args[@]}" <<'PY'
import socket
import sys

held, chosen, busy = [], {}, []
for arg in sys.argv[1:]:
    name, _, value = arg.partition("=")
    if not value.isdigit() or not 0 <= int(value) <= 65535:
        sys.exit(f"{name} must be a port number, got {value!r}")
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # ignore TIME_WAIT leftovers
    try:
        s.bind(("0.0.0.0", int(value)))
    except OSError:
        busy.append(f"{name}={value}")
        s.close()
        continue
    held.append(s)
    chosen[name] = s.getsockname()[1]
if len(set(chosen.values())) != len(chosen):
    sys.exit("the same port is given twice: " + ", ".join(f"{k}={v}" for k, v in chosen.items()))
if busy:
    sys.exit("ports in use: " + ", ".join(busy) + " (set other ports, or pass --free-ports)")
for name, port in chosen.items():
    print(f"{name}={port}")
PY
); then
    die "port check failed (see above)"
fi
while IFS='=' read -r name value; do
    printf -v "$name" '%s' "$value"
done <<<"$port_lines"

# --- state: token, Ray temp dir -----------------------------------------------------------------
umask 077
TOKEN_FILE=$STATE_DIR/ray_auth_token
"$KDRAY_PYTHON" -c 'import secrets; print(secrets.token_hex(32))' >"$TOKEN_FILE"
chmod 600 -- "$TOKEN_FILE"
RAY_AUTH_TOKEN=$(<"$TOKEN_FILE")
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN
# RAY_AUTH_TOKEN wins over ~/.ray/auth_token; an address from the caller's environment must not leak in.
unset RAY_ADDRESS RAY_API_SERVER_ADDRESS RAY_AUTH_TOKEN_PATH
# Ray processes (and so the drivers of `ray job submit` jobs) inherit this.
export MLFLOW_TRACKING_URI="http://127.0.0.1:$MLFLOW_PORT"

# Short and unique: Ray's socket paths live under it (Unix socket paths are limited to 107 bytes),
# and stop.sh finds this cluster's processes by it.
RAY_TEMP_DIR=$(mktemp -d /tmp/kdray-ray-XXXXXX)
echo "$RAY_TEMP_DIR" >"$STATE_DIR/ray_temp_dir"
# One temp dir per node: two nodes sharing a session dir on one machine share runtime_resources/,
# and one node's runtime-env agent then deletes a working_dir the other node still uses (a job
# submitted with --working-dir loses its current directory).
mkdir -p -- "$RAY_TEMP_DIR/head" "$RAY_TEMP_DIR/worker"
mkdir -p -- "$STATE_DIR/logs" "$STATE_DIR/artifacts"

undo_start() {  # stop whatever was started so far; the state folder is ready for the next start
    trap - ERR
    echo "start.sh: stopping what was started" >&2
    KDRAY_LOCAL_DIR=$STATE_DIR "$SCRIPT_DIR/stop.sh" >&2 || true
}
on_error() {  # EXIT_CODE LINE
    echo "start.sh: error (exit $1) at line $2" >&2
    undo_start
    exit "$1"
}
trap 'on_error "$?" "$LINENO"' ERR

fail_with_log() {  # LOGFILE MESSAGE
    echo "start.sh: error: $2" >&2
    echo "---- last lines of $1 ----" >&2
    tail -n 40 -- "$1" >&2 || true
    undo_start
    exit 1
}

cat >"$STATE_DIR/ports.env" <<EOF
NODE_IP=$NODE_IP
RAY_PORT=$RAY_PORT
DASHBOARD_PORT=$DASHBOARD_PORT
RAY_CLIENT_PORT=$RAY_CLIENT_PORT
MLFLOW_PORT=$MLFLOW_PORT
HEAD_AGENT_PORT=$HEAD_AGENT_PORT
WORKER_AGENT_PORT=$WORKER_AGENT_PORT
EOF

head_extra_args=()
if ((HAVE_JOBS_API)); then
    head_extra_args+=(--include-dashboard true)  # fail rather than silently start without the Jobs API
fi
if ((HAVE_CLIENT)); then
    head_extra_args+=(--ray-client-server-port "$RAY_CLIENT_PORT")
fi
common_ray_args=(--node-ip-address "$NODE_IP" --disable-usage-stats
                 --log-style record --log-color false
                 --min-worker-port "${KDRAY_MIN_WORKER_PORT:-0}" --max-worker-port "${KDRAY_MAX_WORKER_PORT:-0}")
if [[ -n ${KDRAY_OBJECT_STORE_MEMORY:-} ]]; then
    common_ray_args+=(--object-store-memory "$KDRAY_OBJECT_STORE_MEMORY")
fi

# --- Ray head ----------------------------------------------------------------------------------
note "starting the Ray head on $NODE_IP:$RAY_PORT ($HEAD_CPUS CPU) ..."
if ! "$RAY_BIN" start --head --port "$RAY_PORT" --num-cpus "$HEAD_CPUS" --num-gpus 0 \
        --dashboard-host 127.0.0.1 --dashboard-port "$DASHBOARD_PORT" \
        --dashboard-agent-listen-port "$HEAD_AGENT_PORT" "${head_extra_args[@]}" \
        --temp-dir "$RAY_TEMP_DIR/head" "${common_ray_args[@]}" >"$STATE_DIR/logs/ray-head.log" 2>&1 </dev/null; then
    fail_with_log "$STATE_DIR/logs/ray-head.log" "ray start --head failed"
fi
# The dashboard moves to another port when its port is taken (a race with the check above); use the
# address Ray reports.
reported=$(grep -Eo 'http://127\.0\.0\.1:[0-9]+' "$STATE_DIR/logs/ray-head.log" | tail -n 1 || true)
if [[ -n $reported && $reported != "http://127.0.0.1:$DASHBOARD_PORT" ]]; then
    note "warning: the dashboard came up on $reported instead of port $DASHBOARD_PORT"
    DASHBOARD_PORT=${reported##*:}
    sed -i "s/^DASHBOARD_PORT=.*/DASHBOARD_PORT=$DASHBOARD_PORT/" "$STATE_DIR/ports.env"
fi

# --- Ray worker --------------------------------------------------------------------------------
note "starting the Ray worker node ($WORKER_CPUS CPU) ..."
if ! "$RAY_BIN" start --address "$NODE_IP:$RAY_PORT" --num-cpus "$WORKER_CPUS" --num-gpus 0 \
        --dashboard-agent-listen-port "$WORKER_AGENT_PORT" \
        --temp-dir "$RAY_TEMP_DIR/worker" "${common_ray_args[@]}" >"$STATE_DIR/logs/ray-worker.log" 2>&1 </dev/null; then
    fail_with_log "$STATE_DIR/logs/ray-worker.log" "ray start (worker) failed"
fi

# --- MLflow ------------------------------------------------------------------------------------
MLFLOW_BACKEND=${KDRAY_MLFLOW_BACKEND:-sqlite:///$STATE_DIR/mlflow.db}
# never print a password of a database URI
backend_shown=$(sed -E 's#(://[^:/@]+):[^@]*@#\1:***@#' <<<"$MLFLOW_BACKEND")
note "starting the MLflow server on 127.0.0.1:$MLFLOW_PORT (backend $backend_shown) ..."
# setsid: its own process group (gunicorn/uvicorn workers included), so stop.sh can end all of it.
# MLflow's server-side job runner (GenAI evaluation jobs, ~7 huey processes) is not used by kdray.
MLFLOW_SERVER_ENABLE_JOB_EXECUTION=${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false} \
setsid "$MLFLOW_BIN" server --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1 \
    --backend-store-uri "$MLFLOW_BACKEND" --artifacts-destination "$STATE_DIR/artifacts" \
    --allowed-hosts "127.0.0.1:$MLFLOW_PORT,localhost:$MLFLOW_PORT" \
    >"$STATE_DIR/logs/mlflow.log" 2>&1 </dev/null &
echo $! >"$STATE_DIR/mlflow.pid"

# --- wait until everything answers ---------------------------------------------------------------
deadline=$((SECONDS + ${KDRAY_START_TIMEOUT:-180}))
mlflow_up=0 nodes=0
while ((SECONDS < deadline)); do
    if ((mlflow_up == 0)) && curl -fs -o /dev/null --max-time 2 "http://127.0.0.1:$MLFLOW_PORT/health"; then
        mlflow_up=1
    fi
    if ((nodes < 2)); then
        # `ray status` lists each alive node as " 1 node_<id>" under "Active:"
        nodes=$("$RAY_BIN" status --address "$NODE_IP:$RAY_PORT" 2>/dev/null | grep -cE '^ +1 node_' || true)
    fi
    ((mlflow_up == 1 && nodes >= 2)) && break
    if ! kill -0 "$(<"$STATE_DIR/mlflow.pid")" 2>/dev/null; then
        fail_with_log "$STATE_DIR/logs/mlflow.log" "the MLflow server exited"
    fi
    sleep 2
done
((nodes >= 2)) || fail_with_log "$STATE_DIR/logs/ray-worker.log" "only $nodes Ray node(s) came up"
((mlflow_up == 1)) || fail_with_log "$STATE_DIR/logs/mlflow.log" "MLflow did not answer /health"
trap - ERR

# --- env.sh ------------------------------------------------------------------------------------
# The token stays in its 0600 file; env.sh reads it when sourced.
{
    echo "# Written by infra/local/start.sh on $(date -u +%Y-%m-%dT%H:%M:%SZ). Source it:  . $STATE_DIR/env.sh"
    echo "export KDRAY_LOCAL_DIR='$STATE_DIR'"
    echo "export RAY_ADDRESS='$NODE_IP:$RAY_PORT'"
    echo "export RAY_AUTH_MODE=token"
    echo "RAY_AUTH_TOKEN=\$(cat '$TOKEN_FILE')"
    echo "export RAY_AUTH_TOKEN"
    echo "export RAY_API_SERVER_ADDRESS='http://127.0.0.1:$DASHBOARD_PORT'"
    echo "export KDRAY_RAY_DASHBOARD_URL='http://127.0.0.1:$DASHBOARD_PORT'"
    if ((HAVE_CLIENT)); then
        echo "export KDRAY_RAY_CLIENT_ADDRESS='ray://$NODE_IP:$RAY_CLIENT_PORT'"
    fi
    echo "export MLFLOW_TRACKING_URI='http://127.0.0.1:$MLFLOW_PORT'"
} >"$STATE_DIR/env.sh"
chmod 600 -- "$STATE_DIR/env.sh"

client_line="ray://$NODE_IP:$RAY_CLIENT_PORT"
((HAVE_CLIENT)) || client_line="not started (needs ray[client])"
jobs_note=""
((HAVE_JOBS_API)) || jobs_note="  (minimal: no Jobs API without ray[default])"
cat <<EOF

kdray local cluster is up (state: $STATE_DIR)
  Ray GCS (--address)   $NODE_IP:$RAY_PORT   head $HEAD_CPUS CPU + worker $WORKER_CPUS CPU, token auth on
  Ray dashboard / Jobs  http://127.0.0.1:$DASHBOARD_PORT$jobs_note
  Ray Client            $client_line
  MLflow                http://127.0.0.1:$MLFLOW_PORT
  Ray temp dir          $RAY_TEMP_DIR
  logs                  $STATE_DIR/logs

Use it:
  . $STATE_DIR/env.sh
  ray status
  kdray search search_spaces/quickstart.yaml --address $NODE_IP:$RAY_PORT
EOF
if ((HAVE_JOBS_API)); then
    echo "  ray job submit --address http://127.0.0.1:$DASHBOARD_PORT --working-dir . -- kdray search search_spaces/quickstart.yaml --address auto"
fi
cat <<EOF
Stop it:
  KDRAY_LOCAL_DIR=$STATE_DIR $SCRIPT_DIR/stop.sh
EOF
