"""ddp: data-parallel neural-network training from first principles.

    import ddp
    model = ddp.fit(X, y, hidden="64", epochs=30)      # or ddp.load("runs/digits/checkpoint.npz")
    model.predict(X_new); model.score(X_test, y_test)

The pieces for a training loop of your own: ddp.Network and ddp.MLP (layers over flat parameter and gradient arenas), ddp.world_comm()
(the MPI world, or a serial one), ddp.DataParallel (broadcast, bucketed allreduce), ddp.make_optimizer.
"""

from .api import Model, fit, load
from .comm import world_comm
from .config import Config
from .errors import UsageError
from .layers import Layer
from .model import MLP, Network
from .optim import SGD, Adam, AdamW, make_optimizer
from .parallel import DataParallel
from .version import __version__

__all__ = ["Model", "fit", "load", "world_comm", "Config", "UsageError", "MLPClassifier", "MLPRegressor", "MLP",
           "Network", "Layer", "SGD", "Adam", "AdamW",
           "make_optimizer", "DataParallel", "__version__"]


def __getattr__(name):
    """ddp.MLPClassifier and ddp.MLPRegressor import scikit-learn's estimator machinery only when asked for."""
    if name in ("MLPClassifier", "MLPRegressor"):
        from . import estimator
        return getattr(estimator, name)
    raise AttributeError(f"module 'ddp' has no attribute {name!r}")
