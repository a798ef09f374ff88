#!/bin/sh
# Emulate a cluster of hosts on one machine with network namespaces (needs root and iproute2).
#
#   netns.sh up PREFIX N HOSTS_FILE   make hosts h0..h(N-1) in namespaces PREFIX-h0.., each with
#                                     eth0 on a private bridge (10.77.0.0/24), and write HOSTS_FILE
#   netns.sh down PREFIX              kill what still runs in PREFIX-* and delete the namespaces
#
# Nothing is connected to the real network: the bridge lives in its own namespace PREFIX-br.
# PREFIX must be unique per run (the tests add a random suffix) so parallel runs never collide.
# Run commands on a host with ns_exec.sh; MPI reaches the other hosts through ns_agent.sh.
set -eu

usage() { echo "usage: $0 up PREFIX N HOSTS_FILE | down PREFIX" >&2; exit 2; }

down() {
    for ns in $(ip netns list | awk '{print $1}' | grep -E "^$1-(br|h[0-9]+)\$" || true); do
        pids=$(ip netns pids "$ns" 2>/dev/null || true)
        # shellcheck disable=SC2086  # one word per pid
        [ -z "$pids" ] || kill -9 $pids 2>/dev/null || true
        ip netns del "$ns" || true
    done
}

up() {
    prefix=$1 n=$2 hosts_file=$3
    br="$prefix-br"
    ip netns add "$br"
    ip -n "$br" link add br0 type bridge
    ip -n "$br" link set br0 up
    printf '127.0.0.1\tlocalhost\n' >"$hosts_file"
    i=0
    while [ "$i" -lt "$n" ]; do
        ns="$prefix-h$i" addr="10.77.0.$((10 + i))"
        ip netns add "$ns"
        # Both ends are created inside the namespaces, so no name is ever taken in the root one.
        ip link add eth0 netns "$ns" type veth peer name "h$i" netns "$br"
        ip -n "$br" link set "h$i" master br0 up
        ip -n "$ns" addr add "$addr/24" dev eth0
        ip -n "$ns" link set eth0 up
        ip -n "$ns" link set lo up
        printf '%s\th%s\n' "$addr" "$i" >>"$hosts_file"
        i=$((i + 1))
    done
}

[ $# -ge 2 ] || usage
case "$1" in
    up) [ $# -eq 4 ] || usage; trap 'down "$2"' EXIT; up "$2" "$3" "$4"; trap - EXIT ;;
    down) [ $# -eq 2 ] || usage; down "$2" ;;
    *) usage ;;
esac
