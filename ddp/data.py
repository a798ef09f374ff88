"""Datasets, splits, standardization, and the index arithmetic of data parallelism.

Files stay on disk: each rank reads only the rows of its shard of each batch, in their stored dtype, and
converts that batch alone on the device (Dataset.inputs).

    ds = load_dataset("digits")
    train, val, test = split(ds, val_fraction=0.1, test_fraction=0.2, seed=0)   # setup.load_data scales them
    for batch in epoch_batches(len(train), 64, seed=0, epoch=e):   # same on every rank
        for micro in micro_batches(shard(batch, rank, world), k):  # this rank's rows
            ...train.inputs(micro, xp, dtype), train.y[micro]...

Data parallelism needs no communication to agree on batches: every rank draws the same
permutation from (seed, epoch) and takes its own contiguous slice of each global batch.
"""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass

import numpy as np

from .backend import get_array_module
from .errors import UsageError
from .formats import READERS, load_bundled, pread_rows

FILE_FORMATS = ("npz", "csv", "idx")
DATASETS = ("digits", "breast_cancer", "diabetes", "synthetic_classification", "synthetic_regression", *FILE_FORMATS)
TASKS = ("auto", "classification", "regression")
BATCH_MODES = ("sgd", "minibatch", "full")
SCALES = ("auto", "standard", "minmax", "none")
MAX_CSV_CLASSES = 50  # an integral CSV target with more distinct values is taken as regression
MAX_CLASSES = 1 << 16


@dataclass
class Dataset:
    """data: (M, d) inputs as stored, in their own dtype (uint8 stays uint8); a read-only memory map for
    idx, .npy and uncompressed .npz files, so nothing is read until a batch asks for its rows.
    rows: this dataset's rows of `data` (None: all of them), in order; a split is index arrays, not copies.
    scale: the preprocessing each batch gets as it is read (setup.load_data fits it on the training rows).
    y: (N,) int64 class indices in 0..n_classes-1, or (N, n_out) float64, one per row of this dataset.
    classes[i] is the label class index i stands for, as it appeared in the data (a number or a string).
    """

    data: np.ndarray
    y: np.ndarray
    task: str
    n_classes: int | None
    name: str
    classes: np.ndarray | None = None
    rows: np.ndarray | None = None
    scale: "Standardizer | None" = None
    shape: tuple | None = None      # one sample's C,H,W when the file says (idx images)

    def __len__(self) -> int:
        return len(self.y)

    @property
    def n_features(self) -> int:
        return self.data.shape[1]

    def take(self, i) -> np.ndarray:
        """Rows i (an index array or a slice) as stored: only those rows are read from disk."""
        rows = np.arange(len(self))[i] if self.rows is None else self.rows[i]
        raw = pread_rows(self.data, rows) if isinstance(self.data, np.memmap) else self.data[rows]
        return raw.astype(raw.dtype.newbyteorder("="), copy=False)  # idx files are big-endian

    def inputs(self, i=slice(None), xp=np, dtype=np.float64):
        """Rows i scaled, as `dtype` on xp's device. The rows cross to the device in their stored dtype (a
        uint8 image is 8x smaller than its float64), and are converted and scaled there, this batch alone."""
        X = xp.asarray(self.take(i)).astype(np.float64)
        if self.scale is not None:
            X = self.scale.transform(X)
        return X.astype(dtype, copy=False)

    X = property(inputs, doc="every row, scaled, float64: for small data and tests")

    def subset(self, idx) -> "Dataset":
        """The rows `idx` (an index array or a boolean mask), with the same metadata; no input is copied."""
        idx = np.arange(len(self))[idx]
        return dataclasses.replace(self, y=self.y[idx], rows=idx if self.rows is None else self.rows[idx])


# ---------------------------------------------------------------------------- loading

def load_dataset(name: str, *, path: str | None = None, task: str = "auto",
                 n_samples: int = 1000, n_features: int = 20, n_classes: int = 3,
                 n_outputs: int = 1, seed: int = 0) -> Dataset:
    """Load a dataset by name (see DATASETS); files need `path`, synthetic ones use the sizes."""
    if name not in DATASETS:
        raise UsageError(f"unknown dataset {name!r} (choose from {', '.join(DATASETS)})")
    if task not in TASKS:
        raise UsageError(f"unknown task {task!r} (choose from {', '.join(TASKS)})")
    if name in FILE_FORMATS:
        return load_files(name, [path], task)[0]
    synthetic = name.startswith("synthetic_")
    data = _synthetic(name, n_samples, n_features, n_classes, n_outputs, seed) if synthetic else load_bundled(name)
    known = "regression" if name in ("diabetes", "synthetic_regression") else "classification"
    if task not in ("auto", known):
        raise UsageError(f"dataset {name!r} is a {known} dataset; task {task!r} does not apply")
    return from_parts([data], known, name, n_classes if synthetic else None)[0]


def load_files(name: str, paths, task: str = "auto") -> list[Dataset]:
    """Datasets from files of format `name` (npz, csv, idx), labels encoded together (from_parts); a path
    that is empty or None gives None in its place (a validation or test file not given)."""
    if not paths[0]:
        raise UsageError(f"dataset {name!r} needs a path")
    got = [READERS[name](p) if p else None for p in paths]
    sets = iter(from_parts([g[:2] for g in got if g], task, name, shape=got[0][2] if name == "idx" else None))
    return [next(sets) if g else None for g in got]


def from_arrays(X, y, task: str = "auto", name: str = "arrays") -> Dataset:
    """A Dataset from arrays in memory (or memory-mapped): from_parts with one part."""
    return from_parts([(X, y)], task, name)[0]


def from_parts(parts, task: str = "auto", name: str = "arrays", n_classes: int | None = None,
               shape=None) -> list[Dataset]:
    """Datasets from (X, y) pairs, a training set then validation or test sets given apart, their labels
    encoded together: a class has the same index in each. task 'auto': labels (integers, strings, booleans,
    or a float column of at most MAX_CSV_CLASSES distinct whole numbers, as a CSV gives) mean classification.
    n_classes: the synthetic data's, which a tiny sample may not show (default: the distinct labels)."""
    if task not in TASKS:
        raise UsageError(f"unknown task {task!r} (choose from {', '.join(TASKS)})")
    parts = [(np.asanyarray(X), np.asarray(y)) for X, y in parts]
    y = np.concatenate([y for _, y in parts]) if len(parts) > 1 else parts[0][1]
    guessed = task == "auto"
    if guessed:
        few_whole = (y.dtype.kind == "f" and y.ndim == 1 and np.all(np.isfinite(y)) and np.all(y == np.round(y))
                     and len(np.unique(y)) <= MAX_CSV_CLASSES)
        task = "classification" if y.dtype.kind in "biuUSO" or few_whole else "regression"
    for X, yp in parts:
        _check(X, yp, task, name)
        if X.shape[1:] != parts[0][0].shape[1:]:
            raise UsageError(f"dataset {name!r}: a file with {X.shape[1]} features, the training data has "
                             f"{parts[0][0].shape[1]}")
    y, classes = _encode(y, task, name, n_classes)
    if guessed and classes is not None and len(classes) > max(MAX_CSV_CLASSES, len(y) // 2):
        raise UsageError(f"dataset {name!r}: {len(classes)} distinct labels in {len(y)} rows: an identifier or a "
                         "feature rather than a target? (--task classification trains on it anyway)")
    ys = np.split(y, np.cumsum([len(yp) for _, yp in parts])[:-1])
    n = None if classes is None else len(classes)
    return [Dataset(X, yp, task, n, name, classes, shape=shape) for (X, _), yp in zip(parts, ys)]


def infer_format(path: str) -> str:
    """npz, csv or idx, from a --data-path's file name(s)."""
    low = path.lower()
    if low.endswith(".npz"):
        return "npz"
    if low.endswith((".csv", ".csv.gz")):
        return "csv"
    if "," in path or "ubyte" in low or low.endswith((".idx", ".idx.gz")):
        return "idx"
    raise UsageError(f"cannot tell the format of --data-path {path!r} from its name: give --dataset npz, csv "
                     "or idx (files named .npz, .csv, .csv.gz, or 'IMAGES,LABELS' idx files are recognised)")


def _synthetic(name, n_samples, n_features, n_classes, n_outputs, seed):
    """X ~ N(0, 1); y from a random one-hidden-layer tanh "teacher" network, so it is learnable."""
    classify = name == "synthetic_classification"
    n_out, out_label, out_min = (n_classes, "n_classes", 2) if classify else (n_outputs, "n_outputs", 1)
    for label, value, low in (("n_samples", n_samples, 1), ("n_features", n_features, 1),
                              (out_label, n_out, out_min)):
        if value < low:
            raise UsageError(f"{label} {value} must be >= {low}")
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n_samples, n_features))
    # Scale by 1/sqrt(fan_in) so the hidden layer is neither saturated nor linear.
    W1 = rng.standard_normal((n_features, 32)) / np.sqrt(n_features)
    W2 = rng.standard_normal((32, n_out)) / np.sqrt(32)
    out = np.tanh(X @ W1) @ W2
    if not classify:
        return X, out + 0.05 * rng.standard_normal(out.shape)
    # A raw argmax often lets one output win almost everywhere. Standardize each logit, then
    # nudge per-class biases until the classes are about equally frequent (fitted on at most
    # 10k rows to stay cheap), so every class appears unless n_features is tiny (1 or 2).
    out = (out - out.mean(axis=0)) / (out.std(axis=0) + 1e-12)
    sample, bias = out[:10_000], np.zeros(n_out)
    for _ in range(100):
        counts = np.bincount((sample + bias).argmax(axis=1), minlength=n_out)
        bias -= 0.1 * np.log((counts + 1) / (len(sample) / n_out + 1))
    return X, (out + bias).argmax(axis=1)


def _check(X, y, task: str, name: str) -> None:
    labels_ok = "biufUSO" if task == "classification" else "biuf"
    if X.dtype.kind not in "biuf" or y.dtype.kind not in labels_ok:
        raise UsageError(f"dataset {name!r}: X must be numeric and y numeric{' or labels' if task == 'classification' else ''}, "
                         f"got {X.dtype} and {y.dtype}")
    if X.ndim != 2 or X.shape[0] == 0 or X.shape[1] == 0:
        raise UsageError(f"dataset {name!r}: X must be 2-D and non-empty, got shape {X.shape}")
    if y.ndim not in (1, 2) or len(y) != len(X):
        raise UsageError(f"dataset {name!r}: X has {len(X)} rows but y has shape {y.shape}")
    for label, a in (("X", X), ("y", y)):
        bad = sum(np.count_nonzero(~np.isfinite(a[s])) for s in row_chunks(a)) if a.dtype.kind == "f" else 0
        if bad:
            raise UsageError(f"dataset {name!r}: {label} contains NaN or Inf ({bad} values)")


def _encode(y, task: str, name: str, n_classes: int | None):
    """(y in the shape and dtype of its task, classes or None): class indices and the labels they stand for."""
    if task == "regression":
        return y.astype(np.float64).reshape(len(y), -1), None
    if y.ndim == 2 and y.shape[1] != 1:
        raise UsageError(f"dataset {name!r}: classification labels must be 1-D, got {y.shape}")
    y = y.reshape(-1)
    if y.dtype.kind == "O":
        y = y.astype(str)
    if y.dtype.kind == "f" and np.any(y != np.round(y)):
        raise UsageError(f"dataset {name!r}: classification labels must be whole numbers or strings, "
                         f"found {y[y != np.round(y)][0]} (use --task regression for a numeric target)")
    if y.dtype.kind in "fb":
        y = y.astype(np.int64)
    if n_classes is not None:                     # synthetic: the labels ARE the class indices
        classes = np.arange(n_classes)
    else:
        classes = np.unique(y)
        if len(classes) > MAX_CLASSES:
            raise UsageError(f"dataset {name!r}: {len(classes)} distinct labels; classification supports at "
                             f"most {MAX_CLASSES} classes (use --task regression for a numeric target)")
    if len(classes) < 2:
        raise UsageError(f"dataset {name!r}: classification needs at least 2 classes, got 1 class ({classes[0]})")
    return np.searchsorted(classes, y).astype(np.int64), classes


# ------------------------------------------------------------- splitting and scaling

def split(ds: Dataset, val_fraction: float = 0.1, test_fraction: float = 0.2,
          seed: int = 0) -> tuple[Dataset, Dataset, Dataset]:
    """Random (train, val, test) split; val/test get round(fraction * N) rows and may be empty."""
    for label, f in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0 <= f < 1:
            raise UsageError(f"{label} {f} must be in [0, 1)")
    if val_fraction + test_fraction >= 1:
        raise UsageError(f"val_fraction + test_fraction = {val_fraction + test_fraction} "
                         "must be < 1 to leave a training set")
    n = len(ds)
    n_val, n_test = round(val_fraction * n), round(test_fraction * n)
    if n - n_val - n_test < 1:
        raise UsageError(f"dataset of {n} samples leaves no training samples after the split")
    test, val, train = np.split(np.random.default_rng(seed).permutation(n), [n_test, n_test + n_val])
    return ds.subset(train), ds.subset(val), ds.subset(test)


class Standardizer:
    """Per-feature (X - mean) / std, with the statistics of the training set only.

    Fitting on validation or test rows would leak their statistics into training.
    """

    def __init__(self):
        self.mean = self.std = None

    def fit(self, X: np.ndarray) -> "Standardizer":
        """X: (N, d) in memory (regression targets). A constant feature gets std 1, so it maps to 0."""
        with np.errstate(over="ignore", invalid="ignore"):
            return self.from_stats(X.mean(axis=0), X.std(axis=0), X)

    @classmethod
    def from_stats(cls, mean, std, X=None) -> "Standardizer":
        s = cls()
        s.mean, std = np.asarray(mean, np.float64), np.asarray(std, np.float64)
        bad = np.flatnonzero(~(np.isfinite(s.mean) & np.isfinite(std)))
        if bad.size:
            j = int(bad[0])
            big = f" (values up to {np.abs(X[:, j]).max():.3g})" if X is not None else ""
            raise UsageError(f"column {j} overflows float64 when standardized{big}; rescale it")
        s.std = np.where(std > 0, std, 1.0)
        return s

    def inverse(self, Z: np.ndarray) -> np.ndarray:
        """(M, d) standardized -> original units."""
        return Z * self.std + self.mean

    def transform(self, X):
        """X: (M, d) float64, NumPy or CuPy -> (M, d) on the same device."""
        if self.mean is None:
            raise RuntimeError("Standardizer.transform called before fit")
        if X.shape[1:] != self.mean.shape:
            raise UsageError(f"X has {X.shape[1:]} features, the standardizer was fit on "
                             f"{self.mean.shape}")
        xp = get_array_module(X)
        out = X - xp.asarray(self.mean)
        out /= xp.asarray(self.std)
        return out


def row_chunks(X, nbytes: int = 1 << 24) -> list[slice]:
    """Slices of X's rows of about `nbytes` each: a pass over a memory-mapped file in bounded memory."""
    step = max(1, nbytes // max(1, X[:1].nbytes))
    return [slice(s, s + step) for s in range(0, len(X), step)]


def fit_scale(ds: Dataset, how: str, comm) -> Standardizer:
    """The input scaling `how` (SCALES) of the training set `ds`, in one pass over its rows: each rank reads
    its blocks of them, and the float64 sums are combined with one allreduce, so every rank gets the same
    statistics whatever it read, and the same for any number of ranks.

    auto: uint8 inputs (images) are divided by 255, anything else is standardized. standard warns once,
    naming them, about features whose training range spans more than 50 stds (a pixel almost always 0): a
    value unseen in training there becomes a z-score in the hundreds. minmax maps the training set's overall
    min and max (one pair for all features, so it suits pixels) to 0 and 1.
    """
    d = ds.n_features
    if how == "auto":
        how = "uint8" if ds.data.dtype == np.uint8 else "standard"
    if how in ("none", "uint8"):
        return Standardizer.from_stats(np.zeros(d), np.full(d, 255.0 if how == "uint8" else 1.0))
    if ds.rows is not None:                              # in file order: long runs of consecutive rows to read
        ds = dataclasses.replace(ds, rows=np.sort(ds.rows))
    n = len(ds)
    if n * d * ds.data.itemsize > 1 << 28 and comm.rank == 0:
        print(f"ddp: scaling statistics: one pass over {n:,} training rows, {comm.size} rank(s) sharing it",
              flush=True)
    shift = ds.take([0])[0].astype(np.float64)          # sums of x - shift: no cancellation when |mean| >> std
    block = max(1, -(-n // 256))                         # at most 256 blocks of rows (block_table)
    step = max(1, (1 << 21) // d)                        # rows per read: 16 MB of float64

    def fill(b, row):                                    # sums of x - shift and of its square, min, max
        total, squares, lo, hi = row.reshape(4, d)
        lo[:], hi[:] = np.inf, -np.inf
        for s in range(b * block, min((b + 1) * block, n), step):
            X = ds.take(slice(s, min(s + step, (b + 1) * block, n))).astype(np.float64)
            np.minimum(lo, X.min(axis=0), out=lo)
            np.maximum(hi, X.max(axis=0), out=hi)
            X -= shift
            total += X.sum(axis=0)
            squares += (X * X).sum(axis=0)
    table = block_table(-(-n // block), 4 * d, comm, fill).reshape(-1, 4, d)
    total, squares = table[:, 0].sum(axis=0), table[:, 1].sum(axis=0)
    lo, hi = table[:, 2].min(axis=0), table[:, 3].max(axis=0)
    if how == "minmax":
        return Standardizer.from_stats(np.full(d, lo.min()), np.full(d, hi.max() - lo.min()))
    mean = total / len(ds)
    with np.errstate(over="ignore", invalid="ignore"):
        std = np.sqrt(np.maximum(squares / len(ds) - mean * mean, 0))
        spiky = np.flatnonzero(hi - lo > 50 * std)
    spiky = spiky[std[spiky] > 0]
    if spiky.size and comm.rank == 0:
        print(f"ddp: warning: {spiky.size} feature(s) are almost constant with rare outliers (columns "
              f"{', '.join(map(str, spiky[:8]))}{', ...' if spiky.size > 8 else ''}): standardized, a value unseen "
              "in training there gives a huge input; --scale minmax suits features that share a range (pixels)",
              file=sys.stderr, flush=True)
    return Standardizer.from_stats(shift + mean, std)


def batch_size_for(mode: str, batch_size: int, n: int) -> int:
    """The global batch size of a mode: sgd 1, minibatch `batch_size`, full `n`."""
    if mode == "sgd":
        return 1
    if mode == "full":
        return n
    if mode != "minibatch":
        raise UsageError(f"unknown batch mode {mode!r} (choose from {', '.join(BATCH_MODES)})")
    if batch_size < 1:
        raise UsageError(f"batch size {batch_size} must be >= 1")
    if batch_size > n:
        raise UsageError(f"batch size {batch_size} is larger than the training set ({n} samples)")
    return batch_size


def epoch_batches(n: int, batch_size: int, *, seed: int, epoch: int, shuffle: bool = True,
                  drop_last: bool = False) -> list[np.ndarray]:
    """The global batches of one epoch: int64 index arrays that together cover range(n) once.

    The permutation depends only on (seed, epoch), so every rank computes the same one
    without communicating, and a resumed run sees the same batches it would have seen.
    """
    if batch_size < 1:
        raise UsageError(f"batch size {batch_size} must be >= 1")
    if n < 1:
        return []
    order = (np.random.default_rng((seed, epoch)).permutation(n) if shuffle else np.arange(n)).astype(np.int64)
    batches = np.split(order, np.arange(batch_size, n, batch_size))
    if drop_last and n % batch_size:
        batches.pop()
    return batches


def shard(indices: np.ndarray, rank: int, world: int) -> np.ndarray:
    """This rank's contiguous part of a global batch, as np.array_split would cut it.

    The first len % world ranks get one extra row. A rank may get none when the batch is
    smaller than the world, so the trainer must weight each rank's gradient by its row count.
    """
    return indices[slice(*shard_range(len(indices), rank, world))]


def shard_range(n: int, rank: int, world: int) -> tuple[int, int]:
    """(start, stop) of part `rank` of range(n) cut into `world` contiguous parts whose sizes
    differ by at most one, the first n % world parts one longer. Batches and the parameter
    server's shards of the arena are both cut this way."""
    if world < 1 or not 0 <= rank < world:
        raise UsageError(f"rank {rank} is not in a world of size {world}")
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def block_table(blocks: int, width: int, comm, fill) -> np.ndarray:
    """Figures per block of rows that are the same bits for any world size. Each rank calls fill(b, row) for its
    whole blocks b (cut as shard_range cuts), writing block b's figures into `row`, zeros of `width` float64; one
    allreduce gives every rank the whole (blocks, width) table (a row is written by one rank, so the sum only
    copies it), which the caller reduces over the blocks in block order."""
    table = np.zeros((blocks, width))
    first, stop = shard_range(blocks, comm.rank, comm.size)
    for b in range(first, stop):
        fill(b, table[b])
    comm.allreduce_sum(table)
    return table


def chunk_shard(indices: np.ndarray, rank: int, world: int, k: int) -> list[np.ndarray]:
    """--deterministic: this rank's whole chunks of a global batch cut into k chunks as np.array_split cuts it.
    The cut depends on the batch alone, never on the world size (exact.py). A rank with no chunk (world > k)
    gets one empty chunk, so that it still joins the step's collectives."""
    start, stop = shard_range(k, rank, world)
    return np.array_split(indices, k)[start:stop] or [indices[:0]]


def micro_batches(indices: np.ndarray, k: int) -> list[np.ndarray]:
    """Split a rank's batch into k consecutive micro-batches (some empty if k > len) for
    gradient accumulation."""
    if k < 1:
        raise UsageError(f"number of micro-batches {k} must be >= 1")
    return np.array_split(indices, k)
