"""Data left on disk (issue 17): each rank reads only its rows, memory does not grow with the file, the
scaling statistics are exact across ranks, and validation/test files are used as given."""
import json
import threading

import numpy as np
from helpers import run_cli, run_launcher
from test_data import write_idx
from test_run import ok, one_line_error

from ddp.comm import SerialComm
from ddp.comm_simulated import run_simulated
from ddp.config import Config
from ddp.data import Dataset, fit_scale, load_dataset, split
from ddp.train import run_with_setup

READS = []


class Counting(np.ndarray):
    """An input array that records how many rows each thread (simulated rank) reads from it."""

    def __getitem__(self, i):
        if isinstance(i, (slice, list, np.ndarray)):
            READS.append((threading.get_ident(), len(np.arange(len(self))[i])))
        return np.asarray(super().__getitem__(i))


def test_each_rank_reads_only_its_rows():
    """2 simulated ranks, 2 epochs: every row read is counted. Reading a whole batch on each rank (instead of
    its shard) or the whole set anywhere would add rows."""
    rng = np.random.default_rng(0)
    X = rng.integers(0, 256, (200, 5), dtype=np.uint8).view(Counting)
    ds = Dataset(X, (np.asarray(X[:, 0]) > 127).astype(np.int64), "classification", 2, "t")
    parts = split(ds, 0.1, 0.2, seed=0)
    n_tr, n_val, n_te = (len(p) for p in parts)
    READS.clear()
    cfg = Config(dataset="npz", hidden="4", epochs=2, batch_size=16, simulate_ranks=2, progress=False, quiet=True,
                 scale="standard", check_every=0)
    run_with_setup(cfg, raw=parts)
    ranks = {t for t, _ in READS}
    # 1 row each for the shift, the training rows once between the ranks for the statistics, the fingerprint's
    # rows on each rank (all of them, below 65,536), each epoch's rows once between the ranks, the validation
    # set after each epoch and at the end, the test set at the end.
    expected = 2 + n_tr + 2 * n_tr + 2 * n_tr + 3 * n_val + n_te
    assert len(ranks) == 2 and sum(n for _, n in READS) == expected
    per_rank = [sum(n for t, n in READS if t == r) for r in ranks]
    assert abs(per_rank[0] - per_rank[1]) <= 2 * 9 + 1          # shards differ by at most a row per batch


def test_scaling_statistics_sharded_over_ranks_equal_one_pass_in_float64():
    rng = np.random.default_rng(1)
    X = 1e6 + rng.standard_normal((1001, 7)) * np.array([1, 1e-3, 10, 1, 1, 1, 2])     # |mean| >> std
    ds = Dataset(X, np.zeros(1001, np.int64), "classification", 2, "t").subset(rng.permutation(1001)[:900])
    ref = ds.X
    one = fit_scale(ds, "standard", SerialComm())
    for world in (1, 3, 4):
        got = run_simulated(world, lambda comm: fit_scale(ds, "standard", comm))
        for s in got:
            assert np.allclose(s.mean, ref.mean(axis=0), rtol=1e-14, atol=0)
            assert np.allclose(s.std, ref.std(axis=0), rtol=1e-9, atol=0)
            # blocks of rows added in block order: the same bits for any world size (--deterministic needs it)
            assert s.mean.tobytes() == one.mean.tobytes() and s.std.tobytes() == one.std.tobytes()
    mm = run_simulated(3, lambda comm: fit_scale(ds, "minmax", comm))[0]
    assert np.all(mm.mean == ref.min()) and np.all(mm.std == ref.max() - ref.min())
    U = Dataset(rng.integers(0, 256, (50, 3), dtype=np.uint8), np.zeros(50, np.int64), "classification", 2, "u")
    U.scale = fit_scale(U, "auto", SerialComm())                  # uint8: / 255
    assert np.array_equal(U.inputs(slice(None), dtype=np.float64), U.data / 255.0)


def test_standard_warns_about_almost_constant_features(capsys):
    X = np.zeros((10000, 3))
    X[:, 0] = np.arange(10000)
    X[7, 2] = 1.0                              # a pixel almost always 0: range 100 stds
    fit_scale(Dataset(X, np.zeros(10000, np.int64), "classification", 2, "t"), "standard", SerialComm())
    err = capsys.readouterr().err
    assert "warning: 1 feature(s)" in err and "(columns 2)" in err


def test_n_ranks_equal_one_process_on_a_memory_mapped_file(tmp_path):
    rng = np.random.default_rng(2)
    X = rng.integers(0, 256, (300, 6), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", X=X, y=(X[:, 0] > X[:, 1]).astype(int))
    assert isinstance(load_dataset("npz", path=str(tmp_path / "d.npz")).data, np.memmap)
    params = []
    for ranks in (0, 3):
        cfg = Config(data_path=str(tmp_path / "d.npz"), hidden="8", epochs=2, batch_size=32, dtype="float64",
                     simulate_ranks=ranks, progress=False, quiet=True, scale="standard")
        params.append(np.array(run_with_setup(cfg)[1].model.params))
    assert np.max(np.abs(params[0] - params[1])) <= 1e-12 * np.max(np.abs(params[0]))


def idx_pair(folder, name, images, labels):
    write_idx(folder / f"{name}-images-ubyte", images, 0x08, "B")
    write_idx(folder / f"{name}-labels-ubyte", labels, 0x08, "B")
    return f"{folder / f'{name}-images-ubyte'},{folder / f'{name}-labels-ubyte'}"


def test_test_file_is_the_summarys_test_set_and_evaluate_agrees(tmp_path):
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (400, 4, 4), dtype=np.uint8)
    labels = (images[:, 0, 0] > 127).astype(np.uint8) + 5 * (images[:, 1, 1] > 200)   # classes 0, 1, 5, 6
    train = idx_pair(tmp_path, "train", images[:300], labels[:300])
    test = idx_pair(tmp_path, "test", images[300:], labels[300:])
    out = tmp_path / "run"
    ok(run_cli("train", "--data-path", train, "--test-path", test, "--val-fraction", "0.1", "--hidden", "8",
               "--epochs", "2", "--batch-size", "32", "--quiet", "--no-progress", "--out", str(out)))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["test_path"] == test
    got = json.loads(ok(run_cli("evaluate", "--checkpoint", str(out / "checkpoint.npz"), "--data-path", test,
                                "--json")).stdout)
    assert got["n"] == 100                                       # the whole file: no fraction cut from it
    assert got["accuracy"] == summary["test_accuracy"] and np.isclose(got["loss"], summary["test_loss"], rtol=1e-6)
    pred = ok(run_cli("predict", "--checkpoint", str(out / "checkpoint.npz"), "--data-path",
                      str(tmp_path / "test-images-ubyte"))).stdout.split()     # images only, no labels
    assert pred[0] == "prediction" and len(pred) == 101 and set(pred[1:]) <= {"0", "1", "5", "6"}
    one_line_error(run_cli("train", "--dataset", "digits", "--test-path", test, "--out", str(tmp_path / "o")),
                   "--test-path", "built in")


def test_two_ranks_stay_under_their_budget_on_a_file_three_times_larger(tmp_path):
    """A 600 MB memory-mapped file, 2 ranks with a 200 MB budget each: every rank's peak RSS (summary.json)
    stays under it. Reading the whole file on a rank, or keeping the pages it read mapped, would not."""
    n, d = 300_000, 2000
    X = np.lib.format.open_memmap(tmp_path / "X.npy", "w+", np.uint8, (n, d))
    y = np.empty(n, np.int64)
    rng = np.random.default_rng(4)
    for s in range(0, n, 20_000):
        X[s:s + 20_000] = chunk = rng.integers(0, 256, (20_000, d), dtype=np.uint8)
        y[s:s + 20_000] = chunk[:, 0] > 127
    np.savez(tmp_path / "big.npz", X=X, y=y)
    del X
    (tmp_path / "X.npy").unlink()
    out = tmp_path / "run"
    res = run_launcher("-n", "2", "--", "train", "--data-path", str(tmp_path / "big.npz"), "--hidden", "8",
                       "--batch-size", "256", "--max-steps", "20", "--val-fraction", "0.02", "--test-fraction", "0.02",
                       "--quiet", "--no-progress", "--out", str(out), timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    rss = json.loads((out / "summary.json").read_text())["peak_rss_mb"]
    assert len(rss) == 2 and max(rss) < 200, rss


def test_convert_writes_an_npz_that_loads_memory_mapped_as_the_csv_loads(tmp_path):
    rows = [f"{i % 7},{i * 0.25},{'007' if i % 3 else 'b'}" for i in range(60)]
    (tmp_path / "d.csv").write_text("f1,f2,label\n" + "\n".join(rows) + "\n")
    ok(run_cli("convert", str(tmp_path / "d.csv"), str(tmp_path / "d.npz")))
    a, b = (load_dataset(f, path=str(tmp_path / f"d.{f}")) for f in ("csv", "npz"))
    assert isinstance(b.data, np.memmap) and np.array_equal(a.X, b.X) and np.array_equal(a.y, b.y)
    assert b.classes.tolist() == ["007", "b"]
    one_line_error(run_cli("convert", str(tmp_path / "d.csv"), str(tmp_path / "d.npy")), ".npz")
    one_line_error(run_cli("convert", str(tmp_path / "d.csv"), str(tmp_path / "no" / "d.npz")), "does not exist")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.csv", "d.npz"]         # no temporary file left


def test_fit_takes_memory_mapped_arrays(tmp_path):
    """ddp.fit on an np.load(mmap_mode='r') array trains exactly as on the array in memory."""
    import ddp
    rng = np.random.default_rng(5)
    X = rng.integers(0, 256, (200, 6), dtype=np.uint8)
    y = (X[:, 0] > X[:, 1]).astype(int)
    np.save(tmp_path / "X.npy", X)
    mapped = np.load(tmp_path / "X.npy", mmap_mode="r")
    kw = dict(hidden="8", epochs=2, batch_size=32, dtype="float64", seed=1)
    a, b = ddp.fit(mapped, y, **kw), ddp.fit(X, y, **kw)
    assert np.array_equal(a.mlp.params, b.mlp.params)
