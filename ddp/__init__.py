"""ddp: data-parallel neural-network training from first principles."""
from .errors import UsageError
from .model import MLP, Layer

__version__ = "0.1.0"
__all__ = ["MLP", "Layer", "UsageError", "__version__"]
