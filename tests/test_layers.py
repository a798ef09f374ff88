"""Every layer kind against independent references: central differences (float64), PyTorch's autograd when
installed (same weights through the state dict; forward, every gradient and batch norm's running statistics
to 1e-10), N simulated ranks against one process, the device path (the emulated GPU without one), and the
arch's wiring: bad specs, checkpoints, ddp.load, resume, --trace.
"""
import json
import os

import numpy as np
import pytest

from helpers import rel_diff, run_cli
from ddp import backend
from ddp.config import Config
from ddp.gradcheck import gradcheck, random_problem
from ddp.layers import Dropout
from ddp.model import MLP, Network, mlp_arch
from ddp.train import run, run_with_setup

# Each kind appears in at least one net below, and each kind's backward is exercised with a parameter
# layer before it (so its dX reaches a checked gradient).
NETS = {
    "conv-pad-stride-maxpool-avgpool": ("conv:3:3:1:1,relu,maxpool:2,conv:4:2:2:0,tanh,avgpool:2,flatten,dense:5,"
                                        "relu,dropout:0.3,dense:3", (2, 8, 8)),
    "batchnorm-layernorm": ("conv:3:3,batchnorm,leaky_relu,maxpool:2,flatten,layernorm,dense:4,batchnorm,sigmoid,"
                            "dense:3", (2, 7, 7)),
    "maxpool-odd-margin-image-layernorm": ("conv:2:3:2:1,layernorm,tanh,maxpool:3,conv:3:1,flatten,dense:3", (1, 9, 9)),
    "flat-dropout-identity": ("dense:6,layernorm,tanh,dropout:0.5,identity,dense:3", 5),
}


def problem(model, B=6, seed=0):
    return random_problem(model, B, seed)


@pytest.mark.parametrize("name", list(NETS))
def test_central_differences(name):
    arch, shape = NETS[name]
    model = Network(arch, shape, dtype="float64", seed=1)
    X, y = problem(model)
    errs = gradcheck(model, X, y)
    assert max(errs) < 1e-7, errs


def test_mlp_shorthand_is_the_network_of_its_layers_bitwise():
    """--hidden 16,9 is dense:16,relu,dense:9,relu,dense:3, with the old He draw: W ~ N(0, 2/n_in) per layer
    from one default_rng(seed), biases zero, arrays named layers.{k}.W/b."""
    a = MLP([7, 16, 9, 3], activation="tanh", dtype="float64", seed=4)
    b = Network(mlp_arch([16, 9, 3], "tanh"), 7, dtype="float64", seed=4)
    rng = np.random.default_rng(4)
    for k, (n_in, n_out) in enumerate([(7, 16), (16, 9), (9, 3)]):
        w = rng.standard_normal((n_out, n_in)) * np.sqrt(2.0 / n_in)
        assert np.array_equal(a.state_dict()[f"layers.{k}.W"], w)
        assert not a.state_dict()[f"layers.{k}.b"].any()
    assert sorted(a.state_dict()) == [f"layers.{k}.{p}" for k in range(3) for p in "Wb"]
    X, y = problem(a)
    assert a.forward_backward(X, y) == b.forward_backward(X, y)
    assert np.array_equal(a.grads, b.grads) and np.array_equal(a.params, b.params)
    assert a.sizes == [7, 16, 9, 3] and a.activation == "tanh"


def _torch_net(torch, model, masks):
    """The torch.nn twin of `model`, and a function giving its parameters' grads in ddp's state-dict order."""
    nn = torch.nn
    mods, shape = [], model.input_shape
    for L in model.seq:
        k, a = L.kind, L.item.split(":")[1:]
        if k == "conv":
            m = nn.Conv2d(shape[0], int(a[0]), int(a[1]), *(int(v) for v in a[2:]))
        elif k == "dense":
            m = nn.Linear(L.n_in, L.n_out)
        elif k in ("maxpool", "avgpool"):
            m = (nn.MaxPool2d if k == "maxpool" else nn.AvgPool2d)(int(a[0]))
        elif k == "batchnorm":
            m = (nn.BatchNorm2d if len(L.in_shape) == 3 else nn.BatchNorm1d)(L.in_shape[-1])
        elif k == "layernorm":
            m = nn.LayerNorm(L.shapes["W"])
        elif k == "dropout":                      # ddp's own mask: the layer under test is the rest
            class M(nn.Module):
                def forward(self, x, L=L):
                    return x * torch.as_tensor(masks[L.pos]).reshape(x.shape[0], *(
                        (L.in_shape[2], L.in_shape[0], L.in_shape[1]) if len(L.in_shape) == 3 else L.in_shape))
            m = M()
        else:
            m = {"relu": nn.ReLU(), "tanh": nn.Tanh(), "sigmoid": nn.Sigmoid(), "identity": nn.Identity(),
                 "leaky_relu": nn.LeakyReLU(0.01), "flatten": nn.Flatten()}[k]
        mods.append(m)
        o = L.out_shape
        shape = (o[2], o[0], o[1]) if len(o) == 3 else o
    return nn.Sequential(*mods).double()


@pytest.mark.parametrize("name", list(NETS))
def test_pytorch_autograd_agrees(name):
    torch = pytest.importorskip("torch")
    arch, shape = NETS[name]
    model = Network(arch, shape, dtype="float64", seed=2)
    model.params[:] = np.random.default_rng(5).standard_normal(model.num_params) * 0.5   # not 1s and 0s
    X, y = problem(model, B=7, seed=3)
    masks = {}
    for L in model.seq:
        if isinstance(L, Dropout):                # the masks ddp draws for rows 0..6 at step 11
            u = L.uniforms(np, model.seed, 11, np.arange(7)).reshape(7, *L.in_shape)
            m = np.where(u >= L.p, 1 / (1 - L.p), 0.0)
            masks[L.pos] = m.transpose(0, 3, 1, 2) if m.ndim == 4 else m
    net = _torch_net(torch, model, masks)
    state = model.state_dict()
    params = [k for k in state if not k.endswith(("running_mean", "running_var"))]
    with torch.no_grad():
        for p, k in zip(net.parameters(), params, strict=True):
            p.copy_(torch.as_tensor(state[k]))
    Xt = torch.as_tensor(X.reshape(len(X), *model.input_shape))
    loss = model.forward_backward(X, y, step=11)
    lt = torch.nn.functional.cross_entropy(net(Xt), torch.as_tensor(y))
    lt.backward()
    assert abs(float(loss) - lt.item()) < 1e-10
    grads = {L.index: L.g for L in model.layers}
    for p, k in zip(net.parameters(), params):
        mine = grads[int(k.split(".")[1])][list(model.layers[int(k.split(".")[1])].shapes).index(k.split(".")[2])]
        assert np.abs(mine - p.grad.numpy()).max() < 1e-10, k
    bns = [m for m in net if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d))]
    stats = [v for k, v in model.state_dict().items() if k.endswith(("running_mean", "running_var"))]
    for m, (mean, var) in zip(bns, zip(stats[::2], stats[1::2])):
        assert np.abs(mean - m.running_mean.numpy()).max() < 1e-10 and np.abs(var - m.running_var.numpy()).max() < 1e-10
    net.eval()                                    # evaluation: no dropout, running statistics
    for m in net:
        if type(m).__name__ == "M":
            m.forward = lambda x: x
    assert np.abs(model.forward(X) - net(Xt).detach().numpy()).max() < 1e-10


def test_maxpool_routes_each_windows_gradient_to_its_first_maximum():
    """Ties (common after relu) are where a max pool's backward goes wrong; a loop over windows is the reference."""
    from ddp.layers import Pass, make_layer
    L = make_layer("maxpool:2", (5, 4, 3))        # H=5: the last row fills no window
    L.xp, L.dtype = np, np.dtype("float64")
    rng = np.random.default_rng(0)
    X = rng.integers(0, 3, (4, 5, 4, 3)).astype(np.float64)
    Y = L.forward(X, Pass(True)).copy()
    dY = rng.standard_normal(Y.shape)
    dX = L.backward(dY, [], True)
    ref_Y, ref_dX = np.zeros_like(Y), np.zeros_like(X)
    for b, i, j, c in np.ndindex(*Y.shape):
        win = X[b, 2 * i:2 * i + 2, 2 * j:2 * j + 2, c]
        t = int(np.argmax(win))                   # the first maximum, row-major
        ref_Y[b, i, j, c] = win.max()
        ref_dX[b, 2 * i + t // 2, 2 * j + t % 2, c] = dY[b, i, j, c]
    assert np.array_equal(Y, ref_Y) and np.array_equal(dX, ref_dX)


def test_dropout_mask_depends_on_global_rows_not_on_the_split():
    L = Network("dense:40,dropout:0.5,dense:2", 3).seq[1]
    rows = np.array([17, 3, 99, 5, 42])
    whole = L.uniforms(np, 7, 12, rows)
    assert np.array_equal(np.concatenate([L.uniforms(np, 7, 12, rows[:2]), L.uniforms(np, 7, 12, rows[2:])]), whole)
    assert not np.array_equal(L.uniforms(np, 7, 13, rows), whole)      # a new mask each step
    assert not np.array_equal(L.uniforms(np, 8, 12, rows), whole)      # and for another seed
    keep = (L.uniforms(np, 0, 0, np.arange(500)) >= 0.5).mean()
    assert 0.48 < keep < 0.52


SIM = dict(dataset="synthetic_classification", n_samples=150, n_features=36, input_shape="1,6,6",
           arch="conv:3:3:1:1,relu,maxpool:2,conv:4:2,batchnorm,relu,flatten,dense:8,dropout:0.3,dense:3",
           batch_size=20, lr=0.1, momentum=0.9, dtype="float64", progress=False, quiet=True, epochs=2,
           val_fraction=0.1, test_fraction=0.1)


def _final_params(cfg):
    out = {}
    run(cfg, on_step=lambda step, model, comm: out.update(p=np.array(backend.to_numpy(model.params))))
    return out["p"]


# With --accumulate, batch norm normalizes each micro-batch (across ranks): micro-batches of 1 rank and of 4
# hold different rows, so that variant swaps batchnorm for layernorm.
@pytest.mark.parametrize("extra", [{}, {"overlap": "on", "bucket_mb": 0.0},
                                   {"accumulate": 2, "arch": SIM["arch"].replace("batchnorm", "layernorm")}])
def test_four_simulated_ranks_equal_one_process(tmp_path, extra):
    kw = {**SIM, **extra}
    one = _final_params(Config(out=str(tmp_path / "one"), **kw))
    four = _final_params(Config(out=str(tmp_path / "four"), simulate_ranks=4, **kw))
    assert rel_diff(four, one) <= 1e-12


def test_the_device_path_equals_numpy(device):
    """The same conv/pool/batchnorm/layernorm/dropout step on NumPy and on the device (the emulated GPU here)."""
    arch, shape = NETS["batchnorm-layernorm"]
    ref = Network(arch + ",dropout:0.2,dense:3", shape, dtype="float64", seed=3)
    dev = Network(arch + ",dropout:0.2,dense:3", shape, dtype="float64", seed=3, device=device)
    X, y = problem(ref, B=5)
    a = ref.forward_backward(X, y, step=2)
    b = dev.forward_backward(dev.xp.asarray(X), dev.xp.asarray(y), step=2)
    assert abs(float(a) - float(b)) < 1e-12
    assert rel_diff(backend.to_numpy(dev.grads), ref.grads) < 1e-12
    assert rel_diff(backend.to_numpy(dev.forward(dev.xp.asarray(X))), ref.forward(X)) < 1e-12


@pytest.mark.parametrize("arch, shape, words", [
    ("conv:4:3,relu,bogus,flatten,dense:10", "1,8,8", "arch item 'bogus': unknown kind"),
    ("conv:4:9,flatten,dense:10", "1,8,8", "arch item 'conv:4:9': kernel 9 is larger than its input 8x8"),
    ("conv:4:3,relu,maxpool:7,flatten,dense:10", "1,8,8", "arch item 'maxpool:7': kernel 7 is larger"),
    ("conv:4:3,relu,dense:10", "1,8,8", "arch item 'dense:10': needs a flat input"),
    ("conv:4:3,flatten,dense:10", "", "arch item 'conv:4:3': needs an image input"),
    ("conv:4:3,flatten,dense:10", "1,4,4", "input shape '1,4,4' has 16 values per sample, but the data has 64"),
    ("conv:4:3,flatten,dense:7", "1,8,8", "ends with 7 outputs, but the data needs 10"),
    ("conv:4,flatten,dense:10", "1,8,8", "arch item 'conv:4': expected conv:OUT:K"),
    ("dropout:1.5,dense:10", "", "arch item 'dropout:1.5': probability 1.5 must be in [0, 1)"),
    ("conv:4:3,relu", "1,8,8", "outputs images (4,6,6): end it with flatten and dense:N"),
])
def test_bad_arch_is_one_line_exit_2_nothing_written(tmp_path, arch, shape, words):
    out = tmp_path / "run"
    res = run_cli("train", "--dataset", "digits", "--arch", arch, *(["--input-shape", shape] if shape else []),
                  "--out", str(out), "--epochs", "1")
    assert res.returncode == 2 and words in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not out.exists()


def test_batchnorm_in_ps_mode_is_refused(tmp_path):
    res = run_cli("train", "--dataset", "digits", "--arch", "dense:16,batchnorm,relu,dense:10", "--mode", "ps",
                  "--out", str(tmp_path / "r"))
    assert res.returncode == 2 and "batchnorm needs --mode allreduce" in res.stderr


def test_arch_checkpoint_load_predict_resume_and_trace(tmp_path):
    """The arch and input shape travel in the checkpoint: ddp.load rebuilds the network, a resumed run
    continues bitwise, and --trace has a span per layer."""
    import ddp
    kw = dict(SIM, arch=SIM["arch"].replace("batchnorm", "layernorm"), dtype="float32", epochs=4)
    _, setup = run_with_setup(Config(out=str(tmp_path / "full"), **kw))
    run(Config(out=str(tmp_path / "half"), max_steps=8, **kw))
    from ddp.run import resolve_config
    run(resolve_config(dict(resume=str(tmp_path / "half" / "checkpoint.npz"), trace=str(tmp_path / "t.json"))))
    a, b = (np.load(tmp_path / d / "checkpoint.npz") for d in ("full", "half"))
    for k in a.files:
        if k.startswith("layers."):
            assert np.array_equal(a[k], b[k]), k
    meta = json.loads(str(a["meta"]))
    assert meta["arch"] == kw["arch"] and meta["input_shape"] == [1, 6, 6]
    model = ddp.load(str(tmp_path / "full"))
    assert isinstance(model.mlp, Network) and model.mlp.arch == kw["arch"]
    X = setup.test.X                              # standardized rows: compare the networks themselves
    assert np.array_equal(model.mlp.forward(X), setup.model.forward(X))
    names = {e["name"] for e in json.load(open(tmp_path / "t.json"))["traceEvents"] if "name" in e}
    n = len(kw["arch"].split(","))
    assert {f"forward L{i}" for i in range(n)} <= names and f"backward L{n - 1}" in names


def test_toml_arch_list_and_fit_with_an_arch(tmp_path):
    import ddp
    from ddp.config import load_toml
    from sklearn.datasets import load_digits
    toml = tmp_path / "c.toml"
    toml.write_text('arch = ["conv:4:3", "relu", "maxpool:2", "flatten", "dense:10"]\ninput_shape = "1,8,8"\n')
    assert load_toml(str(toml)) == {"arch": "conv:4:3,relu,maxpool:2,flatten,dense:10", "input_shape": "1,8,8"}
    X, y = load_digits(return_X_y=True)
    model = ddp.fit(X[:1200], y[:1200], **load_toml(str(toml)), epochs=8, lr=0.05, momentum=0.9, batch_size=32)
    assert model.mlp.arch == "conv:4:3,relu,maxpool:2,flatten,dense:10"
    assert model.score(X[1200:], y[1200:]) > 0.85


def test_training_on_the_device_equals_numpy(tmp_path, device):
    """A whole CNN run (conv, maxpool, batchnorm, dropout) on the device (the emulated GPU here) and on NumPy."""
    ref = _final_params(Config(out=str(tmp_path / "cpu"), **SIM))
    dev = _final_params(Config(out=str(tmp_path / "dev"), device=device, **SIM))
    assert rel_diff(dev, ref) <= 1e-12


def mnist_files():
    """The MNIST idx files (gzip or not) in $DDP_MNIST, else in ../shared/data/mnist beside the repository
    (where the project's machines keep them), or skip saying where they are looked for."""
    import glob
    beside = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "mnist")
    folder = os.environ.get("DDP_MNIST", beside)
    found = {p: sorted(glob.glob(os.path.join(folder, f"{p}*"))) for p in
             ("train-images", "train-labels", "t10k-images", "t10k-labels")} if folder else {}
    if not folder or not all(found.values()):
        pytest.skip(f"the MNIST idx files are absent from {folder!r}: set DDP_MNIST to the folder holding train-images*, "
                    "train-labels*, t10k-images* and t10k-labels*")
    return {k: v[0] for k, v in found.items()}


def test_mnist_cnn_learns_from_the_idx_files(tmp_path):
    """The idx files give the input shape (1, 28, 28) by themselves; a small CNN trained for 150 steps
    classifies the official test images through ddp.load."""
    import ddp
    from ddp.api import read_rows
    f = mnist_files()
    out = tmp_path / "mnist"
    run(Config(data_path=f"{f['train-images']},{f['train-labels']}", arch="conv:8:3,relu,maxpool:2,flatten,dense:10",
               optimizer="adam", lr=0.002, batch_size=64, max_steps=150, val_fraction=0.01,
               test_fraction=0.0, progress=False, quiet=True, out=str(out)))
    model = ddp.load(str(out))
    assert model.mlp.input_shape == (1, 28, 28)
    X, y = read_rows(f"{f['t10k-images']},{f['t10k-labels']}", model.prep.n_features)
    assert len(X) == 10000 and model.score(X, y) > 0.9
