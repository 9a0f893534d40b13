"""Where a toy training step's time goes on a CPU, per batch size — and what torch.compile buys.

Not a paper figure: this backs docs/experiments.md §3–§4 (batch size, step cost). At a fixed wall-clock
budget a smaller batch buys more optimizer steps only while a step's cost scales with the batch;
once fixed per-step costs (Python, dispatch, hundreds of small kernels, the optimizer, the EMA)
dominate, halving the batch stops halving the step and the lever becomes those costs (fused
AdamW, torch.compile). On the 2-core CPU the toy trains on, the cost per image is flat from
batch 64 down to 16 and rises ~20% at batch 8.

It times the per-step work of `train.train` — `data.shapes_batch` (render the batch),
`train.training_step` + backward (U through a per-caption memo, fresh for each setting so no
setting inherits another's encoded captions; Algorithm 1's R + G forward),
gradient clipping, AdamW (`train.make_optimizer`'s for-loop form, and the fused form train.py
now uses in a plain process), the EMA update — on the `toy` preset, from random weights. Times are means over
the steps after a warm-up; compare ratios within one run, not across machines.

    python bench/toy_step.py                          # batch 8, 16, 32, 64 + compile at 8
    python bench/toy_step.py --batch 8 --compile-batch 0 --steps 30
    python bench/toy_step.py --batch 8 --compile-batch 0 --bf16-batch 8   # + bf16 autocast
"""

import argparse
import copy
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root

import checkpoint  # noqa: E402
import presets  # noqa: E402
import train  # noqa: E402
from gen_tower import load_codec  # noqa: E402
from und_tower import TowerMemo, load_tower  # noqa: E402


def time_steps(preset, batch, steps, warmup, und, codec, compiled=False, bf16=False):
    """→ dict of mean ms per step for each part, over `steps` steps after `warmup`."""
    torch.manual_seed(0)
    tower = TowerMemo(und)  # empty: every setting encodes its own captions, as a run does
    model = checkpoint.build_model(preset.model).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    fwd = torch.compile(model) if compiled else model  # the weights stay `model`'s
    opt, fused = train.make_optimizer(model, preset.train), train.make_optimizer(model, preset.train, fused=True)
    batch_fn = train.make_data("shapesworld", preset.model, 0)
    parts = dict.fromkeys(["data", "fwd+bwd", "clip", "adamw", "adamw fused", "ema"], 0.0)
    first = 0.0
    for step in range(warmup + steps):
        t = [time.perf_counter()]
        b = batch_fn(step, batch)
        t.append(time.perf_counter())
        opt.zero_grad(set_to_none=True)
        # bf16: the matrix products in bfloat16 (oneDNN's AVX-512 BF16 path where the CPU has one).
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, _, _ = train.training_step(fwd, b, tower, codec, preset, step)
        loss.backward()
        t.append(time.perf_counter())
        torch.nn.utils.clip_grad_norm_(model.parameters(), preset.train.grad_clip)
        t.append(time.perf_counter())
        # Both optimisers step the same weights in turn; only their times are used, and the
        # weights stay finite at this lr, so the forward costs the same as in training.
        opt.step()
        t.append(time.perf_counter())
        fused.step()
        t.append(time.perf_counter())
        train.ema_update(ema, model, preset.train.ema_decay)
        t.append(time.perf_counter())
        if step == 0:
            first = t[2] - t[1]  # includes compilation when compiled
        if step >= warmup:
            for k, (a, z) in zip(parts, zip(t, t[1:])):
                parts[k] += (z - a) / steps * 1000
    parts["first fwd+bwd"] = first * 1000
    return parts


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, nargs="+", default=[8, 16, 32, 64])
    p.add_argument("--steps", type=int, default=40, help="timed steps per setting")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first (compile happens here)")
    p.add_argument("--compile-batch", type=int, default=8, help="also time torch.compile at this batch (0: skip)")
    p.add_argument("--bf16-batch", type=int, default=0, help="also time bf16 autocast (eager) at this batch (0: skip)")
    args = p.parse_args(argv)
    preset = presets.PRESETS["toy"]()
    und, codec = load_tower(preset.model.tower), load_codec(preset.model.codec)
    print(f"`python bench/toy_step.py {' '.join(argv if argv is not None else sys.argv[1:])}` "
          f"· torch {torch.__version__} · {torch.get_num_threads()} threads · toy preset, random weights\n")
    # "step" is the step train.py now takes in a plain process: with the fused AdamW.
    print("| batch | data | fwd+bwd | clip | AdamW (for-loop) | AdamW fused | EMA | step (fused AdamW) | images/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = {}
    for B in args.batch:
        r = rows[B] = time_steps(preset, B, args.steps, args.warmup, und, codec)
        step = r["data"] + r["fwd+bwd"] + r["clip"] + r["adamw fused"] + r["ema"]
        print(f"| {B} | {r['data']:.1f} | {r['fwd+bwd']:.1f} | {r['clip']:.1f} | {r['adamw']:.1f} | "
              f"{r['adamw fused']:.1f} | {r['ema']:.1f} | {step:.1f} ms | {B / step * 1000:.0f} |", flush=True)
    if args.compile_batch:
        B = args.compile_batch
        eager = rows.get(B) or time_steps(preset, B, args.steps, args.warmup, und, codec)
        comp = time_steps(preset, B, args.steps, args.warmup, und, codec, compiled=True)
        print(f"\ntorch.compile at batch {B}: forward + backward {eager['fwd+bwd']:.1f} → {comp['fwd+bwd']:.1f} ms "
              f"({eager['fwd+bwd'] / comp['fwd+bwd']:.2f}× faster) after a first step of "
              f"{comp['first fwd+bwd'] / 1000:.0f} s (compilation)")
    if args.bf16_batch:
        B = args.bf16_batch
        eager = rows.get(B) or time_steps(preset, B, args.steps, args.warmup, und, codec)
        half = time_steps(preset, B, args.steps, args.warmup, und, codec, bf16=True)
        print(f"\nbf16 autocast at batch {B}: forward + backward {eager['fwd+bwd']:.1f} → {half['fwd+bwd']:.1f} ms "
              f"({eager['fwd+bwd'] / half['fwd+bwd']:.2f}× faster)")


if __name__ == "__main__":
    main()
