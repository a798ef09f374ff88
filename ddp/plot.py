"""`ddp plot`: learning curves of one or more runs, from their metrics.jsonl.

    ddp plot runs/digits --out curves.png
    ddp plot runs/sigmoid runs/relu --out vanishing.png     # overlaid, labelled by folder

Panels: train and validation loss per epoch (validation dashed), the validation metric (accuracy or R²),
and, when a run logged --grad-norms, each layer's gradient norm on a log scale: the vanishing-gradient
experiment of the README in one picture. matplotlib (the `plot` extra) draws it with the Agg backend, so it
works without a display.
"""
from __future__ import annotations

import json
import os

from .errors import UsageError


def read_metrics(run: str) -> list[dict]:
    """The epoch records of a run folder (or of a metrics.jsonl file)."""
    path = os.path.join(run, "metrics.jsonl") if os.path.isdir(run) else run
    if not os.path.isfile(path):
        raise UsageError(f"{run}: no metrics.jsonl (is it a ddp run folder?)")
    records = []
    with open(path) as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except (ValueError, RecursionError):
                raise UsageError(f"{path}: line {n} is not JSON") from None
            if not _is_record(rec):
                raise UsageError(f"{path}: line {n} is not a ddp epoch record (an epoch number, numbers or null "
                                 "for the losses and metrics, a list of numbers for grad_norms)")
            records.append(rec)
    if not records:
        raise UsageError(f"{path} has no epochs yet")
    if len({len(r["grad_norms"]) for r in records if "grad_norms" in r}) > 1:
        raise UsageError(f"{path}: grad_norms has a different number of layers from one epoch to another")
    return [r for r in records if not r.get("partial")] or records


def _is_record(rec) -> bool:
    def number(v, null=True):
        return (v is None and null) or (isinstance(v, (int, float)) and not isinstance(v, bool))
    return (isinstance(rec, dict) and number(rec.get("epoch"), null=False)
            and all(number(rec.get(k)) for k in ("train_loss", "val_loss", "val_accuracy", "val_r2"))
            and isinstance(norms := rec.get("grad_norms", []), list) and all(number(v, False) for v in norms))


def label_of(run: str) -> str:
    path = os.path.abspath(run)
    return os.path.basename(os.path.dirname(path) if path.endswith(".jsonl") else path)


def make_figure(runs: list[str]):
    """A matplotlib Figure of the runs' curves (one colour per run)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("ddp plot needs matplotlib: pip install 'ddp[plot]'") from None
    data = [(label_of(r), read_metrics(r)) for r in runs]
    grads = any("grad_norms" in rec for _, recs in data for rec in recs)
    fig, (axes,) = plt.subplots(1, 3 if grads else 2, figsize=(15 if grads else 10, 4), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    metric_names = set()
    for i, (label, recs) in enumerate(data):
        c = colors[i % len(colors)]
        ep = [r["epoch"] for r in recs]
        axes[0].plot(ep, [r.get("train_loss") for r in recs], color=c, label=f"{label} train")
        if any("val_loss" in r for r in recs):
            axes[0].plot(ep, [r.get("val_loss") for r in recs], color=c, linestyle="--", label=f"{label} val")
        if key := next((k for k in ("val_accuracy", "val_r2") if k in recs[0]), None):
            metric_names.add(key.removeprefix("val_"))
            axes[1].plot(ep, [r.get(key) for r in recs], color=c, label=label)
        if with_norms := [r for r in recs if "grad_norms" in r]:
            n_layers = len(with_norms[0]["grad_norms"])
            for layer in range(n_layers):
                alpha = 0.35 + 0.65 * layer / max(n_layers - 1, 1)
                axes[2].plot([r["epoch"] for r in with_norms], [r["grad_norms"][layer] for r in with_norms],
                             color=c, alpha=alpha, label=f"{label} layer {layer}")
    axes[0].set(title="loss", xlabel="epoch", ylabel="loss")
    axes[1].set(title="validation " + " / ".join(sorted(metric_names) or ["metric"]), xlabel="epoch")
    if grads:
        axes[2].set(title="gradient norm per layer", xlabel="epoch", yscale="log")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def plot(runs: list[str], out: str) -> str:
    fig = make_figure(runs)
    try:
        fig.savefig(out, dpi=100)
    except OSError as e:
        raise UsageError(f"cannot write {out}: {e.strerror or e}") from None
    finally:
        import matplotlib.pyplot as plt
        plt.close(fig)
    return out
