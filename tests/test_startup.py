"""Start-up (issue 10): the bundled datasets are read without sklearn, and the train path imports
nothing it does not need. No timings here: benchmarks/bench_startup.py measures them."""
import json
import subprocess
import sys

import numpy as np
import pytest
import sklearn.datasets

from ddp import backend
from ddp.formats import load_bundled
from helpers import ROOT


@pytest.mark.parametrize("name", ["digits", "breast_cancer", "diabetes"])
def test_bundled_reader_is_bit_identical_to_sklearn(name):
    # load_diabetes scales X by default (scaled=True), and that is what ddp always used.
    X_ref, y_ref = getattr(sklearn.datasets, "load_" + name)(return_X_y=True)
    X, y = load_bundled(name)
    for got, ref in ((X, X_ref), (y, y_ref)):
        assert got.dtype == ref.dtype and got.shape == ref.shape
        assert got.tobytes() == ref.tobytes(), f"{name}: differs in {np.count_nonzero(got != ref)} values"


# The modules a one-process digits run must not load: sklearn's estimator stack and scipy cost
# 1.5 s of start-up per rank; tqdm is for the bar (off here), mpi4py for launched runs only.
HEAVY = ("sklearn", "scipy", "tqdm", "mpi4py", "cupy", "torch")
PROBE = """
import json, sys
from ddp.cli import main
rc = main(["train", "--dataset", "digits", "--epochs", "1", "--no-progress", "--out", sys.argv[1]])
print(json.dumps({"rc": rc, "loaded": sorted({m.split(".")[0] for m in sys.modules} & set(sys.argv[2:]))}))
"""


def test_train_path_imports_nothing_heavy(tmp_path):
    res = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path / "run"), *HEAVY], capture_output=True,
                         text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out == {"rc": 0, "loaded": []}, f"the train path imported {out['loaded']}"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_axpy_uses_numpys_blas(dtype):
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal(1001).astype(dtype), rng.standard_normal(1001).astype(dtype)
    expected = y.astype(np.float64) - 0.3 * x.astype(np.float64)
    backend.axpy(-0.3, x, y)
    assert np.allclose(y, expected, rtol=0, atol=10 * np.finfo(dtype).eps)
    if sys.platform.startswith("linux"):   # found through /proc/self/maps
        assert np.dtype(dtype) in backend._find_blas_axpy(), "no BLAS axpy found: the slow path is in use"
