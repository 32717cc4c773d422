"""What ProxSGD and ProxAdam share: binding a hierarchy and penalties to an optimizer's params."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor

from ..hierarchy.core import Hierarchy
from ..kernels import ProxPlan, group_sq_norms, hierarchical_prox_, scale_atoms_
from ..penalties import Penalty
from ..report import SparsityReport, build_report

_STATE_KEY = "group_prox"
#: A penalty under this key acts on one group holding every parameter of the hierarchy, unless the
#: hierarchy has a level of that name (the earlier project's ``type: global``).
GLOBAL = "global"


def unhooked_step(step: Callable[..., Any]) -> Callable[..., Any]:
    """The parent's ``step`` without torch's hook wrapper, so that step hooks run once per step."""
    while getattr(step, "hooked", False):
        step = step.__wrapped__  # type: ignore[attr-defined]
    return step


def _as_float(x: float | Tensor) -> float:
    return float(x.item()) if isinstance(x, Tensor) else float(x)


class ProxMixin:
    """Adds the proximal step of a hierarchical group penalty to a ``torch.optim.Optimizer``.

    The subclass must call :meth:`_init_prox` at the end of ``__init__`` and :meth:`_prox_step`
    after its ordinary update. It may override :meth:`_component_eta`.
    """

    param_groups: list[dict[str, Any]]
    state: Any

    def _init_prox(
        self, hierarchy: Hierarchy | None, penalties: Mapping[str, Penalty] | None
    ) -> None:
        owner = type(self).__name__
        if hierarchy is None:
            if penalties:
                raise ValueError(f"{owner}: penalties were given without a hierarchy=.")
            self._hierarchy = None
            self._penalties: Mapping[str, Penalty] = MappingProxyType({})
            self._plan = None
            self._frozen_keep: Tensor | None = None
            return
        if not isinstance(hierarchy, Hierarchy):
            raise TypeError(
                f"{owner}: hierarchy must be a group_prox.Hierarchy (for example "
                f"group_prox.hierarchy.resnet(model)), got {type(hierarchy).__name__}."
            )
        penalties = {} if penalties is None else penalties
        if not isinstance(penalties, Mapping):
            raise TypeError(
                f"{owner}: penalties must be a mapping {{level name: penalty}}, "
                f"got {type(penalties).__name__}."
            )
        if GLOBAL in penalties and GLOBAL not in hierarchy.level_names:
            hierarchy = hierarchy.with_level(GLOBAL, [hierarchy.params])
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
                        f"{owner}: the penalty for level {level!r} names groups it does not "
                        f"have: {', '.join(map(repr, unknown[:3]))}"
                        f"{f' and {len(unknown) - 3} more' if len(unknown) > 3 else ''}."
                    )
        group_of = {id(p): i for i, g in enumerate(self.param_groups) for p in g["params"]}
        missing = [lay.name for lay in hierarchy.tensors if id(lay.param) not in group_of]
        if missing:
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise ValueError(
                f"{owner}: the hierarchy holds parameters that are not among the optimizer's "
                f"parameters: {', '.join(missing[:3])}{more}. Pass the same model's parameters."
            )
        devices = {lay.param.device for lay in hierarchy.tensors}
        if len(devices) > 1:
            raise ValueError(
                f"{owner}: the hierarchy's parameters lie on several devices {sorted(map(str, devices))}; "
                "a hierarchy must live on one device."
            )
        self._hierarchy = hierarchy
        self._penalties = MappingProxyType(dict(penalties))
        self._plan = ProxPlan(
            hierarchy,
            list(penalties.items()),
            [group_of[id(lay.param)] for lay in hierarchy.tensors],
        )
        # 1/0 per atom while the zero pattern is frozen (see freeze_zero_groups), else None.
        self._frozen_keep = None
        self._check_step_sizes()

    # ------------------------------------------------------------------------------------ API
    @property
    def hierarchy(self) -> Hierarchy | None:
        """The hierarchy the penalties act on."""
        return self._hierarchy

    @property
    def penalties(self) -> Mapping[str, Penalty]:
        """Read-only mapping ``level -> penalty``; change a penalty's ``lam`` to retune it."""
        return self._penalties

    def penalty_value(self) -> float:
        """The current value of the whole penalty ``Ω(x) = Σ_levels Ω_level(x)``."""
        if self._hierarchy is None:
            return 0.0
        total = 0.0
        for level, pen in self._penalties.items():
            groups = self._hierarchy.groups(level)
            if pen.groups is not None:
                names = self._hierarchy.group_names(level)
                groups = [g for g, n in zip(groups, names) if n in pen.groups]
            total += float(pen.value(groups))
        return total

    def get_sparsity_report(self) -> SparsityReport:
        """Which groups of the hierarchy are exactly zero (see :class:`SparsityReport`)."""
        if self._hierarchy is None:
            raise ValueError(
                f"{type(self).__name__} was built without a hierarchy: nothing to report."
            )
        params = [p for g in self.param_groups for p in g["params"]]
        return build_report(self._hierarchy, all_params=params)

    @property
    def frozen(self) -> bool:
        """Whether the zero pattern is frozen (see :meth:`freeze_zero_groups`)."""
        return self._frozen_keep is not None

    @torch.no_grad()
    def freeze_zero_groups(self) -> int:
        """Freeze the current zero pattern, for a final phase in which the survivors recover.

        From now on every :meth:`step` is the ordinary torch update followed by
        ``x ← x · m``, where ``m`` is 0 on every group of a penalised level that is exactly zero
        now and 1 elsewhere: those groups stay exactly zero, and nothing else is shrunk (the
        penalties are not applied). :meth:`unfreeze` returns to the proximal step. The pattern is
        part of :meth:`state_dict`.

        Returns:
            The number of scalars held at zero.
        """
        plan = self._require_plan("freeze_zero_groups")
        atom_sq, level_sq = group_sq_norms(plan)
        dead = torch.zeros_like(atom_sq, dtype=torch.bool)
        for i, (lp, sq) in enumerate(zip(plan.levels, level_sq)):
            dead |= plan.atoms_in(i, (sq == 0) & lp.covered.to(sq.device))
        keep = (~dead).to(plan.acc_dtype)
        self._frozen_keep = keep
        scale_atoms_(plan, keep)
        numel = torch.as_tensor(self._hierarchy.atom_numel, device=dead.device)  # type: ignore[union-attr]
        return int(numel[dead].sum())

    def unfreeze(self) -> None:
        """Return to the proximal step after :meth:`freeze_zero_groups`."""
        self._frozen_keep = None

    def _require_plan(self, what: str) -> ProxPlan:
        if self._plan is None:
            raise ValueError(f"{type(self).__name__}.{what}: the optimizer has no hierarchy.")
        return self._plan

    # ----------------------------------------------------------------------------- the prox
    def _check_step_sizes(self) -> None:
        plan = self._plan
        if plan is None:
            return
        for link in plan.linked_param_groups:
            lrs = {i: _as_float(self.param_groups[i]["lr"]) for i in sorted(link)}
            if len(set(lrs.values())) > 1:
                raise ValueError(
                    f"{type(self).__name__}: a group tree (around {plan.describe_link(link)}) spans "
                    f"param groups {sorted(link)} whose learning rates differ ({lrs}). The prox "
                    "step size must be one number per tree: give these param groups the same lr, "
                    "or schedule them together."
                )

    def _param_group_lrs(self, dtype: torch.dtype) -> Tensor:
        lrs = [g["lr"] for g in self.param_groups]
        if not any(isinstance(lr, Tensor) for lr in lrs):
            return torch.tensor(lrs, dtype=dtype)
        return torch.stack(
            [torch.as_tensor(lr).detach().to("cpu", dtype).reshape(()) for lr in lrs]
        )

    def _component_eta(self, plan: ProxPlan) -> Tensor:
        """Prox step size of each component (plus a trailing 0): the lr of its param group."""
        lrs = self._param_group_lrs(plan.acc_dtype)
        eta = lrs[plan.component_param_group]
        eta[-1] = 0.0
        return eta

    @torch.no_grad()
    def _prox_step(self) -> None:
        plan = self._plan
        if plan is None:
            return
        if self._frozen_keep is not None:
            scale_atoms_(plan, self._frozen_keep)
            return
        if not any(pen.lam > 0 for pen in self._penalties.values()):
            return
        hierarchical_prox_(plan, self._component_eta(plan))

    # ------------------------------------------------------------------------- state dict
    def state_dict(self) -> dict[str, Any]:
        """torch's optimizer state, plus this package's entry: each penalty's λ (and l1_ratio)
        and a description of the hierarchy, checked when loading."""
        state = super().state_dict()  # type: ignore[misc]
        state[_STATE_KEY] = self._prox_state()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict`; a checkpoint of another hierarchy is refused before anything
        is loaded."""
        torch_state = dict(state_dict)
        prox_state = torch_state.pop(_STATE_KEY, None)
        self._check_prox_state(prox_state)
        super().load_state_dict(torch_state)  # type: ignore[misc]
        self._apply_prox_state(prox_state)

    def _prox_state(self) -> dict[str, Any]:
        keep = self._frozen_keep
        return {
            "penalties": {lv: pen.state_dict() for lv, pen in self._penalties.items()},
            "hierarchy": None if self._hierarchy is None else self._hierarchy.signature(),
            "frozen": None if keep is None else keep.detach().to("cpu", torch.bool).clone(),
        }

    def _check_prox_state(self, state: dict[str, Any] | None) -> None:
        """Refuse a checkpoint of another hierarchy before anything is loaded."""
        if state is None:
            return
        mine = self._prox_state()
        if state.get("hierarchy") != mine["hierarchy"]:
            raise ValueError(
                f"{type(self).__name__}.load_state_dict: the checkpoint was saved with another "
                f"hierarchy ({_describe(state.get('hierarchy'))}) than this optimizer's "
                f"({_describe(mine['hierarchy'])}). Rebuild the hierarchy from the same model."
            )
        saved = state.get("penalties", {})
        if set(saved) != set(self._penalties):
            raise ValueError(
                f"{type(self).__name__}.load_state_dict: the checkpoint penalises levels "
                f"{sorted(saved)}, this optimizer {sorted(self._penalties)}."
            )

    def _apply_prox_state(self, state: dict[str, Any] | None) -> None:
        if state is None:
            return
        for lv, pen_state in state.get("penalties", {}).items():
            self._penalties[lv].load_state_dict(pen_state)
        frozen = state.get("frozen")
        if frozen is None or self._plan is None:
            self._frozen_keep = None
        else:
            device = self._plan.tensors[0].param.device
            self._frozen_keep = frozen.to(device, self._plan.acc_dtype)


def _describe(sig: Any) -> str:
    if not sig:
        return "none"
    levels = ", ".join(f"{lv}: {n} groups" for lv, n in zip(sig["levels"], sig["groups"]))
    return f"{levels}; {len(sig['shapes'])} tensors"
