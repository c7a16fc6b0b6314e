#!/usr/bin/env bash
# A throw-away single-node SLURM cluster for CI and the launcher tests (Debian's slurm-wlm + munge).
#
#   launch/ci_slurm.sh start [DIR]   install the packages if missing (apt), write DIR/slurm.conf,
#                                    start munged, slurmctld and slurmd, wait until the node is idle
#   launch/ci_slurm.sh stop [DIR]    stop the daemons this script started (by their pid files)
#   launch/ci_slurm.sh status [DIR]  exit 0 if this script's controller is running
#
# DIR defaults to $MAGITRAIN_SLURM_DIR or /tmp/magitrain-slurm. Client commands need
# SLURM_CONF=DIR/slurm.conf (tests/test_launch_slurm.py looks there by itself). Needs root.
# Settings (measured, see docs/platform.md): proctrack/pgid (linuxproc leaks background children),
# no cgroups, no accounting, cred_expire=5 and 1 s scheduler intervals so a requeued job runs again
# within ~10 s instead of ~2 min.
set -euo pipefail

cmd=${1:-}
DIR=${2:-${MAGITRAIN_SLURM_DIR:-/tmp/magitrain-slurm}}
CONF=$DIR/slurm.conf
export SLURM_CONF=$CONF

install_packages() {
    if command -v slurmctld >/dev/null && command -v munged >/dev/null; then
        return
    fi
    echo "ci_slurm: installing munge and slurm-wlm"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq munge slurm-wlm >/dev/null
}

write_conf() {
    local host node
    host=$(hostname -s)
    node=$(slurmd -C | head -n1)
    mkdir -p "$DIR/state" "$DIR/spool"
    cat >"$CONF" <<EOF
ClusterName=magitrain-ci
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=5
ProctrackType=proctrack/pgid
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
SchedulerParameters=bf_interval=1,sched_interval=1
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
$node NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munge() {
    if pgrep -x munged >/dev/null; then
        return
    fi
    mkdir -p /run/munge
    chown munge:munge /run/munge
    chmod 0755 /run/munge
    runuser -u munge -- munged
    touch "$DIR/munged.started-here"
}

wait_idle() {
    local state
    for _ in $(seq 60); do
        state=$(sinfo -h -o %t 2>/dev/null | head -n1 || true)
        if [ "$state" = "idle" ] || [ "$state" = "mix" ] || [ "$state" = "alloc" ]; then
            echo "ci_slurm: node $state (SLURM_CONF=$CONF)"
            return 0
        fi
        sleep 0.5
    done
    echo "ci_slurm: node did not come up; logs:" >&2
    tail -n 20 "$DIR/slurmctld.log" "$DIR/slurmd.log" >&2 || true
    return 1
}

# By pid file: `scontrol ping` against a stopped controller retries for about a minute.
running() {
    [ -f "$DIR/slurmctld.pid" ] && kill -0 "$(cat "$DIR/slurmctld.pid")" 2>/dev/null
}

stop_pidfile() {
    local f=$1 pid
    [ -f "$f" ] || return 0
    pid=$(cat "$f")
    if kill "$pid" 2>/dev/null; then
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
    rm -f "$f"
}

case "$cmd" in
start)
    install_packages
    mkdir -p "$DIR"
    if running; then
        echo "ci_slurm: already running (SLURM_CONF=$CONF)"
        exit 0
    fi
    write_conf
    start_munge
    slurmctld -f "$CONF"
    slurmd -f "$CONF"
    wait_idle
    ;;
stop)
    stop_pidfile "$DIR/slurmd.pid"
    stop_pidfile "$DIR/slurmctld.pid"
    if [ -f "$DIR/munged.started-here" ]; then
        stop_pidfile /run/munge/munged.pid
        rm -f "$DIR/munged.started-here"
    fi
    echo "ci_slurm: stopped"
    ;;
status)
    running
    ;;
*)
    echo "usage: $0 start|stop|status [DIR]" >&2
    exit 2
    ;;
esac
