"""group_prox: structured sparsity for PyTorch by exact hierarchical proximal gradient."""

from . import (
    compression,
    families,  # registers the families shipped, after the modules they use
    hierarchy,
    penalties,
)
from .compression import (
    CompressionReport,
    Removable,
    compress,
    compression_report,
    load_compressed,
    removable,
    save_compressed,
)
from .config import from_config, prox_lambda
from .hierarchy import Hierarchy
from .optim import ProxAdam, ProxSGD
from .penalties import (
    L1,
    GroupDecay,
    GroupL0,
    GroupLasso,
    GroupLogSum,
    GroupMCP,
    GroupSCAD,
    Penalty,
    SparseGroupLasso,
)
from .prox import HierarchicalProx
from .report import SparsityReport, get_sparsity_report
from .target import SparsityTarget

__version__ = "0.1.0"

__all__ = [
    "L1",
    "CompressionReport",
    "GroupDecay",
    "GroupL0",
    "GroupLasso",
    "GroupLogSum",
    "GroupMCP",
    "GroupSCAD",
    "HierarchicalProx",
    "Hierarchy",
    "Penalty",
    "ProxAdam",
    "ProxSGD",
    "Removable",
    "SparseGroupLasso",
    "SparsityReport",
    "SparsityTarget",
    "__version__",
    "compress",
    "compression",
    "compression_report",
    "families",
    "from_config",
    "get_sparsity_report",
    "hierarchy",
    "load_compressed",
    "penalties",
    "prox_lambda",
    "removable",
    "save_compressed",
]
