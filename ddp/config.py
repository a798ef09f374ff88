"""Training configuration: one dataclass, read from TOML, overridden by flags.

Every field becomes a `--flag` (underscores become dashes) whose help text is
the field's `help` metadata, so the TOML keys, the flags and `--help` can never
drift apart. Precedence: defaults < `--config FILE.toml` < flags. Nothing is
ever `exec`'d or `eval`'d: TOML is parsed by tomllib and checked field by field.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from dataclasses import dataclass, field

from .errors import UsageError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def opt(default, help, choices=None, group="training"):
    return field(default=default, metadata={"help": help, "choices": choices, "group": group})


@dataclass
class Config:
    # data
    dataset: str = opt("digits", "dataset: digits, breast_cancer, diabetes, synthetic_classification, "
                       "synthetic_regression, or npz/csv/idx with --data-path", group="data")
    data_path: str = opt("", "file for npz/csv datasets; 'IMAGES,LABELS' for idx", group="data")
    task: str = opt("auto", "classification or regression (auto: from the dataset)",
                    ["auto", "classification", "regression"], group="data")
    n_samples: int = opt(2000, "samples in a synthetic dataset", group="data")
    n_features: int = opt(20, "features in a synthetic dataset", group="data")
    n_classes: int = opt(3, "classes in synthetic_classification", group="data")
    val_fraction: float = opt(0.1, "fraction of the data held out for validation", group="data")
    test_fraction: float = opt(0.2, "fraction of the data held out for the final test", group="data")
    standardize: bool = opt(True, "standardize features with the training set's mean and std", group="data")
    # model
    hidden: str = opt("128,64", "hidden layer sizes, comma-separated ('' for none)", group="model")
    activation: str = opt("relu", "hidden activation", ["relu", "leaky_relu", "sigmoid", "tanh", "identity"],
                          group="model")
    loss: str = opt("auto", "loss (auto: softmax_cross_entropy for classification, mse for regression)",
                    ["auto", "mse", "binary_cross_entropy", "softmax_cross_entropy"], group="model")
    init: str = opt("he", "weight initialisation", ["he", "xavier"], group="model")
    dtype: str = opt("float32", "floating-point precision", ["float32", "float64"], group="model")
    device: str = opt("cpu", "where the math runs (auto: GPU if usable)", ["cpu", "gpu", "auto"], group="model")
    # optimizer
    optimizer: str = opt("sgd", "optimizer", ["sgd", "adam", "adamw"], group="optimizer")
    lr: float = opt(0.1, "learning rate", group="optimizer")
    momentum: float = opt(0.0, "SGD momentum", group="optimizer")
    nesterov: bool = opt(False, "Nesterov momentum (SGD)", group="optimizer")
    weight_decay: float = opt(0.0, "weight decay (L2 for sgd/adam, decoupled for adamw)", group="optimizer")
    beta1: float = opt(0.9, "Adam beta1", group="optimizer")
    beta2: float = opt(0.999, "Adam beta2", group="optimizer")
    eps: float = opt(1e-8, "Adam epsilon", group="optimizer")
    schedule: str = opt("constant", "learning-rate schedule", ["constant", "step", "cosine"], group="optimizer")
    warmup_steps: int = opt(0, "linear learning-rate warmup steps", group="optimizer")
    step_size: int = opt(1000, "steps between decays of the step schedule", group="optimizer")
    gamma: float = opt(0.1, "decay factor of the step schedule", group="optimizer")
    # training
    batch_mode: str = opt("minibatch", "sgd (batch 1), minibatch (--batch-size) or full (whole training set)",
                          ["sgd", "minibatch", "full"])
    batch_size: int = opt(64, "GLOBAL batch size per optimizer step, split evenly across ranks")
    epochs: int = opt(10, "passes over the training set")
    max_steps: int = opt(0, "stop after this many optimizer steps (0: no limit)")
    seed: int = opt(0, "seed for initialisation, the data split and shuffling")
    out: str = opt("runs/ddp", "output folder for metrics.jsonl, checkpoint.npz and summary.json")
    resume: str = opt("", "checkpoint.npz to continue from")
    grad_norms: bool = opt(False, "log each layer's gradient norm per epoch (watch gradients vanish)")
    progress: bool = opt(True, "show a progress bar")
    # distributed
    mode: str = opt("allreduce", "allreduce (gradient averaging) or ps (parameter server)",
                    ["allreduce", "ps"], group="distributed")
    simulate_ranks: int = opt(0, "simulate N ranks in this one process (no MPI launcher needed)",
                              group="distributed")
    bucket_mb: float = opt(1.0, "gradient bucket size in MB for the overlapped allreduce", group="distributed")
    overlap: str = opt("auto", "reduce gradient buckets during backward (on), or in one blocking allreduce after "
                       "it (off); auto: on for GPU arrays, off on CPU, where it measured slower (benchmarks/RESULTS.md)",
                       ["auto", "on", "off"], group="distributed")
    accumulate: int = opt(1, "split each rank's batch into k micro-batches; communicate once per step",
                          group="distributed")
    compress: str = opt("none", "gradient compression for the allreduce", ["none", "fp16"], group="distributed")
    drop_last: bool = opt(False, "drop the last partial batch of each epoch", group="distributed")
    check_every: int = opt(100, "compare a hash of the parameters across ranks every N steps (0: only at "
                           "the end)", group="distributed")
    debug: bool = opt(False, "check before each collective that all ranks make the same call",
                      group="distributed")
    servers: int = opt(1, "ps mode: the first S ranks are parameter servers", group="distributed")
    consistency: str = opt("sync", "ps mode: sync, async, or ssp (bounded staleness, see --staleness)",
                           ["sync", "async", "ssp"], group="distributed")
    staleness: int = opt(0, "ps mode with ssp: no worker runs more than k steps ahead of the slowest",
                         group="distributed")
    timeout: float = opt(300.0, "end the job, naming the ranks that have not arrived, when one wait in a "
                         "collective or parameter-server exchange lasts this many seconds", group="distributed")

    def hidden_sizes(self) -> list[int]:
        text = self.hidden.strip()
        if not text:
            return []
        try:
            sizes = [int(s) for s in text.split(",")]
        except ValueError:
            raise UsageError(f"--hidden {self.hidden!r} must be comma-separated integers, e.g. 128,64") from None
        if min(sizes) < 1:
            raise UsageError(f"--hidden {self.hidden!r}: layer sizes must be positive")
        return sizes

    def validate(self) -> "Config":
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise UsageError(f"unknown {f.name.replace('_', ' ')} {getattr(self, f.name)!r}: "
                                 f"expected one of {', '.join(choices)}")
        checks = [
            (self.lr > 0, f"learning rate must be positive, got {self.lr}"),
            (self.batch_size >= 1, f"batch size {self.batch_size} must be >= 1"),
            (self.epochs >= 1, f"epochs {self.epochs} must be >= 1"),
            (self.max_steps >= 0, f"max steps {self.max_steps} must be >= 0"),
            (self.accumulate >= 1, f"accumulate {self.accumulate} must be >= 1"),
            (self.bucket_mb >= 0, f"bucket size {self.bucket_mb} MB must be >= 0"),
            (self.simulate_ranks >= 0, f"simulate ranks {self.simulate_ranks} must be >= 0"),
            (self.check_every >= 0, f"check every {self.check_every} must be >= 0"),
            (self.staleness >= 0, f"staleness {self.staleness} must be >= 0"),
            (self.servers >= 1, f"servers {self.servers} must be >= 1"),
            (math.isfinite(self.timeout) and self.timeout > 0,
             f"timeout {self.timeout} must be a finite number of seconds > 0"),
        ]
        for ok, msg in checks:
            if not ok:
                raise UsageError(msg)
        self.hidden_sizes()
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(Config)}


def _coerce(name, value):
    """A TOML or checkpoint value, checked against the field's type."""
    f = FIELDS[name]
    typ = {"str": str, "int": int, "float": float, "bool": bool}[f.type]
    if name == "hidden" and isinstance(value, list):
        value = ",".join(str(v) for v in value)
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise UsageError(f"config key {name!r} must be a {f.type}, got {value!r}")
    return value


def load_toml(path: str) -> dict:
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise UsageError(f"config file {path} not found") from None
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"config file {path} is not valid TOML: {e}") from None
    except OSError as e:
        raise UsageError(f"cannot read config file {path}: {e.strerror}") from None
    if isinstance(data.get("train"), dict):      # allow a [train] table as well as top-level keys
        data = {**{k: v for k, v in data.items() if k != "train"}, **data["train"]}
    out = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in FIELDS:
            raise UsageError(f"config file {path}: unknown key {key!r}")
        out[name] = _coerce(name, value)
    return out


def add_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per Config field. Defaults are SUPPRESSed so that we can tell
    which flags were given, and let only those override the TOML file."""
    parser.add_argument("--config", metavar="FILE.toml", help="read settings from a TOML file; flags override it")
    groups = {}
    for f in dataclasses.fields(Config):
        g = f.metadata["group"]
        if g not in groups:
            groups[g] = parser.add_argument_group(g)
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata['help']} (default: {f.default!r})"
        if f.type == "bool":
            groups[g].add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                   help=help_text)
        else:
            typ = {"str": str, "int": int, "float": float}[f.type]
            groups[g].add_argument(flag, type=typ, default=argparse.SUPPRESS, help=help_text,
                                   choices=f.metadata["choices"], metavar=f.name.upper())


def from_args(ns: argparse.Namespace) -> Config:
    values = load_toml(ns.config) if getattr(ns, "config", None) else {}
    values.update({k: v for k, v in vars(ns).items() if k in FIELDS})
    return Config(**values).validate()
