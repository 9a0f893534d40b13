"""Scale-out: torchrun, FSDP2 and torch.distributed.checkpoint (App. A), in torchtitan's order.

The same `train()` runs as one plain process (`python train.py`) or under torchrun on
1…N processes and nodes (`torchrun --nproc_per_node 8 train.py --preset mos_s`). Under
torchrun (WORLD_SIZE is set) it follows torchtitan's order, all PyTorch's own pieces:
  process group (nccl on GPU, gloo on CPU) → build R + G on the meta device →
  activation checkpointing per generation block (optional) → fully_shard each generation
  block and each router block, then the root, with bf16 parameters / fp32 gradient
  reduction on GPU (App. A: "bf16 all-gather, fp32 reduce-scatter") → to_empty →
  rank 0's seeded initialisation broadcast to every shard → optimiser on the shards.
The frozen understanding tower (bf16) and the VAE (fp32) stay OUTSIDE the sharded module:
every rank holds its own copy and nothing of them is trained, or the feature cache
replaces the tower. Parameters, gradients, Adam moments and the EMA are all sharded.

The global batch is the preset's batch_size whatever the world size: rank r trains rows
r·B/W … (r+1)·B/W - 1 of each global batch, in micro-batches of train.micro_batch
(gradient accumulation) if set. With per-sample randomness (`train.sample_generators`)
each row sees the same caption dropout, t, noise and ε-greedy draws in any layout, so 1 and
N processes train the same model up to floating-point reduction order.

Under torchrun a checkpoint is a torch.distributed.checkpoint (DCP) folder of every rank's
shards, plus a consolidated ema.safetensors and config.json for sampling; it resumes on any
number of processes, and a plain process reads it too (`load_distributed_checkpoint`).

Neighbours: train.py calls `init_distributed`, `build_sharded`, `shard_batch` and the DCP
save / load; checkpoint.py builds the unsharded model (`build_model`) and writes the
single-process checkpoints; sizing.py estimates the per-GPU memory of this layout.
"""

import json
import os
import shutil
import sys
from dataclasses import dataclass

import torch

from checkpoint import build_model, init_weights, keep_optimizer_kind
from gen_tower import MoS
from presets import Preset


@dataclass
class Dist:
    """Where this process sits. `enabled`: under torchrun, with a process group and FSDP2."""

    rank: int = 0
    world: int = 1
    device: str = "cpu"
    enabled: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> Dist:
    """Join torchrun's process group (nccl on GPU, gloo on CPU); a plain process gets Dist()."""
    import torch.distributed as tdist

    if "WORLD_SIZE" not in os.environ:
        return Dist(device=device)
    if device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not tdist.is_initialized():
        # NOTE: torchrun's key-value store outlives a worker restart (--max-restarts), and the
        # new workers would read the dead ones' addresses from it (gloo then fails with
        # "connection refused"). A key prefix per restart gives each generation its own keys.
        store, rank, world = next(tdist.rendezvous("env://"))
        store = tdist.PrefixStore(f"mos/restart-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
        tdist.init_process_group("nccl" if device.startswith("cuda") else "gloo", store=store, rank=rank, world_size=world)
    return Dist(tdist.get_rank(), tdist.get_world_size(), device, True)


def use_activation_checkpointing(preset: Preset) -> bool:
    """train.act_ckpt: "on", "off", or "auto" = on from 1024² (App. A), where the image tokens'
    activations, not the sharded weights, are what fills a GPU (see `sizing.memory_estimate`)."""
    flag = preset.train.act_ckpt
    if flag not in ("auto", "on", "off"):
        raise ValueError(f"train.act_ckpt must be auto, on or off, got {flag!r}")
    return flag == "on" or (flag == "auto" and preset.model.image_size >= 1024)


def shard_model(model: MoS, act_ckpt: bool, bf16: bool) -> MoS:
    """FSDP2 in torchtitan's order: checkpoint + fully_shard each block, then the root.

    Each generation block and each router block is one FSDP unit (its parameters are
    all-gathered just before it runs and freed after); the root unit holds the rest (patch
    embedding, registers, Proj, head, the router's tokenizers). The composable `checkpoint`
    keeps parameter names unchanged, so state dicts match an unsharded model's.
    """
    from torch.distributed._composable import checkpoint
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    blocks = list(model.gen.blocks)
    for i, block in enumerate(blocks):
        if act_ckpt:
            checkpoint(block)  # keep only the block's input; recompute its inside in backward
        # The last block runs first in backward: keeping it gathered saves one all-gather.
        fully_shard(block, mp_policy=mp, reshard_after_forward=i < len(blocks) - 1)
    for block in getattr(model.router, "blocks", []):  # static baselines have no router blocks
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def build_sharded(preset: Preset, dist: Dist, act_ckpt: bool, init_from: str = "") -> tuple[MoS, MoS]:
    """→ (model, ema), both FSDP2-sharded over the world, starting from the weights a plain
    process would build with the same seed (rank 0 builds them on CPU and broadcasts)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    mcfg = preset.model
    full = {}
    if dist.main:  # the reference initialisation, bit-identical to the single-process run
        torch.manual_seed(preset.train.seed)
        ref = build_model(mcfg, "cpu")
        if init_from:
            print(f"initialised from {init_weights(ref, init_from)}", file=sys.stderr, flush=True)
        full = ref.state_dict()
    bf16 = dist.device.startswith("cuda")
    model = shard_model(build_model(mcfg, "meta"), act_ckpt, bf16)
    ema = shard_model(build_model(mcfg, "meta").requires_grad_(False), False, bf16)
    for m in (model, ema):
        m.to_empty(device=dist.device)
        # NOTE: a fresh dict each time: the broadcast replaces the dict's values with shards.
        set_model_state_dict(m, dict(full), options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return model.train(), ema.eval()


def shard_batch(batch_fn, step: int, B: int, start: int, count: int):
    """Rows start … start+count-1 of global batch `step`.

    Sources that can build just those rows take start/count (ShapesWorld, real folders: each
    rank reads only its own images); others build the global batch and keep the slice. Either
    way all ranks cut one global batch, so they share its aspect bucket (bucket-aware)."""
    import inspect

    if "count" in inspect.signature(batch_fn).parameters:
        return batch_fn(step, B, start=start, count=count)
    return tuple(x[start:start + count] for x in batch_fn(step, B))


def save_distributed_checkpoint(run_dir: str, step: int, model, ema, opt, preset: Preset, dist: Dist,
                                data_position: int) -> str:
    """torch.distributed.checkpoint: run_dir/step-XXXXXX/ with every rank's shards of the
    model, EMA and optimiser (.distcp files + .metadata), the train state (step, data position,
    world size, every rank's RNG), and — for sample.py / edit.py — a consolidated
    ema.safetensors + config.json written by rank 0. Atomic like
    `checkpoint.save_checkpoint`: written to step-XXXXXX.tmp/ and renamed once every rank has
    finished. (Multi-node: run_dir must be a shared filesystem.) The LR schedule is a pure
    function of the step (`train.lr_at`)."""
    import pickle

    import torch.distributed as tdist
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    final = os.path.join(run_dir, f"step-{step:06d}")
    tmp = final + ".tmp"
    if dist.main:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    tdist.barrier()
    rngs = [None] * dist.world
    tdist.all_gather_object(rngs, torch.get_rng_state())
    state = {"model": get_model_state_dict(model), "ema": get_model_state_dict(ema),
             "optimizer": get_optimizer_state_dict(model, opt),
             "train": {"step": step, "data_position": data_position, "world_size": dist.world,
                       "rng": pickle.dumps(rngs)}}  # bytes: one object, whatever the world size
    dcp.save(state, checkpoint_id=tmp)
    # Consolidated EMA: each tensor is all-gathered and copied to rank 0's CPU one by one.
    weights = get_model_state_dict(ema, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.main:
        save_file({k: v.contiguous() for k, v in weights.items()}, os.path.join(tmp, "ema.safetensors"))
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(preset.to_dict(), f, indent=2)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
    tdist.barrier()
    return final


def is_distributed_checkpoint(ckpt: str) -> bool:
    return os.path.exists(os.path.join(ckpt, ".metadata"))


def load_distributed_checkpoint(ckpt: str, model, ema, opt, dist: Dist) -> dict:
    """Load a DCP step folder into model, EMA and optimiser in place → its train state.

    Works for any world size, whatever wrote it: DCP reads each saved shard into the ranges
    this process holds (N → M), and a plain process (dist.enabled False) reads full tensors.
    Every rank gets back its own RNG state when the old run had that rank."""
    import pickle

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)

    state = {"model": get_model_state_dict(model), "ema": get_model_state_dict(ema),
             "optimizer": get_optimizer_state_dict(model, opt),
             "train": {"step": 0, "data_position": 0, "world_size": 0, "rng": b""}}
    dcp.load(state, checkpoint_id=ckpt, no_dist=not dist.enabled)
    set_model_state_dict(model, state["model"])
    set_model_state_dict(ema, state["ema"])
    keep_optimizer_kind(opt, lambda: set_optimizer_state_dict(model, opt, state["optimizer"]))
    rngs = pickle.loads(state["train"]["rng"])
    if dist.rank < len(rngs):
        torch.set_rng_state(rngs[dist.rank])
    return state["train"]
