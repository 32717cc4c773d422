"""Compression of mixture-of-experts layers, kept under this name for existing imports.

The family (the layouts it recognises, its levels, its compression plan and
:class:`ZeroExpert`) lives in :mod:`group_prox.families.experts`.
"""

from ..families.experts import ZeroExpert, applies, plan

__all__ = ["ZeroExpert", "applies", "plan"]
