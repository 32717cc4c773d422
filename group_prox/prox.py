"""HierarchicalProx: the proximal operator of a hierarchical group penalty, bound to parameters.

The optimizers hold one (``optimizer.prox``) and apply it after torch's update; a
:class:`~group_prox.SparsityTarget`, the report and the distributed code talk to it through the
methods below. It can also be used on its own, after any update rule::

    prox = gp.HierarchicalProx(h, {"base_level": gp.GroupLasso(1e-4)})
    ...
    my_update_(params)
    prox.apply_(lr)          # x ← prox_{lr·Ω}(x), in place

It owns the :class:`~group_prox.kernels.ProxPlan` (the hierarchy's index layout, built once), the
penalties, the frozen zero pattern and two records of what it last read:

* **norms**: the squared norm of every atom after its last application (``‖x_a‖²·s_a²`` from the
  norms it read and the scales it wrote), so that measuring the group norms right after a step
  (a controller's job) costs no read of the parameters;
* **finiteness**: each parameter's version counter after an application that found every atom
  norm finite, so that the optimizer's look for NaN and infinite values can leave out the
  parameters that nothing has written since (see :meth:`HierarchicalProx.unread`).

Both records are kept per parameter by its version counter (``Tensor._version``), which every
in-place write through the tensor itself increments; writes through ``.data`` are not seen.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor, nn

from .hierarchy.core import Hierarchy
from .kernels import (
    NonFiniteAtoms,
    ProxPlan,
    group_scales,
    group_sq_norms,
    hierarchical_prox_,
    scale_atoms_,
    scales_from_norms,
)
from .penalties import Penalty

__all__ = ["GLOBAL", "HierarchicalProx", "NonFiniteAtoms"]

#: A penalty under this key acts on one group holding every parameter of the hierarchy, unless the
#: hierarchy has a level of that name (the earlier project's ``type: global``).
GLOBAL = "global"


class HierarchicalProx:
    r"""The exact proximal operator of ``Ω = Σ_levels Ω_level`` on a hierarchy's parameters.

    One application with step sizes ``η`` (one per group tree) computes, in place,

    .. math:: x \leftarrow \operatorname{prox}_{\eta\,\Omega}(x)
              = \operatorname*{argmin}_z \tfrac12\|z - x\|^2 + \eta\,\Omega(z),

    level by level from the finest to the coarsest penalised level (see
    :func:`group_prox.kernels.hierarchical_prox_`): one read of every tensor for its atom norms,
    arithmetic on those few numbers, one scaling write.

    Args:
        hierarchy: the :class:`~group_prox.Hierarchy` of parameter groups.
        penalties: ``{level name: penalty}``; levels without one are not penalised. The key
            ``"global"``, when the hierarchy has no level of that name, stands for one group
            holding every parameter of the hierarchy.
        param_groups: the parameters by step-size group, e.g. an optimizer's
            ``[g["params"] for g in optimizer.param_groups]``; every tensor of the hierarchy must
            be in one. Default: one group holding the hierarchy's parameters.
        owner: the name used in error messages (the optimizer's class name).
        allow_meta: accept parameters on the ``meta`` device, to build the plan of a large model
            before its weights exist; such a prox cannot be applied (it raises a ``ValueError``)
            until :meth:`bind` gives it the materialised parameters. Optimizers never pass it:
            one over ``meta`` parameters is refused.

    Raises:
        TypeError, ValueError: for penalties or a hierarchy that do not fit (each message names
            the level, group or parameter and what to change), before anything is built.
    """

    #: The name of a parameter on the meta device (the prox refuses to apply), else None; also
    #: for a prox pickled before it had the attribute.
    _meta: str | None = None

    def __init__(
        self,
        hierarchy: Hierarchy,
        penalties: Mapping[str, Penalty] | None = None,
        param_groups: Sequence[Sequence[Tensor]] | None = None,
        *,
        owner: str = "HierarchicalProx",
        allow_meta: bool = False,
    ) -> None:
        self.owner = owner
        penalties = {} if penalties is None else penalties
        if not isinstance(penalties, Mapping):
            raise TypeError(
                f"{owner}: penalties must be a mapping {{level name: penalty}}, e.g. "
                f"{{'base_level': group_prox.GroupLasso(1e-4)}}; got {type(penalties).__name__}."
            )
        if not isinstance(hierarchy, Hierarchy):
            raise TypeError(
                f"{owner}: hierarchy must be a group_prox.Hierarchy (for example "
                f"group_prox.hierarchy.resnet(model)), got {type(hierarchy).__name__}."
            )
        hierarchy = _with_global_level(owner, hierarchy, penalties)
        _check_penalties(owner, hierarchy, penalties)
        if param_groups is None:
            param_groups = [hierarchy.params]
        group_of = {id(p): i for i, group in enumerate(param_groups) for p in group}
        _check_parameters(
            owner, hierarchy, [p for group in param_groups for p in group], allow_meta=allow_meta
        )
        self.hierarchy = hierarchy
        self._penalties: Mapping[str, Penalty] = MappingProxyType(dict(penalties))
        self.plan = ProxPlan(
            hierarchy,
            list(penalties.items()),
            [group_of[id(lay.param)] for lay in hierarchy.tensors],
        )
        # 1/0 per atom while the zero pattern is frozen (see freeze_zero_groups), else None.
        self._frozen_mask: Tensor | None = None
        # The plan cuts each tensor by its shape now; a tensor resized later would fail mid-step.
        self._shapes = tuple(tuple(lay.param.shape) for lay in hierarchy.tensors)
        self._meta = next((lay.name for lay in hierarchy.tensors if lay.param.is_meta), None)
        self._forget()

    def bind(self, params: nn.Module | Mapping[str, Tensor]) -> HierarchicalProx:
        """This prox over the parameters of the same names and shapes in ``params``: typically
        built with ``allow_meta=True`` on a model on the ``meta`` device, bound to the
        materialised model.

        The hierarchy is bound with :meth:`Hierarchy.bind <group_prox.Hierarchy.bind>` and the
        plan's index tensors are shared (nothing is built again); each tensor keeps its param
        group, the penalties are the same objects, and the frozen pattern is carried over. This
        prox is not modified.

        Raises:
            TypeError, ValueError: as :meth:`Hierarchy.bind <group_prox.Hierarchy.bind>` (a
                missing name, another shape, a tensor on the ``meta`` device; the message names
                the parameter), or if the bound parameters lie on several devices; before
                anything is built.
        """
        hierarchy = self.hierarchy.bind(params)
        _check_one_device(self.owner, hierarchy)
        out = copy.copy(self)
        out.hierarchy = hierarchy
        out.plan = self.plan.bind(hierarchy)
        out._meta = None
        device = hierarchy.tensors[0].param.device if hierarchy.tensors else None
        mask = self._frozen_mask
        out._frozen_mask = None if mask is None or device is None else mask.to(device)
        out._forget()
        return out

    # ------------------------------------------------------------------------ what it holds
    @property
    def penalties(self) -> Mapping[str, Penalty]:
        """Read-only mapping ``level -> penalty``; change a penalty's ``lam`` to retune it."""
        return self._penalties

    @property
    def active(self) -> bool:
        """Whether an application changes anything: frozen, or some penalty has ``lam > 0``."""
        return self._frozen_mask is not None or any(p.lam > 0 for p in self._penalties.values())

    @property
    def frozen(self) -> bool:
        """Whether the zero pattern is frozen (see :meth:`freeze_zero_groups`)."""
        return self._frozen_mask is not None

    @property
    def frozen_mask(self) -> Tensor | None:
        """While frozen, the 0/1 factor of every atom (in the plan's atom order), else ``None``."""
        return self._frozen_mask

    def penalty_value(self) -> float:
        """The current value of the whole penalty ``Ω(x) = Σ_levels Ω_level(x)``."""
        total = 0.0
        for level, pen in self._penalties.items():
            groups = self.hierarchy.groups(level)
            if pen.groups is not None:
                names = self.hierarchy.group_names(level)
                groups = [g for g, n in zip(groups, names) if n in pen.groups]
            total += float(pen.value(groups))
        return total

    # ------------------------------------------------------------------------------ checks
    def check(self) -> None:
        """Refuse, before any tensor is changed, a parameter resized since the plan was built,
        a penalty whose fields were set past their checks, and a prox still on the ``meta``
        device (see :meth:`bind`)."""
        self._refuse_meta()
        for level, pen in self._penalties.items():
            try:
                pen._validate()
            except (TypeError, ValueError) as e:
                raise type(e)(
                    f"{self.owner}: the penalty of level {level!r} holds an invalid value ({e}) "
                    f"Set it through its property, e.g. optimizer.penalties[{level!r}].lam = 1e-4. "
                    "Nothing was changed."
                ) from None
        for lay, shape in zip(self.plan.tensors, self._shapes):
            if tuple(lay.param.shape) != shape:
                raise ValueError(
                    f"{self.owner}: parameter {lay.name} of the hierarchy was resized from "
                    f"{shape} to {tuple(lay.param.shape)} after the optimizer was built; build "
                    "the hierarchy and the optimizer again for the new shapes. Nothing was changed."
                )

    def check_step_sizes(self, step_sizes: Mapping[int, float], where: str = "param group") -> None:
        """Refuse step sizes (``{param group index: lr}``) that differ inside one group tree: the
        prox step size must be one number per tree."""
        for link in self.plan.linked_param_groups:
            linked = {i: step_sizes[i] for i in sorted(link)}
            if len(set(linked.values())) > 1:
                raise ValueError(
                    f"{self.owner}: a group tree (around {self.plan.describe_link(link)}) spans "
                    f"{where}s {sorted(link)} whose learning rates differ ({linked}). The prox "
                    "step size must be one number per tree: give these param groups the same lr, "
                    "or schedule them together."
                )

    # ---------------------------------------------------------------------------- applying
    def component_step_sizes(self, step_sizes: Tensor | float) -> Tensor:
        """The step size of every group tree (and a trailing 0 for unpenalised atoms), from one
        step size per param group (a tensor indexed by param group, or one number for all)."""
        plan = self.plan
        lrs = torch.as_tensor(step_sizes, dtype=plan.acc_dtype).detach().to("cpu").reshape(-1)
        if lrs.numel() == 1:
            eta = lrs.expand(plan.num_components + 1).clone()
        else:
            eta = lrs[plan.component_param_group]
        eta[-1] = 0.0
        return eta

    @torch.no_grad()
    def apply_(self, step_sizes: Tensor | float, *, check_finite: bool = False) -> None:
        """``x ← prox_{η·Ω}(x)`` in place; while frozen, ``x ← x·m`` with the frozen pattern ``m``.

        Args:
            step_sizes: one step size per group tree, as from :meth:`component_step_sizes`, or one
                number for all.
            check_finite: look at the atom norms (read anyway) before scaling anything and raise
                :class:`~group_prox.kernels.NonFiniteAtoms` if one is NaN or infinite. Only then
                does the application record the parameters as finite (see :meth:`unread`).

        Nothing is read or written when every λ is 0 and the pattern is not frozen.
        """
        self._refuse_meta()
        plan = self.plan
        if self._frozen_mask is not None:
            self._forget()
            scale_atoms_(plan, self._frozen_mask)
            return
        if not self.active:
            return
        eta = step_sizes
        if not isinstance(eta, Tensor) or eta.numel() != plan.num_components + 1:
            eta = self.component_step_sizes(step_sizes)
        self._forget()
        atom_sq = hierarchical_prox_(plan, eta, check_finite=check_finite)
        if atom_sq is None or plan.sharding is not None:
            return
        versions = self._versions()
        self._norms = _Read(atom_sq, versions)
        if check_finite:
            self._finite_versions = versions

    # ------------------------------------------------------------ fused into an update
    @property
    def scales_from_norms(self) -> bool:
        """Whether an application is, at the current λs, a scaling of each atom computed from the
        atoms' norms alone (some group level active, no elementwise L1 part, not frozen, not
        sharded). Then an update that computes the new values can also compute their atom norms
        and write the scaled values in one pass (see :meth:`scales` and :meth:`record`), as
        ``ProxSGD(..., compiled=True)`` does, instead of writing them for :meth:`apply_` to read
        and write again."""
        return self._frozen_mask is None and scales_from_norms(self.plan)

    @torch.no_grad()
    def scales(self, atom_sq: Tensor, step_sizes: Tensor | float) -> list[Tensor]:
        """The scales of ``prox_{η·Ω}`` for values whose squared atom norms are ``atom_sq`` (in
        the plan's atom order), as one view per tensor of the hierarchy that broadcasts against
        it: multiplying each tensor's new values by its view applies the prox. Only while
        :attr:`scales_from_norms`; the views are the plan's buffers, valid until the next call.
        """
        self._refuse_meta()
        if not self.scales_from_norms:
            raise ValueError(
                f"{self.owner}.scales: the prox is not a scaling from atom norms alone now (an "
                "elementwise L1 part is active, the pattern is frozen or the tensors are "
                "sharded); use apply_()."
            )
        eta = step_sizes
        if not isinstance(eta, Tensor) or eta.numel() != self.plan.num_components + 1:
            eta = self.component_step_sizes(step_sizes)
        group_scales(self.plan, eta, atom_sq)
        return self.plan.on(atom_sq.device).scale_views

    def record(self, atom_sq: Tensor, *, finite: bool) -> None:
        """Record, after an update wrote ``x·s`` with the :meth:`scales` for ``atom_sq``, what the
        prox knows without reading again: the squared atom norms ``atom_sq·s²`` (for
        :meth:`group_sq_norms`) and, with ``finite``, that every parameter is finite (for
        :meth:`unread`)."""
        scale = self.plan.on(atom_sq.device).scale
        versions = self._versions()
        self._norms = _Read(atom_sq * scale.square(), versions)
        self._finite_versions = versions if finite else None

    def _refuse_meta(self) -> None:
        if self._meta is not None:
            raise ValueError(
                f"{self.owner}: parameter {self._meta!r} is on the meta device, so the prox cannot "
                "read it: materialise the model (model.to_empty(device=...), then initialise or "
                "load its weights) and use prox.bind(model). Nothing was changed."
            )

    # ------------------------------------------------------------------- what it last read
    def _forget(self) -> None:
        self._norms: _Read | None = None
        self._finite_versions: tuple[int, ...] | None = None

    def _versions(self) -> tuple[int, ...]:
        return tuple(lay.param._version for lay in self.plan.tensors)

    def unread(self, params: Sequence[Tensor]) -> list[Tensor]:
        """The tensors of ``params`` that a look for NaN and infinite values must still read: all
        but the hierarchy's parameters that the last application found finite (its atom norms
        were) and that nothing has written since. The prox scaled them by finite factors, so they
        are still finite."""
        versions = self._finite_versions
        if versions is None:
            return list(params)
        known = {
            id(lay.param) for lay, v in zip(self.plan.tensors, versions) if lay.param._version == v
        }
        return [p for p in params if id(p) not in known]

    @torch.no_grad()
    def group_sq_norms(self) -> tuple[Tensor, list[Tensor]]:
        """Atom squared norms and, for each penalised level of the plan (in ``plan.levels``
        order), the squared norm of each of its groups (uncovered groups count 0).

        Right after an application, with no parameter written since, these come from what the
        application read and wrote (``‖x_a‖²·s_a²``) and cost no read of the parameters;
        otherwise every tensor is read once. From what an application read, the level norms are
        computed once: until a parameter is written, later calls return the same tensors (read
        them, do not modify them)."""
        norms = self._norms
        if norms is None or norms.versions != self._versions():
            return group_sq_norms(self.plan)
        if norms.level_sq is None:
            norms.level_sq = self.plan.level_sq_norms(norms.atom_sq)
        return norms.atom_sq, list(norms.level_sq)

    # --------------------------------------------------------------------- zero patterns
    @torch.no_grad()
    def freeze_zero_groups(self) -> int:
        """Freeze the current zero pattern: from now on an application is ``x ← x·m``, ``m`` 0 on
        every group of a penalised level that is exactly zero now and 1 elsewhere (see
        :meth:`ProxSGD.freeze_zero_groups <group_prox.ProxSGD.freeze_zero_groups>`).

        Returns:
            The number of scalars held at zero.
        """
        plan = self.plan
        if not plan.tensors:  # a hierarchy without parameters has nothing to hold at zero
            return 0
        atom_sq, level_sq = self.group_sq_norms()
        dead = torch.zeros_like(atom_sq, dtype=torch.bool)
        for i, (lp, sq) in enumerate(zip(plan.levels, level_sq)):
            dead |= plan.atoms_in(i, (sq == 0) & lp.covered.to(sq.device))
        self._frozen_mask = (~dead).to(plan.acc_dtype)
        self._forget()
        scale_atoms_(plan, self._frozen_mask)
        numel = torch.as_tensor(self.hierarchy.atom_numel, device=dead.device)
        return int(numel[dead].sum())

    def unfreeze(self) -> None:
        """Return to the proximal step after :meth:`freeze_zero_groups`."""
        self._frozen_mask = None

    @torch.no_grad()
    def zero_groups_(self, level: str, groups: Tensor) -> None:
        """Set to exactly zero the groups of ``level`` marked in ``groups`` (bool, one per group
        of the level)."""
        i = self.level_index(level)
        plan = self.plan
        device = plan.tensors[0].param.device
        if groups.shape != (plan.levels[i].num_groups,) or groups.dtype != torch.bool:
            raise ValueError(
                f"{self.owner}.zero_groups_: expected a bool tensor of "
                f"{plan.levels[i].num_groups} entries for level {level!r}, got "
                f"{groups.dtype} of shape {tuple(groups.shape)}."
            )
        self._forget()
        scale_atoms_(plan, (~plan.atoms_in(i, groups.to(device))).to(plan.acc_dtype))

    def level_index(self, level: str) -> int:
        """The index of a penalised level in ``plan.levels``."""
        for i, lp in enumerate(self.plan.levels):
            if lp.name == level:
                return i
        raise ValueError(
            f"{self.owner}: level {level!r} has no penalty; the penalised levels are "
            f"{[lp.name for lp in self.plan.levels]}."
        )

    # ------------------------------------------------------------------------- state dict
    def state_dict(self) -> dict[str, Any]:
        """The penalties' values, a description of the hierarchy and the frozen pattern (a bool
        tensor per atom, or ``None``)."""
        mask = self._frozen_mask
        return {
            "penalties": {lv: pen.state_dict() for lv, pen in self._penalties.items()},
            "hierarchy": self.hierarchy.signature(),
            "frozen": None if mask is None else mask.detach().to("cpu", torch.bool).clone(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load a :meth:`state_dict` already checked against this prox (the optimizers check it
        with the rest of their checkpoint before loading anything)."""
        for level, pen_state in state.get("penalties", {}).items():
            self._penalties[level].load_state_dict(pen_state)
        frozen = state.get("frozen")
        self._forget()
        if frozen is None or not self.plan.tensors:
            self._frozen_mask = None
        else:
            device = self.plan.tensors[0].param.device
            self._frozen_mask = frozen.to(device, self.plan.acc_dtype)

    # ------------------------------------------------------------------- copy and pickle
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_penalties"] = dict(self._penalties)  # a read-only view cannot be pickled
        state["_norms"] = state["_finite_versions"] = None  # versions are not carried by copies
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        state["_penalties"] = MappingProxyType(dict(state["_penalties"]))
        self.__dict__.update(state)

    def __repr__(self) -> str:
        pens = ", ".join(f"{lv}: {pen!r}" for lv, pen in self._penalties.items())
        return (
            f"HierarchicalProx({len(self.plan.tensors)} tensors, "
            f"{self.hierarchy.num_atoms} atoms; {{{pens}}}{'; frozen' if self.frozen else ''})"
        )


@dataclass
class _Read:
    """The squared atom norms of the parameters as they were at ``versions`` (their version
    counters), and the squared group norms of every penalised level, computed on first use."""

    atom_sq: Tensor
    versions: tuple[int, ...]
    level_sq: list[Tensor] | None = None


def _with_global_level(
    owner: str, hierarchy: Hierarchy, penalties: Mapping[str, Penalty]
) -> Hierarchy:
    if GLOBAL not in penalties or GLOBAL in hierarchy.level_names:
        return hierarchy
    if not hierarchy.tensors:
        raise ValueError(
            f"{owner}: penalties[{GLOBAL!r}] acts on one group holding every parameter of the "
            "hierarchy, but the hierarchy holds none. Check how it was built (a builder finds no "
            "group in a model it does not recognise)."
        )
    return hierarchy.with_level(GLOBAL, [hierarchy.params])


def _check_penalties(owner: str, hierarchy: Hierarchy, penalties: Mapping[str, Penalty]) -> None:
    for level, pen in penalties.items():
        if level not in hierarchy.level_names:
            raise ValueError(
                f"{owner}: penalties names level {level!r}, which the hierarchy does not have; "
                f"its levels are {list(hierarchy.level_names)}."
            )
        if not isinstance(pen, Penalty):
            raise TypeError(
                f"{owner}: the penalty for level {level!r} must be a group_prox penalty "
                f"(GroupLasso, L1, ...), got {type(pen).__name__}."
            )
        if pen.groups is not None:
            unknown = sorted(pen.groups - set(hierarchy.group_names(level)))
            if unknown:
                raise ValueError(
                    f"{owner}: the penalty for level {level!r} names groups it does not have: "
                    f"{', '.join(map(repr, unknown[:3]))}"
                    f"{f' and {len(unknown) - 3} more' if len(unknown) > 3 else ''}."
                )
        try:
            pen.weights(hierarchy.group_sizes(level))
        except (TypeError, ValueError) as e:
            raise type(e)(
                f"{owner}: the weights of the penalty for level {level!r} cannot be computed: {e}"
            ) from e


def _check_parameters(
    owner: str, hierarchy: Hierarchy, own: Sequence[Tensor], *, allow_meta: bool = False
) -> None:
    frozen = hierarchy.names_outside(own, requires_grad=False)
    if frozen:
        raise ValueError(
            f"{owner}: the hierarchy holds frozen parameters (requires_grad=False) that are not "
            f"among the optimizer's parameters: {frozen}. Build the hierarchy without them: the "
            "builders of group_prox.hierarchy leave frozen parameters out unless "
            "include_frozen=True (a hand-built Hierarchy should not list them either). Give them "
            "to the optimizer only if the prox should shrink them too."
        )
    missing = hierarchy.names_outside(own)
    if missing:
        raise ValueError(
            f"{owner}: the hierarchy holds parameters that are not among the optimizer's "
            f"parameters: {missing}. Pass the same model's parameters."
        )
    meta = next((lay for lay in hierarchy.tensors if lay.param.is_meta), None)
    if meta is not None and not allow_meta:
        raise ValueError(
            f"{owner}: parameter {meta.name!r} is on the meta device, so the prox cannot read it: "
            "materialise the model first (model.to_empty(device=...), then initialise or load its "
            "weights) and build the optimizer from it (a hierarchy built on the meta device: "
            "hierarchy.bind(model))."
        )
    _check_one_device(owner, hierarchy)


def _check_one_device(owner: str, hierarchy: Hierarchy) -> None:
    devices = {lay.param.device for lay in hierarchy.tensors}
    if len(devices) > 1:
        raise ValueError(
            f"{owner}: the hierarchy's parameters lie on several devices "
            f"{sorted(map(str, devices))}; a hierarchy must live on one device."
        )
