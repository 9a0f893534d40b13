"""The hot memory-bound ops of both towers as Triton kernels: RMSNorm, the SwiGLU gate, and
(beyond the paper) the state mixing of Eq. 4.

Paper, App. A ("Triton Kernel Optimization"): MoS trains with custom Triton kernels for
RMSNorm and the fused FFN, built on Liger-Kernel (Hsu et al. 2024). We write our own, in
Liger's layering, one section per op:

    _op_fwd_kernel / _op_bwd_kernel   one row per program, int64 program id, masked loads,
                                      fp32 accumulation; maths and gradient in the docstring
    op_forward / op_backward          launchers: flatten to 2-D rows, BLOCK_SIZE, num_warps
    OpFunction                        the torch.autograd.Function gluing the two together
    op_reference                      the PyTorch path, exact, runs anywhere — and the oracle
                                      tests/test_kernels.py compares the kernels against

and, on top, the public functions every model file calls — `rms_norm(x, weight, eps)` and
`swiglu(gate, up)` — and the modules `RMSNorm` and `SwiGLU`. Every norm in `gen_tower.py` and
`router.py` (block norms, QK-norm, modality-specific norms) and every FFN goes through them,
so swapping the maths for a kernel happens in exactly one place.

Why kernels at all: both ops are element-wise or row-wise, so their cost is memory traffic,
not FLOPs. Eager PyTorch runs RMSNorm as a chain of kernels (the fp32 upcast, square, mean,
rsqrt, the two multiplies, the cast back — or a fused norm between the two casts), each a
round trip of the whole tensor through HBM; the fused kernel reads x once and writes y once.
SwiGLU eager keeps silu(gate) as an extra activation for backward; the kernel recomputes it
from gate instead (recomputing a sigmoid is far cheaper than a round trip to HBM).

Backend choice (`set_backend`, `use_backend`, env var MOS_KERNELS):
    "auto"    Triton on CUDA tensors, the PyTorch reference elsewhere (CPU, meta) — default
    "triton"  always the kernels; on CPU tensors this needs TRITON_INTERPRET=1, which makes
              Triton run the kernels as numpy programs (how the tests prove them on CPU)
    "torch"   always the PyTorch reference
Triton itself is imported only when a kernel is first launched, so CPU training and sampling
never pay for it (and TRITON_INTERPRET may be set any time before that first launch).

Glossary: D = width of the normalised / FFN input, F = FFN hidden width, R = rows (all
leading dims flattened: B·S tokens, or B·S·H heads for QK-norm), B batch, L context tokens,
m understanding states, k selected states per token.
"""

# Kernel signatures annotate compile-time constants as `tl.constexpr`; with postponed
# annotations these stay strings, so this file can define the kernels without importing
# Triton (Triton reads the strings when it compiles).
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

triton = tl = None  # imported on the first kernel launch, see _jit()


def __getattr__(name: str):
    """Fail a foreign `from kernels import X` with one line that names the fix.

    Hugging Face publishes a package that is also called `kernels`; when it is installed,
    transformers imports names such as `CUDAProperties` from it while loading any model class.
    Run from the repository root, Python finds this file under that name first. Any name this
    module does not define therefore means that clash, and a `from ... import` turns the
    ImportError raised here into exactly this message (module __getattr__, PEP 562).
    """
    if name.startswith("__"):  # dunder probes (copy, pickle, doctest) expect AttributeError
        raise AttributeError(name)
    raise ImportError(
        f"kernels.py (this repository) has no {name!r}: the installed transformers asked for the Hugging Face "
        "package 'kernels', which this file shadows; install the tested versions with "
        "`pip install -r requirements.txt -c constraints.txt`",
        name=name,
    )


#################################################################################
#                     Backend selection and lazy Triton loading                 #
#################################################################################

BACKENDS = ("auto", "triton", "torch")


def _check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"kernel backend {name!r} is not one of {BACKENDS}")
    return name


def _backend_from_env() -> str:
    """MOS_KERNELS=auto|triton|torch picks the starting backend (default auto)."""
    return _check_backend(os.environ.get("MOS_KERNELS", "auto").strip().lower() or "auto")


_backend = _backend_from_env()


def set_backend(name: str) -> None:
    """Pick the implementation of every op in this file: "auto", "triton" or "torch"."""
    global _backend
    _backend = _check_backend(name)


def get_backend() -> str:
    return _backend


@contextlib.contextmanager
def use_backend(name: str):
    """`with use_backend("triton"): ...` — the backend for a block of code, then restored."""
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None  # finds the package, imports nothing


def _use_triton(x: torch.Tensor) -> bool:
    if _backend == "torch":
        return False
    if _backend == "triton":
        return True
    # auto: CUDA only. NOTE: under torch.compile we hand the compiler the PyTorch reference
    # instead: Inductor fuses those few ops into a Triton kernel of its own, where our opaque
    # launch would only break the graph.
    return x.is_cuda and _triton_installed() and not torch.compiler.is_compiling()


def triton_active(x: torch.Tensor) -> bool:
    """Would the ops of this file run their Triton kernels on `x` (backend and device)?"""
    return _use_triton(x)


@functools.cache
def _jit(kernel):
    """`triton.jit(kernel)`, applied on the first launch rather than at import.

    Two reasons. Importing Triton costs CPU-only runs time for nothing. And `triton.jit`
    decides at decoration time whether a kernel is compiled for the GPU or run by the
    interpreter (TRITON_INTERPRET=1): decorating late means the variable only has to be set
    before the first launch, not before this file is imported (pytest imports every test
    module, and with them this file, before any test body runs).
    """
    global triton, tl
    try:
        import triton
        import triton.language as tl
    except ImportError as e:
        raise ImportError("the Triton kernel backend needs the `triton` package (pip install triton)") from e
    return triton.jit(kernel)


def _launchable(kernel, *tensors: torch.Tensor):
    """The jitted `kernel`, after checking it can run on these tensors: compiled kernels need
    CUDA tensors; interpreted ones (TRITON_INTERPRET=1 at the first launch) run anywhere."""
    jitted = _jit(kernel)
    if not all(t.is_cuda for t in tensors):
        from triton.runtime.interpreter import InterpretedFunction

        if not isinstance(jitted, InterpretedFunction):
            raise RuntimeError(
                "the Triton kernels need CUDA tensors; to run them on CPU set TRITON_INTERPRET=1 "
                "before the first kernel launch, or use kernels.set_backend('torch')"
            )
    return jitted


MAX_FUSED_SIZE = 65536  # widest row one program holds in registers (Liger's limit)


def calculate_settings(n_cols: int) -> tuple[int, int]:
    """BLOCK_SIZE = next power of 2 ≥ n_cols (a program holds a whole row), and num_warps.

    More warps for wider rows so each thread keeps a handful of elements (Liger's table):
    a 3072-wide row → BLOCK 4096, 8 warps = 256 threads × 16 elements.
    """
    block = 1 << max(n_cols - 1, 0).bit_length()
    if block > MAX_FUSED_SIZE:
        raise ValueError(f"rows of {n_cols} elements are wider than the kernels' limit of {MAX_FUSED_SIZE}")
    num_warps = 32 if block >= 32768 else 16 if block >= 8192 else 8 if block >= 2048 else 4
    return block, num_warps


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """t (..., C) → (R, C) with unit column stride; a view whenever one exists.

    The kernels take a row stride, so strided row views are read in place: the `gate` and
    `up` halves of SwiGLU's fused matmul output ((R, 2F) cut in two, row stride 2F) and
    slices of a routing tensor cost no copy. Only layouts no (R, C) view can describe (the
    per-head q of a qkv projection, a transposed last dim) are copied.
    """
    rows = t.reshape(-1, t.shape[-1])  # (R, C)
    if rows.stride(-1) != 1 and rows.shape[-1] > 1:
        rows = rows.contiguous()
    return rows


# Programs per SM for the row-looping RMSNorm backward. Liger launches one per SM; but one
# program keeps only one row's loads in flight at a time (it reduces each row before loading
# the next), too few bytes to cover HBM latency, so we launch a few per SM and let the
# hardware interleave them, as many as registers allow.
# The price is a (programs, D) fp32 partial-dweight buffer, written once and summed once: at
# mos_s shapes (D = 3072, 132 SMs) 6.5 MB, 2-9% of the bytes the backward moves for batch
# 8 down to 2. bench/kernels.py is the judge of this number.
BWD_PROGRAMS_PER_SM = 4


@functools.cache
def _num_bwd_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return BWD_PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter runs programs one after another; any small number will do


#################################################################################
#                                   RMSNorm                                     #
#################################################################################


def _rms_norm_fwd_kernel(Y_ptr, Y_row_stride, X_ptr, X_row_stride, W_ptr, RSTD_ptr, n_cols, eps,
                         BLOCK_SIZE: tl.constexpr):
    """One row per program: y = x · r · w,  r = 1 / sqrt(mean(x²) + eps).

    x is read once, in its own dtype, and upcast to fp32 in registers: squares of bf16
    values summed in bf16 would lose most of their bits. r (one fp32 per row) is saved for
    the backward pass, which then never recomputes the reduction.
    """
    row = tl.program_id(0).to(tl.int64)  # NOTE: int64, or row · stride overflows past 2³¹ elements
    cols = tl.arange(0, BLOCK_SIZE)
    mask = cols < n_cols  # BLOCK_SIZE is a power of 2 ≥ n_cols: the tail lanes do nothing
    x = tl.load(X_ptr + row * X_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)  # masked lanes add 0 to the sum
    tl.store(RSTD_ptr + row, rstd)
    y = x * rstd * w
    tl.store(Y_ptr + row * Y_row_stride + cols, y.to(Y_ptr.dtype.element_ty), mask=mask)


def _rms_norm_bwd_kernel(dX_ptr, dX_row_stride, dY_ptr, dY_row_stride, X_ptr, X_row_stride, W_ptr, RSTD_ptr,
                         dW_ptr, n_rows, n_cols, rows_per_program, BLOCK_SIZE: tl.constexpr):
    """A block of `rows_per_program` rows per program: dx for each row, and this block's dw.

    With x̂ = r·x, y = x̂ ⊙ w, g = dy ⊙ w and r = (Σ_j x_j² / D + eps)^(-1/2), so that
    ∂r/∂x_i = -r³ x_i / D:

        dw   = Σ_rows dy ⊙ x̂
        dx_i = Σ_j g_j ∂(r x_j)/∂x_i = Σ_j g_j (δ_ij r - x_j r³ x_i / D)
             = r·g_i - (r³/D)·x_i·Σ_j g_j x_j
             = r · (g_i - x̂_i · mean_j(g_j x̂_j))

    dx needs one reduction per row, done in registers. dw is a sum over ALL rows: rather than
    atomics on one row of D floats (contended, and non-deterministic in fp32), each program
    sums its own block of rows into registers and writes one partial row; the launcher adds
    the (programs, D) partials. A few programs per SM (BWD_PROGRAMS_PER_SM), so the partial
    buffer stays small.
    """
    pid = tl.program_id(0).to(tl.int64)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    cols = tl.arange(0, BLOCK_SIZE)
    mask = cols < n_cols
    w = tl.load(W_ptr + cols, mask=mask, other=0.0).to(tl.float32)  # loaded once per program
    dw = tl.zeros((BLOCK_SIZE,), dtype=tl.float32)
    for row in range(row_start, row_end):
        x = tl.load(X_ptr + row * X_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dY_ptr + row * dY_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD_ptr + row)
        x_hat = x * rstd
        g = dy * w
        dx = rstd * (g - x_hat * (tl.sum(g * x_hat, axis=0) / n_cols))
        tl.store(dX_ptr + row * dX_row_stride + cols, dx.to(dX_ptr.dtype.element_ty), mask=mask)
        dw += dy * x_hat
    tl.store(dW_ptr + pid * n_cols + cols, dw, mask=mask)


def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float):
    """Launch the forward kernel: x (..., D) → y (..., D), plus what backward needs."""
    kernel = _launchable(_rms_norm_fwd_kernel, x, weight)
    x2 = _as_rows(x)  # (R, D)
    R, D = x2.shape
    if weight.shape != (D,):
        raise ValueError(f"RMSNorm weight of shape {tuple(weight.shape)} does not match width {D}")
    y = torch.empty((R, D), dtype=x.dtype, device=x.device)  # (R, D)
    rstd = torch.empty(R, dtype=torch.float32, device=x.device)  # (R,)
    if R:
        block, num_warps = calculate_settings(D)
        kernel[(R,)](
            y, y.stride(0), x2, x2.stride(0), weight.contiguous(), rstd, D, eps,
            BLOCK_SIZE=block, num_warps=num_warps,
        )
    return y.view(x.shape), x2, rstd


def rms_norm_backward(dy: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor):
    """Launch the backward kernel: dy (..., D) → dx (R, D) in x's dtype, dw (D,) in w's dtype."""
    dy2 = _as_rows(dy)  # (R, D)
    R, D = x2.shape
    dx = torch.empty((R, D), dtype=x2.dtype, device=x2.device)  # (R, D)
    if R == 0:
        return dx, torch.zeros_like(weight)
    programs = min(R, _num_bwd_programs(x2.device))
    dw_partial = torch.empty((programs, D), dtype=torch.float32, device=x2.device)  # (P, D), every row written
    block, num_warps = calculate_settings(D)
    _jit(_rms_norm_bwd_kernel)[(programs,)](
        dx, dx.stride(0), dy2, dy2.stride(0), x2, x2.stride(0), weight.contiguous(), rstd,
        dw_partial, R, D, -(-R // programs),  # ceil(R / P) rows each
        BLOCK_SIZE=block, num_warps=num_warps,
    )
    return dx, dw_partial.sum(dim=0).to(weight.dtype)  # (R, D), (D,)


class RMSNormFunction(torch.autograd.Function):
    """y = rms_norm(x, w) through the kernels; saves x (as rows), w and the per-row r."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        y, x2, rstd = rms_norm_forward(x, weight, eps)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.x_shape = x.shape
        return y

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        dx, dw = rms_norm_backward(dy, x2, weight, rstd)
        return dx.view(ctx.x_shape), dw, None


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The PyTorch path: the same maths in fp32 whatever the input dtype, cast back once."""
    y = F.rms_norm(x.float(), (x.shape[-1],), weight.float(), eps)
    return y.to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dim: y = x / sqrt(mean(x²) + eps) · weight (Zhang & Sennrich 2019).

    Accumulates in fp32 whatever the input dtype; y has x's dtype, dweight has weight's.
    """
    if _use_triton(x):
        return RMSNormFunction.apply(x, weight, eps)
    return rms_norm_reference(x, weight, eps)


#################################################################################
#                                   SwiGLU                                      #
#################################################################################


def _swiglu_fwd_kernel(C_ptr, C_row_stride, A_ptr, A_row_stride, B_ptr, B_row_stride, n_cols,
                       BLOCK_SIZE: tl.constexpr):
    """One row per program: c = silu(a) · b = a · σ(a) · b, in fp32, rounded once on store."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_SIZE)
    mask = cols < n_cols
    a = tl.load(A_ptr + row * A_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B_ptr + row * B_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    c = a * tl.sigmoid(a) * b
    tl.store(C_ptr + row * C_row_stride + cols, c.to(C_ptr.dtype.element_ty), mask=mask)


def _swiglu_bwd_kernel(dA_ptr, dB_ptr, dC_ptr, dC_row_stride, A_ptr, A_row_stride, B_ptr, B_row_stride, n_cols,
                       BLOCK_SIZE: tl.constexpr):
    """One row per program. With s = σ(a) and silu(a) = a·s, and σ' = s(1 - s):

        db = dc · silu(a)
        da = dc · b · d silu/da = dc · b · (s + a·s·(1 - s)) = dc · b · (s + silu(a)·(1 - s))

    σ(a) is recomputed from a here instead of being saved by the forward pass: eager PyTorch
    keeps silu(a) alive as a third (R, F) activation; one exp per element is much cheaper
    than writing and re-reading it. dA and dB are fresh buffers (Liger overwrites a and b in
    place to save memory, which breaks anyone else holding those tensors).
    """
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_SIZE)
    mask = cols < n_cols
    dc = tl.load(dC_ptr + row * dC_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    a = tl.load(A_ptr + row * A_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B_ptr + row * B_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(a)
    silu = a * s
    db = dc * silu
    da = dc * b * (s + silu * (1.0 - s))
    tl.store(dA_ptr + row * n_cols + cols, da.to(dA_ptr.dtype.element_ty), mask=mask)
    tl.store(dB_ptr + row * n_cols + cols, db.to(dB_ptr.dtype.element_ty), mask=mask)


def swiglu_forward(gate: torch.Tensor, up: torch.Tensor):
    """Launch the forward kernel: gate, up (..., F) → c (..., F); also returns both as rows."""
    kernel = _launchable(_swiglu_fwd_kernel, gate, up)
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"swiglu needs gate and up of one shape and dtype, got "
                         f"{tuple(gate.shape)} {gate.dtype} and {tuple(up.shape)} {up.dtype}")
    a, b = _as_rows(gate), _as_rows(up)  # (R, F) each, read in place when strided
    R, hidden = a.shape
    c = torch.empty((R, hidden), dtype=gate.dtype, device=gate.device)  # (R, F)
    if R:
        block, num_warps = calculate_settings(hidden)
        kernel[(R,)](
            c, c.stride(0), a, a.stride(0), b, b.stride(0), hidden, BLOCK_SIZE=block, num_warps=num_warps,
        )
    return c.view(gate.shape), a, b


def swiglu_backward(dc: torch.Tensor, a: torch.Tensor, b: torch.Tensor):
    """Launch the backward kernel: dc (..., F) → dgate, dup (R, F)."""
    dc2 = _as_rows(dc)  # (R, F)
    R, hidden = a.shape
    da = torch.empty((R, hidden), dtype=a.dtype, device=a.device)  # (R, F)
    db = torch.empty((R, hidden), dtype=b.dtype, device=b.device)  # (R, F)
    if R:
        block, num_warps = calculate_settings(hidden)
        _jit(_swiglu_bwd_kernel)[(R,)](
            da, db, dc2, dc2.stride(0), a, a.stride(0), b, b.stride(0), hidden,
            BLOCK_SIZE=block, num_warps=num_warps,
        )
    return da, db


class SwiGLUFunction(torch.autograd.Function):
    """c = silu(gate) · up through the kernels; saves gate and up only (not silu(gate))."""

    @staticmethod
    def forward(ctx, gate, up):
        c, a, b = swiglu_forward(gate, up)
        ctx.save_for_backward(a, b)
        ctx.shape = gate.shape
        return c

    @staticmethod
    def backward(ctx, dc):
        a, b = ctx.saved_tensors
        da, db = swiglu_backward(dc, a, b)
        return da.view(ctx.shape), db.view(ctx.shape)


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The PyTorch path: silu(gate) · up in the inputs' dtype."""
    return F.silu(gate) * up


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU gate: silu(gate) · up (Shazeer 2020)."""
    if _use_triton(gate):
        return SwiGLUFunction.apply(gate, up)
    return swiglu_reference(gate, up)


#################################################################################
#                                  Modules                                      #
#################################################################################


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
    The matmuls stay cuBLAS's; the kernel fuses the gate between them.
    """

    def __init__(self, dim: int, mlp_ratio: float = 4.0, multiple_of: int = 64):
        super().__init__()
        hidden = int(2 * mlp_ratio * dim / 3)
        hidden = multiple_of * ((hidden + multiple_of - 1) // multiple_of)
        self.w_gate_up = nn.Linear(dim, 2 * hidden, bias=False)  # one matmul for both halves
        self.w_down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w_gate_up(x).chunk(2, dim=-1)  # (..., F) each, views: the kernel reads them in place
        return self.w_down(swiglu(gate, up))  # (..., D)


#################################################################################
#          Beyond the paper: fused state mixing (Eq. 4) without the gather      #
#################################################################################


def _mix_states_fwd_kernel(OUT_ptr, OUT_row_stride, S_ptr, S_row_stride, S_state_stride, IDX_ptr, IDX_row_stride,
                           W_ptr, W_row_stride, n_cols, K: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """One token (b, l) per program: out = Σ_{s<k} w_s · S[idx_s], Eq. 4, accumulated in fp32.

    The eager path gathers the k chosen states into a (B, L, k, D) tensor (written to HBM and
    read back) before the weighted sum; here each chosen state row goes straight from the
    stacked (B, L, m, D) states into registers. k is tiny (2) and a compile-time constant,
    so the loop over it is unrolled.
    """
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_SIZE)
    mask = cols < n_cols
    acc = tl.zeros((BLOCK_SIZE,), dtype=tl.float32)
    for s in tl.static_range(K):
        i = tl.load(IDX_ptr + row * IDX_row_stride + s).to(tl.int64)  # which of the m states
        w = tl.load(W_ptr + row * W_row_stride + s).to(tl.float32)
        state = tl.load(S_ptr + row * S_row_stride + i * S_state_stride + cols, mask=mask, other=0.0)
        acc += w * state.to(tl.float32)
    tl.store(OUT_ptr + row * OUT_row_stride + cols, acc.to(OUT_ptr.dtype.element_ty), mask=mask)


def _mix_states_bwd_kernel(dW_ptr, dO_ptr, dO_row_stride, S_ptr, S_row_stride, S_state_stride, IDX_ptr,
                           IDX_row_stride, n_cols, K: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """One token per program: dw_s = ⟨dout, S[idx_s]⟩, since ∂out/∂w_s = S[idx_s].

    Only the weights get a gradient: the states come from the frozen understanding tower
    (the router learns through w alone, Sec. 3.2), so dS is never needed.
    """
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_SIZE)
    mask = cols < n_cols
    g = tl.load(dO_ptr + row * dO_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    for s in tl.static_range(K):
        i = tl.load(IDX_ptr + row * IDX_row_stride + s).to(tl.int64)
        state = tl.load(S_ptr + row * S_row_stride + i * S_state_stride + cols, mask=mask, other=0.0)
        tl.store(dW_ptr + row * K + s, tl.sum(g * state.to(tl.float32), axis=0))


def _states_as_rows(states: torch.Tensor) -> torch.Tensor:
    """(B, L, m, D) → (B·L, m, D) with unit column stride, a view whenever one exists."""
    s3 = states.reshape(-1, states.shape[-2], states.shape[-1])  # (BL, m, D)
    return s3 if s3.stride(-1) == 1 else s3.contiguous()


def mix_states_forward(states: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor):
    """Launch the forward kernel: (B, L, m, D), (B, L, k), (B, L, k) → (B, L, D)."""
    kernel = _launchable(_mix_states_fwd_kernel, states, idx, weights)
    B, L, m, D = states.shape
    k = idx.shape[-1]
    s3, i2, w2 = _states_as_rows(states), _as_rows(idx), _as_rows(weights)  # (BL, m, D), (BL, k), (BL, k)
    out = torch.empty((B * L, D), dtype=states.dtype, device=states.device)  # (BL, D)
    if B * L:
        block, num_warps = calculate_settings(D)
        kernel[(B * L,)](
            out, out.stride(0), s3, s3.stride(0), s3.stride(1), i2, i2.stride(0), w2, w2.stride(0), D,
            K=k, BLOCK_SIZE=block, num_warps=num_warps,
        )
    return out.view(B, L, D), s3, i2


def mix_states_backward(dout: torch.Tensor, s3: torch.Tensor, i2: torch.Tensor):
    """Launch the backward kernel: dout (B, L, D) → dweights (B·L, k) in fp32."""
    d2 = _as_rows(dout)  # (BL, D)
    BL, k = i2.shape
    D = s3.shape[-1]
    dw = torch.empty((BL, k), dtype=torch.float32, device=dout.device)  # (BL, k)
    if BL:
        block, num_warps = calculate_settings(D)
        _jit(_mix_states_bwd_kernel)[(BL,)](
            dw, d2, d2.stride(0), s3, s3.stride(0), s3.stride(1), i2, i2.stride(0), D,
            K=k, BLOCK_SIZE=block, num_warps=num_warps,
        )
    return dw


class MixStatesFunction(torch.autograd.Function):
    """Eq. 4 through the kernels; gradient for the weights only (the states are frozen)."""

    @staticmethod
    def forward(ctx, states, idx, weights):
        out, s3, i2 = mix_states_forward(states, idx, weights)
        ctx.save_for_backward(s3, i2)
        ctx.w_shape, ctx.w_dtype = weights.shape, weights.dtype
        return out

    @staticmethod
    def backward(ctx, dout):
        s3, i2 = ctx.saved_tensors
        dw = mix_states_backward(dout, s3, i2)
        return None, None, dw.view(ctx.w_shape).to(ctx.w_dtype)


def mix_states_reference(states: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The gather + weighted sum the kernel replaces (the same maths as router.mix_states)."""
    B, L, m, D = states.shape
    picked = states.gather(2, idx.unsqueeze(-1).expand(B, L, idx.shape[-1], D))  # (B, L, k, D)
    return (weights.unsqueeze(-1).to(states.dtype) * picked).sum(dim=2)  # (B, L, D)


def mix_states_fused(states: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Eq. 4, S_j^c = Σ_{i∈I_j} w̄_ij S_i, for every token, without materialising the gather.

    states (B, L, m, D) frozen · idx (B, L, k) with values in [0, m) · weights (B, L, k)
    → (B, L, D) in the states' dtype. `idx` and `weights` may be strided slices (such as
    `idx[:, :, j]` of the router's (B, L, n, k) output): they are read in place.
    """
    if states.dim() != 4 or idx.shape != states.shape[:2] + idx.shape[-1:] or weights.shape != idx.shape:
        raise ValueError(f"mix_states_fused needs states (B, L, m, D), idx and weights (B, L, k); got "
                         f"{tuple(states.shape)}, {tuple(idx.shape)}, {tuple(weights.shape)}")
    if not _use_triton(states):
        return mix_states_reference(states, idx, weights)
    if states.requires_grad and torch.is_grad_enabled():
        raise ValueError("mix_states_fused treats the states as frozen and gives them no gradient; "
                         "detach them, or use router.mix_states when they must be trained")
    return MixStatesFunction.apply(states, idx, weights)
