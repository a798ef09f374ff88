#!/bin/sh
# make-hostfile.sh OUT SLOTS NODE...: write an Open MPI hostfile with SLOTS ranks on each NODE.
#
#   make-hostfile.sh /tmp/hostfile 1 worker1 worker2 worker3
#
# Waits (up to $DDP_WAIT_TIMEOUT s, default 120) until every NODE's name resolves, because
# containers can start before their peers are known to the network's DNS. Writes OUT atomically.
set -eu

die() { echo "make-hostfile.sh: error: $*" >&2; exit 2; }

[ $# -ge 3 ] || die "usage: make-hostfile.sh OUT SLOTS NODE..."
out="$1" slots="$2"
shift 2
case "$slots" in
    ''|*[!0-9]*|0*) die "SLOTS must be a positive integer, got '$slots'" ;;
esac

deadline=$(( $(date +%s) + ${DDP_WAIT_TIMEOUT:-120} ))
tmp="$out.tmp.$$"
: >"$tmp"
for node in "$@"; do
    case "$node" in
        ''|-*|*[!A-Za-z0-9._-]*) rm -f "$tmp"; die "bad node name '$node'" ;;
    esac
    until getent hosts "$node" >/dev/null; do
        if [ "$(date +%s)" -ge "$deadline" ]; then
            rm -f "$tmp"
            die "node '$node' does not resolve after ${DDP_WAIT_TIMEOUT:-120} s"
        fi
        sleep 1
    done
    printf '%s slots=%s\n' "$node" "$slots" >>"$tmp"
done
mv "$tmp" "$out"
