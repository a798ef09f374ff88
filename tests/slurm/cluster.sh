#!/usr/bin/env bash
# A one-node Slurm cluster started by hand (munged, slurmctld, slurmd), private to one directory.
#
#   tests/slurm/cluster.sh up DIR      # start it; then: export SLURM_CONF=DIR/slurm.conf
#   tests/slurm/cluster.sh down DIR    # stop every daemon it started
#
# Everything lives in DIR: the munge key and socket, the state, the logs, the pid files; the ports are
# picked free, so two clusters (two CI runs) never meet. Needs Debian's slurmd, slurmctld, slurm-client
# and munge, and root (slurmd starts jobs as their users). No systemd, no /etc/slurm.
# Exit status of 'up': 0 ready, 1 a daemon did not come up (its log is printed).
set -euo pipefail

cmd="${1:-}"
dir="${2:-}"
[[ ( "$cmd" == up || "$cmd" == down ) && -n "$dir" ]] || { echo "usage: $0 up|down DIR" >&2; exit 2; }

stop() {
    local name pid
    for name in slurmd slurmctld munged; do
        [[ -s "$dir/$name.pid" ]] || continue
        pid="$(cat "$dir/$name.pid")"
        # Only our own daemon: the pid must still run the program we started from this directory.
        if [[ -r /proc/$pid/cmdline ]] && tr '\0' ' ' </proc/"$pid"/cmdline | grep -q -- "$dir"; then
            kill "$pid" 2>/dev/null || true
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -9 "$pid" 2>/dev/null || true
        fi
        rm -f "$dir/$name.pid"
    done
}

if [[ "$cmd" == down ]]; then
    stop
    exit 0
fi

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

fail() {
    echo "cluster.sh: $1 did not start; its log:" >&2
    tail -n 30 "$dir/$1.log" >&2 2>/dev/null || true
    stop
    exit 1
}

mkdir -p "$dir/state" "$dir/spool"
chmod 700 "$dir"
dd if=/dev/urandom of="$dir/munge.key" bs=1024 count=1 status=none
chmod 400 "$dir/munge.key"
munged --force --key-file="$dir/munge.key" --socket="$dir/munge.sock" --pid-file="$dir/munged.pid" \
    --seed-file="$dir/munged.seed" --log-file="$dir/munged.log"
for _ in $(seq 50); do [[ -S "$dir/munge.sock" ]] && break; sleep 0.1; done
[[ -S "$dir/munge.sock" ]] || fail munged

cpus="$(nproc)"
cat >"$dir/slurm.conf" <<CONF
ClusterName=ddptest
SlurmctldHost=localhost
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket=$dir/munge.sock
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
MpiDefault=none
ReturnToService=2
SchedulerType=sched/builtin
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SlurmctldTimeout=30
SlurmdTimeout=30
MinJobAge=600
NodeName=localhost CPUs=$cpus State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
CONF
export SLURM_CONF="$dir/slurm.conf"
slurmctld -i -f "$SLURM_CONF" || fail slurmctld
slurmd -N localhost -f "$SLURM_CONF" || fail slurmd
for _ in $(seq 100); do
    state="$(sinfo -h -N -o %t 2>/dev/null || true)"
    [[ "$state" == idle ]] && exit 0
    sleep 0.2
done
echo "cluster.sh: the node is '${state:-unknown}', not idle, after 20 s" >&2
fail slurmd
