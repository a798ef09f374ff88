"""Tests for ddp.data: loaders against scikit-learn, file formats written by hand, splits,
standardization against StandardScaler, and the batch/shard index arithmetic."""
import gzip
import struct

import numpy as np
import pytest
import sklearn.datasets
from sklearn.preprocessing import StandardScaler

from ddp.data import (DATASETS, Dataset, Standardizer, batch_size_for, epoch_batches,
                      from_parts, load_dataset, micro_batches, shard, split)
from ddp.formats import read_idx
from ddp.errors import UsageError


# ---------------------------------------------------------------- built-in datasets

@pytest.mark.parametrize("name, task", [("digits", "classification"),
                                        ("breast_cancer", "classification"),
                                        ("diabetes", "regression")])
def test_sklearn_datasets_match_sklearn(name, task):
    X, y = getattr(sklearn.datasets, "load_" + name)(return_X_y=True)
    ds = load_dataset(name)
    assert ds.task == task and ds.name == name and len(ds) == len(X)
    assert ds.X.dtype == np.float64 and np.array_equal(ds.X, X)
    if task == "classification":
        assert ds.y.dtype == np.int64 and ds.y.shape == (len(X),)
        assert np.array_equal(ds.y, y) and ds.n_classes == len(np.unique(y))
    else:
        assert ds.y.shape == (len(X), 1) and ds.n_classes is None
        assert np.array_equal(ds.y[:, 0], y)


def test_sklearn_dataset_rejects_other_task():
    with pytest.raises(UsageError, match="digits"):
        load_dataset("digits", task="regression")


def test_synthetic_classification_deterministic_and_balanced():
    a = load_dataset("synthetic_classification", n_samples=500, n_features=7, n_classes=4, seed=1)
    b = load_dataset("synthetic_classification", n_samples=500, n_features=7, n_classes=4, seed=1)
    c = load_dataset("synthetic_classification", n_samples=500, n_features=7, n_classes=4, seed=2)
    assert a.X.shape == (500, 7) and a.y.shape == (500,) and a.y.dtype == np.int64
    assert a.task == "classification" and a.n_classes == 4
    assert np.array_equal(a.X, b.X) and np.array_equal(a.y, b.y)
    assert not np.array_equal(a.X, c.X) and not np.array_equal(a.y, c.y)
    for seed in range(10):
        for k in (2, 3, 10):
            ds = load_dataset("synthetic_classification", n_classes=k, seed=seed)
            assert np.bincount(ds.y, minlength=k).min() > 0.5 * len(ds) / k


def test_synthetic_classification_labels_depend_on_x():
    # The labels come from a teacher network, so a nearest-neighbour model must beat chance.
    from sklearn.neighbors import KNeighborsClassifier

    ds = load_dataset("synthetic_classification", n_samples=1000, n_features=5, n_classes=3)
    knn = KNeighborsClassifier(5).fit(ds.X[:800], ds.y[:800])
    assert knn.score(ds.X[800:], ds.y[800:]) > 0.6


def test_synthetic_regression():
    a = load_dataset("synthetic_regression", n_samples=300, n_features=4, n_outputs=2, seed=3)
    b = load_dataset("synthetic_regression", n_samples=300, n_features=4, n_outputs=2, seed=3)
    c = load_dataset("synthetic_regression", n_samples=300, n_features=4, n_outputs=2, seed=4)
    assert a.task == "regression" and a.n_classes is None
    assert a.X.shape == (300, 4) and a.y.shape == (300, 2) and a.y.dtype == np.float64
    assert np.array_equal(a.y, b.y) and not np.array_equal(a.y, c.y)
    assert a.y.std() > 0.1  # a real signal, not just the noise


@pytest.mark.parametrize("kwargs, word", [({"n_samples": 0}, "n_samples"),
                                          ({"n_features": 0}, "n_features"),
                                          ({"n_classes": 1}, "n_classes")])
def test_synthetic_size_errors(kwargs, word):
    with pytest.raises(UsageError, match=word):
        load_dataset("synthetic_classification", **kwargs)


def test_synthetic_regression_outputs_error():
    with pytest.raises(UsageError, match="n_outputs"):
        load_dataset("synthetic_regression", n_outputs=0)


def test_unknown_dataset_and_task():
    with pytest.raises(UsageError, match="mnist.*digits.*idx"):
        load_dataset("mnist")
    with pytest.raises(UsageError, match="task 'both'"):
        load_dataset("digits", task="both")
    with pytest.raises(UsageError, match="unknown task 'both'"):     # not taken as classification
        from_parts([(np.ones((4, 2)), np.arange(4) % 2)], task="both")
    assert len(DATASETS) == 8


@pytest.mark.parametrize("name", ["npz", "csv", "idx"])
def test_file_datasets_need_existing_path(name, tmp_path):
    with pytest.raises(UsageError, match="needs a path"):
        load_dataset(name)
    missing = str(tmp_path / "nope")
    with pytest.raises(UsageError, match="not found"):
        load_dataset(name, path=missing if name != "idx" else f"{missing},{missing}")


# ---------------------------------------------------------------------- npz and csv

def test_npz_round_trip_classification(tmp_path):
    X = np.random.default_rng(0).standard_normal((20, 3))
    y = np.arange(20) % 4
    np.savez(tmp_path / "d.npz", X=X, y=y)
    ds = load_dataset("npz", path=str(tmp_path / "d.npz"))
    assert ds.task == "classification" and ds.n_classes == 4
    assert np.array_equal(ds.X, X) and np.array_equal(ds.y, y) and ds.y.dtype == np.int64


def test_npz_compressed_is_read_and_uncompressed_is_mapped(tmp_path):
    """np.savez_compressed's members are deflated: no .npy header to map, so they are read whole (map_npz
    once read the compressed bytes as a header and refused every such file); np.savez's X is memory-mapped."""
    from ddp.formats import map_npz
    X = np.random.default_rng(1).standard_normal((30, 4))
    y = np.arange(30) % 3
    np.savez_compressed(tmp_path / "c.npz", X=X, y=y)
    np.savez(tmp_path / "u.npz", X=np.asfortranarray(X), y=y)
    ds = load_dataset("npz", path=str(tmp_path / "c.npz"))
    assert np.array_equal(ds.X, X) and np.array_equal(ds.y, y)
    assert not isinstance(map_npz(str(tmp_path / "c.npz"), "X"), np.memmap)
    mapped = map_npz(str(tmp_path / "u.npz"), "X")
    assert isinstance(mapped, np.memmap) and np.array_equal(mapped, X)


def test_npz_round_trip_regression_and_forced_task(tmp_path):
    X = np.random.default_rng(0).standard_normal((10, 2))
    np.savez(tmp_path / "r.npz", X=X, y=X.sum(axis=1))
    ds = load_dataset("npz", path=str(tmp_path / "r.npz"))
    assert ds.task == "regression" and ds.y.shape == (10, 1)
    assert np.allclose(ds.y[:, 0], X.sum(axis=1))
    # integer targets can still be regressed on, and integral floats classified
    np.savez(tmp_path / "i.npz", X=X, y=np.arange(10))
    assert load_dataset("npz", path=str(tmp_path / "i.npz"), task="regression").y.shape == (10, 1)
    np.savez(tmp_path / "f.npz", X=X, y=np.arange(10) % 2 * 1.0)
    ds = load_dataset("npz", path=str(tmp_path / "f.npz"), task="classification")
    assert ds.y.dtype == np.int64 and ds.n_classes == 2


def test_npz_refuses_pickles_and_missing_arrays(tmp_path):
    np.savez(tmp_path / "obj.npz", X=np.array([[1.0]]), y=np.array([{"a": 1}], dtype=object))
    with pytest.raises(UsageError, match="cannot read"):
        load_dataset("npz", path=str(tmp_path / "obj.npz"))
    np.savez(tmp_path / "noy.npz", X=np.ones((3, 2)))
    with pytest.raises(UsageError, match="'y'"):
        load_dataset("npz", path=str(tmp_path / "noy.npz"))
    (tmp_path / "junk.npz").write_bytes(b"not a zip file")
    with pytest.raises(UsageError, match="cannot read"):
        load_dataset("npz", path=str(tmp_path / "junk.npz"))


@pytest.mark.parametrize("header", [False, True])
def test_csv_round_trip(tmp_path, header):
    X = np.round(np.random.default_rng(0).standard_normal((15, 3)), 6)
    y = np.arange(15) % 3
    table = np.column_stack([X, y])
    np.savetxt(tmp_path / "d.csv", table, delimiter=",", fmt="%.6f",
               header="a,b,c,label" if header else "", comments="")
    ds = load_dataset("csv", path=str(tmp_path / "d.csv"))
    assert ds.X.shape == (15, 3) and np.allclose(ds.X, X)
    assert ds.task == "classification" and np.array_equal(ds.y, y) and ds.n_classes == 3


def test_csv_regression_and_many_values(tmp_path):
    (tmp_path / "r.csv").write_text("x,t\n1,0.5\n2,1.5\n3,2.25\n")
    ds = load_dataset("csv", path=str(tmp_path / "r.csv"))
    assert ds.task == "regression" and np.allclose(ds.y[:, 0], [0.5, 1.5, 2.25])
    # integral, but more than 50 distinct values: a count, not a label
    rows = "\n".join(f"{i},{i}" for i in range(60))
    (tmp_path / "n.csv").write_text(rows)
    assert load_dataset("csv", path=str(tmp_path / "n.csv")).task == "regression"


def test_csv_errors(tmp_path):
    (tmp_path / "bad.csv").write_text("a,b,c\n1,2,x\n3,oops,y\n")      # a feature that is not a number
    with pytest.raises(UsageError, match="cannot parse CSV"):
        load_dataset("csv", path=str(tmp_path / "bad.csv"))
    (tmp_path / "one.csv").write_text("1\n2\n")
    with pytest.raises(UsageError, match="2 columns"):
        load_dataset("csv", path=str(tmp_path / "one.csv"))
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(UsageError, match="empty"):
        load_dataset("csv", path=str(tmp_path / "empty.csv"))


# --------------------------------------------------------------------------- IDX

def write_idx(path, array, code, fmt, compress=False):
    """Write `array` as IDX by hand with struct: magic, big-endian dims, big-endian data."""
    header = struct.pack(">BBBB", 0, 0, code, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    body = struct.pack(f">{array.size}{fmt}", *array.ravel().tolist())
    (gzip.open if compress else open)(path, "wb").write(header + body)


def test_read_idx_ubyte_images_and_labels(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 4, 3), dtype=np.uint8)
    labels = np.array([0, 1, 2, 1, 0], dtype=np.uint8)
    write_idx(tmp_path / "img", images, 0x08, "B")
    write_idx(tmp_path / "lab", labels, 0x08, "B")
    got = read_idx(str(tmp_path / "img"))
    assert got.dtype == np.uint8 and np.array_equal(got, images)
    assert np.array_equal(read_idx(str(tmp_path / "lab")), labels)

    ds = load_dataset("idx", path=f"{tmp_path / 'img'},{tmp_path / 'lab'}")
    assert isinstance(ds.data, np.memmap) and ds.data.dtype == np.uint8      # left on disk, as stored
    assert np.array_equal(ds.X, images.reshape(5, 12))
    assert ds.task == "classification" and np.array_equal(ds.y, labels) and ds.n_classes == 3
    from ddp.config import Config
    from ddp.setup import load_data
    train = load_data(Config(scale="auto"), raw=(ds, ds, ds))[0]       # auto: uint8 pixels / 255
    assert np.array_equal(train.X, images.reshape(5, 12) / 255.0)


def test_read_idx_gzip(tmp_path):
    images = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    write_idx(tmp_path / "img.gz", images, 0x08, "B", compress=True)
    assert np.array_equal(read_idx(str(tmp_path / "img.gz")), images)


@pytest.mark.parametrize("code, fmt, dtype", [(0x09, "b", np.int8), (0x0B, "h", np.int16),
                                              (0x0C, "i", np.int32), (0x0D, "f", np.float32),
                                              (0x0E, "d", np.float64)])
def test_read_idx_other_types(tmp_path, code, fmt, dtype):
    a = (np.arange(24).reshape(2, 3, 4) - 7).astype(dtype)
    if dtype in (np.float32, np.float64):
        a = a * dtype(0.25)
    write_idx(tmp_path / "a", a, code, fmt)
    got = read_idx(str(tmp_path / "a"))
    assert got.dtype == np.dtype(dtype).newbyteorder(">") and np.array_equal(got, a)    # the bytes as stored
    ds = Dataset(got.reshape(2, -1), np.arange(2), "classification", 2, "t")
    assert ds.take([1, 0]).dtype == dtype and np.array_equal(ds.take([1, 0]), a.reshape(2, -1)[[1, 0]])


def test_read_idx_corrupt(tmp_path):
    a = np.arange(12, dtype=np.uint8).reshape(3, 4)
    write_idx(tmp_path / "good", a, 0x08, "B")
    data = (tmp_path / "good").read_bytes()
    cases = {"magic": b"\x01\x00" + data[2:], "type": data[:2] + b"\x07" + data[3:],
             "short": data[:6], "truncated": data[:-1], "trailing": data + b"\x00"}
    for name, bad in cases.items():
        (tmp_path / name).write_bytes(bad)
        with pytest.raises(UsageError, match="IDX"):
            read_idx(str(tmp_path / name))
    (tmp_path / "badgz.gz").write_bytes(gzip.compress(data)[:-8] + b"garbage!")
    with pytest.raises(UsageError, match="badgz"):
        read_idx(str(tmp_path / "badgz.gz"))


def test_idx_pair_errors(tmp_path):
    write_idx(tmp_path / "img", np.zeros((4, 2, 2), np.uint8), 0x08, "B")
    write_idx(tmp_path / "lab", np.array([0, 1, 1], np.uint8), 0x08, "B")
    with pytest.raises(UsageError, match="IMAGES_FILE,LABELS_FILE"):
        load_dataset("idx", path=str(tmp_path / "img"))
    with pytest.raises(UsageError, match="4 rows"):
        load_dataset("idx", path=f"{tmp_path / 'img'},{tmp_path / 'lab'}")


# ------------------------------------------------------------------- validation

@pytest.mark.parametrize("X, y, task, word", [
    (np.ones(5), np.arange(5) % 2, "auto", "2-D"),
    (np.ones((0, 3)), np.zeros(0, int), "auto", "non-empty"),
    (np.ones((5, 2)), np.arange(4) % 2, "auto", "5 rows"),
    (np.array([[1.0], [np.nan], [2.0]]), np.array([0, 1, 0]), "auto", "X contains NaN"),
    (np.ones((3, 1)), np.array([0.5, np.inf, 1.0]), "regression", "y contains NaN"),
    (np.ones((3, 1)), np.array([0, 1.5, 1]), "classification", "whole numbers"),
    (np.ones((3, 1)), np.array(["a", "b", "c"]), "regression", "numeric"),
    (np.ones((3, 1)), np.array([0, 0, 0]), "auto", "2 classes"),
])
def test_file_validation(tmp_path, X, y, task, word):
    np.savez(tmp_path / "d.npz", X=X, y=y)
    with pytest.raises(UsageError, match=word):
        load_dataset("npz", path=str(tmp_path / "d.npz"), task=task)


# ------------------------------------------------------------ split, standardize

def test_split_sizes_disjoint_deterministic():
    ds = Dataset(np.arange(100.0)[:, None], np.arange(100) % 2, "classification", 2, "t")
    train, val, test = split(ds, 0.1, 0.2, seed=5)
    assert (len(train), len(val), len(test)) == (70, 10, 20)
    rows = np.concatenate([train.X[:, 0], val.X[:, 0], test.X[:, 0]])
    assert np.array_equal(np.sort(rows), np.arange(100.0))  # disjoint and complete
    assert np.array_equal(train.y, train.X[:, 0].astype(int) % 2)  # rows stay paired
    assert train.task == "classification" and train.n_classes == 2 and train.name == "t"
    again = split(ds, 0.1, 0.2, seed=5)
    assert all(np.array_equal(a.X, b.X) for a, b in zip((train, val, test), again))
    assert not np.array_equal(split(ds, 0.1, 0.2, seed=6)[0].X, train.X)
    train, val, test = split(ds, 0.0, 0.0)
    assert (len(train), len(val), len(test)) == (100, 0, 0) and val.X.shape == (0, 1)


@pytest.mark.parametrize("val, test", [(-0.1, 0.2), (1.0, 0.0), (0.0, 1.0), (0.5, 0.5)])
def test_split_bad_fractions(val, test):
    ds = Dataset(np.ones((10, 1)), np.zeros(10, int), "classification", 2, "t")
    with pytest.raises(UsageError, match="fraction"):
        split(ds, val, test)


def test_standardize_uses_train_statistics_only():
    """The training path (ddp.setup.load_data): inputs and regression targets scaled with the training
    set's statistics only, as scikit-learn's StandardScaler fitted on the training rows scales them."""
    from ddp.config import Config
    from ddp.setup import load_data
    ds = load_dataset("diabetes")
    ds.data[:, 3] = 7.0  # a constant feature must not divide by zero
    train, val, test = split(ds, 0.2, 0.2, seed=0)
    strain, sval, stest, prep = load_data(Config(dataset="diabetes"), raw=(train, val, test))
    assert np.allclose(strain.X.mean(axis=0), 0) and np.allclose(strain.X[:, 3], 0)
    assert np.allclose(np.delete(strain.X.std(axis=0), 3), 1)
    scaler, yscaler = StandardScaler().fit(train.X), StandardScaler().fit(train.y)
    for ours, raw in ((strain, train), (sval, val), (stest, test)):
        assert np.allclose(ours.X, scaler.transform(raw.X))
        assert np.allclose(ours.y, yscaler.transform(raw.y))
        assert np.allclose(prep.y.inverse(ours.y), raw.y)       # predictions go back to the target's units
    assert abs(sval.X.mean()) > 1e-6  # val was not re-centred on its own statistics
    assert np.array_equal(train.X, split(ds, 0.2, 0.2, seed=0)[0].X)  # inputs untouched


def test_standardizer_checks_feature_count():
    s = Standardizer().fit(np.ones((4, 3)))
    with pytest.raises(UsageError, match="features"):
        s.transform(np.ones((4, 2)))


# ---------------------------------------------------------- batching and sharding

def test_batch_size_for():
    assert batch_size_for("sgd", 64, 1437) == 1
    assert batch_size_for("full", 64, 1437) == 1437
    assert batch_size_for("minibatch", 64, 1437) == 64
    assert batch_size_for("minibatch", 1437, 1437) == 1437
    with pytest.raises(UsageError, match="batch size 0 must be >= 1"):
        batch_size_for("minibatch", 0, 1437)
    with pytest.raises(UsageError, match=r"batch size 5000 is larger than the training set "
                                         r"\(1437 samples\)"):
        batch_size_for("minibatch", 5000, 1437)
    with pytest.raises(UsageError, match="'stochastic'"):
        batch_size_for("stochastic", 64, 1437)


@pytest.mark.parametrize("n, bs", [(10, 3), (12, 4), (5, 8), (1, 1), (100, 1)])
def test_epoch_batches_cover_every_index_once(n, bs):
    batches = epoch_batches(n, bs, seed=0, epoch=0)
    assert all(b.dtype == np.int64 for b in batches)
    assert [len(b) for b in batches[:-1]] == [bs] * (len(batches) - 1)
    assert len(batches[-1]) == (n % bs or min(bs, n))
    assert np.array_equal(np.sort(np.concatenate(batches)), np.arange(n))

    dropped = epoch_batches(n, bs, seed=0, epoch=0, drop_last=True)
    assert len(dropped) == n // bs and all(len(b) == bs for b in dropped)
    assert all(np.array_equal(a, b) for a, b in zip(dropped, batches))


def test_epoch_batches_seed_and_epoch():
    def flat(**kw):
        return np.concatenate(epoch_batches(50, 8, **kw))

    assert np.array_equal(flat(seed=1, epoch=3), flat(seed=1, epoch=3))
    assert not np.array_equal(flat(seed=1, epoch=3), flat(seed=1, epoch=4))
    assert not np.array_equal(flat(seed=1, epoch=3), flat(seed=2, epoch=3))
    assert np.array_equal(flat(seed=1, epoch=3, shuffle=False), np.arange(50))
    assert epoch_batches(0, 4, seed=0, epoch=0) == []
    with pytest.raises(UsageError, match="batch size 0"):
        epoch_batches(10, 0, seed=0, epoch=0)


@pytest.mark.parametrize("n", [0, 1, 2, 3, 7, 8, 64, 101])
@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
def test_shard_partitions_batch(n, world):
    batch = np.random.default_rng(n).permutation(1000)[:n]
    parts = [shard(batch, r, world) for r in range(world)]
    assert np.array_equal(np.concatenate(parts), batch)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    assert sizes == [len(p) for p in np.array_split(batch, world)]


def test_shard_bad_rank():
    with pytest.raises(UsageError, match="rank 3"):
        shard(np.arange(10), 3, 3)
    with pytest.raises(UsageError, match="rank -1"):
        shard(np.arange(10), -1, 2)


def test_micro_batches():
    idx = np.arange(10) * 3
    parts = micro_batches(idx, 3)
    assert [len(p) for p in parts] == [4, 3, 3] and np.array_equal(np.concatenate(parts), idx)
    parts = micro_batches(idx[:2], 4)
    assert [len(p) for p in parts] == [1, 1, 0, 0]
    with pytest.raises(UsageError, match="micro-batches 0"):
        micro_batches(idx, 0)


def test_csv_keeps_labels_as_written_and_names_what_it_cannot_read(tmp_path):
    big = 2**53
    (tmp_path / "big.csv").write_text("".join(f"{i},{big + i % 4}\n" for i in range(40)))
    ds = load_dataset("csv", path=str(tmp_path / "big.csv"))        # as float64, 2**53 + 1 would be 2**53
    assert ds.n_classes == 4 and ds.classes.tolist() == [str(big + k) for k in range(4)]
    (tmp_path / "zeros.csv").write_text("x,label\n" + "".join(f"{i},{'007' if i % 2 else '7'}\n" for i in range(20)))
    assert load_dataset("csv", path=str(tmp_path / "zeros.csv")).classes.tolist() == ["007", "7"]
    (tmp_path / "bom.csv").write_text("\ufeff1,2,0\n3,4,1\n5,6,0\n", encoding="utf-8")
    ds = load_dataset("csv", path=str(tmp_path / "bom.csv"))
    assert len(ds) == 3 and np.array_equal(ds.X[:, 0], [1, 3, 5])  # no row taken for a header
    (tmp_path / "ragged.csv").write_text("a,b,y\n1,2,0\n3,4,1\n5,6,7,0\n")
    with pytest.raises(UsageError, match="line 4: 4 fields"):
        load_dataset("csv", path=str(tmp_path / "ragged.csv"))
    (tmp_path / "ids.csv").write_text("".join(f"{i},{i * 0.5},id{i}\n" for i in range(200)))
    with pytest.raises(UsageError, match="200 distinct labels in 200 rows"):
        load_dataset("csv", path=str(tmp_path / "ids.csv"))
    assert load_dataset("csv", path=str(tmp_path / "ids.csv"), task="classification").n_classes == 200
