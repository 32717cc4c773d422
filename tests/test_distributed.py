"""Multi-process training (gloo, 2 CPU processes): DDP and FSDP2 give the single-process result.

Each test spawns two ranks once and runs several scenarios in them; the ranks write what they end
with to files, and the test compares it with a single-process run on the same global batch, in
float64 so that "equal" means equal to rounding and the zero patterns are exactly the same.
"""

from __future__ import annotations

import gc
import os
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import group_prox as gp
from group_prox.distributed import full_tensor, process_group

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(),
    reason="needs torch.distributed with the gloo backend",
)

WORLD = 2
STEPS = 7
DTYPE = torch.float64


# ------------------------------------------------------------------------------- launching
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, worker: Any, port: int, out: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.save(worker(rank), Path(out) / f"rank{rank}.pt")
        # Under gloo a rank that tears down while another finishes its last collective (or with
        # FSDP2 state still in reference cycles) can abort at exit.
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _spawn(worker: Any, tmp_path: Path) -> list[dict[str, Any]]:
    """Run ``worker(rank)`` on every rank; what it returns, one dict per rank."""
    mp.spawn(_entry, args=(worker, _free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


class _CountAllReduce:
    """Counts ``torch.distributed.all_reduce`` calls while active: ``calls`` those of floating
    tensors (the prox's norms), ``flags`` those of integer ones (agreeing on non-finite values)."""

    def __enter__(self) -> _CountAllReduce:
        self.calls = 0
        self.flags = 0
        self._orig = dist.all_reduce

        def counting(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if tensor.is_floating_point():
                self.calls += 1
            else:
                self.flags += 1
            return self._orig(tensor, *args, **kwargs)

        dist.all_reduce = counting
        return self

    def __exit__(self, *exc: object) -> None:
        dist.all_reduce = self._orig


# ------------------------------------------------------------------------------- data
def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Global batches of 8 rows; rank r trains on rows 4r..4r+3 of each."""
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(8, 6, generator=g, dtype=DTYPE), torch.randint(0, 3, (8,), generator=g))
        for _ in range(STEPS + 1)
    ]


def _local(batch: tuple[torch.Tensor, torch.Tensor], rank: int | None):
    if rank is None:
        return batch
    rows = slice(4 * rank, 4 * rank + 4)
    return batch[0][rows], batch[1][rows]


def _zero_masks(report: gp.SparsityReport) -> dict[str, list[bool]]:
    return {t.name: t.zero_mask for t in report.tensors}


# ------------------------------------------------------------------------------- DDP
def _conv_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.GroupNorm(2, 8),
        nn.ReLU(),
        nn.Conv2d(8, 6, 3, padding=1),
        nn.GroupNorm(2, 6),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 3),
    ).to(DTYPE)


def _images() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(2)
    return [
        (torch.randn(8, 3, 6, 6, generator=g, dtype=DTYPE), torch.randint(0, 3, (8,), generator=g))
        for _ in range(STEPS)
    ]


def _conv_hierarchy(model: nn.Module) -> gp.Hierarchy:
    """Filters with their GroupNorm channels (and the head's input columns), then the blocks."""
    conv1, gn1, conv2, gn2, head = model[0], model[1], model[3], model[4], model[8]

    def channel(i: int, *modules: nn.Module) -> list[tuple[torch.Tensor, int, int]]:
        return [(p, 0, i) for m in modules for p in (m.weight, m.bias)]

    filters = {f"conv1[{i}]": channel(i, conv1, gn1) for i in range(8)}
    filters |= {f"conv2[{i}]": [*channel(i, conv2, gn2), (head.weight, 1, i)] for i in range(6)}
    block1 = [p for m in (conv1, gn1) for p in m.parameters()]
    block2 = [p for m in (conv2, gn2) for p in m.parameters()] + [head.weight]
    return gp.Hierarchy({"base_level": filters, "block": [block1, block2]}, names=model)


def _train_conv(rank: int | None) -> dict[str, Any]:
    model = _conv_net()
    h = _conv_hierarchy(model)
    net: nn.Module = model
    if rank is not None:
        net = nn.parallel.DistributedDataParallel(model)
    opt = gp.ProxSGD(
        model.parameters(),
        lr=0.1,
        momentum=0.9,
        hierarchy=h,
        penalties={"base_level": gp.GroupLasso(0.2), "block": gp.GroupLasso(0.02)},
    )
    for batch in _images():
        x, y = _local(batch, rank)
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    report = opt.get_sparsity_report()
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "masks": _zero_masks(report),
        "zero_groups": {k: lv.zero_groups for k, lv in report.levels.items()},
    }


def test_ddp_ranks_agree_with_single_process(tmp_path):
    ranks = _spawn(_train_conv, tmp_path)
    ref = _train_conv(None)
    assert 0 < ref["zero_groups"]["base_level"] < 14  # some filters died, not all
    for out in ranks:
        assert out["masks"] == ref["masks"]
        assert out["zero_groups"] == ref["zero_groups"]
        for p, q in zip(out["params"], ref["params"]):
            torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
            assert torch.equal(p == 0, q == 0)
    for p, q in zip(ranks[0]["params"], ranks[1]["params"]):
        assert torch.equal(p, q)


# ------------------------------------------------------------------------------- FSDP2
class _MLP(nn.Module):
    """6 → 7 → 5 → 3: 7 and 5 rows, and fc3's 3 rows, split unevenly over two ranks."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 7)
        self.fc2 = nn.Linear(7, 5)
        self.fc3 = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


def _mlp() -> _MLP:
    torch.manual_seed(0)
    return _MLP().to(DTYPE)


def _mlp_hierarchy(m: _MLP) -> gp.Hierarchy:
    """Hidden units = rows of fc1/fc2 (atoms inside one shard) with the next layer's input columns
    (atoms spanning both ranks); layers; the whole model (with fc3.bias as one atom)."""
    f1, f2, f3 = m.fc1, m.fc2, m.fc3
    unit = {f"h1[{j}]": [(f1.weight, 0, j), (f1.bias, 0, j), (f2.weight, 1, j)] for j in range(7)}
    unit |= {f"h2[{k}]": [(f2.bias, 0, k), (f3.weight, 1, k)] for k in range(5)}
    return gp.Hierarchy(
        {
            "unit": unit,
            "layer": {"hidden1": [f1.weight, f1.bias, f2.weight], "hidden2": [f2.bias, f3.weight]},
            "model": {"all": list(m.parameters())},
        },
        names=m,
    )


def _penalties(lam: float) -> dict[str, gp.Penalty]:
    return {
        "unit": gp.SparseGroupLasso(lam, l1_ratio=0.3),
        "layer": gp.GroupLasso(lam / 5),
        "model": gp.L1(lam / 10),
    }


SCENARIOS = {
    "sgd": (gp.ProxSGD, dict(lr=0.1, momentum=0.9), 0.3),
    "adam": (gp.ProxAdam, dict(lr=0.05), 0.6),
    "adam_precond": (gp.ProxAdam, dict(lr=0.05, prox_metric="preconditioner"), 0.015),
    # HSDP: a 2-D mesh (replicate × shard), placements (Replicate(), Shard(0)).
    "hsdp": (gp.ProxSGD, dict(lr=0.1, momentum=0.9), 0.3),
    # The compiled update runs on each rank's local shards.
    "sgd_compiled": (gp.ProxSGD, dict(lr=0.1, momentum=0.9, compiled=True), 0.3),
}


def _whole(t: torch.Tensor) -> torch.Tensor:
    return full_tensor(t).clone()


def _train_mlp(name: str, rank: int | None) -> dict[str, Any]:
    cls, kw, lam = SCENARIOS[name]
    model = _mlp()
    if rank is not None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        shape = (WORLD, 1) if name == "hsdp" else (WORLD,)
        mesh = init_device_mesh("cpu", shape, mesh_dim_names=("replicate", "shard")[: len(shape)])
        for layer in (model.fc1, model.fc2, model.fc3):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    opt = cls(model.parameters(), **kw, hierarchy=_mlp_hierarchy(model), penalties=_penalties(lam))
    calls = []
    batches = _batches()
    for batch in batches[:STEPS]:
        x, y = _local(batch, rank)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        with _CountAllReduce() as counter:
            opt.step()
        calls.append(counter.calls)
    report = opt.get_sparsity_report()
    out = {
        "params": [_whole(p) for p in model.parameters()],
        "report": report.to_dict(),
        "penalty": opt.penalty_value(),
        "all_reduces": calls,
    }
    if name == "hsdp" and rank is not None:
        out["placements"] = str(model.fc1.weight.placements)
        out["world_group"] = process_group(model.parameters()) is dist.group.WORLD
    if name == "sgd":
        # Freeze the pattern and take one more step: dead groups stay dead, nothing else shrinks.
        out["frozen_numel"] = opt.freeze_zero_groups()
        x, y = _local(batches[STEPS], rank)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        out["after_freeze"] = [_whole(p) for p in model.parameters()]
    return out


def _placements(rank: int) -> dict[str, Any]:
    """Hand-made DTensor parameters: Shard(1) (uneven), Replicate, Shard(0) with an empty shard,
    and a plain tensor outside the hierarchy, with gradients set directly; and the errors for what
    is not supported."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (WORLD,))
    values, grads = _placement_data()
    specs = [[Shard(1)], [Replicate()], [Shard(1)], None, [Shard(0)]]
    params = [
        nn.Parameter(v.clone() if s is None else distribute_tensor(v.clone(), mesh, s))
        for v, s in zip(values, specs)
    ]
    opt = _placement_optimizer(params)
    calls = []
    for step_grads in grads:
        for p, g, s in zip(params, step_grads, specs):
            p.grad = g.clone() if s is None else distribute_tensor(g.clone(), mesh, s)
        with _CountAllReduce() as counter:
            opt.step()
        calls.append(counter.calls)
    out: dict[str, Any] = {
        "params": [_whole(p) for p in params],
        "all_reduces": calls,
        "report": opt.get_sparsity_report().to_dict(),
        "group_is_mesh": process_group(params) is mesh.get_group(),
        "no_group": process_group([torch.zeros(2)]) is None,
    }
    bad = nn.Parameter(DTensor.from_local(torch.ones(3, 4, dtype=DTYPE), mesh, [Partial()]))
    h = gp.Hierarchy({"unit": [[(bad, 0, i)] for i in range(3)]}, names={"head.weight": bad})
    with pytest.raises(ValueError, match=r"head\.weight has a Partial placement"):
        gp.ProxSGD([bad], lr=0.1, hierarchy=h, penalties={"unit": gp.GroupLasso(0.1)})
    mesh_2d = init_device_mesh("cpu", (WORLD, 1))
    other = nn.Parameter(distribute_tensor(torch.ones(2, 2, dtype=DTYPE), mesh_2d, [Shard(0)] * 2))
    h = gp.Hierarchy({"unit": [[params[0]], [other]]}, names={"a": params[0], "b.weight": other})
    with pytest.raises(ValueError, match=r"b\.weight lies on device mesh .* a on"):
        gp.ProxSGD([params[0], other], lr=0.1, hierarchy=h, penalties={"unit": gp.L1(0.1)})
    a, d = params[0], params[3]
    h = gp.Hierarchy({"unit": [[a], [d]]}, names={"a": a, "d": d})
    with pytest.raises(ValueError, match="d is a plain tensor but a is a DTensor"):
        gp.ProxSGD([a, d], lr=0.1, hierarchy=h, penalties={"unit": gp.L1(0.1)})
    return out


def _placement_data() -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    g = torch.Generator().manual_seed(3)
    shapes = [(4, 5), (3, 4), (3, 5), (2, 3), (1, 3)]
    values = [torch.randn(s, generator=g, dtype=DTYPE) for s in shapes]
    grads = [[torch.randn(s, generator=g, dtype=DTYPE) for s in shapes] for _ in range(3)]
    return values, grads


def _placement_optimizer(params: list[nn.Parameter]) -> gp.ProxSGD:
    # a: columns (local to a Shard(1) shard) with b's rows and e's columns (e has one row, so
    # rank 1's shard of it is empty); c: rows (spanning both shards); then one group of all.
    # d, a plain tensor, is trained but not penalised.
    a, b, c, _, e = params
    cols = [[(a, 1, j)] + ([(b, 0, j), (e, 1, j)] if j < 3 else []) for j in range(5)]
    rows = [[(c, 0, i)] for i in range(3)]
    h = gp.Hierarchy(
        {"unit": cols + rows, "all": [[a, b, c, e]]},
        names={"a": a, "b": b, "c": c, "e": e},
    )
    pens = {"unit": gp.SparseGroupLasso(1.5, l1_ratio=0.2), "all": gp.GroupLasso(0.3)}
    return gp.ProxSGD(params, lr=0.2, momentum=0.5, hierarchy=h, penalties=pens)


def _sharded_mlp(rank: int | None) -> _MLP:
    model = _mlp()
    if rank is not None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (WORLD,))
        for layer in (model.fc1, model.fc2, model.fc3):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model


def _nonfinite(rank: int | None) -> dict[str, Any]:
    """A NaN in one rank's gradient shard: with "skip" every rank skips the step (one all-reduce
    of a flag), as one process skips it; with "raise" every rank raises."""
    out: dict[str, Any] = {}
    for mode in ("skip", "raise"):
        model = _sharded_mlp(rank)
        opt = gp.ProxSGD(
            model.parameters(), lr=0.1, momentum=0.9, nonfinite=mode,
            hierarchy=_mlp_hierarchy(model), penalties=_penalties(0.3),
        )  # fmt: skip
        flags, error = [], None
        for step, batch in enumerate(_batches()[:4]):
            x, y = _local(batch, rank)
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            if step == 2 and rank in (0, None):
                grad = model.fc2.weight.grad
                (grad.to_local() if rank is not None else grad)[0, 0] = float("nan")
            with _CountAllReduce() as counter:
                try:
                    opt.step()
                except FloatingPointError as e:
                    error = str(e)
                    break
            flags.append(counter.flags)
        out[mode] = {
            "params": [_whole(p) for p in model.parameters()],
            "skipped": opt.skipped_steps,
            "flags": flags,
            "error": error,
        }
    return out


def _with_target(rank: int | None) -> dict[str, Any]:
    """SparsityTarget on a sharded model: it measures group norms and freezes through the same
    kernels, so every rank selects, snaps and freezes the same groups as one process."""
    model = _sharded_mlp(rank)
    opt = gp.ProxSGD(
        model.parameters(), lr=0.1, momentum=0.9, hierarchy=_mlp_hierarchy(model),
        penalties={"unit": gp.GroupLasso(0.0)},
    )  # fmt: skip
    target = gp.SparsityTarget(opt, {"unit": 0.5}, warmup_steps=1, reach_step=4, freeze_step=6)
    for batch in _batches()[:STEPS]:
        x, y = _local(batch, rank)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        target.step()
    return {
        "params": [_whole(p) for p in model.parameters()],
        "report": opt.get_sparsity_report().to_dict(),
        "frozen": opt.frozen,
        "compressed": _compress_gathered(model, rank),
    }


def _compress_gathered(model: nn.Module, rank: int | None) -> dict[str, Any]:
    """The README's recipe: compress refuses sharded parameters; gather the full state dict on
    rank 0, load it into an unsharded model and compress that."""
    x = _batches()[0][0]
    refused = None
    if rank is not None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        try:
            gp.compress(model, example_inputs=x)
        except ValueError as e:
            refused = str(e)
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(model, options=options)
        if not state:  # the full state dict is on rank 0 only
            return {"refused": refused}
        model = _mlp()
        model.load_state_dict(state)
    small = gp.compress(model, example_inputs=x)
    with torch.no_grad():
        out = small(x)
    widths = [small.fc1.out_features, small.fc2.out_features]
    return {"refused": refused, "widths": widths, "outputs": out}


def _fsdp_worker(rank: int) -> dict[str, Any]:
    out = {name: _train_mlp(name, rank) for name in SCENARIOS}
    out["placements"] = _placements(rank)
    out["nonfinite"] = _nonfinite(rank)
    out["target"] = _with_target(rank)
    return out


@pytest.fixture(scope="module")
def fsdp_ranks(tmp_path_factory):
    """One launch of two ranks for all the FSDP2 / DTensor scenarios (start-up dominates)."""
    return _spawn(_fsdp_worker, tmp_path_factory.mktemp("fsdp"))


def test_fsdp2_matches_unsharded_run(fsdp_ranks):
    ranks = fsdp_ranks
    assert all(out["hsdp"]["world_group"] for out in ranks)
    assert ranks[0]["hsdp"]["placements"] == "(Replicate(), Shard(dim=0))"
    for name in SCENARIOS:
        ref = _train_mlp(name, None)
        levels = ref["report"]["levels"]
        assert levels["unit"]["zero_groups"] > 0, name  # the prox has zeroed some groups...
        assert ref["report"]["zero_params"] < ref["report"]["total_params"], name  # ...not all
        # One all-reduce of atom norms per step; the preconditioner metric needs one more.
        per_step = 2 if name == "adam_precond" else 1
        for out in ranks:
            assert out[name]["all_reduces"] == [per_step] * STEPS, name
            assert out[name]["report"] == ref["report"], name
            assert out[name]["penalty"] == pytest.approx(ref["penalty"], rel=1e-12)
            for key in ("params", "after_freeze"):
                for p, q in zip(out[name].get(key, []), ref.get(key, [])):
                    torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
                    assert torch.equal(p == 0, q == 0), name
            assert out[name].get("frozen_numel") == ref.get("frozen_numel")
        for p, q in zip(ranks[0][name]["params"], ranks[1][name]["params"]):
            assert torch.equal(p, q), name


def test_fsdp2_ranks_agree_on_nonfinite_steps(fsdp_ranks):
    ref = _nonfinite(None)
    assert ref["skip"]["skipped"] == 1 and "fc2.weight" in ref["raise"]["error"]
    for rank, out in enumerate(r["nonfinite"] for r in fsdp_ranks):
        assert out["skip"]["skipped"] == 1
        assert out["skip"]["flags"] == [1] * 4  # one small all-reduce per step, to agree
        for p, q in zip(out["skip"]["params"], ref["skip"]["params"]):
            torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
        # The rank holding the NaN names the tensor; the other says another rank found one.
        expected = "fc2.weight" if rank == 0 else "on another rank"
        assert out["raise"]["error"] is not None and expected in out["raise"]["error"]
        for p, q in zip(out["raise"]["params"], fsdp_ranks[0]["nonfinite"]["raise"]["params"]):
            assert torch.equal(p, q)


def test_fsdp2_with_a_sparsity_target(fsdp_ranks):
    ref = _with_target(None)
    assert ref["frozen"] and ref["report"]["levels"]["unit"]["zero_groups"] == 6  # half of 12
    for out in (r["target"] for r in fsdp_ranks):
        assert out["frozen"] and out["report"] == ref["report"]
        for p, q in zip(out["params"], ref["params"]):
            torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
            assert torch.equal(p == 0, q == 0)


def test_compress_refuses_sharded_parameters_and_the_gathered_model_compresses(fsdp_ranks):
    ref = _with_target(None)["compressed"]
    assert sum(ref["widths"]) < 7 + 5
    for out in (r["target"]["compressed"] for r in fsdp_ranks):
        assert "sharded (DTensor" in out["refused"] and "full_state_dict=True" in out["refused"]
    gathered = fsdp_ranks[0]["target"]["compressed"]
    assert gathered["widths"] == ref["widths"]
    torch.testing.assert_close(gathered["outputs"], ref["outputs"], rtol=1e-10, atol=1e-12)


def test_dtensor_placements_match_plain_tensors(fsdp_ranks):
    ranks = [out["placements"] for out in fsdp_ranks]
    values, grads = _placement_data()
    params = [nn.Parameter(v.clone()) for v in values]
    opt = _placement_optimizer(params)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
    report = opt.get_sparsity_report().to_dict()
    assert 0 < report["levels"]["unit"]["zero_groups"] < report["levels"]["unit"]["groups"]
    for out in ranks:
        assert out["all_reduces"] == [1] * len(grads)
        assert out["report"] == report
        assert out["group_is_mesh"] and out["no_group"]
        for p, q in zip(out["params"], params):
            torch.testing.assert_close(p, q.detach(), rtol=1e-10, atol=1e-12)
            assert torch.equal(p == 0, q == 0)
