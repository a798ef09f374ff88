"""Parameter-server training: the first S ranks hold the parameters, the other ranks compute gradients.

    launch/mpirun.sh -n 3 -- train --mode ps --dataset digits                    # 1 server, 2 workers
    launch/mpirun.sh -n 6 -- train --mode ps --servers 2 --consistency ssp --staleness 2

Roles. Ranks 0..S-1 are servers, ranks S..P-1 workers. The flat arena is cut into S contiguous shards of
balanced size; server s owns shard s and its optimizer state. The optimizers are elementwise, so the S shard
optimizers together ARE allreduce mode's optimizer. Servers compute on the host; workers use --device, keep a
full replica (ps_worker.py), and take their shard of every global batch as allreduce mode does. Each step a worker pushes
gradient shard s to server s as soon as backward has finished its layers, and pulls parameter shard s back.

Messages are non-blocking buffer sends of contiguous arrays; nothing is pickled but a few bytes of JSON:

    worker -> server  TAG_GRAD    gradient shard, model dtype
    worker -> server  TAG_CTRL    JSON: {"kind": "epoch", "record": {...}} (to rank 0), "done", "stop" (SIGTERM)
    server -> worker  TAG_PARAMS  parameter shard
    server -> worker  TAG_META    int64 [server clock, staleness of the gradient just applied, status, the
                                  global gradient norm before --clip-grad-norm as float64 bits (sync)]

Consistency (--consistency):
    sync   bulk synchronous. Workers scale their loss by the GLOBAL batch size, so the server's sum of the
           workers' shards is the global-batch mean gradient; one optimizer step, the same new shard to every
           worker: allreduce mode's weights (1e-12 in float64). --clip-grad-norm: the servers sum their shards'
           squared norms, so each clips by the global norm. --deterministic: the workers push their exact
           float64 sums (exact.py), which the servers add in float64: allreduce mode's weights, bitwise.
    async  each gradient (a mean over the worker's own batch) is applied as it arrives and answered at once.
    ssp    async, but a server holds back its reply to a worker more than --staleness k steps ahead of the
           slowest. ssp 0 runs the sync protocol.

Clocks. A worker's clock counts its pushes; a server's is the minimum over the workers (SSP's global clock).
A gradient's staleness is the server's clock when it is applied minus the clock when the worker received the
parameters it was computed on (0 in sync, at most k under ssp); metrics.jsonl records max and mean per epoch.

Output. Rank 0 (server 0) alone writes metrics.jsonl (the first worker sends it each epoch's record),
checkpoint.npz and summary.json. At the schedule's steps the servers gather their shards and optimizer state to
rank 0, which writes ONE checkpoint in allreduce mode's format (either mode resumes the other's). Async and ssp
servers step once per worker step: the schedule and `t` count those updates. NaN in a gradient makes the
servers reply FAILED; every rank raises TrainingError. SIGTERM (sync only): the servers reply STOP to every
worker for the same step, save a checkpoint there, and every rank raises errors.Stopped.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os

import numpy as np

from .backend import all_finite
from .checkpoint import CHECKPOINT, restore, save_checkpoint
from .comm import Communicator, DebugComm
from .config import Config
from .data import shard_range
from .errors import Stopped, TrainingError, UsageError
from .optim import clip_grad_norm, parts_sqnorm
from .parallel import verify_model
from .ps_worker import CTRL_BYTES, FAILED, OK, STOP, TAG_CTRL, TAG_GRAD, TAG_META, TAG_PARAMS, _work
from .report import Reporter
from .run import finished_summary, start_run
from .setup import Setup, agree, checkpoint_points, is_finished, make_optimizer_for, position, steps_per_epoch
from .stop import got_sigterm
from .trace import NULL, Tracer
from .zero import gather_state


def shard_bounds(n: int, parts: int) -> list[tuple[int, int]]:
    """(start, stop) of `parts` balanced contiguous shards of range(n), cut as data.shard cuts a batch."""
    return [shard_range(n, s, parts) for s in range(parts)]


def check_ps(cfg: Config, comm: Communicator) -> None:
    """Reject what ps mode cannot run, with the same message on every rank."""
    S = cfg.servers
    if comm.size < 2:
        raise UsageError(f"ps mode needs at least 2 ranks: {S} server(s) and at least one worker; "
                         f"launch with mpiexec -n {S + 1} or more (or --simulate-ranks {S + 1})")
    if S >= comm.size:
        raise UsageError(f"--servers {S} leaves no worker among {comm.size} ranks: use --servers "
                         f"{comm.size - 1} or fewer, or launch with mpiexec -n {S + 1} or more")


# --------------------------------------------------------------------------- server

class Server:
    """Owns one shard of the arena and its optimizer, and answers the workers' pushes."""

    def __init__(self, setup: Setup, world: Communicator, scomm: Communicator, optimizer, bounds,
                 workers: list[int], *, sync: bool, start: tuple, spe: int, points: dict, reporter: Reporter):
        self.setup, self.cfg, self.world, self.scomm = setup, setup.cfg, world, scomm
        self.model, self.opt, self.bounds, self.workers = setup.model, optimizer, bounds, workers
        model = setup.model
        self.tracer = model.tracer
        a, b = bounds[world.rank]
        self.params = model.params[a:b]            # the optimizer updates this view in place
        self.sync, self.k = sync, None if self.cfg.consistency == "async" else self.cfg.staleness  # None: no bound
        self.start, self.spe, self.points, self.reporter = start, spe, points, reporter
        n, dt = len(workers), model.dtype
        # --deterministic: the pushes are exact float64 parts (exact.py), added in float64, rounded once
        self.grad_in = [np.empty(b - a, np.float64 if self.cfg.deterministic else dt) for _ in range(n)]
        self.sum = np.empty(b - a) if self.cfg.deterministic else optimizer.grads
        self.ctrl_in = [np.empty(CTRL_BYTES, np.uint8) for _ in range(n)]
        # sync sends the shard itself to everyone; async copies it, since it changes before the send is done
        self.out = None if sync else [np.empty(b - a, dt) for _ in range(n)]
        self.meta_out = np.zeros((n, 4), np.int64)
        self.norm = np.zeros(1)                    # the last step's global gradient norm (--clip-grad-norm)
        self.clock = np.zeros(n, np.int64)         # steps each worker has pushed
        self.released = np.zeros(n, np.int64)      # the server clock when each worker got its shard
        self.staleness = np.zeros(n, np.int64)     # of each worker's last applied gradient
        self.grad_reqs, self.ctrl_reqs = [None] * n, [None] * n
        self.sends = [[] for _ in range(n)]
        self.deferred, self.arrived, self.failed = set(), 0, False
        self.stopping = False                      # sync: reply STOP (a SIGTERM here, or a worker's "stop")
        self.bytes_sent = self.bytes_received = 0

    @property
    def gclock(self) -> int:
        return int(self.clock.min())

    def serve(self) -> None:
        n = len(self.workers)
        for w in range(n):
            self._post_ctrl(w)
            self.reply(w, count=False)             # the initial shard
        done, stopped = [False] * n, False
        while not all(done):
            with self.tracer.span("wait for gradients", "wait"):
                i = self.world.waitany(self.grad_reqs + self.ctrl_reqs, "the server's Waitany for gradients",
                                       self._laggards)
            if i < n:
                self.bytes_received += self.grad_in[i].nbytes
                self.on_grad(i)
                continue
            w = i - n
            msg = json.loads(self.ctrl_in[w].tobytes())
            if msg["kind"] == "done":
                done[w] = True
                stopped = stopped or msg.get("stopped", False)
            elif msg["kind"] == "stop":
                self.stopping = True
                self._post_ctrl(w)
            else:
                self.reporter.epoch(msg["record"])
                self._post_ctrl(w)
        for r in self.grad_reqs:                   # the receive each worker's last reply posted
            r.cancel()
        for w in range(n):                         # the final shard
            self.reply(w, more=False, count=False)
        self.world.waitall([r for rs in self.sends for r in rs])
        step = self.start[0] + self.gclock
        if stopped and step not in self.points:    # a stop for SIGTERM between the planned checkpoints
            self.points[step] = position(self.spe, self.start, step)
            self.checkpoint(step)

    def _laggards(self) -> str:
        behind = [self.workers[w] for w in range(len(self.workers)) if self.clock[w] == self.gclock]
        return f"workers {behind} have not pushed step {self.start[0] + self.gclock + 1}"

    def _post_ctrl(self, w):
        self.ctrl_reqs[w] = self.world.irecv(self.ctrl_in[w], self.workers[w], TAG_CTRL)

    def reply(self, w: int, more: bool = True, count: bool = True) -> None:
        """Send worker w the current shard and meta; `more`: repost the receive of its next push."""
        self.world.waitall(self.sends[w])
        if self.out is None:
            buf = self.params
        else:
            buf = self.out[w]
            buf[...] = self.params
        g = self.gclock
        self.meta_out[w] = (g, self.staleness[w], FAILED if self.failed else STOP if self.stopping else OK,
                            self.norm.view(np.int64)[0])
        self.released[w] = g
        dest = self.workers[w]
        if more:
            self.grad_reqs[w] = self.world.irecv(self.grad_in[w], dest, TAG_GRAD)
        self.sends[w] = [self.world.isend(buf, dest, TAG_PARAMS), self.world.isend(self.meta_out[w], dest, TAG_META)]
        if count:
            self.bytes_sent += buf.nbytes + self.meta_out[w].nbytes

    def apply(self) -> None:
        """One optimizer step with the gradient in self.opt.grads, unless it is not finite."""
        if self.failed:
            return
        g = self.opt.grads
        sq = float(self.opt.xp.vdot(g, g))       # one pass: all_finite checks elements only if it is not finite
        sq, finite = parts_sqnorm(self.scomm, g, sq) if self.cfg.clip_grad_norm else (sq, all_finite(g, sq))
        if self.cfg.clip_grad_norm:                # sync: the shards' squared norms add up to the global one
            self.norm[0] = math.sqrt(sq)
            clip_grad_norm(g, self.norm[0], self.cfg.clip_grad_norm)
        if not finite:
            self.failed = True                     # from now on every reply says FAILED
            return
        with self.tracer.span("apply", "optimizer", bytes=self.params.nbytes):
            self.opt.step()

    def on_grad(self, w: int) -> None:
        before = self.gclock
        self.clock[w] += 1
        self.world.at_step(self.start[0] + self.gclock)
        if w == 0 and self.reporter.bar is not None:
            self.reporter.bar.update(1)
        if self.sync:
            self.arrived += 1
            if self.arrived < len(self.workers):
                return
            self.arrived = 0
            g = self.sum                          # the sum over workers, in worker order
            g[...] = self.grad_in[0]
            for x in self.grad_in[1:]:
                g += x
            if g is not self.opt.grads:           # --deterministic: the float64 sum, rounded once
                self.opt.grads[...] = g
            self.world.waitall([r for rs in self.sends for r in rs])   # they read self.params
            self.apply()
            self.stopping = self.stopping or got_sigterm()    # once per step: every worker gets the same
            for u in range(len(self.workers)):
                self.reply(u)
        else:
            self.staleness[w] = before - self.released[w]
            self.opt.grads[...] = self.grad_in[w]
            self.apply()
            after = self.gclock
            if self.k is not None and not self.failed and self.clock[w] > after + self.k:
                self.deferred.add(w)               # too far ahead of the slowest: it waits here
            else:
                self.reply(w)
            for u in sorted(self.deferred - {w}):
                if self.failed or self.clock[u] <= after + self.k:
                    self.deferred.discard(u)
                    self.reply(u)
        if self.gclock > before:
            self.checkpoint(self.start[0] + self.gclock)

    def checkpoint(self, step: int) -> None:
        """At the steps where allreduce mode checkpoints, gather every shard and its optimizer
        state to rank 0 and write one full checkpoint in allreduce mode's format."""
        if step not in self.points:
            return
        root = self.scomm.rank == 0
        counts = [b - a for a, b in self.bounds]
        with self.tracer.span("checkpoint"):
            self.scomm.gatherv(self.params, self.model.params if root else None, counts)
            state = gather_state(self.opt, self.scomm, self.model.num_params, counts)
        if root and self.reporter.active:
            epoch, batch = self.points[step]
            save_checkpoint(os.path.join(self.cfg.out, CHECKPOINT), self.setup, self.model.state_dict(), state,
                            step=step, epoch=epoch, batch=batch)
            self.reporter.saved(step)


# --------------------------------------------------------------------------- entry point

def train_ps(cfg: Config, comm: Communicator, on_step=None, raw=None) -> tuple[dict, Setup]:
    """Train with parameter servers on `comm` (an MPI world); returns (summary, setup) on every rank, the
    setup's model holding the final weights everywhere.

    on_step(step, model, worker_comm), if given, runs on the workers after every step.
    """
    cfg.validate()                   # before check_ps: it trusts --servers and --staleness to be in range
    check_ps(cfg, comm)
    comm.set_timeout(cfg.timeout)
    S, P = cfg.servers, comm.size
    is_server = comm.rank < S
    sync = cfg.ps_sync()
    s, ckpt = start_run(dataclasses.replace(cfg, device="cpu") if is_server else cfg, comm, raw)
    model = s.model
    verify_model(model, comm)
    if S > model.num_params:
        raise UsageError(f"--servers {S} is more than the model's {model.num_params} parameters")
    bounds = shard_bounds(model.num_params, S)
    n_workers = P - S
    spe = steps_per_epoch(cfg, len(s.train), s.batch_size)
    start = (0, 0, 0) if ckpt is None else (int(ckpt["step"]), int(ckpt["epoch"]), int(ckpt["batch_in_epoch"]))
    if is_finished(cfg, start[0], start[1]):      # only a resumed run: a validated Config has epochs >= 1
        return finished_summary(cfg, start[0], start[1], comm.rank == 0), s
    part = comm.split(0 if is_server else 1, comm.rank)   # the servers; the workers

    optimizer = None
    if is_server:
        a, b = bounds[comm.rank]
        # The schedule spans the planned epochs, as in allreduce mode (--max-steps does not reshape
        # it); async servers take one optimizer step per worker step.
        updates = 1 if sync else n_workers
        optimizer = make_optimizer_for(cfg, model.params[a:b], model.grads[a:b], cfg.epochs * spe * updates)
        part.bcast(model.params, root=0)           # rank 0's initial weights, not equal seeds
    if ckpt is not None:                           # each server loads its slice; every rank agrees it worked
        agree(comm, lambda: restore(ckpt, model, optimizer, cfg.resume, (a, b)) if is_server else None)
    points, n_total = checkpoint_points(cfg, spe, *start)

    rank0 = comm.rank == 0
    if rank0:                                      # before the progress bar starts
        kind = "sync (ssp with staleness 0)" if sync and cfg.consistency == "ssp" else cfg.consistency
        if cfg.consistency == "ssp" and not sync:
            kind += f" (staleness <= {cfg.staleness})"
        print(f"ddp: {model} in ps mode: {S} server(s) (ranks 0-{S - 1}), {n_workers} worker(s), {kind}; "
              f"{len(s.train)} training samples, global batch {s.batch_size}, {n_total} steps"
              + (f", run folder {cfg.out}" if cfg.out else ""), flush=True)
        if cfg.staleness and cfg.consistency != "ssp":
            print(f"ddp: warning: --staleness {cfg.staleness} is ignored with --consistency {cfg.consistency}",
                  flush=True)
        if cfg.grad_norms:
            print("ddp: warning: --grad-norms is not recorded in ps mode", flush=True)
    reporter = Reporter(cfg, rank0, n_total, start[0], s.prep.task, start[0] if ckpt is not None else None)
    model.tracer = tracer = Tracer(comm.rank, "server" if is_server else "worker") if cfg.trace else NULL
    if cfg.trace:
        tracer.start(comm)
    try:
        if is_server:
            server = Server(s, comm, part, optimizer, bounds, list(range(S, P)), sync=sync, start=start, spe=spe,
                            points=points, reporter=reporter)
            server.serve()
            result, traffic = None, (server.bytes_sent, server.bytes_received)
        else:
            result, traffic = _work(cfg, s, comm, DebugComm(part) if cfg.debug else part, bounds, start,
                                    reporter, on_step)
    finally:
        reporter.close()
    summary = comm.bcast_obj(result, root=S)       # the first worker's summary, to every rank
    traffic = comm.allgather_obj(traffic)
    part.free()
    if "error" in summary:
        raise TrainingError(summary["error"])
    if "stopped_at" in summary:                    # the servers saved the checkpoint at that step
        raise Stopped.at(summary["stopped_at"], os.path.join(cfg.out, CHECKPOINT), reporter.active)
    comm.bcast(model.params, root=S)              # the final weights, so every rank returns the same model
    summary.update({"mode": "ps", "servers": S, "workers": n_workers, "consistency": cfg.consistency,
                    "staleness_bound": cfg.staleness if cfg.consistency == "ssp" else None,
                    "model_bytes": model.params.nbytes,
                    "step_bytes_sent": [t[0] for t in traffic], "step_bytes_received": [t[1] for t in traffic]})
    if cfg.trace:
        tracer.merge(comm, cfg.trace)
        summary["trace"] = cfg.trace
    return (reporter.summary(summary, f", max staleness {summary['max_staleness']}") if rank0 else summary), s
