"""Does the hierarchy of a 7B-parameter model build in seconds, and what does its prox cost?

Builds, on the ``meta`` device (no weights allocated):

  (a) a Llama-2-7B-shaped decoder (``LlamaForCausalLM``: 32 layers, hidden 4096, MLP 11008, 32
      heads, vocab 32000; 6.74 B parameters);
  (b) a 64-expert MoE decoder (``Qwen3MoeForCausalLM`` with OLMoE-1B-7B's sizes: 16 layers,
      hidden 2048, 64 experts of 1024 hidden units, top 8, 16 heads, vocab 50304; 6.92 B),

and for each times the model's construction on ``meta``, ``gp.hierarchy.transformer`` and the
prox plan (``HierarchicalProx(..., allow_meta=True)``, every level penalised: the largest plan),
then ``bind`` of both to stand-in tensors of the real names and shapes (``torch.empty_strided``
with zero strides: one element of storage each, since the weights do not fit this machine; bind
reads only names and shapes), and an optimizer's own plan on the bound hierarchy. It counts the
groups per level and the bytes the hierarchy and the plan hold (numpy and torch index arrays,
per-device buffers and Python objects: group names, layouts; every object reached from them once,
the parameters excluded) against the weights' bytes in bf16 and in fp32.

Step time is measured on ONE real decoder layer of (a) (202 M parameters, float32, built on
``meta``, materialised, bound): a ``ProxSGD`` step with momentum against ``torch.optim.SGD``
(``foreach=True``, momentum) on the same layer, and the prox alone, per billion parameters, then
extrapolated to the 32 layers (not measured: a linear extrapolation of one layer's time). Writes
``benchmarks/results/scale.md``.

    python benchmarks/scale.py [--threads 2] [--iters 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Iterable

import numpy as np
import torch
from _common import RESULTS as RESULTS_DIR
from _common import machine, publish
from torch import Tensor, nn

import group_prox as gp

RESULTS = RESULTS_DIR / "scale.md"


def _llama(layers: int = 32):
    import transformers

    return transformers.LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
    )


def _moe():
    import transformers

    return transformers.Qwen3MoeConfig(
        hidden_size=2048,
        intermediate_size=1024,
        moe_intermediate_size=1024,
        num_experts=64,
        num_experts_per_tok=8,
        num_hidden_layers=16,
        num_attention_heads=16,
        num_key_value_heads=16,
        head_dim=128,
        vocab_size=50304,
    )


def _timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def held_bytes(roots: Iterable[object], exclude: Iterable[Tensor]) -> int:
    """Bytes held by the objects reachable from ``roots`` (each counted once): numpy buffers and
    torch storages by address, Python objects by ``sys.getsizeof``; the tensors of ``exclude``
    (the parameters) and modules are not counted nor followed."""
    skip = {id(t) for t in exclude}
    seen: set[int] = set()
    buffers: dict[tuple[str, int], int] = {}
    total = 0
    stack = list(roots)
    while stack:
        obj = stack.pop()
        if id(obj) in seen or id(obj) in skip or isinstance(obj, (nn.Module, type)):
            continue
        seen.add(id(obj))
        if isinstance(obj, np.ndarray):
            base = obj
            while isinstance(base.base, np.ndarray):
                base = base.base
            buffers[("cpu", base.__array_interface__["data"][0])] = base.nbytes
            continue
        if isinstance(obj, Tensor):
            if obj.is_meta:
                continue
            storage = obj.untyped_storage()
            buffers[(str(obj.device), storage.data_ptr())] = storage.nbytes()
            continue
        total += sys.getsizeof(obj)
        if isinstance(obj, dict):
            stack += list(obj.keys()) + list(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack += list(obj)
        elif hasattr(obj, "__dict__"):
            stack.append(vars(obj))
    return total + sum(buffers.values())


def _stand_ins(model: nn.Module) -> dict[str, Tensor]:
    """A leaf tensor of every parameter's name and shape holding one element (zero strides)."""
    return {
        n: torch.empty_strided(p.shape, (0,) * p.dim(), dtype=p.dtype)
        for n, p in model.named_parameters()
    }


def _penalties(h: gp.Hierarchy) -> dict[str, gp.GroupLasso]:
    return {level: gp.GroupLasso(1e-6) for level in h.level_names}


def build(name: str, config) -> dict[str, object]:
    import transformers

    cls = (
        transformers.LlamaForCausalLM
        if isinstance(config, transformers.LlamaConfig)
        else transformers.Qwen3MoeForCausalLM
    )
    t_model, model = _timed(lambda: _on_meta(cls, config))
    t_h, h = _timed(lambda: gp.hierarchy.transformer(model))
    t_plan, prox = _timed(lambda: gp.HierarchicalProx(h, _penalties(h), allow_meta=True))
    stand = _stand_ins(model)
    t_bind_h, hb = _timed(lambda: h.bind(stand))
    t_bind, bound = _timed(lambda: prox.bind(stand))
    t_opt, opt = _timed(
        lambda: gp.ProxSGD(list(hb.params), lr=0.1, hierarchy=hb, penalties=_penalties(hb))
    )
    bound.plan.on(torch.device("cpu"))  # the per-device index tensors and work buffers
    params = list(stand.values())
    numel = sum(p.numel() for p in model.parameters())
    h_bytes = held_bytes([hb], params)
    all_bytes = held_bytes([hb, bound.plan], params)
    row = {
        "name": name,
        "numel": numel,
        "tensors": len(h.tensors),
        "atoms": h.num_atoms,
        "groups": {lv: h.num_groups(lv) for lv in h.level_names},
        "t_model": t_model,
        "t_h": t_h,
        "t_plan": t_plan,
        "t_bind_h": t_bind_h,
        "t_bind": t_bind,
        "t_opt": t_opt,
        "h_bytes": h_bytes,
        "plan_bytes": all_bytes - h_bytes,
        "bytes": all_bytes,
    }
    del opt
    return row


def _on_meta(cls, config) -> nn.Module:
    with torch.device("meta"):
        return cls(config)


def step_times(iters: int, warmup: int) -> dict[str, float]:
    """Median seconds of a ProxSGD step, a torch SGD step and the prox alone on one real layer."""
    import transformers

    config = _llama(1)
    config._attn_implementation = "eager"
    with torch.device("meta"):
        layers = nn.ModuleList(
            [transformers.models.llama.modeling_llama.LlamaDecoderLayer(config, 0)]
        )
    h = gp.hierarchy.transformer(layers)
    pens = {"base_level": gp.GroupLasso(1e-6), "layer": gp.GroupLasso(1e-7)}
    prox = gp.HierarchicalProx(h, pens, allow_meta=True)
    layers.to_empty(device="cpu")
    torch.manual_seed(0)
    with torch.no_grad():
        for p in layers.parameters():
            p.normal_(0.0, 0.02)
            p.grad = torch.randn_like(p) * 1e-3
    hb = h.bind(layers)
    bound = prox.bind(layers)
    params = list(layers.parameters())
    opt = gp.ProxSGD(params, lr=1e-3, momentum=0.9, hierarchy=hb, penalties=pens)
    sgd = torch.optim.SGD(params, lr=1e-3, momentum=0.9, foreach=True)
    runs: dict[str, list[float]] = {"prox_sgd": [], "sgd": [], "prox": []}
    for i in range(warmup + iters):
        times = {
            "prox_sgd": _timed(opt.step)[0],
            "sgd": _timed(sgd.step)[0],
            "prox": _timed(lambda: bound.apply_(1e-3))[0],
        }
        if i >= warmup:
            for k, v in times.items():
                runs[k].append(v)
    out = {k: statistics.median(v) for k, v in runs.items()}
    out["numel"] = sum(p.numel() for p in params)
    return out


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    rows = [
        build("Llama-2-7B shape (LlamaForCausalLM)", _llama()),
        build("64-expert MoE (Qwen3MoeForCausalLM, OLMoE-1B-7B sizes)", _moe()),
    ]
    steps = step_times(args.iters, args.warmup)

    lines = [
        "# Scale: a 7B-parameter hierarchy and plan built on the meta device",
        "",
        f"Machine: {machine()}. Produced by `python benchmarks/scale.py --threads {args.threads}"
        f" --iters {args.iters}`.",
        "",
        "Built on `meta` (no weights allocated), every level penalised (the largest plan); "
        "`bind` to stand-in tensors of the real names and shapes (one element of storage each). "
        "Memory: the bytes held by the bound hierarchy and its plan (index arrays, per-device "
        "buffers, group names and other Python objects), against the weights' bytes.",
        "",
        "| model | parameters | tensors | atoms | groups per level | model on meta | "
        "hierarchy | plan | `Hierarchy.bind` | `HierarchicalProx.bind` | `ProxSGD` on the bound "
        "hierarchy | hierarchy + plan | / bf16 weights | / fp32 weights |",
        "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | "
        "---: | ---: |",
    ]
    for r in rows:
        groups = ", ".join(f"{lv} {n:,}" for lv, n in r["groups"].items())
        lines.append(
            f"| {r['name']} | {r['numel'] / 1e9:.2f} B | {r['tensors']} | {r['atoms']:,} | "
            f"{groups} (total {sum(r['groups'].values()):,}) | {r['t_model']:.2f} s | "
            f"{r['t_h']:.2f} s | {r['t_plan']:.2f} s | {r['t_bind_h'] * 1e3:.0f} ms | "
            f"{r['t_bind'] * 1e3:.0f} ms | {r['t_opt']:.2f} s | {_mib(r['bytes'])} "
            f"({_mib(r['h_bytes'])} + {_mib(r['plan_bytes'])}) | "
            f"{100 * r['bytes'] / (2 * r['numel']):.2f} % | "
            f"{100 * r['bytes'] / (4 * r['numel']):.2f} % |"
        )
    n = steps["numel"]
    per_b = {k: steps[k] / n * 1e9 for k in ("prox_sgd", "sgd", "prox")}
    layers = _llama().num_hidden_layers
    lines += [
        "",
        f"Step time on one real Llama-2-7B decoder layer ({n / 1e6:.0f} M parameters, float32, "
        f"built on meta, materialised, bound; base_level λ = 1e-6, layer λ = 1e-7), median of "
        f"{args.iters} steps after {args.warmup}; the last column is {layers} × the layer's "
        "time, **extrapolated**, not measured (embeddings and LM head, outside the hierarchy, "
        "left out).",
        "",
        "| step | one layer | per billion parameters | × 32 layers (extrapolated) |",
        "| --- | ---: | ---: | ---: |",
    ]
    names = {
        "sgd": "`torch.optim.SGD` (momentum, foreach)",
        "prox_sgd": "`gp.ProxSGD` (momentum, with the prox)",
        "prox": "the prox alone (`HierarchicalProx.apply_`)",
    }
    for k in ("sgd", "prox_sgd", "prox"):
        lines.append(
            f"| {names[k]} | {steps[k] * 1e3:.0f} ms | {per_b[k]:.2f} s | "
            f"{steps[k] * layers:.1f} s |"
        )
    lines.append(
        f"\nProxSGD / SGD: {steps['prox_sgd'] / steps['sgd']:.2f}×; the prox alone is "
        f"{steps['prox'] / steps['sgd']:.2f}× an SGD step."
    )
    publish(RESULTS, lines, write=not args.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
