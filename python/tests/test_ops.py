"""The ops as PyTorch sees them: opcheck, gradcheck, torch.compile, TorchScript, torch.export, bad input."""

import io

import pytest
import torch

import flash_attn2
from conftest import requires_cuda
from reference import naive_attention, random_qkv

DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]


def low_precision(device):
    return torch.float32 if device == "cpu" else torch.bfloat16


def sample_args(device, requires_grad):
    dtype = low_precision(device)
    cases = [(2, 4, 2, 33, 47, 64, True), (1, 2, 2, 17, 17, 32, False)]
    for b, hq, hkv, nq, nk, d, causal in cases:
        q, k, v = random_qkv(b, hq, hkv, nq, nk, d, dtype, device, requires_grad=requires_grad)
        yield q, k, v, causal


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_forward_ops(device):
    for q, k, v, causal in sample_args(device, requires_grad=True):
        torch.library.opcheck(torch.ops.flash_attn2.fwd.default, (q, k, v, causal))
        torch.library.opcheck(torch.ops.flash_attn2.fwd_with_lse.default, (q, k, v, causal, 0.2))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_backward_op(device):
    for q, k, v, causal in sample_args(device, requires_grad=False):
        out, lse = flash_attn2.attention_with_lse(q, k, v, causal)
        dout = torch.randn_like(out)
        torch.library.opcheck(torch.ops.flash_attn2.bwd.default, (dout, q, k, v, out, lse, causal, None))


@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck_float64(causal):
    q, k, v = random_qkv(1, 4, 2, 7, 9, 8, torch.float64, "cpu", requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, k, v: flash_attn2.attention(q, k, v, causal), (q, k, v))
    assert torch.autograd.gradcheck(lambda q, k, v: flash_attn2.attention_with_lse(q, k, v, causal)[0], (q, k, v))


def test_double_backward_is_refused():
    q, k, v = random_qkv(1, 1, 1, 5, 5, 8, torch.float64, "cpu", requires_grad=True)
    (gq,) = torch.autograd.grad(flash_attn2.attention(q, k, v).sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        gq.sum().backward()


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph_dynamic_forward_and_backward(device):
    torch._dynamo.reset()
    graph_breaks = []

    def attend(q, k, v):
        return flash_attn2.attention(q, k, v, causal=True).square().sum()

    compiled = torch.compile(attend, fullgraph=True, dynamic=True)
    for nq in (33, 65):  # two sizes: the second runs the dynamic-shape graph
        q, k, v = random_qkv(2, 4, 2, nq, 40, 64, low_precision(device), device, requires_grad=True)
        loss = compiled(q, k, v)
        loss.backward()
        tq, tk, tv = (t.detach().requires_grad_() for t in (q, k, v))
        attend(tq, tk, tv).backward()
        tol = 1e-4 if device == "cpu" else 2e-2
        torch.testing.assert_close(q.grad, tq.grad, atol=tol, rtol=tol)
        torch.testing.assert_close(v.grad, tv.grad, atol=tol, rtol=tol)
    explanation = torch._dynamo.explain(attend)(q, k, v)
    graph_breaks.extend(explanation.break_reasons)
    assert explanation.graph_break_count == 0, graph_breaks


@pytest.mark.parametrize("device", DEVICES)
def test_torchscript_round_trip(device):
    @torch.jit.script
    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.ops.flash_attn2.fwd(q, k, v, True)

    buffer = io.BytesIO()
    torch.jit.save(attend, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    q, k, v = random_qkv(1, 2, 2, 19, 19, 32, low_precision(device), device)
    assert torch.equal(loaded(q, k, v), flash_attn2.attention(q, k, v, True))


def test_export_contains_the_op():
    class Attention(torch.nn.Module):
        def forward(self, q, k, v):
            return torch.ops.flash_attn2.fwd(q, k, v, True)

    q, k, v = random_qkv(1, 2, 2, 19, 23, 32, torch.float32, "cpu")
    exported = torch.export.export(Attention(), (q, k, v))
    assert "flash_attn2.fwd" in str(exported.graph)
    q2, k2, v2 = random_qkv(1, 2, 2, 19, 23, 32, torch.float32, "cpu")
    torch.testing.assert_close(exported.module()(q2, k2, v2), naive_attention(q2, k2, v2, True)[0])


def test_defaults_match_sdpa():
    q, k, v = random_qkv(2, 4, 4, 64, 64, 32, torch.float64, "cpu")
    for causal in (False, True):
        expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
        torch.testing.assert_close(flash_attn2.attention(q, k, v, causal), expected)


BAD_INPUTS = [
    ((2, 4, 8, 16), (2, 2, 8), (2, 2, 8, 16), "k must have 4 dimensions"),
    ((2, 4, 8, 16), (3, 2, 8, 16), (3, 2, 8, 16), "batch sizes differ"),
    ((2, 4, 8, 16), (2, 3, 8, 16), (2, 3, 8, 16), "not a multiple of the 3 heads"),
    ((2, 4, 8, 16), (2, 2, 8, 32), (2, 2, 8, 32), "head dims differ"),
    ((2, 4, 8, 16), (2, 2, 8, 16), (2, 2, 9, 16), "k has sequence length 8 but v has 9"),
]


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("q_shape,k_shape,v_shape,message", BAD_INPUTS)
def test_bad_shapes_raise_clear_errors(device, q_shape, k_shape, v_shape, message):
    q, k, v = (torch.randn(s, device=device) for s in (q_shape, k_shape, v_shape))
    with pytest.raises(RuntimeError, match=message):
        flash_attn2.attention(q, k, v)


def test_bad_dtypes_and_lse_raise_clear_errors():
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(RuntimeError, match="k has dtype Double but q has dtype Float"):
        flash_attn2.attention(q, q.double(), q)
    with pytest.raises(RuntimeError, match="expected float32, float64, float16 or bfloat16"):
        flash_attn2.attention(q.int(), q.int(), q.int())
    out, lse = flash_attn2.attention_with_lse(q, q, q)
    with pytest.raises(RuntimeError, match=r"lse has shape \[1, 2, 7\]"):
        torch.ops.flash_attn2.bwd(out, q, q, q, out, lse[..., :7], False, None)
    with pytest.raises(RuntimeError, match="scale must be a finite positive number"):
        flash_attn2.attention(q, q, q, scale=float("nan"))


@requires_cuda
def test_cuda_specific_errors():
    q = torch.randn(1, 2, 8, 16, device="cuda")
    with pytest.raises(RuntimeError, match="CUDA kernels take float16 or bfloat16"):
        flash_attn2.attention(q, q, q)
    with pytest.raises(RuntimeError, match="k is on cpu but q is on cuda:0"):
        flash_attn2.attention(q.half(), q.half().cpu(), q.half())
    odd = torch.randn(1, 2, 8, 20, device="cuda", dtype=torch.half)
    with pytest.raises(RuntimeError, match="positive multiple of 8"):
        flash_attn2.attention(odd, odd, odd)
