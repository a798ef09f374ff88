"""A cost model of one data-parallel step, checked against emulated hosts (issue 10).

    python benchmarks/scaling.py --check                # as root: measure, predict, compare; exit 1 if a
                                                        # prediction is off by more than 15%
    python benchmarks/scaling.py --check --save s.json  # ... and keep the measured inputs
    python benchmarks/scaling.py --table                # predicted step time and efficiency, 8..1024 ranks
    python benchmarks/scaling.py --table --inputs s.json    # ... with the compute measured by --check

THE MODEL. Per optimizer step, with M the gradient's bytes, p ranks in a ring, n workers and S servers in
ps mode, alpha the latency of one message (s), beta the inverse bandwidth of one link (s/byte, each way:
links are full duplex), and t_c the compute of one rank (forward, backward, optimizer) on its b samples:

    compute     t_c(b) = t0 + b * c                        fitted to forward+backward timed at a few b
    ring        T_ring = t_c + 2(p-1)*alpha + 2(p-1)/p * M * beta
                (reduce-scatter then allgather: 2(p-1) messages of M/p bytes each way on every link)
    ps          T_ps   = t_c + 2*alpha + 2*max(M, n*M/S)*beta + t_apply
                (sync: the push, then the pull; each phase is as slow as its busiest link, a worker's
                carrying M and a server's n*M/S; t_apply is the server's sum of n shards + optimizer).
                When the workers finish computing at different times, t_first <= t_last, the push ends
                at max(t_last + M*beta, t_first + n*M/S*beta): a server's link starts with the first
                push, a worker's own link at the latest with the last one (ps_step).
    overlap     with k buckets, the ring's comm C_k = k*2(p-1)*alpha + 2(p-1)/p * M * beta, and
                T = t_c + C_k - min(C_k - c_last, t_bwd),   c_last = one bucket's C (it waits for backward
                to end), t_bwd = 2/3 t_c (backward does twice forward's FLOPs): overlap hides at most the
                backward pass, and every extra bucket costs 2(p-1)*alpha.
    efficiency  E = t_c / T   (per-rank throughput against one rank that never communicates)

alpha and beta are measured in the same run, in every round (pooled: each size's median): a ping-pong (one way:
alpha + m*beta) for ps, and an allreduce on 2 hosts (2*alpha + m*beta, the ring formula at p = 2) for the ring.
alpha is the 8-byte message's time; beta is the slope of a least-squares line over 256 KiB .. M (the shaper passes a
burst at wire speed, so smaller messages beat the shaped rate and say nothing about the 2.7 MB that matter; the
line's own intercept absorbs the burst's head start). Compute is
timed in the same job: forward+backward inside the very steps being predicted (so it carries the CPU load that
the communication sees; the slowest worker, step by step), plus the optimizer timed beside them; the table also
gives the error with compute timed alone just before each case (a sweep over 32, 64, 128 samples, which also
gives the per-sample time that --table uses).

THE CHECK (--check, root): network namespaces on a private bridge (tests/cluster/netns.sh), one rank per emulated
host, Open MPI over TCP only, the ranks started through tests/cluster/ns_agent.sh. Each host's link is shaped in
both directions (its eth0, and its port on the bridge) to R by htb, with a 5 ms queue per peer (see shape(): fair
queueing with a short buffer, as a Linux host's fq_codel gives; one deep FIFO per link kept small messages behind
bulk data). This kernel has no netem, so latency is what it is. Rates: 1 and 2.5 Gbit/s. At 5 and 10 Gbit/s TCP
through the veth pairs is bound by these 2 shared cores, not by the link, and a link model does not apply
(benchmarks/RESULTS.md shows a 10 Gbit/s run). Open MPI's allreduce is pinned to its ring algorithm (the
model's), and TCP's slow start after idle is off, as on a tuned cluster. Cases, at each rate: allreduce on 2, 3
and 4 hosts; ps with 1 and 2 servers and 2 and 3 workers, each server on a host of its own. The measured step is
ddp's own training loop (ddp.train.run, --mode allreduce or ps) on the MLP 784-512-512-10, float32, 128 samples
per worker, timed between optimizer steps; rounds of all cases alternate, and every figure is a median.
Namespaces are always deleted, on error and on Ctrl-C too.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import secrets
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CLUSTER = os.path.join(ROOT, "tests", "cluster")

SIZES = (784, 512, 512, 10)          # the validation MLP: 669,706 parameters, 2.68 MB of float32
BATCH = 128                          # samples per worker and step
TOLERANCE = 0.15


# --------------------------------------------------------------------------- the model (pure functions)

def mlp_params(sizes) -> int:
    return sum((a + 1) * b for a, b in zip(sizes[:-1], sizes[1:]))


# The sweep: a latency probe, then sizes up to the gradient itself (bigger ones behave differently here: a
# 4 MiB 2-host allreduce at 2.5 Gbit/s overflows the 5 ms queues now and then and took 19-47 ms, not 13).
SWEEP_BYTES = (8, 1 << 18, 1 << 20, 1 << 21, 4 * mlp_params(SIZES))


def ring_comm(p: int, M: float, alpha: float, beta: float, buckets: int = 1) -> float:
    """Seconds for a ring allreduce of M bytes over p ranks, in `buckets` equal allreduces."""
    if p <= 1:
        return 0.0
    return buckets * 2 * (p - 1) * alpha + 2 * (p - 1) / p * M * beta


def ps_comm(n: int, S: int, M: float, alpha: float, beta: float) -> float:
    """Seconds for one sync push + pull: each phase waits for the busiest link, max(M, n*M/S) bytes."""
    return 2 * alpha + 2 * max(M, n * M / S) * beta


def overlapped_step(t_c: float, p: int, M: float, alpha: float, beta: float, buckets: int) -> float:
    """Ring step with `buckets` buckets reduced during backward (t_bwd = 2/3 of t_c)."""
    C = ring_comm(p, M, alpha, beta, buckets)
    last = ring_comm(p, M / buckets, alpha, beta)
    return t_c + C - max(0.0, min(C - last, 2 * t_c / 3))


def ps_step(t_first: float, t_last: float, n: int, S: int, M: float, alpha: float, beta: float,
            t_apply: float = 0.0) -> float:
    """One sync ps step when the workers' compute ends between t_first and t_last.

    A server's link starts receiving with the first worker's push, a worker's link at the latest with
    the last one's: the push ends at max(t_last + M*beta, t_first + n*M/S*beta). Then the servers apply,
    and the pull waits for the busiest link. With t_first = t_last = t_c this is t_c + ps_comm + t_apply.
    """
    push = max(t_last + M * beta, t_first + n * M / S * beta)
    return alpha + push + t_apply + alpha + max(M, n * M / S) * beta


def fit_latency_bandwidth(points) -> tuple[float, float]:
    """Least squares of t = n_msgs*alpha + n_bytes*beta over points (n_msgs, n_bytes, t): (alpha, beta)."""
    sxx = sum(a * a for a, _, _ in points)
    sxy = sum(a * b for a, b, _ in points)
    syy = sum(b * b for _, b, _ in points)
    sxt = sum(a * t for a, _, t in points)
    syt = sum(b * t for _, b, t in points)
    det = sxx * syy - sxy * sxy
    return (syy * sxt - sxy * syt) / det, (sxx * syt - sxy * sxt) / det


def fit_line(xs, ys) -> tuple[float, float]:
    """Least squares y = a + b*x: (a, b)."""
    return fit_latency_bandwidth([(1.0, x, y) for x, y in zip(xs, ys)])


# --------------------------------------------------------------------------- measuring (under mpiexec)

def _cases(world_size: int) -> list[dict]:
    cases = [{"name": f"allreduce p={p}", "mode": "allreduce", "ranks": p, "workers": p, "servers": 0}
             for p in (2, 3, 4) if p <= world_size]
    cases += [{"name": f"ps S={S} n={n}", "mode": "ps", "ranks": n + S, "workers": n, "servers": S}
              for S in (1, 2) for n in (2, 3) if n + S <= world_size]
    return cases


def measure(args) -> None:
    """The whole measurement, in one MPI job with one rank per emulated host; rank 0 writes args.measure."""
    sys.path.insert(0, HERE)
    import common  # noqa: F401  (before numpy: one BLAS thread per rank)
    import numpy as np
    from mpi4py import MPI

    from ddp.comm import MPIComm
    from ddp.config import Config
    from ddp.model import MLP
    from ddp.optim import SGD
    from ddp.backend import all_finite
    from ddp.train import run

    world = MPI.COMM_WORLD
    rank = world.Get_rank()
    clock = time.perf_counter

    def idle_until_all_arrive():
        # A waiting Open MPI rank spins on a core; these ranks must leave the CPU to the others.
        req = world.Ibarrier()
        while not req.Test():
            time.sleep(0.002)

    def timed(fn, reps, warm=2):
        for _ in range(warm):
            fn()
        out = []
        for _ in range(reps):
            t = clock()
            fn()
            out.append(clock() - t)
        return statistics.median(out)

    # ---- the network: ping-pong and 2-rank allreduce between h0 and h1, once per round
    pair = world.Split(0 if rank < 2 else MPI.UNDEFINED, rank)
    bufs = {m: np.zeros(max(m // 4, 1), np.float32) for m in SWEEP_BYTES}

    def settle():
        # Each message starts on an idle network, as an allreduce does after a step's compute: sent
        # back to back, the 2-host allreduce (both directions at once) swings between 1.2x and 2x the
        # one-way time under this emulation's deep tbf queues; spaced out it is as stable as in training.
        pair.Barrier()
        time.sleep(0.01)

    def network_sweep():
        sweep = {"pingpong": {}, "allreduce2": {}}
        for m, buf in bufs.items():
            def pingpong():
                settle()
                t = clock()
                if rank == 0:
                    pair.Send(buf, 1)
                    pair.Recv(buf, 1)
                else:
                    pair.Recv(buf, 0)
                    pair.Send(buf, 0)
                return clock() - t

            def allreduce():
                settle()
                t = clock()
                pair.Allreduce(MPI.IN_PLACE, buf)
                return clock() - t

            pingpong()
            sweep["pingpong"][m] = statistics.median(pingpong() for _ in range(args.sweep_reps)) / 2
            allreduce()
            sweep["allreduce2"][m] = statistics.median(allreduce() for _ in range(args.sweep_reps))
        return sweep

    # ---- the cases
    cases = _cases(world.Get_size())
    subs = [world.Split(0 if rank < c["ranks"] else MPI.UNDEFINED, rank) for c in cases]
    model = MLP(list(SIZES), seed=rank)
    opt = SGD(model.params, model.grads, lr=1e-3)
    rng = np.random.default_rng(rank)
    X = rng.standard_normal((4 * BATCH, SIZES[0])).astype(np.float32)
    y = rng.integers(0, SIZES[-1], 4 * BATCH)
    records, sweeps = [], []
    for r in range(args.rounds):
        if rank < 2:            # the network's alpha and beta under this round's load
            sweeps.append(network_sweep())
        idle_until_all_arrive()
        k = r % len(cases)
        for ci in list(range(k, len(cases))) + list(range(k)):
            case, sub = cases[ci], subs[ci]
            if sub == MPI.COMM_NULL:
                idle_until_all_arrive()
                continue
            S, n = case["servers"], case["workers"]
            server = rank < S
            rec = {"case": case["name"], "round": r, "rank": rank, "role": "server" if server else "worker"}
            sub.Barrier()
            if server:      # the sync apply: sum n gradient shards, check them, one optimizer step
                a, b = rank * model.num_params // S, (rank + 1) * model.num_params // S
                shard_opt = SGD(model.params[a:b], model.grads[a:b], lr=1e-3)
                ins = [np.ones(b - a, np.float32) for _ in range(n)]

                def apply():
                    g = shard_opt.grads
                    g[...] = ins[0]
                    for x in ins[1:]:
                        g += x
                    all_finite(g)
                    shard_opt.step()

                rec["t_apply"] = timed(apply, 10)
            else:           # forward + backward (+ the optimizer when there are no servers) on b rows
                comp = {}
                for bsz in (BATCH // 4, BATCH // 2, BATCH):
                    def step(bsz=bsz):
                        idx = rng.integers(0, len(X), bsz)
                        model.forward_backward(X[idx], y[idx], denom=bsz * n)
                    comp[bsz] = timed(step, args.compute_reps)
                t0, c = fit_line(list(comp), list(comp.values()))
                # In allreduce mode the worker also checks and applies the update; in ps mode the servers do.
                t_opt = 0.0 if S else timed(lambda: (all_finite(model.grads), opt.step()), args.compute_reps)
                rec.update({"compute": comp, "per_sample": c, "t0": t0, "t_opt": t_opt,
                            "t_c": t0 + c * BATCH + t_opt})
            sub.Barrier()   # (the servers wait here, in MPI, as they do while workers compute)

            stamps = []
            cfg = Config(dataset="synthetic_classification", n_features=SIZES[0], n_classes=SIZES[-1],
                         n_samples=BATCH * n * (args.warmup + args.steps), val_fraction=0.0, test_fraction=0.0,
                         hidden=",".join(map(str, SIZES[1:-1])), batch_size=BATCH * n, epochs=1, lr=1e-3,
                         check_every=0, progress=False, mode=case["mode"], servers=max(S, 1),
                         quiet=True, out=os.path.join(args.workdir, f"{os.path.basename(args.measure)}-{ci}-{r}"))
            # (a folder per rate too: ddp refuses to start a run in a folder that holds one)
            inside = []

            def on_step(step, model, comm):
                stamps.append(clock())
                if step == 1:      # from now on also time forward+backward inside the real steps
                    fb = model.forward_backward

                    def timed_fb(*a, **kw):
                        t = clock()
                        out = fb(*a, **kw)
                        inside.append(clock() - t)
                        return out
                    model.forward_backward = timed_fb

            run(cfg, MPIComm(sub), on_step=on_step)
            if stamps:
                steps = [b - a for a, b in zip(stamps, stamps[1:])][args.warmup - 1:]
                rec["step"] = statistics.median(steps)
                rec["step_q"] = statistics.quantiles(steps, n=4)
                rec["fb_steps"] = inside[args.warmup - 1:]
            records.append(rec)
            idle_until_all_arrive()

    gathered = world.gather(records, root=0)        # a few hundred floats, once
    if rank == 0:
        out = {"sizes": SIZES, "batch": BATCH, "model_bytes": 4 * mlp_params(SIZES),
               "sweeps": [{k: {str(m): t for m, t in v.items()} for k, v in sw.items()} for sw in sweeps],
               "cases": cases, "records": [x for rs in gathered for x in rs]}
        with open(args.measure, "w") as f:
            json.dump(out, f)


# --------------------------------------------------------------------------- predicting from a measurement

def network_fits(sweep: dict) -> dict:
    """alpha from the smallest message; beta, the slope of a line through the messages of 256 KiB and more.

    The shaper lets a burst pass at wire speed, which takes a constant off every large message's time:
    a line through the origin would read that as a faster link (1.02 Gbit/s on a 1 Gbit/s one), its own
    intercept absorbs it. The slope comes out near TCP's goodput, 1448 payload bytes per 1514 on the wire.
    """
    out = {}
    for kind, n_msgs, key in (("p2p", 1, "pingpong"), ("ring", 2, "allreduce2")):   # ring at p = 2: 2 alpha
        pts = {int(m): t for m, t in sweep[key].items()}
        big = sorted(m for m in pts if m >= 1 << 18)
        out[kind] = (pts[min(pts)] / n_msgs, fit_line(big, [pts[m] for m in big])[1])
    return out


def pooled(sweeps: list) -> dict:
    """Each message size's median over the rounds' sweeps (taken between the cases, as the load drifts)."""
    return {key: {m: statistics.median(sw[key][m] for sw in sweeps) for m in sweeps[0][key]}
            for key in sweeps[0]}


def predict_cases(meas: dict) -> list[dict]:
    """One row per case: predicted and measured step (medians over rounds)."""
    M = meas["model_bytes"]
    fits = network_fits(pooled(meas["sweeps"]))
    rows = []
    for case in meas["cases"]:
        preds, steps, comps, alone = [], [], [], []
        rounds = sorted({x["round"] for x in meas["records"] if x["case"] == case["name"]})
        for r in rounds:
            recs = [x for x in meas["records"] if x["case"] == case["name"] and x["round"] == r]
            workers = [x for x in recs if x["role"] == "worker"]
            # The compute input: forward+backward timed inside these very steps (under the load that the
            # communication sees), plus the optimizer timed beside them. Step by step, the first and the
            # last worker to finish set the pace. t_sweep, fitted to forward+backward timed alone right
            # before, is shown for comparison.
            t_opt = max(x["t_opt"] for x in workers)
            per_step = list(zip(*(x["fb_steps"] for x in workers)))
            t_sweep = max(x["t_c"] for x in workers)
            step = next(x["step"] for x in recs if "step" in x and x["role"] == "worker")
            n, S, M_ = case["workers"], case["servers"], M
            if case["mode"] == "allreduce":
                alpha, beta = fits["ring"]
                comm = ring_comm(n, M, alpha, beta)
                pred = statistics.median(max(fbs) + t_opt + comm for fbs in per_step)
                alone.append(t_sweep + comm)
            else:
                alpha, beta = fits["p2p"]
                t_apply = max(x["t_apply"] for x in recs if x["role"] == "server")
                pred = statistics.median(ps_step(min(fbs), max(fbs), n, S, M_, alpha, beta, t_apply)
                                         for fbs in per_step)
                alone.append(ps_step(t_sweep, t_sweep, n, S, M_, alpha, beta, t_apply))
            t_c = statistics.median(max(fbs) + t_opt for fbs in per_step)
            preds.append(pred)
            steps.append(step)
            comps.append(t_c)
        pred, step = statistics.median(preds), statistics.median(steps)
        rows.append({"case": case["name"], "t_c": statistics.median(comps), "rest": pred - statistics.median(comps),
                     "predicted": pred, "measured": step,
                     "error_sweep": statistics.median(alone) / step - 1, "error": pred / step - 1,
                     "rounds": len(rounds)})
    return rows


# --------------------------------------------------------------------------- the check (root)

def _run(cmd, timeout=120, **kw):
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if res.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} exited {res.returncode}:\n{res.stdout[-3000:]}{res.stderr[-3000:]}")
    return res


def host_addresses(hosts_file: str) -> list[str]:
    """The emulated hosts' addresses, h0 first, from the hosts file that netns.sh wrote."""
    with open(hosts_file) as f:
        names = dict(line.split()[::-1] for line in f if line.strip())
    return [names[f"h{i}"] for i in range(len(names) - 1)]      # less "localhost"


def shape(prefix: str, addrs: list[str], gbit: float | None, queue_ms: float) -> None:
    """Every host's link at `gbit`, both ways, with a short queue per peer: fair queueing with a few ms
    of buffer, as a Linux host's default qdisc (fq_codel, whose target delay is 5 ms) and a data-centre
    switch give. This kernel has neither netem nor fq_codel; htb and u32 are here.

    Why not tbf alone, one FIFO per link: a rank's small messages to one peer (MPI's rendezvous go-ahead,
    TCP's ACKs) then wait behind its bulk data to another, every ring step waits for a neighbour's queue
    to drain, and 4 hosts ran 18-24% slower than the same links with a queue per peer. Why short: behind
    a 50 ms queue TCP grows its windows and socket buffers to tens of ms of data, and on 2 hosts, where
    the go-ahead and the data share one connection, steps swung between 27 and 37 ms (the go-ahead
    queued behind a whole message). htb shares the rate among one class per peer (u32 on the peer's
    address: dst on the host's eth0, src on its port on the bridge), each a bfifo of `queue_ms` at the
    full rate. The bucket holds what the kernel hands over at once (a 64 KiB TSO segment) and what
    arrives within a timer tick at full rate. gbit None removes the shaping.
    """
    hosts = len(addrs)
    burst = str(max(64 * 1024, int((gbit or 0) * 1e9 / 8 / 1000)))
    limit = str(int((gbit or 0) * 1e9 / 8 * queue_ms / 1000))
    rate = f"{gbit}gbit"
    for i in range(hosts):
        for ns, dev, field in ((f"{prefix}-h{i}", "eth0", "dst"), (f"{prefix}-br", f"h{i}", "src")):
            tc = ["ip", "netns", "exec", ns, "tc"]
            subprocess.run(tc + ["qdisc", "del", "dev", dev, "root"], capture_output=True, timeout=30)
            if gbit is None:             # unshaped: the veth pairs at what the CPU gives
                continue
            _run(tc + ["qdisc", "add", "dev", dev, "root", "handle", "1:", "htb", "default", "99"])
            _run(tc + ["class", "add", "dev", dev, "parent", "1:", "classid", "1:1", "htb", "rate", rate,
                       "ceil", rate, "burst", burst, "cburst", burst])
            for j in [j for j in range(hosts) if j != i] + [None]:     # None: ARP and anything else
                cls = f"1:{99 if j is None else 10 + j}"
                _run(tc + ["class", "add", "dev", dev, "parent", "1:1", "classid", cls, "htb",
                           "rate", f"{gbit / hosts}gbit", "ceil", rate, "burst", burst, "cburst", burst,
                           "quantum", "65536"])
                _run(tc + ["qdisc", "add", "dev", dev, "parent", cls, "bfifo", "limit", limit])
                if j is not None:
                    _run(tc + ["filter", "add", "dev", dev, "parent", "1:", "protocol", "ip", "prio", "1",
                               "u32", "match", "ip", field, f"{addrs[j]}/32", "flowid", cls])


def require_root(script: str) -> str | None:
    """Why this machine cannot run a namespace check, or None."""
    if os.geteuid() != 0:
        return f"{script}: error: --check makes network namespaces and needs root"
    for tool in ("ip", "tc", "unshare"):
        if not shutil.which(tool):
            return f"{script}: error: --check needs {tool}"
    return None


def mpiexec_path() -> str:
    path = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return path if os.path.exists(path) else shutil.which("mpiexec") or "mpiexec"


@contextlib.contextmanager
def emulated_hosts(hosts: int):
    """(prefix, hosts file, environment for ns_exec.sh + mpiexec, a scratch folder): `hosts` network namespaces
    on a private bridge, Open MPI over their TCP only. Namespaces and the folder are deleted on the way out, on
    error and on Ctrl-C too."""
    prefix = f"ddps{secrets.token_hex(3)}"         # unique: parallel runs never share a namespace
    work = tempfile.mkdtemp(prefix="ddp-scaling-")
    hosts_file = os.path.join(work, "hosts")

    def on_signal(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        _run([os.path.join(CLUSTER, "netns.sh"), "up", prefix, str(hosts), hosts_file], timeout=60)
        for i in range(hosts):
            _run(["ip", "netns", "exec", f"{prefix}-h{i}", "sysctl", "-q", "-w",
                  "net.ipv4.tcp_slow_start_after_idle=0"])
        env = {**os.environ, "DDP_NETNS_PREFIX": prefix, "DDP_NETNS_HOSTS": hosts_file,
               "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
               "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
               "PRTE_MCA_plm_ssh_agent": os.path.join(CLUSTER, "ns_agent.sh"),
               "OMPI_MCA_btl": "tcp,self", "OMPI_MCA_btl_tcp_if_include": "eth0",
               "OMPI_MCA_oob_tcp_if_include": "eth0", "OMPI_MCA_mpi_yield_when_idle": "1",
               "OMPI_MCA_coll_tuned_use_dynamic_rules": "1", "OMPI_MCA_coll_tuned_allreduce_algorithm": "4",
               "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
        yield prefix, hosts_file, env, work
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        subprocess.run([os.path.join(CLUSTER, "netns.sh"), "down", prefix], capture_output=True, timeout=60)
        shutil.rmtree(work, ignore_errors=True)
        left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30).stdout
        if prefix in left:
            print(f"warning: namespaces {prefix}-* were left behind", file=sys.stderr)


def mpiexec_on_hosts(hosts: int) -> list[str]:
    """The command prefix that starts one rank on each emulated host, from h0."""
    return [os.path.join(CLUSTER, "ns_exec.sh"), "h0", mpiexec_path(), "-n", str(hosts), "--host",
            ",".join(f"h{i}:1" for i in range(hosts)), "--bind-to", "none"]


def check(args) -> int:
    why = require_root("scaling.py")
    if why:
        print(why, file=sys.stderr)
        return 2
    hosts = 5
    t_start = time.perf_counter()
    results = {}
    with emulated_hosts(hosts) as (prefix, hosts_file, env, work):
        for gbit in args.rates:
            shape(prefix, host_addresses(hosts_file), gbit, args.queue_ms)
            out = os.path.join(work, f"measure-{gbit}.json")
            cmd = [*mpiexec_on_hosts(hosts), sys.executable, os.path.abspath(__file__), "--measure", out,
                   "--workdir", work, "--rounds", str(args.rounds), "--steps", str(args.steps)]
            _run(cmd, timeout=args.timeout, env=env)
            with open(out) as f:
                results[gbit] = json.load(f)

    if args.save:
        with open(args.save, "w") as f:
            json.dump({"rounds": args.rounds, "steps": args.steps, "seconds": time.perf_counter() - t_start,
                       "rates": {str(g): m for g, m in results.items()}}, f)
    return report(results, args.rounds, args.steps, time.perf_counter() - t_start)


def report(results: dict, rounds: int, steps: int, seconds: float) -> int:
    """Print predicted against measured for every rate and case; 0 if all are within TOLERANCE."""
    worst, lines = 0.0, []
    for gbit, meas in results.items():
        fits = network_fits(pooled(meas["sweeps"]))
        lines.append(f"{gbit:g} Gbit/s, sweeps of all rounds: ping-pong alpha {fits['p2p'][0] * 1e6:.1f} us, "
                     f"beta {fits['p2p'][1] * 1e9:.3f} ns/B ({8 / fits['p2p'][1] / 1e9:.2f} Gbit/s); "
                     f"2-host allreduce fit alpha {fits['ring'][0] * 1e6:.1f} us, "
                     f"beta {fits['ring'][1] * 1e9:.3f} ns/B ({8 / fits['ring'][1] / 1e9:.2f} Gbit/s)")
    rows = []
    for gbit, meas in results.items():
        for row in predict_cases(meas):
            worst = max(worst, abs(row["error"]))
            rows.append([f"{gbit:g}", row["case"], f"{row['t_c'] * 1e3:.2f}", f"{row['rest'] * 1e3:.2f}",
                         f"{row['predicted'] * 1e3:.2f}", f"{row['measured'] * 1e3:.2f}", f"{row['error']:+.1%}",
                         f"{row['error_sweep']:+.1%}",
                         "ok" if abs(row["error"]) <= TOLERANCE else "OFF"])
    sys.path.insert(0, HERE)
    import common
    M = 4 * mlp_params(SIZES)
    print(f"MLP {'-'.join(map(str, SIZES))}, float32, M = {M / 1e6:.3f} MB, {BATCH} samples per worker and step; "
          f"{rounds} alternating rounds of {steps} timed steps; medians")
    print("\n".join(lines) + "\n")
    print(common.table(["Gbit/s", "case", "compute ms", "model rest ms", "predicted ms", "measured ms", "error",
                        "error, compute timed alone",
                        f"within {TOLERANCE:.0%}"], rows))
    ok = worst <= TOLERANCE
    print(f"\n{'PASS' if ok else 'FAIL'}: largest error {worst:.1%} (tolerance {TOLERANCE:.0%}); "
          f"{seconds:.0f} s")
    return 0 if ok else 1


# --------------------------------------------------------------------------- the table

BIG = (8192, 8192, 4096, 1000)       # 104.8M parameters, 419 MB of float32
RANKS = (8, 16, 32, 64, 128, 256, 512, 1024)
BUCKET_MB = (1, 25)                  # ddp's default bucket, and PyTorch DDP's


def measure_compute_here(reps: int = 15) -> tuple[float, float]:
    """(t0, seconds per sample) of forward+backward+SGD for the validation MLP, one thread, this process."""
    sys.path.insert(0, HERE)
    import common  # noqa: F401
    import numpy as np

    from ddp.model import MLP
    from ddp.optim import SGD
    model = MLP(list(SIZES))
    opt = SGD(model.params, model.grads, lr=1e-3)
    rng = np.random.default_rng(0)
    X = rng.standard_normal((BATCH, SIZES[0])).astype(np.float32)
    y = rng.integers(0, SIZES[-1], BATCH)
    ts = {}
    for b in (BATCH // 4, BATCH // 2, BATCH):
        def step():
            model.forward_backward(X[:b], y[:b])
            opt.step()
        for _ in range(3):
            step()
        runs = []
        for _ in range(reps):
            t = time.perf_counter()
            step()
            runs.append(time.perf_counter() - t)
        ts[b] = statistics.median(runs)
    return fit_line(list(ts), list(ts.values()))


def predicted_rows(M: float, t_c: float, alpha: float, gbit: float, t_apply: float = 0.0) -> list[list[str]]:
    beta = 8 / (gbit * 1e9)
    rows = []
    for p in RANKS:
        ring = t_c + ring_comm(p, M, alpha, beta)
        overl = [overlapped_step(t_c, p, M, alpha, beta, max(1, math.ceil(M / (mb * 1e6)))) for mb in BUCKET_MB]
        ps = {S: t_c + ps_comm(p, S, M, alpha, beta) + t_apply for S in (p // 4, p)}
        rows.append([f"{gbit:g}", str(p), f"{ring * 1e3:.1f}", f"{t_c / ring:.0%}",
                     *(f"{t_c / t:.0%}" for t in overl), *(f"{t_c / ps[S]:.0%}" for S in ps)])
    return rows


def table(args) -> int:
    sys.path.insert(0, HERE)
    import common
    if args.inputs:
        with open(args.inputs) as f:
            saved = json.load(f)
        recs = [x for m in saved["rates"].values() for x in m["records"] if x.get("per_sample")]
        t0 = statistics.median(x["t0"] for x in recs)
        per_sample = statistics.median(x["per_sample"] for x in recs)
        source = f"forward+backward timed in the --check run ({args.inputs}), median over its ranks"
    else:
        t0, per_sample = measure_compute_here()
        source = "forward+backward+SGD timed here, one process, one thread"
    alpha = args.alpha_us * 1e-6
    models = []
    P = mlp_params(SIZES)
    models.append((f"MLP {'-'.join(map(str, SIZES))} ({P / 1e6:.2f}M parameters, {4 * P / 1e6:.2f} MB), "
                   f"{BATCH} samples per rank, compute {(t0 + per_sample * BATCH) * 1e3:.2f} ms per step "
                   f"({source})", 4 * P, t0 + per_sample * BATCH))
    Pb = mlp_params(BIG)
    big_batch = 64
    cpu_big = per_sample * Pb / P * big_batch          # forward+backward FLOPs grow with the parameters
    gpu_big = 6 * Pb * args.gpu_batch / (args.gpu_tflops * 1e12)
    desc = (f"MLP {'-'.join(map(str, BIG))} ({Pb / 1e6:.1f}M parameters, {4 * Pb / 1e6:.0f} MB), "
            f"{big_batch} samples per rank")
    models.append((f"{desc}, compute {cpu_big * 1e3:.0f} ms per step: this CPU core's per-sample time scaled by "
                   f"the parameter count ({Pb / P:.0f}x the FLOPs)", 4 * Pb, cpu_big))
    models.append((f"MLP {'-'.join(map(str, BIG))}, {args.gpu_batch} samples per rank, compute {gpu_big * 1e3:.1f} ms "
                   f"per step: a GPU sustaining {args.gpu_tflops:g} TFLOP/s (6 FLOPs per parameter and sample)",
                   4 * Pb, gpu_big))
    heads = ["Gbit/s", "ranks", "ring ms/step", "E ring", *(f"E ring+overlap {mb} MB buckets" for mb in BUCKET_MB),
             "E ps S=n/4", "E ps S=n"]
    print(f"Predicted step time and scaling efficiency E = t_compute / t_step (weak scaling: fixed samples per "
          f"rank); alpha = {args.alpha_us:g} us per message, beta = 1/line rate; ring = flat ring allreduce, "
          f"ps = sync parameter servers on S extra hosts; overlap: t_bwd = 2/3 of compute.")
    for title, M, t_c in models:
        print(f"\n{title}\n")
        rows = [r for g in args.gbits for r in predicted_rows(M, t_c, alpha, g)]
        print(common.table(heads, rows))
    print("\nps with S >= n servers beats the ring when p(p-2) > M*beta/alpha (it pays 2 alpha per step, the ring "
          "2(p-1) alpha); the smallest such p:")
    for title, M, _ in models[:2]:
        for g in args.gbits:
            ratio = M * 8 / (g * 1e9) / alpha
            p = next(q for q in range(3, 1 << 20) if q * (q - 2) > ratio)
            print(f"  {title.split(' (')[0]}, {g:g} Gbit/s: M*beta/alpha = {ratio:.0f}, p >= {p}")
    print(f"\nreproduce: python benchmarks/scaling.py --table{' --inputs ' + args.inputs if args.inputs else ''}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="validate the model on emulated hosts (root)")
    p.add_argument("--table", action="store_true", help="print the predicted table, 8..1024 ranks")
    p.add_argument("--rates", type=lambda s: [float(x) for x in s.split(",")], default=[1.0, 2.5],
                   help="link rates in Gbit/s for --check (default: 1,2.5; at 5 and 10 the CPU, not the link, "
                        "limits TCP on these 2-core machines: see benchmarks/RESULTS.md)")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds of all cases (default: 5)")
    p.add_argument("--steps", type=int, default=12, help="timed steps per case and round (default: 12)")
    p.add_argument("--save", help="--check: write the measurements to this JSON file")
    p.add_argument("--queue-ms", type=float, default=5.0,
                   help="--check: each peer's queue on a link, in ms at the link rate (default: 5, fq_codel's "
                        "target delay)")
    p.add_argument("--gbits", type=lambda s: [float(x) for x in s.split(",")], default=[10.0, 25.0, 100.0],
                   help="--table: link rates in Gbit/s (default: 10,25,100)")
    p.add_argument("--alpha-us", type=float, default=20.0,
                   help="--table: latency per message in microseconds (default: 20, MPI over TCP in a data centre)")
    p.add_argument("--gpu-tflops", type=float, default=100.0,
                   help="--table: sustained GPU rate for the 100M model's GPU rows (default: 100)")
    p.add_argument("--gpu-batch", type=int, default=4096,
                   help="--table: samples per rank for the 100M model's GPU rows (default: 4096)")
    p.add_argument("--report", metavar="FILE", help="print the --check table again from a --save file")
    p.add_argument("--inputs", help="--table: take compute and latency from a --save file")
    p.add_argument("--timeout", type=int, default=600, help="seconds per MPI job (default: 600)")
    p.add_argument("--measure", help=argparse.SUPPRESS)       # internal: the MPI job
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    p.add_argument("--warmup", type=int, default=5, help=argparse.SUPPRESS)
    p.add_argument("--sweep-reps", type=int, default=5, help=argparse.SUPPRESS)
    p.add_argument("--compute-reps", type=int, default=7, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.measure:
        measure(args)
        return 0
    if args.check:
        try:
            return check(args)
        except KeyboardInterrupt as e:      # the namespaces are gone already (check's finally)
            print(f"scaling.py: interrupted ({e or 'Ctrl-C'}); namespaces removed", file=sys.stderr)
            return 130
    if args.report:
        with open(args.report) as f:
            saved = json.load(f)
        return report({float(g): m for g, m in saved["rates"].items()}, saved["rounds"], saved["steps"],
                      saved["seconds"])
    if args.table:
        return table(args)
    p.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
