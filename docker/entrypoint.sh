#!/bin/sh
# Entrypoint of the ddp image: one role per container.
#
#   entrypoint.sh worker                 run an sshd (as this user, on $DDP_SSH_PORT) for mpiexec
#   entrypoint.sh launcher [DDP_ARGS...] wait for the workers, write a hostfile, run
#                                        launch/mpirun.sh -- DDP_ARGS (default: $DDP_ARGS),
#                                        then stop the workers and exit with the run's status
#   entrypoint.sh COMMAND...             run any other command (a shell, ddp info, ...)
#
# Launcher environment:
#   DDP_WORKERS        worker names, separated by commas or spaces (required)
#   DDP_SLOTS          ranks per worker (default 1)
#   DDP_ARGS           ddp arguments when none are given, e.g. "train --dataset digits --out /shared/runs/a"
#   DDP_IFACE          network interface for MPI's TCP traffic (default: MPI's choice)
#   DDP_STOP_WORKERS   1 (default): stop the workers' sshd afterwards, so 'docker compose up' ends
#   DDP_WAIT_TIMEOUT   seconds to wait for the workers (default 120)
# Both roles use DDP_SHARED (default /shared) for the cluster's ssh keys and DDP_SSH_PORT (2222).
set -eu

here="$(cd "$(dirname "$0")" && pwd)"
mpirun="${DDP_MPIRUN:-$here/../launch/mpirun.sh}"
sshd="${DDP_SSHD:-/usr/sbin/sshd}"

die() { echo "entrypoint.sh: error: $*" >&2; exit 2; }

role="${1:-worker}"
[ $# -eq 0 ] || shift
case "$role" in
    worker)
        [ $# -eq 0 ] || die "the worker role takes no arguments, got '$*'"
        "$here/ssh-setup.sh" keys
        "$here/ssh-setup.sh" client    # Open MPI's daemons also ssh from worker to worker
        config="$("$here/ssh-setup.sh" server)"
        echo "worker $(hostname): sshd on port ${DDP_SSH_PORT:-2222}"
        exec "$sshd" -D -e -f "$config"
        ;;
    launcher)
        workers="$(echo "${DDP_WORKERS:-}" | tr ',' ' ')"
        [ -n "$(echo "$workers" | tr -d " ")" ] || die "set DDP_WORKERS to the worker names, e.g. worker1,worker2"
        if [ $# -eq 0 ]; then
            [ -n "${DDP_ARGS:-}" ] || die "give ddp arguments, or set DDP_ARGS"
            set -f  # split DDP_ARGS into words, but do not expand globs in them
            # shellcheck disable=SC2086
            set -- $DDP_ARGS
            set +f
        fi
        # As PID 1, sh ignores SIGTERM unless it traps it; 'docker stop' should not need SIGKILL.
        trap 'exit 143' TERM INT
        "$here/ssh-setup.sh" keys
        "$here/ssh-setup.sh" client
        if [ "${DDP_STOP_WORKERS:-1}" = 1 ]; then
            # Also on failure: a worker's sshd never exits by itself, and would keep 'up' running.
            # shellcheck disable=SC2086  # one word per worker
            trap '"$here/ssh-setup.sh" stop $workers' EXIT
        fi
        hostfile="$HOME/hostfile"
        # shellcheck disable=SC2086
        "$here/make-hostfile.sh" "$hostfile" "${DDP_SLOTS:-1}" $workers
        # shellcheck disable=SC2086
        "$here/ssh-setup.sh" wait $workers
        echo "launcher: $(tr '\n' ' ' <"$hostfile")"
        "$mpirun" --hostfile "$hostfile" ${DDP_IFACE:+--iface "$DDP_IFACE"} -- "$@" &
        pid=$!
        trap 'kill -TERM "$pid" 2>/dev/null' TERM INT  # mpiexec passes it on to every rank
        # A trapped signal interrupts wait; wait again until mpiexec is really gone.
        while :; do
            rc=0
            wait "$pid" || rc=$?
            kill -0 "$pid" 2>/dev/null || break
        done
        echo "launcher: ddp exited with status $rc"
        exit "$rc"
        ;;
    *)
        exec "$role" "$@"
        ;;
esac
