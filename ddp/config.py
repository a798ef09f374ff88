"""Training configuration: one dataclass, read from TOML, overridden by flags.

Every field becomes a `--flag` (underscores become dashes) whose help text is
the field's `help` metadata, so the TOML keys, the flags and `--help` can never
drift apart. Precedence: defaults < `--config FILE.toml` < flags. Nothing is
ever `exec`'d or `eval`'d: TOML is parsed by tomllib and checked field by field.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field

from .data import BATCH_MODES, DATASETS, FILE_FORMATS, SCALES, TASKS, infer_format
from .errors import UsageError, regular_file
from .losses import LOSSES
from .nn import ACTIVATIONS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def opt(default, help, choices=None, group="training", auto=False):
    """auto: the number may also be the string "auto" (chosen by ddp at start-up)."""
    return field(default=default, metadata={"help": help, "choices": choices, "group": group, "auto": auto})


def number(text: str):
    """--flag's value: a float, or "auto" (argparse names this function in its error: "invalid number value")."""
    return text if text == "auto" else float(text)


@dataclass
class Config:
    # data
    dataset: str = opt("auto", "a built-in dataset, or a file format with --data-path (auto: the format "
                       "from --data-path's extension, else digits)", ("auto", *DATASETS), group="data")
    data_path: str = opt("", "a .npz (arrays X, y), .csv or .csv.gz (last column the target, header "
                         "detected, string labels allowed) or 'IMAGES,LABELS' idx files", group="data")
    val_path: str = opt("", "a validation file, in --data-path's format (then --val-fraction does not apply)",
                        group="data")
    test_path: str = opt("", "a test file, in --data-path's format, such as the official test split (then "
                         "--test-fraction does not apply; summary.json reports it)", group="data")
    task: str = opt("auto", "classification or regression (auto: from the dataset)", TASKS, group="data")
    n_samples: int = opt(2000, "samples in a synthetic dataset", group="data")
    n_features: int = opt(20, "features in a synthetic dataset", group="data")
    n_classes: int = opt(3, "classes in synthetic_classification", group="data")
    val_fraction: float = opt(0.1, "fraction of the data held out for validation", group="data")
    test_fraction: float = opt(0.2, "fraction of the data held out for the final test", group="data")
    scale: str = opt("auto", "input scaling fitted on the training set: standard (per-feature mean and std), "
                     "minmax (overall min and max to 0..1), none; auto: uint8 data (images) / 255, else standard",
                     SCALES, group="data")
    # model
    hidden: str = opt("128,64", "hidden layer sizes, comma-separated ('' for none): the MLP shorthand", group="model")
    arch: str = opt("", "the network's layers, comma-separated, instead of --hidden and --activation: dense:N, "
                    "conv:OUT:K[:STRIDE[:PAD]], maxpool:K, avgpool:K, flatten, dropout:P, batchnorm, layernorm and "
                    "the activations, e.g. conv:32:3,relu,maxpool:2,flatten,dense:10 (TOML: a string or a list)",
                    group="model")
    input_shape: str = opt("", "C,H,W of one sample, for conv and pooling layers (default: the idx images' "
                           "shape, else flat features)", group="model")
    activation: str = opt("relu", "hidden activation", list(ACTIVATIONS), group="model")
    loss: str = opt("auto", "loss (auto: softmax_cross_entropy for classification, mse for regression)",
                    ["auto", *LOSSES], group="model")
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
    clip_grad_norm: float = opt(0.0, "MAX: scale the averaged gradient down to this global L2 norm when it is "
                                "larger, as torch.nn.utils.clip_grad_norm_ (0: off)", group="optimizer")
    # training
    batch_mode: str = opt("minibatch", "sgd (batch 1), minibatch (--batch-size) or full (whole training set)",
                          BATCH_MODES)
    batch_size: int = opt(64, "GLOBAL batch size per optimizer step, split evenly across ranks")
    epochs: int = opt(10, "passes over the training set")
    max_steps: int = opt(0, "stop after this many optimizer steps (0: no limit)")
    seed: int = opt(0, "seed for initialisation, the data split and shuffling")
    out: str = opt("", "run folder for metrics.jsonl, checkpoints, config.toml and summary.json (default: "
                   "runs/DATASET, or runs/DATASET-2, -3... if that holds a run; with --resume, the checkpoint's "
                   "folder)")
    resume: str = opt("", "checkpoint.npz to continue from; its configuration is the base, and only run "
                      "length, output and monitoring flags may differ")
    overwrite: bool = opt(False, "start a new run in an --out folder that already holds one, replacing it")
    checkpoint_every: int = opt(0, "also save checkpoint.npz every N optimizer steps (0: at epoch ends only)")
    grad_norms: bool = opt(False, "log each layer's gradient norm per epoch (watch gradients vanish)")
    progress: bool = opt(True, "show a progress bar (only when stderr is a terminal)")
    quiet: bool = opt(False, "do not print the one line per epoch")
    logger: str = opt("none", "also write each epoch's record to the run folder as metrics.csv (csv) or as event "
                      "files for `tensorboard --logdir` (tensorboard)", ["none", "csv", "tensorboard"])
    early_stopping: int = opt(0, "PATIENCE: stop when --monitor has not improved by --min-delta for this many "
                              "epochs (0: off); needs validation data")
    min_delta: float = opt(0.0, "early stopping: the least change of --monitor that counts as an improvement")
    monitor: str = opt("val_metric", "what early stopping and best.npz follow: val_loss, or val_metric "
                       "(accuracy, or R² for regression)", ["val_loss", "val_metric"])
    trace: str = opt("", "write a timeline of every rank (Chrome trace format: open it in Perfetto or "
                     "chrome://tracing) to this .json file")
    # distributed
    mode: str = opt("allreduce", "allreduce (gradient averaging) or ps (parameter server)",
                    ["allreduce", "ps"], group="distributed")
    simulate_ranks: int = opt(0, "simulate N ranks in this one process (no MPI launcher needed)",
                              group="distributed")
    bucket_mb: float = opt(1.0, "gradient bucket size in MB for the overlapped allreduce; auto: each distinct "
                           "bucketing of a grid from 0 to 32 MB tried on the first training steps, the fastest kept "
                           "(turns --overlap auto on: one bucket is the blocking allreduce after backward)",
                           group="distributed", auto=True)
    overlap: str = opt("auto", "reduce gradient buckets during backward (on), or in one blocking allreduce after "
                       "it (off); auto: on for GPU arrays and with --bucket-mb auto, off on CPU, where it measured "
                       "slower (benchmarks/RESULTS.md)",
                       ["auto", "on", "off"], group="distributed")
    accumulate: int = opt(1, "split each rank's batch into k micro-batches; communicate once per step",
                          group="distributed")
    compress: str = opt("none", "gradient compression for the allreduce: none, fp16 (half the bytes), "
                        "powersgd:R (rank-R PowerSGD on each weight matrix, with error feedback), or auto "
                        "(powersgd:1/2/4, fp16 and none timed on this job's ranks before training; the start line "
                        "says which)", group="distributed")
    error_feedback: bool = opt(True, "PowerSGD: add what compression lost to the next step's gradient "
                               "(--no-error-feedback is for experiments: training then stalls)", group="distributed")
    noise_scale: bool = opt(False, "report the gradient noise scale B_simple (the critical batch size) each "
                            "epoch, from each rank's gradient before the allreduce and the averaged one after it; "
                            "needs 2 or more ranks", group="distributed")
    deterministic: bool = opt(False, "bitwise-identical results for any world size: each global batch is cut "
                              "into --chunks fixed chunks whose gradients are added in fixed point (README)",
                              group="distributed")
    chunks: int = opt(8, "--deterministic: chunks per global batch (a rank computes its chunks one by one; "
                      "more ranks than chunks leaves some idle)", group="distributed")
    shard_optimizer: bool = opt(False, "ZeRO stage 1: each rank keeps the optimizer state of 1/N of the parameters "
                                "(a reduce-scatter of the gradients, the update of its part, an allgather of the "
                                "parameters); checkpoints hold the whole state", group="distributed")
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
        if min(sizes) < 1 or max(sizes) > MAX_WIDTH:
            raise UsageError(f"--hidden {self.hidden!r}: layer sizes must be in 1..{MAX_WIDTH}")
        return sizes

    def validate(self) -> "Config":
        """Check every value, and resolve dataset 'auto'. Raises UsageError naming the setting."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            choices = f.metadata.get("choices")
            if choices and value not in choices:
                raise UsageError(f"unknown {f.name.replace('_', ' ')} {value!r}: expected one of {', '.join(choices)}")
            if f.type == "float" and value != "auto" and not math.isfinite(value):
                raise UsageError(f"--{flag(f.name)} must be a finite number, got {value}")
        if self.dataset == "auto":
            self.dataset = infer_format(self.data_path) if self.data_path else "digits"
        elif self.data_path and self.dataset not in FILE_FORMATS:
            raise UsageError(f"--data-path is for file datasets ({', '.join(FILE_FORMATS)}); dataset "
                             f"{self.dataset!r} is built in: drop --data-path or --dataset")
        if (self.val_path or self.test_path) and self.dataset not in FILE_FORMATS:
            raise UsageError(f"--val-path and --test-path are for file datasets (--data-path); {self.dataset!r} "
                             "is built in")
        checks = [
            (self.lr > 0, f"learning rate must be positive, got {self.lr}"),
            (0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum}"),
            (self.weight_decay >= 0, f"weight decay must be >= 0, got {self.weight_decay}"),
            (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, f"Adam betas must be in [0, 1), got "
                                                         f"{self.beta1}, {self.beta2}"),
            (self.eps > 0, f"Adam eps must be positive, got {self.eps}"),
            (self.gamma > 0, f"gamma must be positive, got {self.gamma}"),
            (self.compress in ("none", "fp16", "auto") or re.fullmatch(r"powersgd:[1-9][0-9]{0,3}", self.compress),
             f"unknown compress {self.compress!r}: expected none, fp16, powersgd:R (R a rank, e.g. powersgd:2) "
             "or auto"),
            (self.compress != "auto" or self.mode == "allreduce", "--compress auto needs --mode allreduce"),
            (not self.compress.startswith("powersgd") or self.mode == "allreduce",
             "--compress powersgd needs --mode allreduce"),
            (self.clip_grad_norm >= 0, f"clip grad norm must be >= 0 (0: off), got {self.clip_grad_norm}"),
            (not self.clip_grad_norm or self.mode == "allreduce" or self.ps_sync(), "--clip-grad-norm in ps mode "
             "needs --consistency sync: async servers apply gradients one by one"),
            (not self.noise_scale or self.mode == "allreduce", "--noise-scale needs --mode allreduce: ps workers "
                                                               "never see the averaged gradient"),
            (1 <= self.chunks <= MAX_COUNT, f"chunks {self.chunks} must be >= 1"),
            (not self.deterministic or self.mode == "allreduce" or self.ps_sync(), "--deterministic in ps mode "
             "needs --consistency sync: async updates depend on arrival order"),
            (not (self.deterministic and self.clip_grad_norm and self.mode == "ps"), "--clip-grad-norm with "
             "--deterministic needs --mode allreduce: the ps servers' norm is summed over their parts, in an order "
             "that depends on --servers"),
            (not self.deterministic or self.compress == "none", "--deterministic cannot be combined with "
                                                                "--compress: compression is not exact"),
            (not self.deterministic or not self.noise_scale, "--noise-scale needs each rank's own gradient, which "
                                                             "--deterministic does not form: use one of them"),
            (not self.shard_optimizer or self.mode == "allreduce", "--shard-optimizer needs --mode allreduce: "
                                                                   "ps servers hold shards of the state already"),
            (not self.shard_optimizer or self.compress == "none", "--shard-optimizer cannot be combined with "
                                                                  "--compress: the reduce-scatter is uncompressed"),
            (not self.shard_optimizer or not self.grad_norms, "--grad-norms needs the whole gradient on every rank: "
                                                              "drop it or --shard-optimizer"),
            (self.step_size >= 1, f"step size {self.step_size} must be >= 1"),
            (self.warmup_steps >= 0, f"warmup steps {self.warmup_steps} must be >= 0"),
            (0 <= self.seed <= MAX_SEED, f"seed {self.seed} must be in 0..2**63-1"),
            (1 <= self.batch_size <= MAX_COUNT, f"batch size {self.batch_size} must be >= 1"),
            (1 <= self.epochs <= MAX_COUNT, f"epochs {self.epochs} must be in 1..{MAX_COUNT}"),
            (0 <= self.max_steps <= MAX_COUNT, f"max steps {self.max_steps} must be in 0..{MAX_COUNT}"),
            (1 <= self.accumulate <= self.batch_size, f"accumulate {self.accumulate} must be in 1..batch size "
                                                      f"({self.batch_size}): each micro-batch needs a sample"),
            (self.bucket_mb == "auto" or 0 <= self.bucket_mb <= 1 << 20, f"bucket size {self.bucket_mb} MB must be "
                                                                         f"in 0..{1 << 20}"),
            (self.bucket_mb != "auto" or (self.mode == "allreduce" and self.overlap != "off" and not
                                          self.deterministic and not self.shard_optimizer and not
                                          self.compress.startswith("powersgd")),
             "--bucket-mb auto times overlapped buckets: it needs --mode allreduce, and no --overlap off, "
             "--deterministic, --shard-optimizer or --compress powersgd (they reduce after backward)"),
            (0 <= self.simulate_ranks <= MAX_SIMULATED, f"simulate ranks {self.simulate_ranks} must be in "
                                                        f"0..{MAX_SIMULATED} (threads of one process)"),
            (self.check_every >= 0, f"check every {self.check_every} must be >= 0"),
            (self.checkpoint_every >= 0, f"checkpoint every {self.checkpoint_every} must be >= 0"),
            (self.staleness >= 0, f"staleness {self.staleness} must be >= 0"),
            (self.servers >= 1, f"servers {self.servers} must be >= 1"),
            (1 <= self.n_samples <= MAX_SAMPLES, f"n samples {self.n_samples} must be in 1..{MAX_SAMPLES}"),
            (1 <= self.n_features <= MAX_WIDTH, f"n features {self.n_features} must be in 1..{MAX_WIDTH}"),
            (self.dataset not in ("synthetic_classification", "synthetic_regression")
             or 16 * self.n_samples * self.n_features <= memory_bytes(),
             f"a synthetic dataset of {self.n_samples} x {self.n_features} needs more than this machine's memory"),
            (2 <= self.n_classes <= MAX_WIDTH, f"n classes {self.n_classes} must be in 2..{MAX_WIDTH}"),
            (0 <= self.val_fraction < 1, f"val fraction {self.val_fraction} must be in [0, 1)"),
            (0 <= self.test_fraction < 1, f"test fraction {self.test_fraction} must be in [0, 1)"),
            (self.timeout > 0, f"timeout {self.timeout} must be a number of seconds > 0"),
            (self.early_stopping >= 0 and self.min_delta >= 0, f"early stopping {self.early_stopping} and min "
                                                              f"delta {self.min_delta} must be >= 0"),
            (self.logger != "tensorboard" or importlib.util.find_spec("tensorboard"),
             '--logger tensorboard needs the tensorboard package: pip install -e ".[tensorboard]"'),
        ]
        for ok, msg in checks:
            if not ok:
                raise UsageError(msg)
        self.hidden_sizes()
        batchnorm = self.arch and "batchnorm" in self.arch.replace(" ", "").lower().split(",")
        if batchnorm and self.mode == "ps":
            raise UsageError("--arch with batchnorm needs --mode allreduce: ps workers do not share batch statistics")
        if batchnorm and self.deterministic:
            raise UsageError("--deterministic cannot train batchnorm: its statistics span the whole batch, but "
                             "each chunk is computed alone (layernorm works)")
        return self

    def ps_sync(self) -> bool:
        """ps mode's bulk-synchronous protocol: --consistency sync, or ssp with staleness 0."""
        return self.consistency == "sync" or (self.consistency == "ssp" and self.staleness == 0)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(Config)}
TYPES = {"str": str, "int": int, "float": float, "bool": bool}     # a field's annotation, a string here
MAX_SEED = 2**63 - 1            # NumPy seeds are unbounded, but the checkpoint stores the seed as int64
MAX_COUNT = 10**9
MAX_WIDTH = 1 << 20
MAX_SAMPLES = 10**8              # synthetic rows: 10^8 x 20 float64 is 16 GB already
def memory_bytes() -> int:
    """Sizes are checked as a product against this before anything is allocated."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


MAX_SIMULATED = 64               # each simulated rank is a thread; hundreds only thrash

# On resume the checkpoint's configuration is the base. These settings may differ from it, because they do
# not change what is computed: how long to run, where output goes, what is shown, and how the same
# arithmetic is spread over ranks and devices. Any other difference is refused by name.
RUN_SETTINGS = frozenset({
    "epochs", "max_steps", "out", "resume", "overwrite", "checkpoint_every", "progress", "quiet", "grad_norms",
    "check_every", "debug", "timeout", "trace", "device", "simulate_ranks", "bucket_mb", "overlap",
    "accumulate", "mode", "servers", "logger", "early_stopping", "min_delta", "monitor", "noise_scale",
    "shard_optimizer",
})


# Output paths come only from the command line: a shared checkpoint must not choose where a run writes.
NOT_INHERITED = frozenset({"max_steps", "resume", "overwrite", "out", "trace"})


def flag(name: str) -> str:
    return name.replace("_", "-")


def merge_for_resume(saved: dict, given: dict, path: str) -> dict:
    """The configuration of a resumed run: the checkpoint's `saved` settings, then the `given` ones (from
    flags or TOML). A given setting that changes the data, model, optimizer or seed is an error."""
    # A key a newer ddp wrote is not ours to judge. --max-steps stopped the saved invocation; carrying
    # it over would stop the resumed one at once.
    values = {name: coerce(name, value, f"checkpoint {path}") for name, value in saved.items()
              if name in FIELDS and name not in NOT_INHERITED}
    for name, value in given.items():
        if name not in RUN_SETTINGS and name in values and values[name] != value:
            raise UsageError(f"--{flag(name)} {value!r} differs from the checkpoint's {values[name]!r}; a resumed "
                             f"run keeps its data, model, optimizer and seed (start a new run with --out instead)")
        values[name] = value
    return values


def coerce(name, value, where="config"):
    """A TOML or checkpoint value, checked against the field's type."""
    f = FIELDS[name]
    typ = TYPES[f.type]
    if name in ("hidden", "arch") and isinstance(value, (list, tuple)):
        value = ",".join(str(v) for v in value)
    if name == "hidden" and isinstance(value, int) and not isinstance(value, bool):
        value = str(value)                           # hidden=64 from Python: one hidden layer
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if f.metadata["auto"] and value == "auto":
        return value
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise UsageError(f"{where} key {name!r} must be {'an' if f.type == 'int' else 'a'} {f.type}, got {value!r}")
    return value


def load_toml(path: str) -> dict:
    regular_file(path, "config file")
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise UsageError(f"config file {path} not found") from None
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"config file {path} is not valid TOML: {e}") from None
    except RecursionError:
        raise UsageError(f"config file {path} is nested too deeply") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"config file {path} is not UTF-8 text (byte {e.start}); TOML files must be UTF-8") from None
    except OSError as e:
        raise UsageError(f"cannot read config file {path}: {e.strerror}") from None
    if isinstance(data.get("train"), dict):      # allow a [train] table as well as top-level keys
        data = {**{k: v for k, v in data.items() if k != "train"}, **data["train"]}
    out = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in FIELDS:
            raise UsageError(f"config file {path}: unknown key {key!r}")
        out[name] = coerce(name, value)
    return out


def add_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per Config field. Defaults are SUPPRESSed so that we can tell
    which flags were given, and let only those override the TOML file."""
    parser.add_argument("--config", metavar="FILE.toml", help="read settings from a TOML file; flags override it")
    groups = {}
    for f in dataclasses.fields(Config):
        g = f.metadata["group"]
        group = groups[g] = groups.get(g) or parser.add_argument_group(g)
        choices = f.metadata["choices"]
        help_text = f.metadata["help"] + (f"; one of: {', '.join(choices)}" if choices else "")
        help_text += f" (default: {f.default!r})"
        if f.type == "bool":
            kind = {"action": argparse.BooleanOptionalAction}
        else:
            typ = number if f.metadata["auto"] else TYPES[f.type]
            kind = {"type": typ, "choices": choices, "metavar": f.name.upper()}
        group.add_argument("--" + flag(f.name), default=argparse.SUPPRESS, help=help_text, **kind)


def given_settings(ns: argparse.Namespace) -> dict:
    """The settings the user gave: the TOML file's, then the flags'. Defaults are not included, so that a
    resumed run can tell what was asked for from what was merely not said."""
    toml = load_toml(ns.config) if getattr(ns, "config", None) else {}
    return {**toml, **{k: v for k, v in vars(ns).items() if k in FIELDS}}


def to_toml(cfg: Config) -> str:
    """The configuration as TOML that --config reads back (tomllib parses it; nothing is evaluated)."""
    # JSON's true/false, integers, floats (finite: validate() refuses others) and escaped strings are TOML too
    lines = [f"{name} = {json.dumps(value, ensure_ascii=False)}" for name, value in cfg.to_dict().items()]
    return "\n".join(["# ddp run configuration: ddp train --config config.toml (flags override it)", *lines]) + "\n"
