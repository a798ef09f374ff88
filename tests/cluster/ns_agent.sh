#!/bin/sh
# An ssh stand-in for MPI launchers: ns_agent.sh [SSH OPTIONS] [USER@]HOST COMMAND...
#
# Like ssh, it joins COMMAND into one string and runs it with sh, here on an emulated host.
#   Open MPI: mpiexec --prtemca plm_ssh_agent ns_agent.sh --host h1:1,h2:1 --bind-to none ...
#   MPICH:    mpiexec -launcher ssh -launcher-exec ns_agent.sh -hosts h1,h2 ...
set -eu
while [ $# -gt 0 ]; do
    case "$1" in
        -[BbcDEeFIiJLlmOoPpQRSWw]) shift 2 ;;  # ssh options that take a value
        -*) shift ;;
        *) break ;;
    esac
done
[ $# -ge 2 ] || { echo "usage: $0 [ssh options] HOST COMMAND..." >&2; exit 255; }
host=${1#*@}
shift
exec "$(dirname "$0")/ns_exec.sh" "$host" sh -c "$*"
