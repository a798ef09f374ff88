#!/bin/sh
# ns_exec.sh HOST CMD [ARGS...]: run CMD on emulated host HOST (see netns.sh).
#
# The command gets HOST's network namespace, its own hostname, and the cluster's /etc/hosts.
# Reads DDP_NETNS_PREFIX (the netns.sh prefix) and DDP_NETNS_HOSTS (the hosts file it wrote).
set -eu
: "${DDP_NETNS_PREFIX:?set DDP_NETNS_PREFIX to the netns.sh prefix}"
: "${DDP_NETNS_HOSTS:?set DDP_NETNS_HOSTS to the hosts file netns.sh wrote}"
[ $# -ge 2 ] || { echo "usage: $0 HOST CMD [ARGS...]" >&2; exit 2; }
host=$1
shift
# shellcheck disable=SC2016  # expanded by the inner sh
exec ip netns exec "$DDP_NETNS_PREFIX-$host" \
    unshare --uts --mount --propagation private \
    sh -c 'mount --bind "$DDP_NETNS_HOSTS" /etc/hosts && hostname "$0" && exec "$@"' "$host" "$@"
