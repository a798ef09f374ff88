"""File formats, read in bounded memory: idx and uncompressed .npz inputs memory-mapped (their rows read with
pread), gzip streamed, CSV parsed; and scikit-learn's bundled sets read without importing sklearn.datasets."""
from __future__ import annotations

import gzip
import io
import itertools
import math
import os
import struct
import zipfile
import zlib

import numpy as np

from .errors import UsageError, regular_file


def pread_rows(mm: np.memmap, rows: np.ndarray) -> np.ndarray:
    """Rows of a C-ordered memory-mapped file, read with pread, one call per run of consecutive rows. Indexing
    the map would map whole page-cache folios (512 KB each here) per random row into the process: RSS would
    grow with the file. Read this way, the file's pages stay in the page cache, shared and reclaimable."""
    out = np.empty((len(rows), *mm.shape[1:]), mm.dtype)
    if not mm.flags.c_contiguous or mm.offset is None:
        out[...] = mm[rows]
        return out
    size = out[:1].nbytes
    flat = out.reshape(len(rows), -1).view(np.uint8)
    starts = np.flatnonzero(np.diff(rows, prepend=-2) != 1)       # runs of consecutive rows
    with open(mm.filename, "rb", buffering=0) as f:
        for a, b in zip(starts, [*starts[1:], len(rows)]):
            os.preadv(f.fileno(), [flat[a:b]], mm.offset + int(rows[a]) * size)
    return out


def load_bundled(name: str) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits, breast_cancer or diabetes, as its load_NAME(return_X_y=True) gives them.

    The files are plain CSV inside the installed package. Reading them directly skips importing
    sklearn.datasets, which pulls in scipy.stats and the estimator machinery: 1.1 s per rank.
    tests/test_data.py proves both readers give bit-identical arrays.
    """
    import importlib.util

    spec = importlib.util.find_spec("sklearn")     # a top-level spec is found without importing it
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(f"dataset {name!r} comes with scikit-learn, which is not installed "
                         "(pip install scikit-learn)")
    folder = os.path.join(spec.submodule_search_locations[0], "datasets", "data")

    def table(file, **kw):
        with gzip.open(os.path.join(folder, file), "rt", encoding="utf-8") as f:
            return np.loadtxt(f, **kw)

    if name != "diabetes":         # features, then the class; breast_cancer's header: n_samples, n_features, names
        data = (table("digits.csv.gz", delimiter=",") if name == "digits"
                else np.loadtxt(os.path.join(folder, "breast_cancer.csv"), delimiter=",", skiprows=1))
        return data[:, :-1], data[:, -1].astype(int)
    # sklearn's scaled=True: each column centred, divided by its std, then by sqrt(n_samples),
    # in the same order of operations so that the result is the same to the last bit.
    X, y = table("diabetes_data_raw.csv.gz"), table("diabetes_target.csv.gz")
    mean, std = np.nanmean(X, axis=0), np.nanstd(X, axis=0)
    X -= mean
    X /= std
    X /= X.shape[0] ** 0.5
    return X, y


def _existing(path: str) -> str:
    """path, if it names a regular file; else a UsageError that says what it is."""
    regular_file(path, "data file")
    if not os.path.isfile(path):
        raise UsageError(f"file not found: {path}")
    return path


def _open(path: str):
    """The file for reading, gunzipped if it is gzip (detected by its magic bytes, not its name)."""
    with open(_existing(path), "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gz else open(path, "rb")


def read_npz_arrays(path: str, required=("X", "y")) -> dict:
    try:
        # allow_pickle=False: a pickled object array in a data file could run arbitrary code.
        with np.load(_existing(path), allow_pickle=False) as f:
            if missing := set(required) - set(f.files):
                raise UsageError(f"{path} lacks array(s) {sorted(missing)}; it needs {' and '.join(required)}")
            return {k: map_npz(path, k) if k == "X" else f[k] for k in ("X", "y") if k in f.files}
    except UsageError:
        raise
    except Exception as e:  # BadZipFile, ValueError (object arrays), OSError, AttributeError (.npy)
        raise UsageError(f"cannot read {path} as an .npz file with {' and '.join(required)}: {e}") from None


def map_npz(path: str, key: str) -> np.ndarray:
    """Array `key` of an .npz, memory-mapped when stored uncompressed (np.savez), else read (np.savez_compressed):
    the .npy inside a stored zip member is plain bytes at an offset that its local header gives."""
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(key + ".npy")
    reader = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    if info.compress_type == zipfile.ZIP_STORED:    # a compressed member's bytes are no .npy header to read
        with open(path, "rb") as fh:
            fh.seek(info.header_offset + 26)
            name_len, extra_len = struct.unpack("<HH", fh.read(4))
            fh.seek(name_len + extra_len, 1)
            version = np.lib.format.read_magic(fh)
            if version in reader:
                shape, fortran, dtype = reader[version](fh)
                if not dtype.hasobject and math.prod(shape):
                    return np.memmap(path, dtype, "r", offset=fh.tell(), shape=shape, order="F" if fortran else "C")
    with np.load(path, allow_pickle=False) as f:
        return f[key]                             # compressed, refused (object arrays), or nothing to map


def read_npz(path: str):
    arrays = read_npz_arrays(path)
    return arrays["X"], arrays["y"]


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def read_csv(path: str, chunk_lines: int = 1 << 16):
    """Comma-separated, the last column the target. Read in chunks of lines, never as one string: a UTF-8 BOM
    is dropped, a first line whose feature fields are not all numbers is a header, and a row with another
    number of fields is an error naming its line. Labels stay strings, exactly as written, unless every one
    round-trips through a number ('007' and integers above 2**53 do not)."""
    try:
        with io.TextIOWrapper(_open(path), encoding="utf-8-sig", errors="replace") as f:
            lines = ((k, line) for k, line in enumerate(f, 1) if line.strip())
            k, line = next(lines, (0, ""))
            if not k:
                raise UsageError(f"CSV file {path} is empty")
            first = [v.strip().strip('"') for v in line.split(",")]
            n = len(first)
            if n < 2:
                raise UsageError(f"CSV file {path} needs at least 2 columns (features, then target), found {n}")
            header = not all(_is_number(v) for v in first[:-1])
            Xs, ys, chunk = [], [], [] if header else [(k, line)]
            while chunk := chunk + list(itertools.islice(lines, chunk_lines)):
                nums, text = zip(*chunk)
                fields = np.char.count(np.array(text), ",") + 1
                ragged = np.flatnonzero((fields != n) & (np.char.find(np.array(text), '"') < 0))
                if ragged.size:
                    raise UsageError(f"CSV file {path}, line {nums[ragged[0]]}: {fields[ragged[0]]} fields, the "
                                     f"first line has {n}")
                try:
                    Xs.append(np.loadtxt(text, delimiter=",", dtype=np.float64, ndmin=2, usecols=range(n - 1),
                                         quotechar='"'))
                except ValueError as e:
                    raise UsageError(f"cannot parse CSV file {path} (lines {nums[0]}-{nums[-1]}): {e}") from None
                ys.append(np.loadtxt(text, delimiter=",", dtype=str, ndmin=1, usecols=n - 1, quotechar='"'))
                chunk = []
    except (OSError, EOFError, zlib.error) as e:  # unreadable, or a corrupt gzip stream
        raise UsageError(f"cannot read {path}: {e}") from None
    if not Xs:
        raise UsageError(f"CSV file {path} has a header but no rows")
    y = np.char.strip(np.concatenate(ys))
    try:
        num = y.astype(np.float64)
    except ValueError:
        return np.concatenate(Xs), y              # string labels: classification
    whole = np.char.isdigit(np.char.lstrip(y, "+-"))
    big = np.abs(num[whole]) >= 2.0**53
    if big.any() or np.any(num[whole].astype(np.int64).astype(str) != np.char.lstrip(y[whole], "+")):
        return np.concatenate(Xs), y              # '007', 2**53 + 1: a number would change the label
    return np.concatenate(Xs), num


# IDX type codes (http://yann.lecun.com/exdb/mnist/): all multi-byte values are big-endian.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str) -> np.ndarray:
    """An IDX file: magic 0x0000TTNN, NN big-endian uint32 dims, then the data in its stored (big-endian) dtype.
    A plain file is memory-mapped; a gzip one is decompressed once, in a stream, into an array of that dtype."""
    try:
        with _open(path) as f:
            head = f.read(4)
            if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] not in _IDX_DTYPES:
                raise UsageError(f"{path} is not an IDX file (bad magic number {head.hex()!r})")
            dtype, ndim = np.dtype(_IDX_DTYPES[head[2]]), head[3]
            raw_dims = f.read(4 * ndim)
            if ndim < 1 or len(raw_dims) < 4 * ndim:
                raise UsageError(f"{path}: corrupt IDX header ({ndim} dims, {4 + len(raw_dims)} bytes)")
            dims = tuple(int(v) for v in np.frombuffer(raw_dims, ">u4"))
            header, need = 4 + 4 * ndim, math.prod(dims) * dtype.itemsize
            if isinstance(f, gzip.GzipFile):
                out = np.empty(dims, dtype)
                buf, got = out.reshape(-1).view(np.uint8), 0
                while got < need and (n := f.readinto(buf[got:])):
                    got += n
                size = header + got + len(f.read(1))
            else:
                size = os.fstat(f.fileno()).st_size
            if size != header + need:
                raise UsageError(f"{path}: IDX file has {size} bytes, dims {dims} of {dtype.name} "
                                 f"need {header + need} (truncated or corrupt)")
            if isinstance(f, gzip.GzipFile) or need == 0:
                return out if need else np.empty(dims, dtype)
            return np.memmap(path, dtype, "r", offset=header, shape=dims)
    except (OSError, EOFError, zlib.error) as e:  # unreadable, or a corrupt gzip stream
        raise UsageError(f"cannot read {path}: {e}") from None


def read_idx_pair(path: str, labels_required: bool = True):
    """path = "IMAGES,LABELS" (or IMAGES alone when labels are not required) -> (X, y, sample shape C,H,W):
    images as (N, rows*cols) rows of their stored dtype, labels 1-D."""
    parts = [p.strip() for p in path.split(",")]
    if not all(parts) or len(parts) != 2 - (not labels_required and len(parts) == 1):
        raise UsageError(f"idx path must be 'IMAGES_FILE,LABELS_FILE', got {path!r}")
    images = read_idx(parts[0])
    labels = read_idx(parts[1]) if len(parts) == 2 else None
    if labels is not None and labels.ndim != 1:
        raise UsageError(f"idx labels {parts[1]} must be 1-D, got shape {labels.shape}")
    return images.reshape(len(images), -1), labels, (1, *images.shape[1:]) if images.ndim == 3 else None


READERS = {"npz": read_npz, "csv": read_csv, "idx": read_idx_pair}    # a file format's (X, y, ...) reader
