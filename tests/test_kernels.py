"""kernels.py: every Triton kernel equals its PyTorch reference, forward and backward, on CPU.

Triton's interpreter (TRITON_INTERPRET=1) runs each kernel program as numpy code, so the very
kernels the GPU compiles are checked here without one: RMSNorm (y, dx, dweight), SwiGLU
(c, dgate, dup), the fused state mixing (out, dweights), odd shapes, strided inputs, and a few
training steps of a tiny MoS with the kernels forced on. Speed is not tested here — that is
bench/kernels.py's job, on a GPU.
"""

import os

# NOTE: must precede the first kernel launch. kernels.py applies triton.jit lazily, at the
# first launch, which is when Triton reads this variable; pytest may well have imported
# kernels.py already (through gen_tower / router), and that is fine.
os.environ["TRITON_INTERPRET"] = "1"

import copy  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import kernels  # noqa: E402
from gen_tower import GenConfig, ModelConfig, MoS  # noqa: E402
from router import RouterConfig, mix_states, route  # noqa: E402

SHAPES = [(9, 7, 41), (3, 129), (2, 5, 384)]  # odd widths: masked tails, non-power-of-2 rows

# Tolerances on the normwise relative error max|got - want| / max|want| (an elementwise
# relative error means nothing where a gradient cancels to ~0).
#   fp32: both sides do the same fp32 maths in a different order, ~1e-7 apart.
#   bf16: results are rounded to 8 significant bits. One rounding step moves a value by up to
#         2^-8 of itself, so by up to 2^-7 of the largest value. The two sides can be two
#         rounding steps apart: Triton's interpreter casts fp32 → bf16 by truncation (the GPU
#         rounds to nearest), and the eager SwiGLU reference rounds twice (silu(gate), then
#         the product) where the kernel rounds once. 2 · 2^-7 ≈ 1.6e-2, torch.testing's own
#         bf16 tolerance.
TOL = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2}


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double(), want.detach().double()
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(True)


@pytest.fixture(autouse=True)
def triton_backend():
    with kernels.use_backend("triton"):
        yield


def test_kernels_really_run_in_the_interpreter():
    from triton.runtime.interpreter import InterpretedFunction

    for kernel in (kernels._rms_norm_fwd_kernel, kernels._rms_norm_bwd_kernel, kernels._swiglu_fwd_kernel,
                   kernels._swiglu_bwd_kernel, kernels._mix_states_fwd_kernel, kernels._mix_states_bwd_kernel):
        assert isinstance(kernels._jit(kernel), InterpretedFunction), kernel.__name__


#################################################################################
#                                   RMSNorm                                     #
#################################################################################


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_rms_norm_forward_and_backward_equal_the_reference(shape, dtype):
    torch.manual_seed(0)
    x = (torch.randn(shape) * 2 + 0.5).to(dtype)
    w = torch.empty(shape[-1]).uniform_(0.5, 1.5).to(dtype)  # a gain away from 1, so dweight matters
    dy = torch.randn(shape).to(dtype)
    xk, wk, xr, wr = leaf(x), leaf(w), leaf(x), leaf(w)
    y = kernels.rms_norm(xk, wk, 1e-6)
    y_ref = kernels.rms_norm_reference(xr, wr, 1e-6)
    y.backward(dy)
    y_ref.backward(dy)
    assert y.dtype == dtype and xk.grad.dtype == dtype and wk.grad.dtype == dtype
    assert rel_err(y, y_ref) <= TOL[dtype]
    assert rel_err(xk.grad, xr.grad) <= TOL[dtype]
    assert rel_err(wk.grad, wr.grad) <= TOL[dtype]


def test_rms_norm_reads_strided_rows_in_place_and_copies_only_what_it_must():
    torch.manual_seed(0)
    B, S, H, hd = 2, 5, 3, 24
    w = torch.empty(hd).uniform_(0.5, 1.5)
    # QK-norm's input: per-head q of a fused qkv projection — no (rows, hd) view exists.
    qkv = torch.randn(B, S, 3 * H * hd)
    q = qkv.view(B, S, 3, H, hd).unbind(2)[0]  # (B, S, H, hd), strides (S·3D, 3D, hd, 1)
    # A slice of wider rows: a (rows, D) view with row stride 2D exists and is used as is.
    sliced = torch.randn(B, S, 2 * hd)[..., :hd]
    assert kernels._as_rows(sliced).data_ptr() == sliced.data_ptr()
    # A transposed last dim: copied, since the kernels need unit column stride.
    transposed = torch.randn(hd, B * S).t()
    for x in (q, sliced, transposed):
        xk, xr, wk, wr = leaf(x), leaf(x), leaf(w), leaf(w)
        dy = torch.randn(x.shape)
        kernels.rms_norm(xk, wk).backward(dy)
        kernels.rms_norm_reference(xr, wr).backward(dy)
        assert rel_err(kernels.rms_norm(x, w), kernels.rms_norm_reference(x, w)) <= 1e-5
        assert rel_err(xk.grad, xr.grad) <= 1e-5 and rel_err(wk.grad, wr.grad) <= 1e-5


def test_zero_rows_launch_nothing():
    x, w = torch.randn(0, 7, requires_grad=True), torch.ones(7, requires_grad=True)
    y = kernels.rms_norm(x, w)
    y.sum().backward()
    assert y.shape == (0, 7) and torch.equal(w.grad, torch.zeros(7))


#################################################################################
#                                   SwiGLU                                      #
#################################################################################


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_swiglu_forward_and_backward_equal_the_reference(shape, dtype):
    torch.manual_seed(0)
    gate, up, dc = (torch.randn(shape) * 3).to(dtype), torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)
    gk, uk, gr, ur = leaf(gate), leaf(up), leaf(gate), leaf(up)
    c = kernels.swiglu(gk, uk)
    c_ref = kernels.swiglu_reference(gr, ur)
    c.backward(dc)
    c_ref.backward(dc)
    assert c.dtype == dtype
    assert rel_err(c, c_ref) <= TOL[dtype]
    assert rel_err(gk.grad, gr.grad) <= TOL[dtype]
    assert rel_err(uk.grad, ur.grad) <= TOL[dtype]


def test_swiglu_module_reads_the_two_halves_of_the_fused_matmul_in_place():
    torch.manual_seed(0)
    gate_up = torch.randn(2, 5, 2 * 96)
    gate, up = gate_up.chunk(2, dim=-1)  # what SwiGLU.forward passes: views with row stride 2F
    assert kernels._as_rows(gate).data_ptr() == gate.data_ptr()
    assert kernels._as_rows(up).data_ptr() == up.data_ptr()
    ffn = kernels.SwiGLU(48, mlp_ratio=3.0)  # F = 96
    x = torch.randn(2, 5, 48)
    xk, xr = leaf(x), leaf(x)
    y = ffn(xk)
    with kernels.use_backend("torch"):
        y_ref = copy.deepcopy(ffn)(xr)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy)
    assert rel_err(y, y_ref) <= 1e-5 and rel_err(xk.grad, xr.grad) <= 1e-5


def test_modules_keep_their_parameter_names_and_sizes():
    # Checkpoints written before the kernels existed must still load.
    assert list(kernels.RMSNorm(8).state_dict()) == ["weight"]
    with torch.device("meta"):  # shapes only, no 50M-parameter allocation
        ffn = kernels.SwiGLU(3072, 4.0)
    assert list(ffn.state_dict()) == ["w_gate_up.weight", "w_down.weight"]
    assert ffn.w_gate_up.weight.shape == (2 * 8192, 3072)  # mos_s: F = 2/3 · 4 · 3072 = 8192


def test_block_size_and_warps_follow_the_row_width():
    assert kernels.calculate_settings(41) == (64, 4)
    assert kernels.calculate_settings(128) == (128, 4)  # QK-norm rows at head dim 128
    assert kernels.calculate_settings(3072) == (4096, 8)  # mos_s width
    assert kernels.calculate_settings(8192) == (8192, 16)  # mos_s SwiGLU hidden width
    with pytest.raises(ValueError, match="wider than"):
        kernels.calculate_settings(70000)


#################################################################################
#                                 Backend switch                                #
#################################################################################


def test_backend_switch_and_auto_fallback_on_cpu(monkeypatch):
    def no_launch(*a, **k):
        raise AssertionError("a kernel was launched")

    monkeypatch.setattr(kernels, "rms_norm_forward", no_launch)
    monkeypatch.setattr(kernels, "swiglu_forward", no_launch)
    x, w = torch.randn(3, 8), torch.ones(8)
    for backend in ("auto", "torch"):  # auto → PyTorch on CPU tensors
        with kernels.use_backend(backend):
            assert torch.equal(kernels.rms_norm(x, w), kernels.rms_norm_reference(x, w))
            assert torch.equal(kernels.swiglu(x, x), kernels.swiglu_reference(x, x))
    assert kernels.get_backend() == "triton"  # restored by use_backend
    with pytest.raises(ValueError, match="kernel backend 'cuda' is not one of"):
        kernels.set_backend("cuda")
    monkeypatch.setenv("MOS_KERNELS", "Torch")
    assert kernels._backend_from_env() == "torch"
    monkeypatch.setenv("MOS_KERNELS", "fast")
    with pytest.raises(ValueError, match="'fast'"):
        kernels._backend_from_env()


#################################################################################
#                       Fused state mixing (beyond the paper)                   #
#################################################################################


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 2])
def test_mix_states_fused_equals_router_mix_states(k, dtype):
    torch.manual_seed(0)
    B, L, n, m, D = 2, 5, 3, 7, 41
    states = torch.randn(B, L, m, D).to(dtype)  # frozen: no gradient
    logits_k, logits_r = leaf(torch.randn(B, L, n, m)), leaf(torch.randn(B, L, n, m))
    logits_r.data.copy_(logits_k.data)
    idx, w_k = route(logits_k, k)  # (B, L, n, k)
    _, w_r = route(logits_r, k)
    j = 1  # one block's slice, as MoS.forward passes it: strided, read in place
    out = kernels.mix_states_fused(states, idx[:, :, j], w_k[:, :, j])  # (B, L, D)
    with kernels.use_backend("torch"):  # router.mix_states would dispatch to the kernel otherwise
        out_ref = mix_states(states, idx[:, :, j], w_r[:, :, j])
    dout = torch.randn(B, L, D).to(dtype)
    out.backward(dout)
    out_ref.backward(dout)
    assert out.dtype == dtype
    assert rel_err(out, out_ref) <= TOL[dtype]
    assert rel_err(logits_k.grad, logits_r.grad) <= TOL[dtype]  # dweights, through the softmax


def test_mix_states_fused_refuses_states_that_need_a_gradient():
    states = torch.randn(1, 2, 3, 4, requires_grad=True)
    idx, w = torch.zeros(1, 2, 1, dtype=torch.long), torch.ones(1, 2, 1)
    with pytest.raises(ValueError, match="frozen"):
        kernels.mix_states_fused(states, idx, w)
    with pytest.raises(ValueError, match=r"states \(B, L, m, D\)"):
        kernels.mix_states_fused(states.detach(), idx[0], w[0])


#################################################################################
#                   A tiny MoS trains the same with the kernels on              #
#################################################################################


def test_tiny_mos_training_steps_match_with_kernels_on(monkeypatch):
    """3 AdamW steps of a tiny MoS (both towers: block norms, QK-norm, modality norms, FFNs),
    random tensors standing in for the understanding states: the same losses, and the same
    first-step gradients, with every norm and FFN through the interpreted kernels."""
    torch.manual_seed(0)
    cfg = ModelConfig(und_states=5, und_dim=24, gen=GenConfig(dim=32, depth=2, heads=2, patch_size=4),
                      router=RouterConfig(dim=16, heads=2))
    model = MoS(cfg, in_channels=3)
    for p in model.parameters():
        if p.dim() == 1:  # norm gains away from 1 so dweight matters
            p.data.uniform_(0.5, 1.5)
    # NOTE: the head is zero-initialised, which would stop every gradient at step 0.
    torch.nn.init.normal_(model.gen.head.weight, std=0.02)
    g = torch.Generator().manual_seed(1)
    B, L = 2, 3
    x0, z1 = torch.randn(B, 3, 8, 8, generator=g), torch.randn(B, 3, 8, 8, generator=g)
    t = torch.rand(B, generator=g)
    states = torch.randn(B, L, 5, 24, generator=g)
    mask = torch.tensor([[True, True, True], [True, True, False]])  # one padded context token
    x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * z1

    launches = {"rms_norm": 0, "swiglu": 0}
    for name in launches:
        real = getattr(kernels, f"{name}_backward")

        def counted(*a, _real=real, _name=name, **k):
            launches[_name] += 1
            return _real(*a, **k)

        monkeypatch.setattr(kernels, f"{name}_backward", counted)

    def train(backend):
        net = copy.deepcopy(model)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
        losses, first_grads = [], None
        with kernels.use_backend(backend):
            for step in range(3):
                eps_gen = torch.Generator().manual_seed(step)  # the same ε-greedy draws both runs
                loss = (net(x_t, t, states, mask, net.routing_draws(B, L, eps_gen)) - (z1 - x0)).pow(2).mean()
                opt.zero_grad()
                loss.backward()
                if step == 0:
                    first_grads = {name: p.grad.clone() for name, p in net.named_parameters()}
                opt.step()
                losses.append(loss.item())
        return losses, first_grads

    losses_ref, grads_ref = train("torch")
    assert launches == {"rms_norm": 0, "swiglu": 0}
    losses, grads = train("triton")
    # Every norm and every FFN ran its backward kernel at every step. Norm calls per step:
    # generation tower 2 blocks × 6 (norm1, norm_ctx, q_norm, k_norm on image and on context
    # keys, norm2) + out_norm; router 3 input norms (t, z, c) + 2 blocks × 4 + out_norm.
    assert launches["rms_norm"] == 3 * ((2 * 6 + 1) + (3 + 2 * 4 + 1))
    assert launches["swiglu"] == 3 * (2 + 2)  # 2 generation blocks + 2 router blocks
    assert all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(losses, losses_ref)), (losses, losses_ref)
    # Gradients pass through attention, softmax and several norms, each adding ~1e-7 of fp32
    # reordering; measured ≤ 7e-6 per tensor, checked at 1e-4.
    for name in grads_ref:
        assert rel_err(grads[name], grads_ref[name]) <= 1e-4, name
