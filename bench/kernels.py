"""Benchmark the Triton kernels of kernels.py on a GPU: time and achieved memory bandwidth.

Paper, App. A ("Triton Kernel Optimization"): MoS trains with Triton RMSNorm and fused FFN
kernels built on Liger-Kernel. This script measures ours at the shapes of the `mos_s`
generation tower (train.py: width D = 3072, 24 heads of 128; SwiGLU hidden width F =
`SwiGLU(3072, 4.0)`'s = 8192), 4096 tokens per sample × batch, against

    eager     the PyTorch reference beside each kernel in kernels.py
    compile   torch.compile of that same reference (Inductor writes its own Triton kernel)
    liger     Liger-Kernel's LigerRMSNormFunction / LigerSiLUMulFunction, when installed
    triton    ours (kernels.RMSNormFunction, SwiGLUFunction, MixStatesFunction)

for forward, backward and forward + backward, and prints a markdown table, headed by the
command that produced it.

Targets on an H100 (issue 5): RMSNorm fwd+bwd ≥ 3× eager and ≥ 80% of HBM bandwidth; both
RMSNorm and SwiGLU ≥ 1.0× Liger. The script checks them at the end of the table.

Bandwidth is *effective*: the bytes an ideal fused kernel must move (each input read once,
each output written once) divided by the time, so a slower implementation that moves more
bytes scores lower, as it should:
    RMSNorm  fwd: read x, write y (+ r, 4 B/row)    bwd: read x, dy (+ r), write dx    → 5·R·D·s
    SwiGLU   fwd: read a, b, write c                bwd: read dc, a, b, write da, db   → 8·R·F·s
    mixing   fwd: read k states, write out          bwd: read dout, k states           → 2(k+1)·B·L·D·s
(s = bytes per element; the dweight reductions are O(D) and left out.)

Beyond the paper, the fused state mixing (Eq. 4) is timed against the gather + weighted sum
of router.mix_states it would replace: mos_s states projected to the generation width
(m = 33 states of D = 3072), L context tokens, k = 2.

Usage (on a GPU machine):
    python bench/kernels.py                       # batch 2, 4, 8; bf16
    python bench/kernels.py --batch 4 --ops rms_norm swiglu --dtype fp32
"""

import argparse
import os
import sys

# This file is itself called kernels.py: make sure `import kernels` finds the repository's.
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path = [ROOT] + [p for p in sys.path if os.path.abspath(p or os.curdir) != HERE]

import torch  # noqa: E402

import kernels  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Peak HBM bandwidth by device name, GB/s (vendor figures), for the "% peak" column.
PEAK_GBS = {"H100 80GB HBM3": 3350, "H100 SXM": 3350, "H100 NVL": 3900, "H100 PCIe": 2000, "H200": 4800,
            "A100-SXM4-80GB": 2039, "A100-SXM4-40GB": 1555, "A100 80GB PCIe": 1935}

# mos_s generation tower (presets.py PRESETS["mos_s"]): D_g = 3072, 24 heads, m = 33 states.
WIDTH, HEADS, STATES, TOKENS = 3072, 24, 33, 4096
DEVICE = "cuda"


def peak_bandwidth(name: str, override: float | None) -> float | None:
    if override:
        return override
    return next((gbs for key, gbs in PEAK_GBS.items() if key in name), None)


def optional_liger():
    """Liger-Kernel's autograd Functions for the two ops, or None when it is not installed."""
    try:
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction
    except ImportError:
        return None
    return {"rms_norm": lambda x, w, eps: LigerRMSNormFunction.apply(x, w, eps),
            "swiglu": LigerSiLUMulFunction.apply}


#################################################################################
#                        One op: inputs, implementations, bytes                 #
#################################################################################


def rms_norm_case(rows: int, dim: int, dtype, liger):
    x = torch.randn(rows, dim, device=DEVICE, dtype=dtype, requires_grad=True)
    w = torch.empty(dim, device=DEVICE, dtype=dtype).uniform_(0.5, 1.5).requires_grad_(True)
    impls = {
        "eager": lambda: kernels.rms_norm_reference(x, w, 1e-6),
        "compile": lambda: COMPILED["rms_norm"](x, w, 1e-6),
        "triton": lambda: kernels.RMSNormFunction.apply(x, w, 1e-6),
    }
    if liger:
        impls["liger"] = lambda: liger["rms_norm"](x, w, 1e-6)
    s = x.element_size()
    return impls, [x, w], 5 * rows * dim * s + 8 * rows


def swiglu_case(rows: int, hidden: int, dtype, liger):
    # gate and up as the two halves of one fused matmul output, exactly as SwiGLU.forward has them
    gate_up = torch.randn(rows, 2 * hidden, device=DEVICE, dtype=dtype)
    gate, up = (t.detach().requires_grad_(True) for t in gate_up.chunk(2, dim=-1))
    impls = {
        "eager": lambda: kernels.swiglu_reference(gate, up),
        "compile": lambda: COMPILED["swiglu"](gate, up),
        "triton": lambda: kernels.SwiGLUFunction.apply(gate, up),
    }
    if liger:
        # Liger wants contiguous inputs and overwrites them in backward: give it its own copies
        a, b = (t.detach().contiguous().requires_grad_(True) for t in (gate, up))
        impls["liger"] = lambda: liger["swiglu"](a, b)
        return impls, [gate, up, a, b], 8 * rows * hidden * gate.element_size()
    return impls, [gate, up], 8 * rows * hidden * gate.element_size()


def mix_states_case(batch: int, ctx: int, dtype, k: int = 2):
    states = torch.randn(batch, ctx, STATES, WIDTH, device=DEVICE, dtype=dtype)  # frozen, projected states
    logits = torch.randn(batch, ctx, STATES, device=DEVICE)
    idx = logits.topk(k, dim=-1).indices  # (B, L, k)
    w = logits.softmax(-1).gather(-1, idx).requires_grad_(True)  # (B, L, k)
    impls = {
        "eager": lambda: kernels.mix_states_reference(states, idx, w),
        "compile": lambda: COMPILED["mix_states"](states, idx, w),
        "triton": lambda: kernels.MixStatesFunction.apply(states, idx, w),
    }
    return impls, [w], 2 * (k + 1) * batch * ctx * WIDTH * states.element_size()


COMPILED = {}


def compile_references():
    COMPILED["rms_norm"] = torch.compile(kernels.rms_norm_reference, dynamic=False)
    COMPILED["swiglu"] = torch.compile(kernels.swiglu_reference, dynamic=False)
    COMPILED["mix_states"] = torch.compile(kernels.mix_states_reference, dynamic=False)


#################################################################################
#                                    Timing                                     #
#################################################################################


def time_impl(fn, leaves):
    """Median ms of forward, backward and forward + backward, via triton.testing.do_bench
    (which also flushes L2 between runs, so every run reads from HBM)."""
    from triton.testing import do_bench

    y = fn()
    dy = torch.randn_like(y)
    fwd = do_bench(fn, grad_to_none=leaves, return_mode="median")
    bwd = do_bench(lambda: y.backward(dy, retain_graph=True), grad_to_none=leaves, return_mode="median")
    both = do_bench(lambda: fn().backward(dy), grad_to_none=leaves, return_mode="median")
    return fwd, bwd, both


def check_close(impls, leaves) -> str | None:
    """Our kernel's output and input grads equal eager's before any timing (a benchmark of a
    wrong kernel is worthless). bf16 tolerance as in tests/test_kernels.py. → None when they
    agree, else what went wrong (the case is then reported and skipped, not timed)."""
    results = {}
    for name in ("eager", "triton"):
        for t in leaves:
            t.grad = None
        y = impls[name]()
        torch.manual_seed(0)
        y.backward(torch.randn_like(y))
        results[name] = [y.detach().float()] + [t.grad.float() for t in leaves if t.grad is not None]
    for got, want in zip(results["triton"], results["eager"]):
        err = ((got - want).abs().max() / want.abs().max()).item()
        if err > 1.6e-2:
            return f"triton disagrees with eager (normwise error {err:.2e})"
    for t in leaves:
        t.grad = None
    return None


def main(args) -> None:
    if not torch.cuda.is_available():
        raise SystemExit("bench/kernels.py needs a CUDA GPU (none found); the kernels are tested on CPU "
                         "by `python -m pytest tests/test_kernels.py`")
    dtype = DTYPES[args.dtype]
    device_name = torch.cuda.get_device_name()
    peak = peak_bandwidth(device_name, args.peak_gbs)
    liger = optional_liger()
    compile_references()
    import triton

    hidden = _swiglu_hidden()
    def emit(*lines):  # print as we go: a run cut short still shows the rows it measured
        print("\n".join(lines), flush=True)

    emit(
        f"`{' '.join(['python', 'bench/kernels.py'] + sys.argv[1:])}`",
        "",
        f"{device_name} · torch {torch.__version__} · triton {triton.__version__} · "
        f"liger-kernel {_version('liger-kernel') if liger else 'not installed'} · {args.dtype} · "
        f"peak HBM {peak or '?'} GB/s · medians of triton.testing.do_bench",
        "",
        "| op | shape | impl | fwd ms | bwd ms | fwd+bwd ms | GB/s | % peak | × eager | × Liger |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    )
    verdicts = []
    for batch in args.batch:
        rows = TOKENS * batch
        cases = []  # (op, shape, factory): inputs are built one case at a time, then freed
        if "rms_norm" in args.ops:
            cases.append(("rms_norm", f"{rows}×{WIDTH}", lambda: rms_norm_case(rows, WIDTH, dtype, liger)))
            # QK-norm: one row per (token, head); in the model q is a strided view and gets copied
            cases.append(("rms_norm (QK)", f"{rows * HEADS}×{WIDTH // HEADS}",
                          lambda: rms_norm_case(rows * HEADS, WIDTH // HEADS, dtype, liger)))
        if "swiglu" in args.ops:
            cases.append(("swiglu", f"{rows}×{hidden}", lambda: swiglu_case(rows, hidden, dtype, liger)))
        if "mix_states" in args.ops:
            cases.append(("mix_states", f"{batch}×{args.ctx}×{STATES}×{WIDTH}, k=2",
                          lambda: mix_states_case(batch, args.ctx, dtype)))
        for op, shape, factory in cases:
            impls, leaves, nbytes = factory()
            try:
                wrong = check_close(impls, leaves)
            except Exception as e:  # noqa: BLE001 — e.g. a kernel that does not compile on this GPU
                wrong = f"{type(e).__name__}: {str(e)[:80]}"
            if wrong:
                emit(f"| {op} | {shape} | triton | {wrong} |||||||")
                verdicts.append((f"{op} b{batch}: triton agrees with eager", False))
                continue
            times = {}
            for name, fn in impls.items():
                try:
                    times[name] = time_impl(fn, leaves)
                except Exception as e:  # noqa: BLE001 — a baseline that fails is reported, not fatal
                    if name in ("eager", "triton"):
                        raise
                    emit(f"| {op} | {shape} | {name} | failed: {type(e).__name__}: {str(e)[:60]} |||||||")
            for name, (fwd, bwd, both) in times.items():
                gbs = nbytes / both / 1e6  # bytes / ms → GB/s
                pct = f"{100 * gbs / peak:.0f}%" if peak else "–"
                vs_eager = times["eager"][2] / both
                vs_liger = f"{times['liger'][2] / both:.2f}" if "liger" in times else "–"
                emit(f"| {op} | {shape} | {name} | {fwd:.3f} | {bwd:.3f} | {both:.3f} | {gbs:.0f} | "
                             f"{pct} | {vs_eager:.2f} | {vs_liger} |")
            ours = times["triton"][2]
            if op == "rms_norm":
                verdicts.append((f"rms_norm b{batch}: ≥ 3× eager", times["eager"][2] / ours >= 3.0))
                if peak:
                    verdicts.append((f"rms_norm b{batch}: ≥ 80% of HBM", nbytes / ours / 1e6 >= 0.8 * peak))
            if op in ("rms_norm", "swiglu") and "liger" in times:
                verdicts.append((f"{op} b{batch}: ≥ 1.0× Liger", times["liger"][2] / ours >= 1.0))
            del impls, leaves
            torch.cuda.empty_cache()
    emit("", *[f"- {'met' if ok else 'MISSED'}: {what}" for what, ok in verdicts])


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "?"


def _swiglu_hidden() -> int:
    with torch.device("meta"):  # the module's own rounding rule, without allocating its weights
        return kernels.SwiGLU(WIDTH, 4.0).w_down.in_features


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=[2, 4, 8], help="samples of 4096 tokens (default 2 4 8)")
    p.add_argument("--ops", nargs="+", default=["rms_norm", "swiglu", "mix_states"],
                   choices=["rms_norm", "swiglu", "mix_states"])
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    p.add_argument("--ctx", type=int, default=512, help="context tokens L for mix_states (default 512)")
    p.add_argument("--peak-gbs", type=float, default=None, help="peak HBM GB/s, if the device is not in the table")
    return p.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
