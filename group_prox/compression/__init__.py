"""Compression: exact zeros in, a physically smaller model with the same outputs out."""

from .api import compress, compression_plan, load_compressed, save_compressed
from .plan import CompressionPlan, ReplaceOp, SliceOp, register_replacement
from .removable import Removable, removable
from .report import CompressionReport, compression_report

__all__ = [
    "CompressionPlan",
    "CompressionReport",
    "Removable",
    "ReplaceOp",
    "SliceOp",
    "compress",
    "compression_plan",
    "compression_report",
    "load_compressed",
    "register_replacement",
    "removable",
    "save_compressed",
]
