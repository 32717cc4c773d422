"""Compression on CUDA: the same exactness on the GPU, in float32 and bfloat16 (skipped on CPU)."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import group_prox as gp
from group_prox.demo import digits_resnet18

from .test_compress_moe import _classifier, _kill
from .test_compress_resnet import sparse

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _transformer(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True, norm_first=True)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    with torch.no_grad():
        attn = model.layers[0].self_attn
        attn.out_proj.weight[:, :8] = 0  # heads 0 and 1
        model.layers[1].linear2.weight[:, ::2] = 0  # half the neurons
    return model.to("cuda", dtype).eval()


@pytest.fixture
def no_tf32():
    """TF32 rounds float32 convolutions and matmuls to 10 bits, differently for other widths."""
    saved = torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    yield
    torch.backends.cudnn.allow_tf32 = saved[0]
    torch.set_float32_matmul_precision(saved[1])


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_families_compress_exactly_on_cuda(dtype, tol, no_tf32):
    resnet = sparse(digits_resnet18).to("cuda", dtype)
    moe = _classifier(fused=True)
    _kill(moe, fused=True)
    cases = [
        (resnet, torch.randn(8, 3, 8, 8)),
        (_transformer(dtype), torch.randn(4, 10, 32)),
        (moe.to("cuda", dtype).eval(), torch.randn(16, 5, 6)),
    ]
    for model, x in cases:
        x = x.to("cuda", dtype)
        small = gp.compress(model)
        assert gp.compression.report.count_params(small) < gp.compression.report.count_params(model)
        assert all(p.is_cuda and p.dtype == dtype for p in small.parameters())
        with torch.no_grad():
            torch.testing.assert_close(small(x), model(x), rtol=tol, atol=tol)
        rep = gp.compression_report(model, small, x, runs=5, warmup=2)
        assert rep.device != "cpu" and rep.speedup > 0


def test_output_check_allows_for_tf32():
    torch.backends.cudnn.allow_tf32 = True  # torch's default for convolutions
    model = sparse(digits_resnet18).cuda()
    x = torch.randn(64, 3, 8, 8, device="cuda")
    small = gp.compress(model, example_inputs=x)  # no RuntimeError
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), rtol=5e-3, atol=5e-3)


def test_saved_on_cuda_loads_on_cpu(no_tf32):
    model = sparse(digits_resnet18).cuda()
    small = gp.compress(model)
    buf = io.BytesIO()
    gp.save_compressed(small, buf)
    buf.seek(0)
    loaded = gp.load_compressed(digits_resnet18, buf, map_location="cpu").eval()
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), small(x.cuda()).cpu(), rtol=1e-5, atol=1e-5)
