"""``compression_report``: parameters, FLOPs and latency of a model before and after compression."""

from __future__ import annotations

import platform
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..inputs import ExampleInputs, batch_size, check, devices, run_model, tensors_of

__all__ = ["CompressionReport", "compression_report", "count_flops", "count_params"]


def count_params(model: nn.Module) -> int:
    """Number of parameter scalars (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_flops(model: nn.Module, example_inputs: Any) -> int:
    """Floating-point operations of one forward pass (multiply and add counted separately), as
    counted by ``torch.utils.flop_counter`` (matrix products, convolutions, attention).

    torch's fused inference kernels for transformer layers are invisible to the counter, so they
    are switched off while counting (``torch.backends.mha.set_fastpath_enabled``).
    """
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with FlopCounterMode(display=False) as counter:
            run_model(model, example_inputs)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return int(counter.get_total_flops())


@dataclass(frozen=True)
class CompressionReport:
    """Sizes and timings of an original and a compressed model on the same inputs.

    Latencies are medians over ``runs`` forward passes in ``eval()`` mode under
    ``torch.inference_mode()``, the two models timed alternately so that both see the same machine
    state.
    """

    params_before: int
    params_after: int
    flops_before: int
    flops_after: int
    latency_before_ms: float
    latency_after_ms: float
    batch_size: int
    runs: int
    max_abs_diff: float
    device: str
    threads: int

    @property
    def params_removed(self) -> float:
        """Fraction of parameters removed."""
        return 1.0 - self.params_after / max(self.params_before, 1)

    @property
    def flops_removed(self) -> float:
        """Fraction of FLOPs removed."""
        return 1.0 - self.flops_after / max(self.flops_before, 1)

    @property
    def flops_ratio(self) -> float:
        """The ideal speedup: FLOPs before ÷ FLOPs after."""
        return self.flops_before / max(self.flops_after, 1)

    @property
    def speedup(self) -> float:
        """Measured speedup: latency before ÷ latency after."""
        return self.latency_before_ms / self.latency_after_ms

    @property
    def realised(self) -> float:
        """How much of the ideal speedup is realised: ``speedup / flops_ratio``."""
        return self.speedup / self.flops_ratio

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for name in ("params_removed", "flops_removed", "flops_ratio", "speedup", "realised"):
            d[name] = getattr(self, name)
        return d

    def _rows(self) -> list[tuple[str, str, str, str]]:
        return [
            ("parameters", f"{self.params_before:,}", f"{self.params_after:,}",
             f"-{100 * self.params_removed:.1f}%"),
            ("FLOPs", f"{self.flops_before:,}", f"{self.flops_after:,}",
             f"-{100 * self.flops_removed:.1f}% (ideal x{self.flops_ratio:.2f})"),
            (f"latency (batch {self.batch_size})", f"{self.latency_before_ms:.3f} ms",
             f"{self.latency_after_ms:.3f} ms",
             f"x{self.speedup:.2f} ({100 * self.realised:.0f}% of ideal)"),
        ]  # fmt: skip

    def to_markdown(self) -> str:
        lines = ["| | before | after | change |", "|---|---:|---:|---:|"]
        lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in self._rows()]
        return "\n".join(lines)

    def __str__(self) -> str:
        head = (
            f"Compression report ({self.device}, {self.threads} threads, median of {self.runs} "
            f"runs; max |output difference| {self.max_abs_diff:.2e})"
        )
        rows = [("", "before", "after", "change"), *self._rows()]
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        body = [
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))
            )
            for r in rows
        ]
        return "\n".join([head, *body])


def _device_name(example_inputs: Any) -> str:
    cuda = [d for d in devices(example_inputs) if d.type == "cuda"]
    if cuda:
        return torch.cuda.get_device_name(cuda[0])
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def _sync(example_inputs: Any) -> None:
    if any(d.type == "cuda" for d in devices(example_inputs)):
        torch.cuda.synchronize()


@torch.inference_mode()
def compression_report(
    model: nn.Module,
    small: nn.Module,
    example_inputs: ExampleInputs,
    *,
    runs: int = 30,
    warmup: int = 5,
) -> CompressionReport:
    """Compare ``model`` and its compressed copy ``small`` on ``example_inputs``.

    Both models are put in ``eval()`` mode (and restored afterwards). Parameters are counted,
    FLOPs counted with ``torch.utils.flop_counter``, the largest absolute difference of their
    outputs measured, and latency timed as the median of ``runs`` calls each (after ``warmup``),
    the two models alternating.

    Args:
        model: the original model.
        small: the model returned by :func:`group_prox.compress`.
        example_inputs: a tensor, a tuple or list of positional inputs, or a dict of keyword
            inputs (see :mod:`group_prox.inputs`); the first dimension of its first tensor is
            reported as the batch size.
        runs: timed calls per model (at least 1).
        warmup: untimed calls per model first.
    """
    if runs < 1 or warmup < 0:
        raise ValueError(
            f"compression_report(): need runs >= 1 and warmup >= 0, got {runs}, {warmup}."
        )
    check(example_inputs, "compression_report()")
    inputs = example_inputs
    modes = model.training, small.training
    model.eval(), small.eval()
    try:
        want, got = run_model(model, inputs), run_model(small, inputs)
        diffs = [
            (w.float() - g.float()).abs().max().item()
            for w, g in zip(tensors_of(want), tensors_of(got), strict=True)
            if w.numel()
        ]
        flops = count_flops(model, inputs), count_flops(small, inputs)
        times: tuple[list[float], list[float]] = ([], [])
        for i in range(warmup + runs):
            for m, t in ((model, times[0]), (small, times[1])):
                _sync(inputs)
                start = time.perf_counter()
                run_model(m, inputs)
                _sync(inputs)
                if i >= warmup:
                    t.append(time.perf_counter() - start)
    finally:
        model.train(modes[0]), small.train(modes[1])
    return CompressionReport(
        params_before=count_params(model),
        params_after=count_params(small),
        flops_before=flops[0],
        flops_after=flops[1],
        latency_before_ms=1e3 * statistics.median(times[0]),
        latency_after_ms=1e3 * statistics.median(times[1]),
        batch_size=batch_size(inputs),
        runs=runs,
        max_abs_diff=max(diffs, default=0.0),
        device=_device_name(inputs),
        threads=torch.get_num_threads(),
    )
