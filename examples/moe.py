"""A small mixture-of-experts layer with a top-k router, and a training loop that removes experts.

The layer holds its experts either as an ``nn.ModuleList`` of two-layer MLPs or as fused 3-D
weights (``w_in: [experts, d_model, d_hidden]``, ``w_out: [experts, d_hidden, d_model]``); both
forms compute the same function and ``group_prox.hierarchy.moe`` understands both.

Run ``python examples/moe.py`` to train a small MoE classifier with ``ProxAdam`` and a group lasso
on hidden units and on whole experts, print which experts survived, and compress it with
``group_prox.compress`` (dead hidden units and dead experts physically removed, same outputs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ExpertMLP(nn.Module):
    """One expert: ``fc2(act(fc1(x)))``."""

    def __init__(self, d_model: int, d_hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_hidden)
        self.fc2 = nn.Linear(d_hidden, d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class FusedExperts(nn.Module):
    """``num_experts`` MLPs in four tensors; expert ``e`` is ``act(x @ w_in[e] + b_in[e]) @ w_out[e]
    + b_out[e]``.

    Implements ``keep_experts``, the protocol by which ``group_prox.compress`` drops the rows of
    experts that compute exactly zero (see ``group_prox.families.experts``): expert ``e`` (the
    router's index) then reads row ``self.rows[e]`` of the tensors, or is a dropped expert that
    returns zeros.
    """

    def __init__(self, num_experts: int, d_model: int, d_hidden: int) -> None:
        super().__init__()
        bound_in, bound_out = d_model**-0.5, d_hidden**-0.5
        self.w_in = nn.Parameter(torch.empty(num_experts, d_model, d_hidden).uniform_(-1, 1))
        self.b_in = nn.Parameter(torch.empty(num_experts, d_hidden).uniform_(-1, 1))
        self.w_out = nn.Parameter(torch.empty(num_experts, d_hidden, d_model).uniform_(-1, 1))
        self.b_out = nn.Parameter(torch.empty(num_experts, d_model).uniform_(-1, 1))
        with torch.no_grad():
            self.w_in.mul_(bound_in), self.b_in.mul_(bound_in)
            self.w_out.mul_(bound_out), self.b_out.mul_(bound_out)
        # Expert e -> its row in the tensors, None once dropped. Plain Python, not a buffer: it is
        # rebuilt by re-applying the compression plan, so the state_dict keys do not change.
        self.rows: list[int | None] = list(range(num_experts))

    def __len__(self) -> int:
        return len(self.rows)

    def expert(self, e: int, x: Tensor) -> Tensor:
        row = self.rows[e]
        if row is None:  # dropped by keep_experts: its w_out and b_out rows were 0
            return x.new_zeros((*x.shape[:-1], self.w_out.shape[-1]))
        return F.gelu(x @ self.w_in[row] + self.b_in[row]) @ self.w_out[row] + self.b_out[row]

    def keep_experts(self, kept: list[int]) -> None:
        """Keep only rows ``kept`` (increasing, as the tensors are now) of every tensor.

        Exact when the dropped rows' experts compute 0 (``w_out[e] = 0`` and ``b_out[e] = 0``),
        which is what ``group_prox.compress`` checks before calling it: a dropped expert returns
        zeros, every other expert reads its own row as before, and expert indices (the router's)
        do not change.
        """
        idx = torch.as_tensor(kept, dtype=torch.long, device=self.w_in.device)
        for name in ("w_in", "b_in", "w_out", "b_out"):
            old = getattr(self, name)
            new = old.detach().index_select(0, idx).contiguous()
            setattr(self, name, nn.Parameter(new, requires_grad=old.requires_grad))
        new_row = {old: new for new, old in enumerate(kept)}
        self.rows = [None if r is None else new_row.get(r) for r in self.rows]


class TopKMoE(nn.Module):
    """``y = Σ_{e ∈ top-k(router(x))} softmax(top-k logits)_e · expert_e(x)`` per token.

    Args:
        d_model: token width.
        d_hidden: hidden width of every expert.
        num_experts: number of experts.
        top_k: experts evaluated per token.
        fused: hold the experts as fused 3-D weights instead of an ``nn.ModuleList``.
    """

    def __init__(
        self, d_model: int, d_hidden: int, num_experts: int, top_k: int = 2, fused: bool = False
    ) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}.")
        self.top_k = top_k
        self.router = nn.Linear(d_model, num_experts, bias=False)
        self.experts: nn.Module = (
            FusedExperts(num_experts, d_model, d_hidden)
            if fused
            else nn.ModuleList(ExpertMLP(d_model, d_hidden) for _ in range(num_experts))
        )

    def routing(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Per token: the chosen experts ``[tokens, k]`` and their gates ``[tokens, k]``."""
        logits, chosen = self.router(x).topk(self.top_k, dim=-1)
        return chosen, logits.softmax(dim=-1)

    def run_expert(self, e: int, x: Tensor) -> Tensor:
        if isinstance(self.experts, FusedExperts):
            return self.experts.expert(e, x)
        return self.experts[e](x)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        chosen, gates = self.routing(tokens)
        out = torch.zeros_like(tokens)
        for e in range(len(self.experts)):
            rows, slot = torch.nonzero(chosen == e, as_tuple=True)
            if rows.numel():
                y = self.run_expert(e, tokens[rows]) * gates[rows, slot, None]
                out.index_add_(0, rows, y)
        return out.reshape(shape)


class MoEClassifier(nn.Module):
    """``head(mean over tokens of (x + moe(norm(x))))`` on inputs ``[batch, tokens, d_in]``."""

    def __init__(
        self, d_in: int, d_model: int, num_classes: int, num_experts: int = 8, fused: bool = False
    ) -> None:
        super().__init__()
        self.embed = nn.Linear(d_in, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.moe = TopKMoE(d_model, 4 * d_model, num_experts, top_k=2, fused=fused)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x)
        h = h + self.moe(self.norm(h))
        return self.head(h.mean(dim=1))


def train(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    lam: float,
    lr: float,
    epochs: int,
    batch_size: int,
):
    """Train with ``ProxAdam`` and a group lasso of strength ``lam`` on hidden units and on whole
    experts; return the optimizer (``opt.get_sparsity_report()`` shows what survived)."""
    import group_prox as gp

    opt = gp.ProxAdam(
        model.parameters(),
        lr=lr,
        hierarchy=gp.hierarchy.moe(model),
        penalties={"base_level": gp.GroupLasso(lam), "block": gp.GroupLasso(lam)},
    )
    for _ in range(epochs):
        for i in range(0, len(x), batch_size):
            opt.zero_grad()
            F.cross_entropy(model(x[i : i + batch_size]), y[i : i + batch_size]).backward()
            opt.step()
    return opt


def main() -> None:
    torch.manual_seed(0)
    x = torch.randn(512, 8, 16)
    y = (x[:, :, :4].sum(dim=(1, 2)) > 0).long() + 2 * (x[:, :, 4].mean(dim=1) > 0).long()
    model = MoEClassifier(16, 32, num_classes=4, num_experts=8, fused=True)
    opt = train(model, x, y, lam=0.2, lr=3e-3, epochs=30, batch_size=64)
    with torch.no_grad():
        accuracy = (model(x).argmax(dim=1) == y).float().mean().item()
    print(f"train accuracy {accuracy:.3f}")
    print(opt.get_sparsity_report())

    import group_prox as gp

    # Dead hidden units and dead experts are physically removed; compress checks the outputs.
    small = gp.compress(model, opt.hierarchy, example_inputs=x[:64])
    before, after = (sum(p.numel() for p in m.parameters()) for m in (model, small))
    print(f"parameters: {before:,} before, {after:,} after compression")
    print(gp.compression_report(model, small, x[:64]))


if __name__ == "__main__":
    main()
