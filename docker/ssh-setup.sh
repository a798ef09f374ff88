#!/bin/sh
# SSH between the nodes of a ddp cluster, for mpiexec: no root, no keys in the image or the repo.
#
#   ssh-setup.sh keys          make the cluster's keys in $DDP_SHARED/.cluster, once (safe to race)
#   ssh-setup.sh client        ~/.ssh/config, key and known_hosts for 'ssh NODE' to a peer's sshd
#   ssh-setup.sh server        ~/.ssh/sshd/sshd_config for a non-root sshd on $DDP_SSH_PORT
#   ssh-setup.sh wait NODE...  wait until 'ssh NODE true' works on every NODE ($DDP_WAIT_TIMEOUT s)
#   ssh-setup.sh stop NODE...  stop the sshd on every NODE, which ends a worker container
#
# Every node shares one user key and one host key, kept on the shared volume, and known_hosts
# trusts that host key for any name: a node accepts exactly the peers that can read the volume.
# The keys live as long as the volume (docker compose down -v removes them).
#
# Environment: DDP_SHARED (default /shared), DDP_SSH_PORT (2222), DDP_WAIT_TIMEOUT (120), HOME.
set -eu

shared="${DDP_SHARED:-/shared}"
keys="$shared/.cluster"
port="${DDP_SSH_PORT:-2222}"
ssh_dir="$HOME/.ssh"
# ssh reads ~/.ssh/config from the passwd home, not $HOME; naming the file works for both.
ssh_cmd() { ssh -F "$ssh_dir/config" "$@"; }

die() { echo "ssh-setup.sh: error: $*" >&2; exit 2; }

make_keys() {
    [ -d "$keys" ] && return 0
    mkdir -p "$shared"
    tmp="$(mktemp -d "$shared/.cluster.XXXXXX")"
    ssh-keygen -q -t ed25519 -N '' -C ddp-cluster-user -f "$tmp/id_ed25519"
    ssh-keygen -q -t ed25519 -N '' -C ddp-cluster-host -f "$tmp/ssh_host_ed25519_key"
    printf '* %s\n' "$(cut -d' ' -f1,2 "$tmp/ssh_host_ed25519_key.pub")" >"$tmp/known_hosts"
    # rename() is atomic: when several nodes start at once, the first complete set wins.
    mv -T "$tmp" "$keys" 2>/dev/null || rm -rf "$tmp"
    [ -f "$keys/known_hosts" ] || die "$keys exists but holds no cluster keys; remove it"
}

install_key() {  # install_key SRC DEST MODE
    [ -f "$1" ] || die "missing $1; run 'ssh-setup.sh keys' first"
    cp "$1" "$2.tmp" && chmod "$3" "$2.tmp" && mv "$2.tmp" "$2"
}

client() {
    mkdir -p "$ssh_dir" && chmod 700 "$ssh_dir"
    install_key "$keys/id_ed25519" "$ssh_dir/id_ed25519" 600
    install_key "$keys/id_ed25519.pub" "$ssh_dir/id_ed25519.pub" 644
    install_key "$keys/known_hosts" "$ssh_dir/known_hosts" 644
    cat >"$ssh_dir/config" <<EOF
# Written by ssh-setup.sh for mpiexec between the nodes of a ddp cluster.
Host *
    Port $port
    IdentityFile $ssh_dir/id_ed25519
    IdentitiesOnly yes
    UserKnownHostsFile $ssh_dir/known_hosts
    StrictHostKeyChecking yes
    BatchMode yes
    ConnectTimeout 10
    LogLevel ERROR
EOF
    chmod 600 "$ssh_dir/config"
}

server() {
    mkdir -p "$ssh_dir/sshd" && chmod 700 "$ssh_dir" "$ssh_dir/sshd"
    install_key "$keys/ssh_host_ed25519_key" "$ssh_dir/sshd/ssh_host_ed25519_key" 600
    install_key "$keys/id_ed25519.pub" "$ssh_dir/authorized_keys" 600
    # SetEnv gives the sessions mpiexec opens this PATH, so they find the venv's prted and python.
    cat >"$ssh_dir/sshd/sshd_config" <<EOF
# Written by ssh-setup.sh: a non-root sshd that lets in the cluster key, and nothing else.
Port $port
HostKey $ssh_dir/sshd/ssh_host_ed25519_key
PidFile $ssh_dir/sshd/sshd.pid
AuthorizedKeysFile $ssh_dir/authorized_keys
AllowUsers $(id -un)
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
PermitRootLogin prohibit-password
AllowTcpForwarding no
X11Forwarding no
PrintMotd no
LogLevel ERROR
SetEnv PATH=$PATH
EOF
    echo "$ssh_dir/sshd/sshd_config"
}

wait_for() {
    deadline=$(( $(date +%s) + ${DDP_WAIT_TIMEOUT:-120} ))
    for node in "$@"; do
        until ssh_cmd -o ConnectTimeout=5 "$node" true 2>/dev/null; do
            [ "$(date +%s)" -lt "$deadline" ] \
                || die "no ssh to '$node' on port $port after ${DDP_WAIT_TIMEOUT:-120} s (is its sshd up?)"
            sleep 1
        done
    done
}

stop() {
    for node in "$@"; do
        # The session dies with the sshd it kills, so ssh's exit status means nothing here.
        # shellcheck disable=SC2016  # $HOME is the worker's
        ssh_cmd "$node" 'kill "$(cat "$HOME/.ssh/sshd/sshd.pid")"' 2>/dev/null || true
    done
}

[ $# -ge 1 ] || die "usage: ssh-setup.sh keys|client|server|wait NODE...|stop NODE..."
cmd="$1"
shift
case "$cmd" in
    keys) make_keys ;;
    client) client ;;
    server) server ;;
    wait) wait_for "$@" ;;
    stop) stop "$@" ;;
    *) die "unknown command '$cmd' (keys, client, server, wait, stop)" ;;
esac
