"""Train MoS: the training loop of Algorithm 1, in one process or under torchrun, with exact resume.

Paper Algorithm 1 (one training step), App. A (optimiser, schedule, EMA, ε-greedy, k), Sec. 3.5
(staged training). docs/design.md §11 (training), §15.1 (CLI).

    python train.py --preset toy                       # ShapesWorld on a laptop CPU
    python train.py --preset toy --steps 200 --out runs/try
    python train.py --resume runs/try                  # continue from the latest checkpoint
    python train.py --preset toy --set train.batch_size=8 train.compile=inductor   # compiled step (CPU: small batches)
    python train.py --preset mos_s --dry-run           # sizes on the meta device, no weights
    python train.py --preset mos_s --dry-run --world-size 8   # + per-GPU memory on 8 GPUs
    torchrun --nproc_per_node 8 train.py --preset mos_s     # FSDP2 over 8 GPUs (distributed.py)
    torchrun --nproc_per_node 8 train.py --preset mos_s --stage 1 --data pairs.jsonl       # Sec. 3.5
    torchrun --nproc_per_node 8 train.py --preset mos_s --stage 2 --data pairs.jsonl --init-from runs/mos_s-stage1

`train()` comes first and reads like a training script: config (the preset, checked, and this
process's place in the world) → model (R + G and their EMA, AdamW) → data (U's states through a
per-caption memo, the batches, the codec) → the loop (`training_step` per micro-batch, clip,
step, EMA, log) → checkpoint. The helpers follow in that order. A preset with phases (the toy)
runs `train_phases`: one `train()` per phase, then an export. The rest lives beside this file:
    presets.py      TrainConfig, Preset, the preset zoo, the stages of Sec. 3.5, `--set`
    checkpoint.py   build_model, step folders (save / find / load), exports, `--init-from`
    distributed.py  torchrun, FSDP2 and DCP checkpoints, in torchtitan's order
    sizing.py       `--dry-run` (sizes, FLOPs, memory per GPU) and "can this machine train it?"
    und_tower.py    TowerMemo: U behind a per-caption memo;   flow.py: t, noise, target, loss

One training step (Alg. 1):
    captions ─► U (frozen; memoised per caption) ─► states S (B, L, m, D_u), mask (B, L)
    images ─► codec.encode ─► z0 (B, C, h, w);   t ~ p(t);   z_t = (1-t) z0 + t z1
    v̂ = MoS(z_t, t, S, mask, ε)        loss = ||v̂ - (z1 - z0)||²

Exact resume: every random draw of step s (timesteps, noise, caption dropout, ε-greedy)
comes from generators seeded with (seed, s, row), and ShapesWorld example i is a pure function
of (seed, i). So a run resumed at step s draws exactly what the uninterrupted run drew, with no
data-path RNG state captured mid-stream; the optimiser, schedule, EMA, step and torch RNG are saved.

Glossary: B batch · L context tokens · m und. states · D_u und. width · C, h, w latent shape.
"""

import argparse
import copy
import json
import math
import os
import shlex
import sys
import time

import torch
import torch.nn as nn

from checkpoint import (build_model, count, export_weights, find_checkpoint, init_weights, keep_optimizer_kind,
                        save_checkpoint)
from distributed import (Dist, build_sharded, init_distributed, is_distributed_checkpoint, load_distributed_checkpoint,
                         save_distributed_checkpoint, shard_batch, use_activation_checkpointing)
from flow import add_noise, flow_loss, loss_by_t_bins, sample_t, velocity_target
from gen_tower import ModelConfig, check_count, check_size, codec_shape
from presets import PRESETS, STAGES, Preset, TrainConfig, apply_overrides, get_preset, stage_preset
from sample import generate, save_grid
from sizing import check_can_train, print_dry_run
from und_tower import TowerMemo


#################################################################################
#                                 The training loop                             #
#################################################################################


def train(preset: Preset, out: str, resume: str | None = None, device="cpu", quiet=False, stop_at: int | None = None,
          data_spec: str = "shapesworld", features: str | None = None, latents: str | None = None):
    """The training loop, in one plain process or on every rank under torchrun (FSDP2, see
    distributed.py). Returns the list of (step, global loss) it ran.

    data_spec: "shapesworld", "emojiworld" or a folder / .jsonl of image–caption pairs.
    features: an on-disk understanding-feature cache (data.build_feature_cache); U is then
    loaded only if a caption is missing from it.
    latents: an on-disk latent cache (data.build_latent_cache) read instead of data_spec; the
    VAE then only decodes the sample grids (App. B.4's producer–consumer, image side).
    """
    from tqdm import tqdm

    import data

    # Config: the preset, checked before anything is built, and where this process sits.
    tcfg, mcfg = preset.train, preset.model
    check_size(mcfg.image_size, mcfg.codec, mcfg.gen.patch_size)
    tcfg.check()
    tcfg.world = "" if latents or data_spec not in data.WORLDS else data_spec  # what the checkpoints record
    dist = init_distributed(device)  # under torchrun: this rank's process group and GPU
    device, quiet = dist.device, quiet or not dist.main  # rank 0 logs
    B = tcfg.batch_size  # the GLOBAL batch, whatever the world size
    if B % dist.world:
        raise ValueError(f"the global batch {B} must be a multiple of the {dist.world} processes")
    per_rank = B // dist.world
    micro = tcfg.micro_batch or per_rank
    if per_rank % micro:
        raise ValueError(f"train.micro_batch {micro} must divide the {per_rank} rows each process trains per step")

    # Model: R + G and their EMA, AdamW, the compiled forward if asked; a resume then puts back
    # the weights, the optimiser, the step and the clocks.
    model, ema, opt, fwd = build_training(preset, dist, resume, quiet)
    torch.manual_seed(tcfg.seed + dist.rank)  # per-rank seed for anything not drawn per sample
    start, spent = 0, (0.0, 0.0)  # step, and (wall, CPU) seconds this run trained before a resume
    if resume:
        start, spent = resume_training(resume, model, ema, opt, dist, quiet)

    # Data: U behind its per-caption memo, the batch source and the codec (or the latent cache).
    tower, batch_fn, codec = load_inputs(preset, device, data_spec, features, latents, quiet)
    log(f"generation tower {count(model.gen) / 1e6:.2f}M · router {count(model.router) / 1e6:.2f}M", quiet)

    # The loop: Algorithm 1 per micro-batch, one optimiser step per global batch.
    os.makedirs(out, exist_ok=True)
    end = tcfg.steps if stop_at is None else min(stop_at, tcfg.steps)
    history, last_good = [], None
    bar = tqdm(range(start, end), initial=start, total=tcfg.steps, disable=quiet, dynamic_ncols=True)
    t0, c0 = time.time() - spent[0], time.process_time() - spent[1]  # clocks that survive a resume
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, tcfg)
        first = dist.rank * per_rank  # this rank's rows of the global batch
        batch = shard_batch(batch_fn, step, B, first, per_rank)
        opt.zero_grad(set_to_none=True)
        loss, per_sample, t = 0.0, [], []
        for a in range(0, per_rank, micro):  # gradient accumulation over micro-batches
            mb = tuple(x[a:a + micro] for x in batch)
            n = len(mb[1])  # rows actually read (a real-data file can fail to open)
            m_loss, m_per, m_t = training_step(fwd, mb, tower, codec, preset, step, device,
                                               rows=range(first + a, first + a + n))
            (m_loss * (n / per_rank)).backward()  # gradients of the mean over this rank's rows
            loss = loss + m_loss.detach() * (n / per_rank)
            per_sample.append(m_per)
            t.append(m_t)
        per_sample, t = torch.cat(per_sample), torch.cat(t)  # (per_rank,) each, for the loss-by-t log
        if dist.enabled:  # FSDP2 averaged the gradients over ranks; average the logged loss alike
            torch.distributed.all_reduce(loss)
            loss = loss / dist.world
        # Checked on the global loss, so every rank stops together (no rank left in a collective);
        # no optimiser step is taken, so the weights stay those of the last good step.
        if not torch.isfinite(loss):
            msg = f"non-finite loss {loss.item()} at step {step}; stopping."
            msg += f" The last good checkpoint is {last_good}." if last_good else " No checkpoint was written yet."
            raise FloatingPointError(msg)
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
        gnorm = gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm  # a DTensor under FSDP2
        opt.step()
        ema_update(ema, model, tcfg.ema_decay if step > tcfg.warmup else min(tcfg.ema_decay, (1 + step) / (10 + step)))
        history.append((step, loss.item()))
        if dist.main and (step % tcfg.log_every == 0 or step == end - 1):
            bins = loss_by_t_bins(per_sample, t, bins=4)  # rank 0's rows
            bar.set_postfix(loss=f"{loss.item():.4f}", gnorm=f"{gnorm:.2f}", lr=f"{lr_at(step, tcfg):.2e}")
            with open(os.path.join(out, "log.jsonl"), "a") as f:
                f.write(json.dumps({"step": step, "loss": loss.item(), "loss_by_t": bins, "grad_norm": gnorm.item(),
                                    "lr": lr_at(step, tcfg), "elapsed_s": round(time.time() - t0, 1),
                                    "cpu_s": round(time.process_time() - c0, 1)}) + "\n")
        # Checkpoint: every ckpt_every steps and at the end; a sample grid every sample_every.
        done = step + 1
        if done % tcfg.ckpt_every == 0 or done == end:
            last_good = save_training_checkpoint(out, done, model, ema, opt, preset, dist, (t0, c0))
        if tcfg.sample_every and not mcfg.gen.ref and (done % tcfg.sample_every == 0 or done == end):
            # Under FSDP2 every rank runs the (sharded) EMA forward; rank 0 writes the PNG.
            grid = os.path.join(out, f"samples-{done:06d}.png") if dist.main else None
            write_sample_grid(ema, tower, codec, preset, grid, device)
    return history


#################################################################################
#                     Model, optimiser and schedule (App. A)                    #
#################################################################################


def build_training(preset: Preset, dist: Dist, resume: str | None, quiet: bool):
    """→ (model, ema, optimiser, forward): R + G and their EMA on this process's device, or
    FSDP2-sharded over the world (distributed.py); they start from train.init_from's weights
    unless resuming. `forward` is what the training step calls: the model itself, or its
    torch.compile'd form (train.compile)."""
    tcfg, mcfg = preset.train, preset.model
    if dist.enabled:  # FSDP2 over the world (distributed.py)
        model, ema = build_sharded(preset, dist, use_activation_checkpointing(preset),
                                   init_from="" if resume else tcfg.init_from)
    else:
        torch.manual_seed(tcfg.seed)
        model = build_model(mcfg, dist.device).train()
        if tcfg.init_from and not resume:  # before the EMA copy, so the EMA starts there too
            log(f"initialised from {init_weights(model, tcfg.init_from)}", quiet)
        ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = make_optimizer(model, tcfg, fused=not dist.enabled)
    fwd = model  # what the training step calls; the plain module unless train.compile is set
    if tcfg.compile:
        if dist.enabled:
            raise ValueError("train.compile is for single-process training; unset it under torchrun")
        import torch._dynamo as dynamo  # `import torch._dynamo` would make `torch` a local name here

        if tcfg.compile not in dynamo.list_backends(exclude_tags=()):
            raise ValueError(f"unknown train.compile backend {tcfg.compile!r}; choose one of "
                             f"{', '.join(dynamo.list_backends())} (or '' for eager)")
        # One graph, compiled once: training_step hands in the ε-greedy draws and marks the
        # caption length L dynamic (it changes batch to batch). The first step is slow.
        fwd = torch.compile(model, backend=tcfg.compile)
        log(f"torch.compile (backend {tcfg.compile}): the first step includes compilation", quiet)
    return model, ema, opt, fwd


def make_optimizer(model: nn.Module, cfg: TrainConfig, fused: bool = False):
    """AdamW (App. A). fused=True: PyTorch's one-kernel AdamW instead of the per-parameter for-loop
    PyTorch picks on a CPU — the same update, ~3x cheaper for the toy (8.5 -> 2.8 ms a step,
    bench/toy_step.py). train() uses it in a plain process; sharded runs keep the default."""
    # No weight decay on gains, biases, registers and embeddings (1-D or token tables).
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "registers" not in n and "type_embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "registers" not in n and "type_embed" not in n)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=cfg.betas,
                             fused=fused or None)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to cfg.lr, then cosine down to cfg.lr_min at cfg.steps (App. A)."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.lr_min + 0.5 * (cfg.lr - cfg.lr_min) * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float):
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1 - decay)


#################################################################################
#                                      Data                                     #
#################################################################################


def load_inputs(preset: Preset, device: str, data_spec: str, features: str | None, latents: str | None, quiet: bool):
    """→ (tower, batch_fn, codec): U behind its per-caption memo (pre-filled from a feature
    cache, if given: U then loads only for a caption it lacks), the batch source and the codec
    (a latent cache instead of images and the VAE's encoder, if given)."""
    import data
    from gen_tower import load_codec  # looked up per call: tests put in stand-ins for U and the VAE
    from und_tower import load_tower

    tcfg, mcfg = preset.train, preset.model
    memo = data.load_feature_cache(features) if features else None
    tower_dtype = getattr(torch, tcfg.tower_dtype) if tcfg.tower_dtype else None  # bf16 for full presets (App. A)
    if memo is not None and mcfg.tower_init != "pretrained":
        raise ValueError("a feature cache holds the pre-trained tower's states; train a model.tower_init="
                         f"{mcfg.tower_init} run without --features")
    tower = TowerMemo(lambda: load_tower(mcfg.tower, device=device, dtype=tower_dtype, init=mcfg.tower_init),
                      memo=memo)
    if memo is None:
        init = "" if mcfg.tower_init == "pretrained" else f", {mcfg.tower_init} weights"
        log(f"understanding tower {mcfg.tower}: {count(tower.tower) / 1e6:.1f}M "
            f"(frozen, m={mcfg.und_states}{init})", quiet)
    else:
        log(f"understanding states for {len(memo)} captions from the feature cache {features}", quiet)
    if latents:  # z0 precomputed: the batch holds latents, the codec's encode is the identity
        cache = data.LatentCache(latents, seed=tcfg.seed)
        cache.check(mcfg.image_size, codec_shape(mcfg.codec)[0])
        batch_fn, codec = cache.batch, data.PrecomputedLatentCodec(mcfg.codec)
        log(f"{len(cache)} latents from the latent cache {latents}", quiet)
    else:
        batch_fn = make_data(data_spec, mcfg, tcfg.seed, tcfg.t2i_fraction)
        codec = load_codec(mcfg.codec).to(device)
    return tower, batch_fn, codec


def make_data(spec: str, mcfg: ModelConfig, seed: int, t2i_fraction: float = 0.0):
    """→ batch_fn(step, B) for a synthetic world ("shapesworld", "emojiworld") or a folder /
    .jsonl of real pairs.

    Edit models (mcfg.gen.ref): batches are (targets, instructions, sources) — a world's edit
    triplets, or a .jsonl of {"source", "instruction", "target"} — and a `t2i_fraction` of the
    steps (drawn from (seed, step), so resume stays exact) are text-to-image pairs instead.
    """
    import data

    # the synthetic worlds: text-to-image batches and edit triplets, one contract each
    worlds = {"shapesworld": (data.shapes_batch, data.edit_batch),
              "emojiworld": (data.emojiworld.emoji_batch, data.emojiworld.edit_batch)}
    if mcfg.gen.ref:
        source = (lambda step, B: worlds[spec][1](seed, step * B, B, mcfg.image_size)) if spec in worlds \
            else data.EditData(spec, mcfg.image_size, seed=seed).batch

        def edits(step, B):
            src, instructions, tgt = source(step, B)
            return tgt, instructions, src
        if t2i_fraction <= 0:
            return edits
        if spec not in worlds:
            raise ValueError("train.t2i_fraction > 0 mixes in a synthetic world's text-to-image batches; "
                             "use --data shapesworld or emojiworld")

        import numpy as np

        def mixed(step, B):
            if np.random.default_rng([seed, 9, step]).random() < t2i_fraction:
                return worlds[spec][0](seed, step * B, B, mcfg.image_size)
            return edits(step, B)
        return mixed
    if spec in worlds:  # start/count: one rank's rows of the global batch (distributed.shard_batch)
        world_batch = worlds[spec][0]
        return lambda step, B, start=0, count=None: world_batch(seed, step * B + start, B if count is None else count,
                                                                mcfg.image_size)
    real = data.ImageCaptionData(spec, area=mcfg.image_size ** 2,
                                 multiple=codec_shape(mcfg.codec)[1] * mcfg.gen.patch_size, seed=seed)
    return real.batch


#################################################################################
#                        One training step (Algorithm 1)                        #
#################################################################################


def sample_generators(seed: int, step: int, rows) -> list[torch.Generator]:
    """One CPU generator per sample, seeded from (seed, step, global row of the batch).

    Every random draw of a sample — caption dropout, t, the noise z1, the ε-greedy choices —
    comes from its own generator, so it is the same whether the global batch runs in one
    process, is sharded over N (rank r holds rows r·B/N …), or is split into micro-batches.
    numpy's SeedSequence mixes the three numbers into a well-spread 64-bit seed.
    """
    import numpy as np

    return [torch.Generator().manual_seed(int(np.random.SeedSequence([seed, step, r]).generate_state(1, np.uint64)[0]))
            for r in rows]


def training_step(model, batch, tower_fn, codec, preset: Preset, step: int, device="cpu", *, rows=None):
    """One forward pass of Algorithm 1; returns (loss, per-sample loss, t).

    rows: the global batch rows this batch holds (default 0 … B-1: the whole batch); they
    pick the per-sample generators, see `sample_generators`.
    """
    tcfg = preset.train
    # (images, captions) for text-to-image; (targets, instructions, references) for MoS-Edit.
    images, captions, refs = (*batch, None) if len(batch) == 2 else batch
    gens = sample_generators(tcfg.seed, step, range(len(captions)) if rows is None else rows)
    drop = torch.cat([torch.rand(1, generator=g) for g in gens]) < tcfg.caption_dropout  # (B,)
    # For edits the dropout hits the instruction only (the reference stays): CFG on the instruction.
    captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
    if refs is None:
        states, mask = tower_fn(captions)  # (B, L, m, D_u), (B, L)
    else:  # a VLM tower also reads the reference image (und_tower.edit_context)
        states, mask = tower_fn(captions, images=refs)
    z0 = codec.encode(images.to(device))  # (B, C, h, w)
    t = torch.cat([sample_t(1, tcfg.t_sampler, scale=tcfg.mode_scale, shift=tcfg.t_shift, generator=g)
                   for g in gens]).to(device)  # (B,)
    z1 = torch.stack([torch.randn(z0.shape[1:], generator=g) for g in gens]).to(device, z0.dtype)  # (B, C, h, w)
    z_t, z1 = add_noise(z0, t, z1=z1)  # (B, C, h, w)
    extra = {} if refs is None else {"ref": codec.encode(refs.to(device))}  # clean, never noised
    states, mask = states.to(device), mask.to(device)
    # The ε-greedy draws, made here (after z1, as the model would) and handed in: a compiled
    # forward (train.compile) then has no per-sample generator loop to break its graph at.
    draws = model.routing_draws(len(gens), mask.shape[1], gens)  # (B, L|1, n, m+1), or None when ε = 0
    # The caption length L changes batch to batch: tell torch.compile so from the first step, or
    # it compiles for the first L and again (as long) when L first changes. A no-op in eager mode.
    for x in (states, mask) + (() if draws is None or draws.shape[1] == 1 else (draws,)):
        torch._dynamo.maybe_mark_dynamic(x, 1)
    v = model(z_t, t, states, mask, draws, **extra)
    # v covers the target tokens only, so the reference tokens get no loss.
    per_sample = flow_loss(v, velocity_target(z0, z1), reduction="none")  # (B,)
    return per_sample.mean(), per_sample.detach(), t


#################################################################################
#                        Checkpoints and sample grids                           #
#################################################################################


def resume_training(resume: str, model, ema, opt, dist: Dist, quiet: bool) -> tuple[int, tuple[float, float]]:
    """Load a run's latest checkpoint (or this one) into model, EMA and optimiser in place
    → (step, (wall, CPU) seconds trained before). A DCP folder resumes on any number of
    processes; a single-process checkpoint only in a single process."""
    from safetensors.torch import load_file

    ckpt = find_checkpoint(resume)
    spent = 0.0, 0.0
    if is_distributed_checkpoint(ckpt):  # DCP, written by any number of processes
        start = load_distributed_checkpoint(ckpt, model, ema, opt, dist)["step"]
    elif dist.enabled:
        raise ValueError(f"{ckpt} is a single-process checkpoint; resume it with plain `python train.py --resume`")
    else:
        state = torch.load(os.path.join(ckpt, "state.pt"), weights_only=False)
        model.load_state_dict(load_file(os.path.join(ckpt, "model.safetensors")))
        ema.load_state_dict(load_file(os.path.join(ckpt, "ema.safetensors")))
        keep_optimizer_kind(opt, lambda: opt.load_state_dict(state["optimizer"]))
        torch.set_rng_state(state["torch_rng"])
        start = state["step"]
        spent = state.get("train_seconds", 0.0), state.get("cpu_seconds", 0.0)
    log(f"resumed from {ckpt} at step {start}", quiet)
    return start, spent


def save_training_checkpoint(out: str, done: int, model, ema, opt, preset: Preset, dist: Dist, clocks) -> str:
    """out/step-XXXXXX/ after `done` steps: a DCP folder under torchrun, else safetensors plus
    state.pt (optimiser, step, RNG, data position, and the wall / CPU seconds since the `clocks`
    (t0, c0) started). Returns the folder."""
    if dist.enabled:
        return save_distributed_checkpoint(out, done, model, ema, opt, preset, dist, done * preset.train.batch_size)
    t0, c0 = clocks
    state = {"optimizer": opt.state_dict(), "step": done, "torch_rng": torch.get_rng_state(),
             "data_position": done * preset.train.batch_size,
             "train_seconds": time.time() - t0, "cpu_seconds": time.process_time() - c0}
    return save_checkpoint(out, done, model, ema, preset, state)


GRID_PROMPTS = ["a red circle", "a blue square", "a green triangle", "two circles", "three squares",
                "a red circle to the left of a blue square", "a yellow square and a purple circle", "a triangle"]


def write_sample_grid(model, tower_fn, codec, preset, path, device="cpu"):
    """The grid of GRID_PROMPTS (seed 0, 4 columns) a run draws every train.sample_every steps
    with its EMA; `path` is None on ranks other than 0, which sample but write nothing."""
    from torch.distributed.fsdp import FSDPModule

    prompts = GRID_PROMPTS

    sharded = isinstance(model, FSDPModule)  # under torchrun every rank samples, in step
    if sharded:  # project_states uses the root's weights OUTSIDE forward: gather them first
        model.unshard()
    try:
        images = generate(model, tower_fn, codec, prompts, preset, seed=0, device=device)
    finally:
        if sharded:
            model.reshard()
    if path:  # None on ranks other than 0
        save_grid(images, path, ncol=4)


#################################################################################
#                            Phased recipes (the toy)                           #
#################################################################################


def train_phases(preset: Preset, out: str, command: str, device="cpu", data_spec: str = "shapesworld",
                 quiet=False, stop_at: int | None = None) -> str:
    """Run a phased recipe (`Preset.phases`) into out/phase-1 … phase-K, then export.

    Phase k is a `train()` run with phase k's assignments; finished, it writes out/phase-k/export
    (EMA in train.export_dtype; steps and seconds in config.json), which phase k+1 starts from
    (grown by `checkpoint.init_weights`). A finished phase *is* its export: called again, this
    skips it (its step folders may be gone) and resumes an unfinished phase from its latest
    checkpoint. `stop_at` stops a phase at that step. Returns the export, or "" if stopped early."""
    base = copy.deepcopy(preset)
    base.phases = []
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "recipe.json"), "w") as f:  # what --resume OUT reads back
        json.dump({"command": command, "preset": preset.to_dict()}, f, indent=2)
    record = []  # per phase: assignments, steps, wall and CPU seconds
    for k, assignments in enumerate(preset.phases, 1):
        p = apply_overrides(copy.deepcopy(base), assignments)
        if k > 1:
            p.train.init_from = os.path.join(out, f"phase-{k - 1}", "export")
        run = os.path.join(out, f"phase-{k}")
        export = os.path.join(run, "export")
        if not os.path.exists(os.path.join(export, "config.json")):
            done = _last_step(run)
            if done < p.train.steps:
                log(f"phase {k}/{len(preset.phases)}: {' '.join(assignments) or '(the base preset)'}"
                    f" — {p.train.steps} steps, {p.model.gen.depth} blocks, in {run}", quiet)
                train(p, run, resume=run if done else None, device=device, quiet=quiet, stop_at=stop_at,
                      data_spec=data_spec)
                if _last_step(run) < p.train.steps:
                    return ""
            ckpt = find_checkpoint(run)
            st = torch.load(os.path.join(ckpt, "state.pt"), weights_only=False)
            export_weights(ckpt, export, p, {"phase": k, "set": assignments, "steps": p.train.steps, "depth":
                           p.model.gen.depth, "wall_s": round(st["train_seconds"], 1), "cpu_s": round(st["cpu_seconds"], 1)})
        with open(os.path.join(export, "config.json")) as f:
            record.append(json.load(f)["recipe"])
    return export_weights(export, os.path.join(out, "export"), p,
                          {"command": command, "phases": record,
                           "trained_steps": sum(r["steps"] for r in record),
                           "wall_s": round(sum(r["wall_s"] for r in record), 1),
                           "cpu_s": round(sum(r["cpu_s"] for r in record), 1)})


def _last_step(run: str) -> int:
    """The step of a run dir's latest checkpoint, 0 if it has none."""
    steps = [d for d in os.listdir(run) if d.startswith("step-") and not d.endswith(".tmp")] if os.path.isdir(run) else []
    return max((int(d[5:]) for d in steps), default=0)


#################################################################################
#                                      CLI                                      #
#################################################################################


def log(msg: str, quiet: bool = False):
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train a MoS model (see README).")
    p.add_argument("--preset", default="toy", help=f"one of: {', '.join(PRESETS)}")
    p.add_argument("--steps", type=int, help="total training steps (overrides the preset)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--out", default=None, help="run directory (default runs/<preset>)")
    p.add_argument("--resume", default=None, help="a run directory (latest checkpoint) or one checkpoint")
    p.add_argument("--data", default=None, help="'shapesworld', 'emojiworld', a folder of images + .txt captions, or a "
                   ".jsonl (default: the preset's world, else shapesworld)")
    p.add_argument("--features", default=None, help="understanding-feature cache dir (python data.py --cache ...)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="override preset fields, e.g. --set model.gen.depth=8 train.lr=2e-3")
    p.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dry-run", action="store_true", help="print sizes (meta device) and exit")
    p.add_argument("--world-size", type=int, default=8, help="--dry-run: GPUs to estimate the per-GPU memory for")
    p.add_argument("--micro-batch", type=int, help="rows per forward on each process (gradient accumulation)")
    p.add_argument("--act-ckpt", choices=("auto", "on", "off"), help="activation checkpointing (auto: on from 1024²)")
    p.add_argument("--stage", type=int, choices=sorted(STAGES),
                   help="training stage of a full preset (Sec. 3.5): 1 512², 2 1024², 3 aesthetic 1024², 4 2048²")
    p.add_argument("--init-from", default=None, metavar="DIR",
                   help="start from these weights only (the previous stage's run dir or checkpoint): fresh optimiser, step 0")
    p.add_argument("--latents", default=None, metavar="DIR",
                   help="Wan latent cache dir (python data.py --latents DIR ...): read z0 instead of encoding images")
    args = p.parse_args(argv)
    args.command = "python train.py " + shlex.join(sys.argv[1:] if argv is None else argv)  # recorded by exports
    return args


def main(args) -> int:
    # torchrun --max-restarts: a restarted worker (TORCHELASTIC_RESTART_COUNT > 0) continues
    # from its run directory's latest checkpoint instead of starting over.
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    run_dir = args.out or os.path.join("runs", args.preset + (f"-stage{args.stage}" if getattr(args, "stage", None) else ""))
    if restarted and not args.resume and os.path.isdir(run_dir) and any(
            d.startswith("step-") and not d.endswith(".tmp") for d in os.listdir(run_dir)):
        args.resume = run_dir
    recipe = os.path.join(args.resume or "", "recipe.json")
    if args.resume and os.path.isfile(recipe):  # a phased run (train_phases): continue all of it
        with open(recipe) as f:
            recipe = json.load(f)
        torch.set_num_threads(args.threads or max(1, os.cpu_count() or 1))
        preset = Preset.from_dict(recipe["preset"])
        export = train_phases(preset, args.resume, recipe["command"], args.device, data_of(args, preset))
        print(f"done: {export} holds the exported checkpoint")
        return 0
    if args.resume:
        with open(os.path.join(find_checkpoint(args.resume), "config.json")) as f:
            preset = Preset.from_dict(json.load(f))
    else:
        preset = get_preset(args.preset)
        if args.steps is not None:  # --steps: the base setting alone, not the preset's phases
            preset.phases = []
    if getattr(args, "stage", None):
        if not args.resume:
            preset = stage_preset(preset, args.stage)
        elif preset.train.stage != args.stage:  # a resume (or torchrun restart) keeps the checkpoint's stage
            raise ValueError(f"--resume continues the checkpoint's own stage ({preset.train.stage}); start stage "
                             f"{args.stage} as a new run with --stage {args.stage} --init-from PREVIOUS_RUN")
    if getattr(args, "init_from", None):
        preset.train.init_from = args.init_from
    for key, flag in (("steps", "--steps"), ("batch_size", "--batch-size"), ("micro_batch", "--micro-batch")):
        check_count(flag, getattr(args, key, None), minimum=0 if key == "micro_batch" else 1)
    check_count("--threads", getattr(args, "threads", None))
    for key in ("steps", "batch_size", "lr", "micro_batch", "act_ckpt"):
        if getattr(args, key, None) is not None:
            setattr(preset.train, key, getattr(args, key))
    apply_overrides(preset, args.set)
    preset.train.check()  # what --set changed
    if args.dry_run:  # sizes on the meta device (sizing.py): nothing is loaded
        print_dry_run(preset, args.preset, args.world_size)
        return 0
    check_can_train(preset, f"checkpoint {args.resume}" if args.resume else f"preset {args.preset}", args.device,
                    features=args.features, latents=args.latents)
    out = args.out or (args.resume if args.resume and not os.path.exists(os.path.join(args.resume, "config.json"))
                       else os.path.join("runs", args.preset + (f"-stage{args.stage}" if args.stage else "")))
    torch.set_num_threads(args.threads or max(1, os.cpu_count() or 1))
    if preset.phases and not args.resume:
        if os.path.exists(os.path.join(out, "recipe.json")):
            raise ValueError(f"{out} already holds a phased run: continue it with --resume {out}, or choose another --out")
        export = train_phases(preset, out, args.command, args.device, data_of(args, preset))
        print(f"done: {export} holds the exported checkpoint")
        return 0
    train(preset, out, resume=args.resume, device=args.device, data_spec=data_of(args, preset), features=args.features,
          latents=args.latents)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"done: checkpoints in {out}")
    return 0


def data_of(args, preset: Preset) -> str:
    """--data, else the world the preset (or the checkpoint resumed) trains on, else ShapesWorld."""
    return args.data or preset.train.world or "shapesworld"


if __name__ == "__main__":
    try:
        sys.exit(main(parse_args()))
    except (ValueError, FloatingPointError, FileNotFoundError) as e:
        # Under torchrun every rank meets a bad setting alike before the process group exists
        # (check_can_train, the counts): rank 0 says it once. Later errors may be one rank's own.
        if int(os.environ.get("RANK", "0")) == 0 or torch.distributed.is_initialized():
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
