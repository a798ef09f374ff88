"""A run's configuration and folder, shared by every mode (set-up: setup.py; SIGTERM: stop.py).

    given = {"dataset": "digits", "epochs": 5}          # what the user said (flags, TOML, ddp.fit kwargs)
    cfg = resolve_config(given)                        # + the checkpoint's settings when resuming
    setup, ckpt = start_run(cfg, comm)                 # data, preprocessing, model; the run folder checked
    reporter = Reporter(cfg, comm.rank == 0, ...)      # report.py: metrics, epoch lines, best.npz, summary

Everything a run writes lives in its folder (--out): config.toml, metrics.jsonl, checkpoint.npz, best.npz,
summary.json. A checkpoint is self-contained: weights, optimizer state, position in the data, the resolved
configuration, and the preprocessing (input standardization, target standardization, the class labels as
they appeared in the data), so `ddp.load` can use the model on raw rows. It loads with allow_pickle=False.
Only rank 0 writes. A folder that holds any run file is a run: never overwritten unless asked (--resume,
--overwrite). A run holds its folder's lock (lock.py) until it ends.
"""
from __future__ import annotations

import itertools
import json
import os

from .checkpoint import BEST, CHECKPOINT, check_resume, load_checkpoint, saved_config
from .comm import Communicator
from .config import Config, merge_for_resume
from .errors import UsageError
from .lock import LOCK, lock
from .report import restart_count
from .setup import agree, build


def start_run(cfg: Config, comm: Communicator, raw=None):
    """Set-up shared by both modes, agreed by every rank: the data and model built, the checkpoint (if
    resuming) checked against them, then the run folder checked (rank 0) before anything is written.
    Returns (setup, checkpoint or None)."""
    s = agree(comm, build, cfg, comm.local_rank, raw, comm)

    def load():
        ckpt = load_checkpoint(cfg.resume)
        check_resume(ckpt, s, cfg.resume)
        return ckpt
    ckpt = agree(comm, load) if cfg.resume else None
    # Last, once every input has been checked: --overwrite clears the folder here, so bad input never costs
    # the user the run it would have replaced.
    agree(comm, lambda: prepare_out(cfg) if comm.rank == 0 and cfg.out else None)
    return s, ckpt


def resolve_config(given: dict) -> Config:
    """The configuration of a run from the settings the user gave (flags/TOML/kwargs).

    With resume, the checkpoint's saved configuration is the base and `given` may only change run settings
    (config.RUN_SETTINGS); --out defaults to the checkpoint's folder. Under launch/mpirun.sh --max-restarts
    (DDP_RESTART >= 1), a relaunched job resumes from its folder's checkpoint when there is one.
    """
    given = dict(given)
    restart = restart_count()
    if restart and not given.get("resume"):
        out = given.get("out") or latest_auto_out(Config(**{k: v for k, v in given.items() if k != "out"}))
        if out and os.path.exists(os.path.join(out, CHECKPOINT)):
            given.update(resume=os.path.join(out, CHECKPOINT), out=out)
    path = given.get("resume")
    if not path:
        return Config(**given).validate()
    values = merge_for_resume(saved_config(path), given, path)
    values.update(out=given.get("out") or os.path.dirname(os.path.abspath(path)), overwrite=False)
    return Config(**values).validate()


RUN_FILES = (CHECKPOINT, BEST, "metrics.jsonl", "summary.json", "config.toml")


def run_files(out: str) -> list[str]:
    return [os.path.join(out, n) for n in RUN_FILES if os.path.lexists(os.path.join(out, n))]


def auto_outs(dataset: str):
    """runs/DATASET, runs/DATASET-2, runs/DATASET-3, ..."""
    base = os.path.join("runs", dataset)
    return itertools.chain([base], (f"{base}-{n}" for n in itertools.count(2)))


def auto_out(cfg: Config) -> str:
    """runs/DATASET, or the first runs/DATASET-N that holds no run yet."""
    return next(path for path in auto_outs(cfg.dataset) if not run_files(path))


def latest_auto_out(cfg: Config) -> str | None:
    """The newest existing runs/DATASET[-N] (a restarted job goes back to the folder it made)."""
    found = list(itertools.takewhile(os.path.isdir, auto_outs(cfg.validate().dataset)))
    return found[-1] if found else None


def prepare_out(cfg: Config) -> None:
    """Check the run folder before anything is written (rank 0). Refuses to start a new run over one."""
    out = cfg.out
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {out} is a file, not a folder")
    if cfg.trace:
        refuse_run_file(cfg.trace, "--trace")
    try:
        os.makedirs(out, exist_ok=True)
        lock(out)                                  # also the proof that the folder is writable
    except OSError as e:
        raise UsageError(f"cannot write to --out {out}: {e.strerror or e}") from None
    held, ckpt = run_files(out), os.path.join(out, CHECKPOINT)
    if held and not cfg.resume and not cfg.overwrite:
        raise UsageError(f"{out} already holds a run ({held[0]}); continue it with --resume {ckpt}, replace it "
                         "with --overwrite, or choose another --out")
    if cfg.overwrite and not cfg.resume:
        for path in held:
            os.remove(path)


def refuse_run_file(path: str, flag: str) -> None:
    """An output path of a command must not replace a model or a run's file."""
    if os.path.basename(path) in RUN_FILES + (LOCK,) or (path.endswith(".npz") and os.path.lexists(path)):
        raise UsageError(f"{flag} {path} would overwrite a run's file or a model; choose another path")


def finished_summary(cfg: Config, step: int, epoch: int, reporter_active: bool) -> dict:
    """Resuming a run that already reached its end: say so, train nothing, touch nothing."""
    if reporter_active:
        print(f"ddp: the run in {cfg.out} already finished at step {step} (epoch {epoch} of {cfg.epochs}"
              f"{f', max steps {cfg.max_steps}' if cfg.max_steps else ''}); nothing to do. To train further, "
              f"resume with a larger --epochs (or --max-steps).", flush=True)
    try:
        with open(os.path.join(cfg.out, "summary.json")) as fh:
            summary = json.load(fh)
    except (OSError, ValueError):
        summary = {"steps": step, "epochs": epoch}
    summary["already_finished"] = True
    return summary
