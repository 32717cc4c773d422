"""Training frameworks: callbacks that step a :class:`~group_prox.SparsityTarget` and keep its
state with every checkpoint.

* :class:`group_prox.integrations.hf.SparsityTargetCallback` for Hugging Face's ``Trainer``
  (optional extra ``group_prox[hf]``);
* :class:`group_prox.integrations.lightning.SparsityTargetCallback` for Lightning
  (``lightning`` or ``pytorch_lightning``).

Each module imports its framework when it is imported, not before.
"""
