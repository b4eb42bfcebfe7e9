#!/usr/bin/env bash
# A real SLURM cluster on this one machine, for tests and for trying the job scripts:
# munged + slurmctld + two slurmd daemons emulating node1 and node2 (Debian's slurmd takes -N).
#
#   slurm/local_cluster.sh install   apt packages only (CI)
#   slurm/local_cluster.sh up        install if missing, write the config, start, wait for idle nodes
#   slurm/local_cluster.sh down      cancel jobs, stop the daemons, restore /etc/hosts
#   slurm/local_cluster.sh env       print the export line clients need (SLURM_CONF)
#
# Everything lives in $MOR_SLURM_DIR (default /tmp/mor-slurm); clients find the config through
# SLURM_CONF, so nothing is written to /etc/slurm. Needs root (daemons run as root, /etc/hosts).
set -euo pipefail

STATE=${MOR_SLURM_DIR:-/tmp/mor-slurm}
CONF=$STATE/slurm.conf
HOST=$(hostname -s)
CTLD_PORT=${MOR_SLURM_PORT:-6817}
NODES=(node1 node2)
HOSTS_TAG="# mor-slurm local cluster"

log() { echo "local_cluster: $*" >&2; }

install() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v munged >/dev/null; then
        return 0
    fi
    # Daemons must not start during the install (no systemd here, and we start our own).
    local made_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
        made_policy=1
    fi
    log "installing slurmctld slurmd slurm-client munge"
    export DEBIAN_FRONTEND=noninteractive
    local rc=0
    apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null \
        || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends \
                slurmctld slurmd slurm-client munge >/dev/null; } || rc=$?
    [ "$made_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
    return $rc
}

write_conf() {
    mkdir -p "$STATE"/{state,log,run}
    for n in "${NODES[@]}"; do mkdir -p "$STATE/spool/$n"; done
    local port=$((CTLD_PORT + 1))
    cat > "$CONF" <<EOF
# Written by slurm/local_cluster.sh: two emulated nodes on $HOST.
ClusterName=morlocal
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# No cgroups in this container: plain process tracking, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$STATE/log/jobcomp.txt
StateSaveLocation=$STATE/state
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdPidFile=$STATE/run/slurmd-%n.pid
SlurmdLogFile=$STATE/log/slurmd-%n.log
SlurmdSpoolDir=$STATE/spool/%n
# Finished jobs stay visible to scontrol (there is no accounting database for sacct).
MinJobAge=3600
KillWait=5
MailProg=/bin/true
EOF
    for n in "${NODES[@]}"; do
        echo "NodeName=$n NodeHostname=$HOST NodeAddr=127.0.0.1 Port=$port CPUs=2 RealMemory=4000" >> "$CONF"
        port=$((port + 1))
    done
    echo "PartitionName=debug Nodes=node[1-${#NODES[@]}] Default=YES MaxTime=INFINITE State=UP" >> "$CONF"
}

# Node names must resolve inside jobs (MASTER_ADDR comes from `scontrol show hostnames`).
# /etc/hosts may be a bind mount: edit it in place, never replace the file.
hosts_add() {
    grep -qF "$HOSTS_TAG" /etc/hosts || echo "127.0.0.1 ${NODES[*]} $HOSTS_TAG" >> /etc/hosts
}

hosts_remove() {
    if grep -qF "$HOSTS_TAG" /etc/hosts; then
        local kept
        kept=$(grep -vF "$HOSTS_TAG" /etc/hosts)
        printf '%s\n' "$kept" > /etc/hosts
    fi
}

# A stopped daemon can linger as a zombie: kill -0 succeeds on it, so look at the process state.
alive() {
    local pid=$1
    [ -r "/proc/$pid/stat" ] || return 1
    local st
    st=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) || return 1
    [ "$st" != Z ] && [ "$st" != X ]
}

start_munge() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        return 0  # already running (ours from an earlier `up`, or the machine's)
    fi
    mkdir -p /run/munge && chown munge:munge /run/munge
    [ -f /etc/munge/munge.key ] || { runuser -u munge -- /usr/sbin/mungekey --create 2>/dev/null || /usr/sbin/create-munge-key -f; }
    runuser -u munge -- /usr/sbin/munged
    touch "$STATE/run/munged.ours"
    for _ in $(seq 50); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    log "munged does not answer"; return 1
}

up() {
    install
    if [ -f "$STATE/run/slurmctld.pid" ] && alive "$(cat "$STATE/run/slurmctld.pid")"; then
        log "already up ($CONF)"; return 0
    fi
    write_conf
    hosts_add
    start_munge
    slurmctld -f "$CONF" -i
    for n in "${NODES[@]}"; do slurmd -f "$CONF" -N "$n"; done
    export SLURM_CONF=$CONF
    for _ in $(seq 150); do
        # idle on every node: "node[1-2] idle" or one line per node
        if [ "$(sinfo -h -N -o '%N %t' 2>/dev/null | grep -c ' idle$')" = "${#NODES[@]}" ]; then
            log "up: $(sinfo -h -o '%P %D %t %N')  (export SLURM_CONF=$CONF)"
            return 0
        fi
        sleep 0.2
    done
    log "nodes did not become idle; see $STATE/log"; sinfo -N >&2 || true
    return 1
}

stop_pid_file() {
    local f=$1 pid
    [ -f "$f" ] || return 0
    pid=$(cat "$f")
    if alive "$pid"; then
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 50); do alive "$pid" || break; sleep 0.1; done
        alive "$pid" && kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$f"
}

down() {
    if [ -f "$CONF" ]; then
        export SLURM_CONF=$CONF
        # Job processes outlive slurmd: cancel every job first and let their steps die.
        if scancel --quiet --user=root 2>/dev/null; then
            for _ in $(seq 50); do
                [ -z "$(squeue -h -t running,completing 2>/dev/null)" ] && break
                sleep 0.2
            done
        fi
    fi
    for n in "${NODES[@]}"; do stop_pid_file "$STATE/run/slurmd-$n.pid"; done
    stop_pid_file "$STATE/run/slurmctld.pid"
    if [ -f "$STATE/run/munged.ours" ]; then
        stop_pid_file /run/munge/munged.pid
        rm -f "$STATE/run/munged.ours"
    fi
    hosts_remove
    rm -rf "$STATE"
    log "down"
}

case "${1:-}" in
    install) install ;;
    up) up ;;
    down) down ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) echo "usage: $0 install|up|down|env" >&2; exit 64 ;;
esac
