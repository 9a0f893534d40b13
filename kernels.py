"""The two hot element-wise ops of both towers: RMSNorm and the SwiGLU gate.

Paper, App. A ("Triton Kernel Optimization"): MoS trains with custom Triton kernels for
RMSNorm and the fused FFN, built on Liger-Kernel. This file is where those ops live. Every
norm in `gen_tower.py` and `router.py` (block norms, QK-norm, modality-specific norms) is an
`RMSNorm` from here, and every FFN is a `SwiGLU` from here, so swapping the maths for a
kernel happens in exactly one place.

Today each op is its PyTorch reference path (exact, runs anywhere). The Triton forward and
backward kernels, and the dispatch that uses them on CUDA, slot in behind the same two
functions `rms_norm` and `swiglu`.

Glossary: D = width of the normalised / FFN input, F = FFN hidden width.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dim: y = x / sqrt(mean(x²) + eps) · weight.

    Accumulates in fp32 whatever the input dtype (bf16 squares lose too many bits), then
    casts back, which is what the fused kernel does too.
    """
    y = F.rms_norm(x.float(), (x.shape[-1],), weight.float(), eps)
    return y.to(x.dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU gate: silu(gate) · up (Shazeer 2020)."""
    return F.silu(gate) * up


class RMSNorm(nn.Module):
    """RMSNorm (Zhang & Sennrich 2019) with a learned per-channel gain, initialised to 1."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class SwiGLU(nn.Module):
    """The FFN of every block: W_down(silu(W_gate x) · W_up x), no biases (LLaMA-style).

    The hidden width F is 2/3 of `mlp_ratio · D` so a SwiGLU FFN costs the same FLOPs as a
    GELU FFN of ratio `mlp_ratio`, rounded up to a multiple of 64 for friendly matmul shapes.
    """

    def __init__(self, dim: int, mlp_ratio: float = 4.0, multiple_of: int = 64):
        super().__init__()
        hidden = int(2 * mlp_ratio * dim / 3)
        hidden = multiple_of * ((hidden + multiple_of - 1) // multiple_of)
        self.w_gate_up = nn.Linear(dim, 2 * hidden, bias=False)  # one matmul for both halves
        self.w_down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w_gate_up(x).chunk(2, dim=-1)  # (..., F) each
        return self.w_down(swiglu(gate, up))  # (..., D)
