"""Training throughput of the ablation generation tower under FSDP2 on one GPU: step time,
images/s, tokens/s, peak memory and MFU, with and without activation checkpointing.

Paper App. A (FSDP, bf16 mixed precision, activation checkpointing). Issue #4's goal: MFU ≥ 50%
on an H100. The model is what `train.py` trains — router R + generation tower G of the
`ablation` preset (~1B, D 2048 × 20 blocks) — sharded exactly as train.py shards it
(`distributed.shard_model`: fully_shard per generation block and router block, then the root;
bf16 parameters, fp32 gradient reduction), at 512² in Wan 2.2 latent space: 16× VAE, patch 2
→ 32×32 latents → 256 image tokens (+4 registers), L = 77 context tokens of the LLaMA-3.2-3B
tower's m = 29 states. The understanding tower and the VAE are not run (their outputs are
random tensors of the right shapes): this measures R + G, forward + backward + AdamW.

    python bench/train_throughput.py                       # on a GPU: both AC settings
    python bench/train_throughput.py --batch 64 --act-ckpt on
    python bench/train_throughput.py --dry                 # CPU: the FLOP count only

MFU = model FLOPs per step / step time / peak bf16 FLOP/s (989 TFLOP/s dense for an H100
SXM; pass --peak-tflops for another GPU). Model FLOPs are counted by PyTorch's FlopCounterMode
over one forward AND backward on the meta device (matmuls and attention; elementwise ops are
not counted), so the recomputation that activation checkpointing adds is NOT counted — MFU
then shows what checkpointing costs.

NOTE: NOT RUN YET. This project's machine has no GPU; only `--dry` (the FLOP count) has
been run, on CPU. The GPU path is written against torch 2.13's FSDP2 API, untested.
"""

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import checkpoint  # noqa: E402
import distributed  # noqa: E402
import presets  # noqa: E402
import sizing  # noqa: E402
import train  # noqa: E402
from gen_tower import codec_shape  # noqa: E402


def inputs(preset, batch: int, context_len: int, device, dtype=torch.float32):
    """Random stand-ins for one training batch: z_t (B, C, h, w), t (B,), states (B, L, m, D_u),
    mask (B, L), the velocity target (B, C, h, w)."""
    m = preset.model
    C, f = codec_shape(m.codec)
    h = w = m.image_size // f
    with torch.device(device):
        z_t = torch.randn(batch, C, h, w)
        t = torch.rand(batch)
        states = torch.randn(batch, context_len, m.und_states, m.und_dim, dtype=dtype)
        mask = torch.ones(batch, context_len, dtype=torch.bool)
        target = torch.randn(batch, C, h, w)
    return z_t, t, states, mask, target


def model_flops(preset, batch: int, context_len: int) -> int:
    """Matmul + attention FLOPs of one training step (forward + backward) on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    model = checkpoint.build_model(preset.model, device="meta").train()
    z_t, t, states, mask, target = inputs(preset, batch, context_len, "meta")
    with FlopCounterMode(display=False) as counter:
        v = model(z_t, t, states, mask, model.routing_draws(*mask.shape))
        (v.float() - target).pow(2).mean().backward()
    return counter.get_total_flops()


def bench(preset, batch: int, steps: int, warmup: int, context_len: int, act_ckpt: bool) -> dict:
    """FSDP2 on one GPU (a 1-process group), bf16; → timings and peak memory."""
    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29512")
    if not dist.is_initialized():
        dist.init_process_group("nccl", rank=0, world_size=1)
    torch.cuda.set_device(0)
    torch.manual_seed(0)
    model = distributed.shard_model(checkpoint.build_model(preset.model, device="meta"), act_ckpt=act_ckpt, bf16=True)
    model.to_empty(device="cuda")
    with torch.no_grad():
        for p in model.parameters():  # any finite weights do for timing
            p.normal_(0.0, 0.02)
    opt = train.make_optimizer(model, preset.train)
    # The states enter in bf16: U runs in bf16 (App. A), so that is what training reads.
    z_t, t, states, mask, target = inputs(preset, batch, context_len, "cuda", dtype=torch.bfloat16)
    torch.cuda.reset_peak_memory_stats()

    def step():
        v = model(z_t, t, states, mask, model.routing_draws(*mask.shape))
        loss = (v.float() - target).pow(2).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    peak = torch.cuda.max_memory_allocated() / 1024 ** 3
    del model, opt
    torch.cuda.empty_cache()
    return {"step_s": dt, "peak_gib": peak}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="ablation")
    p.add_argument("--batch", type=int, default=32, help="images per step on the one GPU")
    p.add_argument("--steps", type=int, default=30, help="timed steps")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (allocator, cuBLAS autotune)")
    p.add_argument("--context", type=int, default=77, help="L, context tokens per prompt")
    p.add_argument("--act-ckpt", choices=("both", "on", "off"), default="both")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU (H100 SXM: 989)")
    p.add_argument("--dry", action="store_true", help="count the FLOPs on the meta device only (runs on CPU)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)

    preset = presets.get_preset(args.preset)
    tokens = sizing.image_tokens(preset.model, preset.model.image_size)
    flops = model_flops(preset, args.batch, args.context)
    sizes = sizing.dry_run(preset)
    print(f"{args.preset}: G {sizes['generation_tower'] / 1e9:.3f}B + R {sizes['router'] / 1e6:.1f}M parameters, "
          f"{preset.model.image_size}² → {tokens} image tokens, L = {args.context}, batch {args.batch}")
    print(f"model FLOPs per training step (fwd + bwd): {flops / 1e12:.2f} TFLOP "
          f"({flops / args.batch / 1e9:.1f} GFLOP per image)")
    results = {"preset": args.preset, "batch": args.batch, "image_tokens": tokens, "context": args.context,
               "step_flops": flops, "runs": []}
    if args.dry:
        print("--dry: no GPU run")
    else:
        if not torch.cuda.is_available():
            print("error: no CUDA GPU (use --dry for the FLOP count)", file=sys.stderr)
            return 2
        for ckpt in {"both": (False, True), "on": (True,), "off": (False,)}[args.act_ckpt]:
            r = bench(preset, args.batch, args.steps, args.warmup, args.context, ckpt)
            r.update(act_ckpt=ckpt, images_per_s=args.batch / r["step_s"], tokens_per_s=args.batch * tokens / r["step_s"],
                     mfu=flops / r["step_s"] / (args.peak_tflops * 1e12))
            results["runs"].append(r)
            print(f"act-ckpt {'on ' if ckpt else 'off'}: step {1000 * r['step_s']:.1f} ms · {r['images_per_s']:.1f} img/s"
                  f" · {r['tokens_per_s']:.0f} image tokens/s · peak {r['peak_gib']:.1f} GiB · MFU {100 * r['mfu']:.1f}%"
                  f" (of {args.peak_tflops:g} TFLOP/s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
