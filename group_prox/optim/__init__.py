"""Optimizers: the torch update followed by the exact prox of a hierarchical group penalty."""

from .adam import ProxAdam
from .sgd import ProxSGD

__all__ = ["ProxAdam", "ProxSGD"]
