"""ddp: data-parallel neural-network training from first principles.

    import ddp
    model = ddp.fit(X, y, hidden="64", epochs=30)      # or ddp.load("runs/digits/checkpoint.npz")
    model.predict(X_new); model.score(X_test, y_test)

The pieces for a training loop of your own: ddp.Network and ddp.MLP (layers over flat parameter and gradient arenas), ddp.world_comm()
(the MPI world, or a serial one), ddp.DataParallel (broadcast, bucketed allreduce), ddp.make_optimizer.
"""
__version__ = "0.1.0"

from .api import Model, fit, load  # noqa: E402
from .comm import world_comm  # noqa: E402
from .config import Config  # noqa: E402
from .errors import UsageError  # noqa: E402
from .layers import Layer  # noqa: E402
from .model import MLP, Network  # noqa: E402
from .optim import SGD, Adam, AdamW, make_optimizer  # noqa: E402
from .parallel import DataParallel  # noqa: E402

__all__ = ["Model", "fit", "load", "world_comm", "Config", "UsageError", "MLP", "Network", "Layer", "SGD", "Adam", "AdamW",
           "make_optimizer", "DataParallel", "__version__"]
