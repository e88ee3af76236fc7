#!/usr/bin/env bash
# A small SLURM cluster on this one host, to try launch/slurm/train.sbatch locally and for the tests
# (tests/test_slurm.py): munged, slurmctld and two slurmd (node1, node2) on 127.0.0.1, CPU-only,
# from the distribution's packages. Root only (slurmd starts each job as its user). Debian 12:
#   apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge   # SLURM 22.05
#   launch/slurm/local_cluster.sh up          # or: make slurm-up
#   export SLURM_CONF=/tmp/restorer-slurm/slurm.conf     # `up` and `env` print this line
#   sbatch --nodes 2 --ntasks-per-node 2 launch/slurm/train.sbatch --config launch/configs/cpu.yaml ...
#   launch/slurm/local_cluster.sh status      # sinfo + squeue; exit 1 when the cluster is down
#   launch/slurm/local_cluster.sh down        # cancels the jobs, stops every daemon `up` started
# `up` is idempotent (a running cluster is left as it is; a half-started one is stopped and started
# afresh). Everything lives in one state dir (config, munge key and socket, spool, logs); the host's
# /etc/slurm, /etc/munge and /etc/hosts are not touched: the nodes are named node1..nodeN with
# NodeAddr=127.0.0.1 and one slurmd port each. Containers: no cgroups needed (proctrack/linuxproc,
# task/none), no accounting database (`scontrol show job` keeps finished jobs for an hour).
# A requeued job waits cred_expire + 1 s before it may start again (SLURM's default cred_expire is
# 120 s; 5 s here) and the scheduler runs every 2 s (60 s default), so a requeue takes seconds.
# Environment: SLURM_LOCAL_DIR (state dir, default /tmp/restorer-slurm), SLURM_LOCAL_PORT (slurmctld's
# port, the nodes take the next ones; default 16817), SLURM_LOCAL_NODES (default 2).
set -euo pipefail

DIR=${SLURM_LOCAL_DIR:-/tmp/restorer-slurm}
PORT=${SLURM_LOCAL_PORT:-16817}
NODES=${SLURM_LOCAL_NODES:-2}
CONF=$DIR/slurm.conf
export SLURM_CONF=$CONF

die() {
    echo "error: local_cluster: $*" >&2
    exit 1
}

node_names() { seq -f 'node%g' 1 "$NODES"; }

pid_alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

daemons_alive() {
    pid_alive "$DIR/munge/munged.pid" && pid_alive "$DIR/slurmctld.pid" || return 1
    for node in $(node_names); do pid_alive "$DIR/slurmd-$node.pid" || return 1; done
}

nodes_ready() {
    # every node answers and none is down, drained or not responding (sinfo's '*' suffix)
    local states
    states=$(sinfo -h -N -o '%N %t' 2>/dev/null) || return 1
    [ "$(grep -c . <<<"$states")" -ge "$NODES" ] || return 1
    ! grep -qvE ' (idle|alloc|mix|comp)$' <<<"$states"
}

is_up() { [ -f "$CONF" ] && daemons_alive && scontrol ping 2>/dev/null | grep -q UP && nodes_ready; }

check_host() {
    [ "$(id -u)" = 0 ] || die "needs root (slurmd starts each job as its user); run it with sudo"
    local cmd missing=()
    for cmd in munged slurmctld slurmd sbatch scontrol sinfo squeue scancel; do
        command -v "$cmd" >/dev/null || missing+=("$cmd")
    done
    [ ${#missing[@]} = 0 ] || die "not installed: ${missing[*]} (Debian: apt-get install slurmctld slurmd slurm-client munge)"
}

write_conf() {
    local cpus mem node port=$PORT
    # the CPUs and memory slurmd itself sees (a node configured above them is drained); memory is
    # split between the nodes so that together they do not promise more than the host has
    cpus=$(slurmd -C | grep -o 'CPUs=[0-9]*' | cut -d= -f2)
    [ "$cpus" -le "$(nproc)" ] || cpus=$(nproc)
    mem=$(($(slurmd -C | grep -o 'RealMemory=[0-9]*' | cut -d= -f2) / NODES))
    cat >"$CONF" <<EOF
# written by launch/slurm/local_cluster.sh: $NODES CPU-only nodes on 127.0.0.1 for tests
ClusterName=restorer-local
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.socket,cred_expire=5
StateSaveLocation=$DIR/ctld
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
MinJobAge=3600
KillWait=10
PartitionName=local Nodes=node[1-$NODES] Default=YES MaxTime=INFINITE State=UP
EOF
    for node in $(node_names); do
        port=$((port + 1))
        echo "NodeName=$node NodeAddr=127.0.0.1 NodeHostname=localhost Port=$port CPUs=$cpus RealMemory=$mem" >>"$CONF"
        mkdir -p "$DIR/spool/$node"
    done
}

start_munge() {
    mkdir -p "$DIR/munge"
    chmod 755 "$DIR" # the socket must be reachable by every user whose job runs here
    (umask 077 && head -c 1024 /dev/urandom >"$DIR/munge/munge.key")
    chmod 400 "$DIR/munge/munge.key"
    chmod 711 "$DIR/munge"
    munged --force --socket="$DIR/munge/munge.socket" --key-file="$DIR/munge/munge.key" \
        --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munged.seed" ||
        die "munged did not start (log: $DIR/log/munged.log)"
}

wait_ready() {
    for _ in $(seq 1 120); do
        nodes_ready && return 0
        sleep 0.5
    done
    tail -n 5 "$DIR"/log/slurm*.log >&2 || true
    die "the nodes did not come up within 60 s (logs: $DIR/log)"
}

up() {
    check_host
    if is_up; then
        echo "local SLURM cluster already up ($NODES nodes, state in $DIR)"
        echo "export SLURM_CONF=$CONF"
        return 0
    fi
    down >/dev/null 2>&1 || true # a half-started cluster: stop what is left, start afresh
    local port
    for port in $(seq "$PORT" $((PORT + NODES))); do
        ! (echo >"/dev/tcp/127.0.0.1/$port") 2>/dev/null ||
            die "port $port on 127.0.0.1 is in use (SLURM_LOCAL_PORT=N chooses ports N..N+$NODES)"
    done
    rm -rf "$DIR"
    mkdir -p "$DIR/ctld" "$DIR/spool" "$DIR/log"
    start_munge
    write_conf
    slurmctld -f "$CONF" || die "slurmctld did not start (log: $DIR/log/slurmctld.log)"
    for node in $(node_names); do
        slurmd -f "$CONF" -N "$node" || die "slurmd $node did not start (log: $DIR/log/slurmd-$node.log)"
    done
    wait_ready
    echo "local SLURM cluster up: $NODES nodes (partition local), state and logs in $DIR"
    echo "export SLURM_CONF=$CONF"
}

# The processes `up` started and those they started in turn (slurmscriptd, the slurmstepd of running
# jobs): every process holding a file open under the state dir (each has its log file there).
our_pids() {
    find /proc/[0-9]*/fd -maxdepth 1 -lname "$DIR/*" 2>/dev/null | cut -d/ -f3 | sort -u | grep -vxE "$$|$BASHPID" || true
}

stop_pids() { # SIGTERM, up to 10 s, then SIGKILL
    local pid alive
    [ $# -gt 0 ] || return 0
    kill "$@" 2>/dev/null || true
    for _ in $(seq 1 50); do
        alive=0
        for pid in "$@"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        [ $alive = 1 ] || return 0
        sleep 0.2
    done
    kill -KILL "$@" 2>/dev/null || true
}

down() {
    local jobs
    if [ -f "$CONF" ] && pid_alive "$DIR/slurmctld.pid"; then
        jobs=$(squeue -h -o %i 2>/dev/null || true)
        if [ -n "$jobs" ]; then
            # shellcheck disable=SC2086
            scancel $jobs 2>/dev/null || true
            for _ in $(seq 1 50); do
                [ -z "$(squeue -h -t running,completing -o %i 2>/dev/null)" ] && break
                sleep 0.2
            done
        fi
    fi
    # shellcheck disable=SC2046
    stop_pids $(our_pids)
    echo "local SLURM cluster down (logs kept in $DIR/log)"
}

status() {
    if is_up; then
        echo "up: state in $DIR; export SLURM_CONF=$CONF"
        sinfo
        squeue
    else
        echo "down (no running cluster with state in $DIR)"
        return 1
    fi
}

case "${1:-}" in
up) up ;;
down) down ;;
status) status ;;
env) echo "export SLURM_CONF=$CONF" ;;
*)
    echo "usage: $0 up|down|status|env" >&2
    exit 2
    ;;
esac
