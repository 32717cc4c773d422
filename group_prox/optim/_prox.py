"""What ProxSGD and ProxAdam share: binding a hierarchy and penalties to an optimizer's params."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor, nn

from ..distributed import is_dtensor, local_tensor, process_group
from ..hierarchy.core import Hierarchy
from ..inputs import ExampleInputs
from ..penalties import Penalty
from ..prox import HierarchicalProx, NonFiniteAtoms
from ..report import SparsityReport, build_report, with_removable
from ..validation import check_choice
from ._checkpoint import (
    FORMAT,
    STATE_KEY,
    OptimizerKind,
    check_checksums,
    check_prox_state,
    check_torch_state,
    state_checksums,
)
from ._nonfinite import NONFINITE_MODES, NonFinite, describe, first_nonfinite, parameter_names


def unhooked_step(step: Callable[..., Any]) -> Callable[..., Any]:
    """The parent's ``step`` without torch's hook wrapper, so that step hooks run once per step."""
    while getattr(step, "hooked", False):
        step = step.__wrapped__  # type: ignore[attr-defined]
    return step


def _as_float(x: float | Tensor) -> float:
    return float(x.item()) if isinstance(x, Tensor) else float(x)


class ProxMixin:
    """Adds the proximal step of a hierarchical group penalty to a ``torch.optim.Optimizer``.

    The optimizer holds a :class:`~group_prox.HierarchicalProx` (:attr:`prox`) and applies it
    after torch's update. The subclass must call :meth:`_init_prox` at the end of ``__init__`` and
    run its update through :meth:`_guarded_step`. It may override :meth:`prox_step_sizes`.
    """

    param_groups: list[dict[str, Any]]
    state: Any
    #: What this optimizer's checkpoints hold, to refuse another kind's before loading any of it.
    checkpoint_kind: OptimizerKind
    #: The attributes that ``copy.deepcopy`` and ``pickle`` carry besides torch's ``defaults``,
    #: ``state`` and ``param_groups`` (see :meth:`__getstate__`); a subclass adds its own.
    _copied_attributes: tuple[str, ...] = (
        "_prox",
        "nonfinite",
        "_nonfinite_group",
        "_nonfinite_device",
        "skipped_steps",
    )

    def _init_prox(
        self, hierarchy: Hierarchy | None, penalties: Mapping[str, Penalty] | None
    ) -> None:
        owner = type(self).__name__
        if hierarchy is None:
            if penalties is not None and not isinstance(penalties, Mapping):
                raise TypeError(
                    f"{owner}: penalties must be a mapping {{level name: penalty}}, e.g. "
                    f"{{'base_level': group_prox.GroupLasso(1e-4)}}; got "
                    f"{type(penalties).__name__}."
                )
            if penalties:
                raise ValueError(
                    f"{owner}: penalties were given for levels {list(penalties)} without a "
                    "hierarchy=; pass the hierarchy they act on, e.g. "
                    "hierarchy=group_prox.hierarchy.resnet(model)."
                )
            self._prox: HierarchicalProx | None = None
        else:
            self._prox = HierarchicalProx(
                hierarchy, penalties, [g["params"] for g in self.param_groups], owner=owner
            )
        self._check_step_sizes()

    # ------------------------------------------------------------------------------------ API
    @property
    def prox(self) -> HierarchicalProx | None:
        """The :class:`~group_prox.HierarchicalProx` applied after every update (``None``
        without a hierarchy): its plan, penalties, frozen pattern and what it last read."""
        return self._prox

    @property
    def hierarchy(self) -> Hierarchy | None:
        """The hierarchy the penalties act on."""
        return None if self._prox is None else self._prox.hierarchy

    @property
    def penalties(self) -> Mapping[str, Penalty]:
        """Read-only mapping ``level -> penalty``; change a penalty's ``lam`` to retune it."""
        return _NO_PENALTIES if self._prox is None else self._prox.penalties

    def penalty_value(self) -> float:
        """The current value of the whole penalty ``Ω(x) = Σ_levels Ω_level(x)``."""
        return 0.0 if self._prox is None else self._prox.penalty_value()

    def get_sparsity_report(
        self, model: nn.Module | None = None, *, example_inputs: ExampleInputs | None = None
    ) -> SparsityReport:
        """Which groups of the hierarchy are exactly zero (see :class:`SparsityReport`); given the
        ``model`` the optimizer trains, also what :func:`~group_prox.compress` would remove now
        (``report.removable``, FLOPs included when ``example_inputs`` are given)."""
        if self._prox is None:
            raise ValueError(
                f"{type(self).__name__} was built without a hierarchy: nothing to report."
            )
        params = [p for g in self.param_groups for p in g["params"]]
        report = build_report(self._prox.hierarchy, all_params=params)
        if model is not None:
            if not isinstance(model, nn.Module):
                raise TypeError(
                    f"{type(self).__name__}.get_sparsity_report: model must be the nn.Module "
                    f"the optimizer trains, got {type(model).__name__}."
                )
            report = with_removable(report, model, self._prox.hierarchy, example_inputs)
        return report

    @property
    def frozen(self) -> bool:
        """Whether the zero pattern is frozen (see :meth:`freeze_zero_groups`)."""
        return self._prox is not None and self._prox.frozen

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
        return self._require_prox("freeze_zero_groups").freeze_zero_groups()

    def unfreeze(self) -> None:
        """Return to the proximal step after :meth:`freeze_zero_groups`."""
        if self._prox is not None:
            self._prox.unfreeze()

    def prox_step_sizes(self) -> Tensor:
        """The step size of the prox at the next step for every group tree (the prox's
        components, with a trailing 0 for unpenalised atoms): the ``lr`` of the tree's param
        group. A controller reads it to turn group norms into thresholds."""
        prox = self._require_prox("prox_step_sizes")
        return prox.component_step_sizes(self._param_group_lrs(prox.plan.acc_dtype))

    def _tensor_names(self) -> dict[int, str]:
        """The hierarchy's names of its tensors, by ``id``, for messages."""
        if self._prox is None:
            return {}
        return {id(lay.param): lay.name for lay in self._prox.hierarchy.tensors}

    def _require_prox(self, what: str) -> HierarchicalProx:
        if self._prox is None:
            raise ValueError(f"{type(self).__name__}.{what}: the optimizer has no hierarchy.")
        return self._prox

    # ----------------------------------------------------------------------- guarded steps
    def _init_nonfinite(self, nonfinite: NonFinite) -> None:
        self.nonfinite: NonFinite = check_choice(
            nonfinite, type(self).__name__, "nonfinite", NONFINITE_MODES
        )
        # Sharded gradients (FSDP2): each rank sees its own shards, so all ranks must agree on
        # whether to step, or one would step (and enter the prox's collective) alone.
        sharded = next((p for g in self.param_groups for p in g["params"] if is_dtensor(p)), None)
        self._nonfinite_group = None if sharded is None else process_group([sharded])
        self._nonfinite_device = None if sharded is None else local_tensor(sharded).device
        #: Steps skipped because of non-finite values (``nonfinite="skip"``, or a
        #: ``torch.amp.GradScaler`` that found an overflow in a fused step).
        self.skipped_steps = 0

    def _guarded_step(
        self,
        update: Callable[[], None],
        closure: Callable[[], Any] | None,
        fused: Callable[[], bool] | None = None,
    ) -> Any:
        """Run ``closure``, look at the gradients and parameters, then ``update()`` and the prox,
        or nothing at all. Every refusal happens before a tensor is changed.

        ``fused`` (optional) is tried first: an update fused with the prox that looks at what it
        will write before writing anything, and returns False, having changed nothing, where it
        does not apply or found a NaN or an infinity (the separate look then names it)."""
        self._check_step_sizes()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._amp_found_inf():
            self.skipped_steps += 1
            return loss
        if fused is not None and fused():
            return loss
        if self.nonfinite != "ignore":
            problem = self._agree(self._find_nonfinite())
            if problem is not None:
                if self.nonfinite == "raise":
                    raise FloatingPointError(
                        f"{type(self).__name__}.step: {problem}. Nothing was changed: the "
                        "parameters and the optimizer state are as before this step. Look for the "
                        "cause upstream (the loss, the learning rate, the data), or build the "
                        "optimizer with nonfinite='skip' to skip such steps and count them in "
                        "skipped_steps, as torch.amp.GradScaler does."
                    )
                self.skipped_steps += 1
                return loss
        update()
        self._prox_step()
        return loss

    def _agree(self, problem: str | None) -> str | None:
        """With sharded parameters, the problem this rank found or, if another rank found one, a
        word about it: one all-reduce of a flag, so that every rank skips or raises together."""
        if self._nonfinite_group is None:
            return problem
        flag = torch.tensor([problem is not None], dtype=torch.int32, device=self._nonfinite_device)
        torch.distributed.all_reduce(
            flag, op=torch.distributed.ReduceOp.MAX, group=self._nonfinite_group
        )
        if problem is None and bool(flag.item()):
            return "a gradient or parameter shard on another rank holds NaN or infinite values"
        return problem

    def _amp_found_inf(self) -> bool:
        """A ``torch.amp.GradScaler`` driving a fused step sets ``found_inf`` on the optimizer
        instead of skipping the call; the fused kernel then skips the update, so must the prox."""
        found_inf = getattr(self, "found_inf", None)
        return found_inf is not None and bool(found_inf.item() > 0)

    def _find_nonfinite(self) -> str | None:
        """Which gradient or parameter holds a NaN or an infinity (one pass, one sync), or None.

        The parameters that the last prox found finite and that nothing has written since are
        not read again (see :meth:`HierarchicalProx.unread`). Under a GradScaler's fused step the
        gradients are still scaled and ``found_inf`` has already judged them, so only the
        parameters are looked at."""
        params = [p for g in self.param_groups for p in g["params"]]
        scaled = getattr(self, "found_inf", None) is not None
        grads = [] if scaled else [p.grad for p in params if p.grad is not None]
        with_grad = [] if scaled else [p for p in params if p.grad is not None]
        if self._prox is not None:
            params = self._prox.unread(params)
        bad = first_nonfinite([*grads, *params])
        if bad is None:
            return None
        names = parameter_names(self.param_groups, self._tensor_names())
        if bad < len(grads):
            return (
                f"the gradient of {names[id(with_grad[bad])]} holds {describe(grads[bad])} values"
            )
        p = params[bad - len(grads)]
        return f"the parameter {names[id(p)]} holds {describe(p)} values"

    # ----------------------------------------------------------------------------- the prox
    def _check_step_sizes(self, lrs: Sequence[object] | None = None) -> None:
        """Refuse, before any tensor is changed, a learning rate that is not a finite number
        >= 0, a group tree whose param groups have different learning rates, and a penalty whose
        fields were set past their checks. ``lrs``: the learning rates of a checkpoint's param
        groups, checked instead of the optimizer's own before they are loaded."""
        owner = type(self).__name__
        own = lrs is None
        if lrs is None:
            lrs = [g.get("lr") for g in self.param_groups]
        fix = (
            "set optimizer.param_groups[{i}]['lr'] (or the scheduler that sets it) to a finite "
            "number >= 0"
            if own
            else "load a checkpoint saved by this optimizer"
        )
        where = "param group" if own else "the checkpoint's param group"
        values: dict[int, float] = {}
        for i, lr in enumerate(lrs):
            if isinstance(lr, Tensor):
                if lr.numel() != 1 or lr.is_complex() or lr.dtype == torch.bool:
                    raise TypeError(
                        f"{owner}: {where} {i} has an lr tensor of shape {tuple(lr.shape)} and "
                        f"dtype {lr.dtype}; lr must be a real number or a 1-element real tensor: "
                        f"{fix.format(i=i)}."
                    )
                if lr.device.type != "cpu":
                    # Reading a device tensor would wait for the device, at every step.
                    continue
                value = float(lr.item())
            elif isinstance(lr, bool) or not isinstance(lr, numbers.Real):
                raise TypeError(
                    f"{owner}: {where} {i} has lr={lr!r} ({type(lr).__name__}); lr must be a real "
                    f"number or a 1-element real tensor: {fix.format(i=i)}."
                )
            else:
                value = float(lr)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(
                    f"{owner}: {where} {i} has lr={value!r}, but the learning rate is also the "
                    f"prox step size and must be finite and >= 0: {fix.format(i=i)}. Nothing "
                    "was changed."
                )
            values[i] = value
        prox = self._prox
        if prox is None:
            return
        if own:
            prox.check()
        linked = {i for link in prox.plan.linked_param_groups for i in link}
        prox.check_step_sizes(
            {i: values[i] if i in values else _as_float(lrs[i]) for i in sorted(linked)},  # type: ignore[arg-type]
            where,
        )

    def _param_group_lrs(self, dtype: torch.dtype) -> Tensor:
        lrs = [g["lr"] for g in self.param_groups]
        if not any(isinstance(lr, Tensor) for lr in lrs):
            return torch.tensor(lrs, dtype=dtype)
        return torch.stack(
            [torch.as_tensor(lr).detach().to("cpu", dtype).reshape(()) for lr in lrs]
        )

    def _prox_step(self) -> None:
        prox = self._prox
        if prox is None or not prox.active:
            return
        try:
            prox.apply_(
                self.prox_step_sizes() if not prox.frozen else 0.0,
                check_finite=self.nonfinite != "ignore",
            )
        except NonFiniteAtoms as err:
            name = prox.plan.tensors[err.tensor].name
            base = next(c.__name__ for c in type(self).__mro__ if c.__module__.startswith("torch."))
            raise FloatingPointError(
                f"{type(self).__name__}.step: the {base} update made parameter {name!r} NaN or "
                "infinite from finite gradients and parameters (a learning rate too large for its "
                "precision?). The prox was not applied, so no other group was touched, but the "
                "parameters and the optimizer state hold this step's update: reload the last "
                "checkpoint and lower the learning rate."
            ) from None

    # ------------------------------------------------------------------- copy and pickle
    def __getstate__(self) -> dict[str, Any]:
        """What ``copy.deepcopy`` and ``pickle`` carry: torch's ``defaults``, ``state`` and
        ``param_groups``, and the hierarchy, the penalties, the plan (its per-device buffers are
        made again at the next step), the frozen zero pattern and the non-finite settings and
        count. As with torch's optimizers, hooks are not carried.

        Copied together with its model (``copy.deepcopy((model, opt))``, or one ``pickle`` of
        both), the copy refers to the copied parameters throughout, and training it continues
        bit for bit as the original would. Refused with a ``TypeError``: sharded parameters
        (``DTensor``, FSDP2), whose shards belong to a process group; and, by ``pickle`` only, a
        penalty weight that cannot be pickled (a lambda, a local function)."""
        sharded = next((p for g in self.param_groups for p in g["params"] if is_dtensor(p)), None)
        if sharded is not None:
            name = parameter_names(self.param_groups, self._tensor_names())[id(sharded)]
            raise TypeError(
                f"{type(self).__name__} cannot be copied or pickled: its parameter {name} is "
                "sharded (a DTensor, as under FSDP2), and a copy of a shard is not bound to its "
                "process group. Save it with torch.distributed.checkpoint (its state from "
                "torch.distributed.checkpoint.state_dict.get_optimizer_state_dict), or load its "
                "state_dict() into an optimizer built on the copied model."
            )
        state = super().__getstate__()  # type: ignore[misc]
        for key in self._copied_attributes:
            if key in self.__dict__:
                state[key] = self.__dict__[key]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`__getstate__` gave (torch's ``load_state_dict`` also calls this
        with its own keys alone)."""
        super().__setstate__(state)  # type: ignore[misc]

    # ------------------------------------------------------------------------- state dict
    def state_dict(self) -> dict[str, Any]:
        """torch's optimizer state, plus this package's entry under ``"group_prox"``: its format
        version, the optimizer kind, each penalty's kind, options and values (λ, l1_ratio), a
        description of the hierarchy, the frozen zero pattern, the count of skipped steps and a
        checksum of every tensor, all checked when loading.

        Like torch's, the dict holds the live state buffers: save it (or ``copy.deepcopy`` it)
        before the next step, or its checksums no longer match."""
        state = super().state_dict()  # type: ignore[misc]
        entry = self._prox_state()
        entry["checksums"] = state_checksums(state["state"], entry["frozen"])
        state[STATE_KEY] = entry
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load a :meth:`state_dict`, or a state dict of the torch optimizer of the same kind.

        A checkpoint of another optimizer kind, of another hierarchy, of other penalised levels,
        penalty kinds or options, of parameters of other shapes, of an unknown format, or a
        damaged one (a tensor that does not match its checksum) is refused before anything is
        loaded: the optimizer is then left as it was."""
        owner = f"{type(self).__name__}.load_state_dict"
        saved_lrs, saved_names = check_torch_state(
            owner, state_dict, self.param_groups, self._tensor_names(), self.checkpoint_kind
        )
        self._check_step_sizes(saved_lrs)
        torch_state = dict(state_dict)
        prox_state = torch_state.pop(STATE_KEY, None)
        self._check_prox_state(prox_state)
        if prox_state is not None and prox_state.get("format") is not None:
            check_checksums(owner, state_dict, saved_names)
        super().load_state_dict(torch_state)  # type: ignore[misc]
        self._apply_prox_state(prox_state)

    def _prox_state(self) -> dict[str, Any]:
        prox = self._prox
        own = (
            {"penalties": {}, "hierarchy": None, "frozen": None}
            if prox is None
            else prox.state_dict()
        )
        return {
            "format": FORMAT,
            "optimizer": self.checkpoint_kind.name,
            **own,
            "skipped_steps": self.skipped_steps,
        }

    def _check_prox_state(self, state: Any) -> None:
        """Refuse a checkpoint of another hierarchy or of other penalised levels, or a damaged
        one, before anything is loaded (see :func:`check_prox_state`)."""
        if state is None:
            return
        check_prox_state(
            f"{type(self).__name__}.load_state_dict",
            state,
            self._prox_state(),
            self.penalties,
            None if self._prox is None else self._prox.hierarchy.num_atoms,
        )

    def _apply_prox_state(self, state: dict[str, Any] | None) -> None:
        if state is None:
            return
        self.skipped_steps = int(state.get("skipped_steps", 0))
        if self._prox is not None:
            self._prox.load_state_dict(state)


_NO_PENALTIES: Mapping[str, Penalty] = MappingProxyType({})
