#!/usr/bin/env bash
# Stop the local kdray cluster that infra/local/start.sh started for $KDRAY_LOCAL_DIR
# (default ~/.kdray/local-cluster): its two Ray nodes and its MLflow server, and nothing else.
#
# `ray stop` is NOT used: it ends every Ray process of this user on the machine, including other
# clusters. Instead this cluster's Ray processes are found by its unique temp dir (/tmp/kdray-ray-*):
# the processes that name it on their command line, those with a file open under it (Ray workers
# rename themselves "ray::..." but keep their log files there open), and the children of both.
# MLflow runs in its own process group, whose id start.sh saved.
#
# Idempotent: running it again, or with nothing running, does nothing and exits 0.
# Keeps the MLflow data (mlflow.db, artifacts/) and logs/ in the state folder.
#
# Environment: KDRAY_LOCAL_DIR (state folder), KDRAY_STOP_GRACE (seconds before SIGKILL, default 15).
set -euo pipefail

STATE_DIR=${KDRAY_LOCAL_DIR:-$HOME/.kdray/local-cluster}
GRACE=${KDRAY_STOP_GRACE:-15}

note() { echo "stop.sh: $*"; }

if [[ ! -d $STATE_DIR ]]; then
    note "no state folder $STATE_DIR: nothing to stop"
    exit 0
fi
STATE_DIR=$(cd -- "$STATE_DIR" && pwd)

alive() {  # PID...: print those still running (zombies count as gone)
    local pid state
    for pid in "$@"; do
        state=$(ps -o stat= -p "$pid" 2>/dev/null || true)
        [[ -n $state && $state != Z* ]] && echo "$pid"
    done
    return 0
}

terminate() {  # WHAT PID...: SIGTERM, wait up to GRACE seconds, then SIGKILL what is left
    local what=$1 left waited=0
    shift
    [[ $# -gt 0 ]] || return 0
    kill -TERM "$@" 2>/dev/null || true
    while :; do
        mapfile -t left < <(alive "$@")
        [[ ${#left[@]} -eq 0 ]] && break
        if ((waited >= GRACE * 2)); then
            note "$what: ${#left[@]} process(es) still running after ${GRACE}s, sending SIGKILL:" \
                 "$(ps -o comm= -p "$(IFS=,; echo "${left[*]}")" | tr '\n' ' ')"
            kill -KILL "${left[@]}" 2>/dev/null || true
            sleep 1
            break
        fi
        sleep 0.5
        waited=$((waited + 1))
    done
}

with_descendants() {  # PID...: these processes and all their descendants
    local pid ppid grew=1
    local -A seen=()
    for pid in "$@"; do seen[$pid]=1; done
    while ((grew)); do
        grew=0
        while read -r pid ppid; do
            if [[ -n ${seen[$ppid]:-} && -z ${seen[$pid]:-} ]]; then
                seen[$pid]=1
                grew=1
            fi
        done < <(ps -e -o pid=,ppid=)
    done
    printf '%s\n' "${!seen[@]}"
}

# --- Ray -----------------------------------------------------------------------------------------
ray_pids() {  # TEMP_DIR: this cluster's Ray processes and all their descendants
    local tmp=$1 pid
    local -a found=()
    # 1. the temp dir on the command line (gcs_server, raylet, dashboard, agents, log monitor ...)
    mapfile -t -O "${#found[@]}" found < <(pgrep -u "$(id -u)" -f -- "$tmp" || true)
    # 2. a file open under the temp dir (workers titled "ray::IDLE", "ray::ImplicitFunc" ...)
    mapfile -t -O "${#found[@]}" found < <(
        find /proc/[0-9]*/fd -maxdepth 1 -lname "$tmp/*" 2>/dev/null | cut -d/ -f3 | sort -u)
    [[ ${#found[@]} -gt 0 ]] || return 0
    # 3. and their descendants
    while read -r pid; do
        [[ $pid != "$$" && $pid != "$BASHPID" ]] && echo "$pid"
    done < <(with_descendants "${found[@]}")
    return 0
}

stopped_any=0
if [[ -f $STATE_DIR/ray_temp_dir ]]; then
    RAY_TEMP_DIR=$(<"$STATE_DIR/ray_temp_dir")
    # only ever a folder start.sh made
    if [[ $RAY_TEMP_DIR =~ ^/tmp/kdray-ray-[A-Za-z0-9]+$ ]]; then
        mapfile -t pids < <(ray_pids "$RAY_TEMP_DIR")
        if [[ ${#pids[@]} -gt 0 ]]; then
            note "stopping ${#pids[@]} Ray process(es) of $RAY_TEMP_DIR"
            # As `ray stop` does: the GCS last, so raylets and workers can still reach it while exiting.
            gcs=() others=()
            for pid in "${pids[@]}"; do
                if [[ $(ps -o comm= -p "$pid" 2>/dev/null || true) == gcs_server ]]; then
                    gcs+=("$pid")
                else
                    others+=("$pid")
                fi
            done
            terminate "Ray" "${others[@]}"
            terminate "Ray GCS" "${gcs[@]}"
            # late children (a worker that was being started)
            mapfile -t pids < <(ray_pids "$RAY_TEMP_DIR")
            terminate "Ray" "${pids[@]}"
            stopped_any=1
        else
            note "no Ray processes of $RAY_TEMP_DIR are running"
        fi
        mapfile -t pids < <(ray_pids "$RAY_TEMP_DIR")
        if [[ ${#pids[@]} -gt 0 ]]; then
            note "error: Ray processes of $RAY_TEMP_DIR are still running: ${pids[*]}; state kept, run stop.sh again"
            exit 1
        fi
        rm -rf -- "$RAY_TEMP_DIR"
    else
        note "warning: ignoring unexpected Ray temp dir '$RAY_TEMP_DIR' in $STATE_DIR/ray_temp_dir"
    fi
    rm -f -- "$STATE_DIR/ray_temp_dir"
fi

# --- MLflow --------------------------------------------------------------------------------------
if [[ -f $STATE_DIR/mlflow.pid ]]; then
    pid=$(<"$STATE_DIR/mlflow.pid")
    cmd=$(tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline" || true)
    # only if that pid is still our server (not a reused pid)
    if [[ $pid =~ ^[0-9]+$ && $cmd == *mlflow*server*"$STATE_DIR/artifacts"* ]]; then
        pgid=$(ps -o pgid= -p "$pid" | tr -d ' ' || true)
        if [[ $pgid == "$pid" ]]; then
            mapfile -t group < <(pgrep -g "$pgid" || true)
            note "stopping the MLflow server (process group $pgid, ${#group[@]} process(es))"
            kill -TERM -- "-$pgid" 2>/dev/null || true
            terminate "MLflow" "${group[@]}"
        else
            # not a group leader (started some other way): the process and its descendants
            mapfile -t group < <(with_descendants "$pid")
            note "stopping the MLflow server (pid $pid, ${#group[@]} process(es))"
            terminate "MLflow" "${group[@]}"
        fi
        stopped_any=1
    else
        note "the MLflow server (pid $pid) is not running"
    fi
    rm -f -- "$STATE_DIR/mlflow.pid"
fi

# the token and env.sh belong to the stopped cluster; data and logs stay
rm -f -- "$STATE_DIR/ray_auth_token" "$STATE_DIR/env.sh" "$STATE_DIR/ports.env"
if ((stopped_any)); then
    note "stopped (MLflow data and logs kept in $STATE_DIR)"
else
    note "nothing was running"
fi
