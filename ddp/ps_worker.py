"""A parameter-server worker (ps.py describes the protocol): a full replica that runs the one training loop,
pushing gradient shards to the servers and pulling parameter shards back in place of the allreduce."""
from __future__ import annotations

import json

import numpy as np

from .comm import Communicator
from .config import Config
from .errors import TrainingError
from .evaluate import final_metrics
from .exact import ExactSum
from .loop import train_loop
from .parallel import check_replicas
from .stop import got_sigterm

TAG_GRAD, TAG_CTRL, TAG_PARAMS, TAG_META = 41, 42, 43, 44
OK, FAILED, STOP = 0, 1, 2     # STOP: this server got SIGTERM (sync only: stop at the end of this step)
CTRL_BYTES = 1 << 14          # every control message is padded to this (an epoch record is a few hundred bytes)


class Worker:
    """A full replica that pushes gradient shards to the servers and pulls parameter shards back: a ps
    worker's side of the loop (see loop.py)."""

    def __init__(self, world: Communicator, wcomm: Communicator, model, bounds, cfg: Config):
        self.world, self.comm, self.model, self.tracer = world, wcomm, model, model.tracer
        self.identical = cfg.ps_sync()
        self.clip, self.norms = cfg.clip_grad_norm, [0.0, 0]  # --clip-grad-norm: this epoch's norms and clipped steps
        # --deterministic: the workers' chunks added exactly among themselves, pushed as float64 (exact.py)
        self.exact = ExactSum(wcomm, model.grads, cfg.chunks) if cfg.deterministic else None
        # Contiguous views of the arenas: the messages read and write the model itself.
        self.params = [model.params[a:b] for a, b in bounds]
        self.grads = [(model.grads if self.exact is None else self.exact.acc)[a:b] for a, b in bounds]
        self.meta = np.zeros((len(bounds), 4), np.int64)
        # Shard s is complete once backward has finished the layer holding its first element.
        self.ready = {}
        for s, (a, _) in enumerate(bounds):
            layer = next(L for L in model.layers if L.start <= a < L.stop)
            self.ready.setdefault(layer.index, []).append(s)
        self.reqs, self.keep = [], []
        self.bytes_sent = self.bytes_received = 0
        self.pull_bytes = sum(p.nbytes for p in self.params)
        self.told, self.share = False, 1.0
        self.stale = [0, 0, 0]                     # this epoch's max, sum and count of the replies' staleness
        self.run_stale = [0, 0.0, 0.0]             # the run's

    def expect(self, s: int, count: bool = True) -> None:
        """Post the receives of server s's reply: its parameter shard and its meta."""
        self.reqs += [self.world.irecv(self.params[s], s, TAG_PARAMS), self.world.irecv(self.meta[s], s, TAG_META)]
        if count:
            self.bytes_received += self.params[s].nbytes + self.meta[s].nbytes

    def push(self, s: int) -> None:
        with self.tracer.span(f"push to server {s}", "push", bytes=self.grads[s].nbytes):
            # The reply's receives go up before the gradient leaves. Writing the reply into the arena
            # while backward goes on is safe: backward is done with every layer of shard s.
            self.expect(s)
            self.reqs.append(self.world.isend(self.grads[s], s, TAG_GRAD))
        self.bytes_sent += self.grads[s].nbytes

    def on_grad(self, layer: int) -> None:
        for s in self.ready.get(layer, ()):
            self.push(s)

    def send_ctrl(self, dest: int, obj: dict) -> None:
        """A control message: JSON text padded with spaces to CTRL_BYTES, so that a receive needs no count."""
        text = json.dumps(obj).encode()
        if len(text) > CTRL_BYTES:
            raise RuntimeError(f"control message of {len(text)} bytes exceeds {CTRL_BYTES}")
        data = np.frombuffer(bytearray(text.ljust(CTRL_BYTES)), np.uint8)
        self.keep.append(data)                     # alive until its send completes
        self.reqs.append(self.world.isend(data, dest, TAG_CTRL))

    def wait(self) -> np.ndarray:
        """Finish every pending message; returns the replies' meta, one [clock, staleness, status] per server."""
        with self.tracer.span("pull (wait for the servers' replies)", "pull", bytes=self.pull_bytes):
            self.world.waitall(self.reqs, "the worker's Waitall for the servers' replies")
        self.reqs, self.keep = [], []
        return self.meta

    # ---- the loop's side (loop.py)
    def denom(self, global_rows: int, my_rows: int) -> int:
        # sync: a share of the global-batch mean, as in allreduce mode; async: this worker's own mean
        self.share = 1.0 if self.identical else my_rows / global_rows
        return global_rows if self.identical else max(my_rows, 1)

    def backward(self, X, y, denom, accumulate, last, rows, step):
        if self.exact is None:
            return self.model.forward_backward(X, y, denom=denom, accumulate=accumulate, rows=rows, step=step,
                                               on_grad=self.on_grad if last else None)
        loss = self.model.forward_backward(X, y, denom=denom, rows=rows, step=step)
        self.exact.add(self.model.grads, loss)
        if last:
            self.exact.local()
            for srv in range(len(self.grads)):
                self.push(srv)
        return loss

    def apply(self, loss, step):
        meta = self.wait()
        st = meta[:, 1]
        self.stale = [max(self.stale[0], int(st.max())), self.stale[1] + int(st.sum()), self.stale[2] + len(st)]
        if self.exact is not None:              # the sum of every chunk's loss, on the first worker only
            loss, self.share = (self.exact.loss if self.comm.rank == 0 else 0.0), 1.0
        norm = float(meta[0, 3:].view(np.float64)[0])
        self.norms = [self.norms[0] + norm, self.norms[1] + (self.clip / (norm + 1e-6) < 1)]
        return float(loss) * self.share, not (meta[:, 2] == FAILED).any()

    def stop(self, step, position) -> bool:
        if not self.identical:
            return False
        if (self.meta[:, 2] == STOP).any():        # every worker got the same replies for this step
            return True
        if got_sigterm() and not self.told:        # the servers stop everyone at one step
            for srv in range(len(self.params)):
                self.send_ctrl(srv, {"kind": "stop"})
            self.told = True
        return False

    def epoch_sums(self):
        return self.stale[1:]

    def epoch_extra(self, sums, step, n_steps) -> dict:
        peaks = self.comm.allgather_obj((self.stale[0], step))
        extra = {"max_staleness": max(p[0] for p in peaks), "mean_staleness": sums[0] / max(sums[1], 1),
                 "last_step": max(p[1] for p in peaks)}
        if self.clip:
            extra.update(grad_norm=self.norms[0] / max(n_steps, 1), clipped_steps=self.norms[1])
            self.norms = [0.0, 0]
        r = self.run_stale
        self.run_stale = [max(r[0], extra["max_staleness"]), r[1] + sums[0], r[2] + sums[1]]
        self.stale = [0, 0, 0]
        return extra

    def end_epoch(self, record, step, position):
        if self.comm.rank == 0:                    # to rank 0 (a server), which writes the records
            self.send_ctrl(0, {"kind": "epoch", "record": record})


def _work(cfg: Config, s, world: Communicator, wcomm: Communicator, bounds, start, reporter, on_step):
    """A worker: the loop, with push/pull in place of the allreduce. Returns (summary or {"error": ...}, traffic)."""
    worker = Worker(world, wcomm, s.model, bounds, cfg)
    for srv in range(len(bounds)):                  # the initial shards
        worker.expect(srv, count=False)
    worker.wait()
    error, stopped = None, False
    try:
        step, epoch, t0, stopped, reason = train_loop(cfg, s, worker, start, {}, reporter, on_step)
    except TrainingError as e:                      # raised on every worker together: tell the servers
        error = str(e)
    # Shut down: tell every server, then take the final shards, which hold every worker's last update.
    for srv in range(len(bounds)):
        worker.send_ctrl(srv, {"kind": "done", "stopped": stopped})
        worker.expect(srv, count=False)
    worker.wait()
    traffic = (worker.bytes_sent, worker.bytes_received)
    if error is not None:
        return {"error": error}, traffic
    check_replicas(wcomm, s.model.params, step)
    r = worker.run_stale
    summary = {**final_metrics(s, wcomm, step=step, epoch=epoch, world_size=world.size, t0=t0, stop_reason=reason),
               "max_staleness": r[0], "mean_staleness": r[1] / max(r[2], 1)}
    if stopped:
        summary["stopped_at"] = step
    return summary, traffic
