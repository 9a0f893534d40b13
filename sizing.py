"""Sizing a preset without its weights (`train.py --dry-run`), and whether this machine can train it.

Everything is built on PyTorch's meta device — modules and tensors with shapes and no memory
— so mos_l (a 14B tower, a 5B generation tower) is sized on a laptop in seconds:
  * parameter counts of R and G (`dry_run`) and of U's language model (und_tower.tower_param_count);
  * image tokens N per training stage and aspect bucket (`image_tokens`, `stage_table`, Sec. 3.5);
  * the matmul FLOPs of one denoising step and the router's share of them (`flops_estimate`):
    the paper's "Router Efficiency" claim (Sec. 4.1, Fig. 7) in numbers we can compute;
  * the per-GPU memory of FSDP2 training at a given world size (`memory_estimate`, App. A).

`check_can_train` answers the same question from the other side: before any process builds or
loads billions of parameters, it says in one line what this machine lacks (CUDA GPUs, weights
in the local Hugging Face cache) and what to run instead.

Neighbours: presets.py holds the presets and stages; checkpoint.build_model builds them on
meta; distributed.py is the layout `memory_estimate` prices; train.py's `main` calls
`print_dry_run` and `check_can_train`.

Glossary: N image tokens · L context tokens · D width · P parameters · W world size (GPUs).
"""

import json
import os

import torch

from checkpoint import build_model, count
from gen_tower import WAN22_VAE_HUB_ID, ModelConfig, check_size, codec_shape
from presets import STAGES, Preset, stage_preset


#################################################################################
#                                Sizes and FLOPs                                #
#################################################################################


def print_dry_run(preset: Preset, name: str, world_size: int):
    """`train.py --dry-run`: the sizes (one JSON line among them), the paper-scale report and the
    per-GPU memory at `world_size` GPUs."""
    sizes = dry_run(preset)
    print(f"preset {name}: {preset.about}")
    print(f"  understanding tower  {sizes['tower']}  (m = {sizes['und_states']} states × {sizes['und_dim']})")
    print(f"  generation tower     {sizes['generation_tower'] / 1e6:10.2f} M parameters")
    print(f"  router               {sizes['router'] / 1e6:10.2f} M parameters")
    print(json.dumps(sizes))
    print_scale_report(preset)
    print_memory_report(preset, world_size)


def dry_run(preset: Preset) -> dict:
    """Build router + generation tower on the meta device (no memory, no weights) and report sizes."""
    model = build_model(preset.model, device="meta")
    sizes = {"generation_tower": count(model.gen), "router": count(model.router),
             "und_states": preset.model.und_states, "und_dim": preset.model.und_dim, "tower": preset.model.tower}
    return sizes


def image_tokens(mcfg: ModelConfig, size) -> int:
    """N, the image tokens of one (h, w) (or square `size`) image: codec ×f, then patch p."""
    h, w = (size, size) if isinstance(size, int) else size
    f = codec_shape(mcfg.codec)[1] * mcfg.gen.patch_size
    return (h // f) * (w // f)


def flops_estimate(preset: Preset, size, context_len: int = 77) -> dict:
    """Matmul FLOPs of ONE denoising step (one MoS forward, batch 1) and the router's share.

    Counted with PyTorch's FlopCounterMode (torch.utils.flop_counter) on the meta device: the
    modules and inputs are shapes only, so mos_l at 2048² costs no memory and no time. The
    counter attributes each op to the modules it runs in, so "MoS.router" is R alone (its
    blocks, input tokenizers and logit head) and the rest is G (patch embed, Proj, blocks,
    head). Elementwise ops (norms, softmax, top-k) are not counted — they are a small part of
    both. context_len: L, the context tokens; 77 is UnderstandingTower's default max_length
    for a text prompt. With CFG a step runs the model on 2 rows, which leaves the share alike.
    """
    from torch.utils.flop_counter import FlopCounterMode

    mcfg = preset.model
    h, w = (size, size) if isinstance(size, int) else size
    check_size(h, mcfg.codec, mcfg.gen.patch_size)
    check_size(w, mcfg.codec, mcfg.gen.patch_size)
    model = build_model(mcfg, device="meta").eval()
    C, f = codec_shape(mcfg.codec)
    with torch.device("meta"):
        x_t = torch.empty(1, C, h // f, w // f)  # (1, C, h, w) latent
        t = torch.empty(1)
        states = torch.empty(1, context_len, mcfg.und_states, mcfg.und_dim)  # (1, L, m, D_u)
        mask = torch.ones(1, context_len, dtype=torch.bool)  # (1, L)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x_t, t, states, mask)
    total = counter.get_total_flops()
    router = sum(counter.get_flop_counts().get("MoS.router", {}).values())
    return {"size": [h, w], "image_tokens": image_tokens(mcfg, (h, w)), "context_tokens": context_len,
            "step_flops": total, "router_flops": router, "router_share": router / total}


def stage_table(preset: Preset, context_len: int = 77) -> list[dict]:
    """Per training stage (Sec. 3.5): resolution, image tokens (square, and the range over the
    aspect-ratio buckets at that area) and the router's FLOPs share at the square size."""
    import data

    rows, by_size = [], {}
    for stage in STAGES:
        s = stage_preset(preset, stage)
        size = s.model.image_size
        buckets = data.make_buckets(size * size, codec_shape(s.model.codec)[1] * s.model.gen.patch_size)
        n = [image_tokens(s.model, hw) for hw in buckets]
        if size not in by_size:  # stages 2 and 3 share 1024²
            by_size[size] = flops_estimate(s, size, context_len)
        est = by_size[size]
        rows.append({"stage": stage, "size": size, "image_tokens": est["image_tokens"], "bucket_tokens": [min(n), max(n)],
                     "t_sampler": f"{s.train.t_sampler} (shift {s.train.t_shift:g})", "steps": s.train.steps,
                     "step_tflops": est["step_flops"] / 1e12, "router_share": est["router_share"]})
    return rows


def print_scale_report(preset: Preset, context_len: int = 77):
    """--dry-run lines for the paper's scale: U's size (its LM on meta), image tokens and the
    router's FLOPs share per stage. Nothing is loaded; a custom tower path has no known size."""
    from und_tower import LM_CONFIGS, tower_param_count

    name = preset.model.tower
    if name == "minilm" or name in LM_CONFIGS:
        print(f"  und. tower LM        {tower_param_count(name) / 1e6:10.2f} M parameters (meta, frozen, "
              f"{preset.train.tower_dtype or 'float32'}; a VLM's vision encoder not counted)")
    if preset.model.codec != "wan2.2":
        est = flops_estimate(preset, preset.model.image_size, context_len)
        print(f"  router FLOPs share at {preset.model.image_size}² ({est['image_tokens']} image tokens, "
              f"L = {context_len}): {100 * est['router_share']:.2f}% of one denoising step")
        return
    print(f"  stages (Sec. 3.5); router share = router / whole MoS matmul FLOPs of one step, batch 1, L = {context_len}:")
    print(f"  {'stage':>5} {'size':>6} {'image tokens':>13} {'buckets':>11} {'t sampler':>22} {'steps':>8}"
          f" {'TFLOP/step':>11} {'router':>7}")
    for r in stage_table(preset, context_len):
        print(f"  {r['stage']:>5} {r['size']:>5}² {r['image_tokens']:>13} {'%d–%d' % tuple(r['bucket_tokens']):>11}"
              f" {r['t_sampler']:>22} {r['steps']:>8} {r['step_tflops']:>11.2f} {100 * r['router_share']:>6.2f}%")


#################################################################################
#                             Memory per GPU (FSDP2)                            #
#################################################################################


def memory_estimate(preset: Preset, world_size: int, act_ckpt: bool, micro_batch: int | None = None,
                    context_len: int = 77) -> dict:
    """Per-GPU memory (GiB) of FSDP2 training at `world_size`, by part. An estimate:

    sharded (÷ W)  fp32 parameters 4P, gradients 4P, AdamW moments 8P, EMA 4P  (16P+4P bytes)
    gathered       bf16 copies of the blocks being used: the current and the prefetched
                   block, forward and backward (2 × 2 bytes × block params), plus the root's
                   unsharded parameters in bf16 (reshard of the root happens after backward)
    U              the frozen understanding tower's LM (und_tower.tower_param_count), bf16,
                   replicated on every GPU (0 with --features; a VLM's vision encoder not counted)
    activations    per micro-batch row, bf16: a generation block keeps ≈ 22·D values per token
                   of its S = R + N stream (inputs of norms, qkv, q/k after norm and RoPE,
                   attention output, SwiGLU gate/up/product) plus ≈ 4·D per context token (L),
                   and the mixed context; with activation checkpointing only each block's input
                   (D per token) is kept, plus one block's full set while it is recomputed.
                   The (B, L, m, D_u) understanding states are counted too (fp32 in, bf16 copy).
    Not counted: the allocator's fragmentation, NCCL buffers, the VAE (fp32, ~1 GB for Wan 2.2
    or 0 with the latent cache), CUDA context (~0.5 GB). Leave ~10-15% headroom.
    """
    from und_tower import LM_CONFIGS, tower_param_count

    mcfg, tcfg = preset.model, preset.train
    model = build_model(mcfg, device="meta")
    P = count(model)
    P_und = tower_param_count(mcfg.tower) if mcfg.tower == "minilm" or mcfg.tower in LM_CONFIGS else 0
    block = count(model.gen.blocks[0])
    root = P - block * len(model.gen.blocks) - sum(count(b) for b in getattr(model.router, "blocks", []))
    per_rank = max(1, tcfg.batch_size // world_size)
    mb = micro_batch or tcfg.micro_batch or per_rank
    D, n = mcfg.gen.dim, mcfg.gen.depth
    S = mcfg.gen.registers + image_tokens(mcfg, mcfg.image_size)  # stream tokens per row
    L = context_len
    gib = 1024 ** 3
    per_block = 2 * (22 * D * S + 4 * D * L + D * L)  # bytes per row, bf16, one block fully saved
    if act_ckpt:
        acts = mb * (n * 2 * D * S + per_block)  # inputs of all blocks + one recomputed block
    else:
        acts = mb * n * per_block
    states = mb * L * mcfg.und_states * mcfg.und_dim * (4 + 2)
    out = {
        "world_size": world_size, "micro_batch": mb, "image_tokens": S - mcfg.gen.registers, "params": P,
        "params_grads_adam_ema": 20 * P / world_size / gib,
        "gathered_bf16": (2 * 2 * 2 * block + 2 * root) / gib,
        "understanding_tower_bf16": 2 * P_und / gib,
        "activations": acts / gib,
        "states": states / gib,
        "act_ckpt": act_ckpt,
    }
    out["total"] = sum(out[k] for k in ("params_grads_adam_ema", "gathered_bf16", "understanding_tower_bf16",
                                        "activations", "states"))
    return out


def print_memory_report(preset: Preset, world_size: int):
    """--dry-run lines: per-GPU memory at --world-size W, with and without activation checkpointing."""
    if world_size < 1:
        raise ValueError(f"--world-size must be >= 1, got {world_size}")
    for ckpt in (False, True):
        m = memory_estimate(preset, world_size, ckpt)
        print(f"  memory per GPU, {world_size} GPUs, micro-batch {m['micro_batch']}, {m['image_tokens']} image tokens, "
              f"activation checkpointing {'on' if ckpt else 'off'}: {m['total']:.1f} GiB = "
              f"{m['params_grads_adam_ema']:.1f} params+grads+Adam+EMA (sharded) + {m['gathered_bf16']:.1f} gathered bf16 "
              f"+ {m['understanding_tower_bf16']:.1f} U (bf16) + {m['activations']:.1f} activations + {m['states']:.1f} states")


#################################################################################
#                           Can this machine train it?                          #
#################################################################################


def hub_cached(repo_id: str, *files: str, cache_dir: str | None = None) -> bool:
    """Are these files of a Hugging Face hub repo in the local cache? No network. A file may be
    'a|b', either will do (a sharded model's index or one weights file)."""
    from huggingface_hub import try_to_load_from_cache

    return all(any(isinstance(try_to_load_from_cache(repo_id, f, cache_dir=cache_dir), str) for f in alt.split("|"))
               for alt in files)


def check_can_train(preset: Preset, what: str, device: str, features: str | None = None,
                    latents: str | None = None) -> None:
    """Stop before any process builds or loads billions of parameters when this machine cannot
    train `preset`: one ValueError saying what is missing and what to run instead.

    A full preset (Wan 2.2 latent space: ablation, mos_s, mos_l) needs CUDA GPUs; a tower other
    than the embedded MiniLM (unless --features replaces it) and the Wan VAE (unless --latents
    replaces it) need their weights in the local Hugging Face cache, or a network to fetch them
    (not with HF_HUB_OFFLINE). Looks only at the local cache. The toy needs none of it.
    """
    from und_tower import TOWERS

    mcfg = preset.model
    offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    needs, lacks = [], []
    if mcfg.codec == "wan2.2":
        needs.append("CUDA GPUs")
        if not (str(device).startswith("cuda") and torch.cuda.is_available()):
            lacks.append("this machine has no CUDA GPU" if not torch.cuda.is_available() else f"--device is {device}")
    weights = []  # (hub id, files that must be cached)
    if not features and mcfg.tower != "minilm" and not os.path.isdir(os.path.expanduser(mcfg.tower)):
        hub_id = TOWERS[mcfg.tower].hub_id if mcfg.tower in TOWERS else mcfg.tower
        weights.append((hub_id, ("config.json", "model.safetensors.index.json|model.safetensors")))
    if mcfg.codec == "wan2.2" and not latents:
        weights.append((WAN22_VAE_HUB_ID, ("vae/config.json", "vae/diffusion_pytorch_model.safetensors")))
    if weights:
        needs.append("the weights of " + " and ".join(hub_id for hub_id, _ in weights))
    absent = [hub_id for hub_id, files in weights if offline and not hub_cached(hub_id, *files)]
    if absent:
        lacks.append(f"{' and '.join(absent)} {'is' if len(absent) == 1 else 'are'} not in the local "
                     "Hugging Face cache (HF_HUB_OFFLINE is set)")
    if lacks:
        raise ValueError(f"{what} needs {' and '.join(needs)}; {', and '.join(lacks)} — run "
                         "`python train.py --preset toy` instead, or add `--dry-run` to size it without weights")
