"""Compression: exact zeros in, a physically smaller model with the same outputs out."""

from .api import compress, load_compressed, save_compressed
from .plan import CompressionPlan, ReplaceOp, SliceOp, register_replacement
from .report import CompressionReport, compression_report

__all__ = [
    "CompressionPlan",
    "CompressionReport",
    "ReplaceOp",
    "SliceOp",
    "compress",
    "compression_report",
    "load_compressed",
    "register_replacement",
    "save_compressed",
]
