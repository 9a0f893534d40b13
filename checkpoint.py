"""Checkpoints: the model a preset builds, step folders written and read, exports, warm starts.

A single-process checkpoint is a directory `run/step-000500/` holding model.safetensors,
ema.safetensors, config.json (the preset, `Preset.to_dict()`: enough to rebuild the model) and
state.pt (optimiser, step, torch RNG, data position, wall and CPU seconds). It is written to a
temporary directory and renamed into place, so a crash mid-write never leaves a half
checkpoint behind. Under torchrun a checkpoint is a torch.distributed.checkpoint folder
instead (distributed.py); it carries a consolidated ema.safetensors and config.json too, so
`find_checkpoint`, `read_preset` and `load_checkpoint` serve both kinds for sampling.

Also here, out of the training loop's way:
  * `export_weights`: the checkpoint a phased recipe ships (its EMA in train.export_dtype).
  * `init_weights` (`train.py --init-from`, train.init_from): start from another run's
    weights — the next stage (Sec. 3.5), MoS-Edit from a text-to-image model (Sec. 3.5), or a
    deeper tower grown from a shallower one (`grow_depth`, docs/design.md §11.7).

Neighbours: presets.py defines what config.json holds; train.py saves and resumes through
here; sample.py, edit.py and eval.py load with `load_checkpoint`; distributed.py shards what
`build_model` builds.
"""

import json
import os
import shutil

import torch
import torch.nn as nn

from gen_tower import ModelConfig, MoS, check_size, codec_shape
from presets import Preset


#################################################################################
#                                     Model                                     #
#################################################################################


def build_model(cfg: ModelConfig, device="cpu") -> MoS:
    check_size(cfg.image_size, cfg.codec, cfg.gen.patch_size)
    with torch.device(device):
        return MoS(cfg, in_channels=codec_shape(cfg.codec)[0])


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


#################################################################################
#                                  Checkpoints                                  #
#################################################################################


def save_checkpoint(run_dir: str, step: int, model, ema, preset: Preset, state: dict | None) -> str:
    """Write run_dir/step-XXXXXX/ atomically: build in a temp dir, then rename."""
    from safetensors.torch import save_file

    final = os.path.join(run_dir, f"step-{step:06d}")
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(tmp, "model.safetensors"))
    save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, os.path.join(tmp, "ema.safetensors"))
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(preset.to_dict(), f, indent=2)
    if state is not None:
        torch.save(state, os.path.join(tmp, "state.pt"))
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def find_checkpoint(path: str) -> str:
    """A checkpoint dir itself, or the latest step-* inside a run dir."""
    if not os.path.isdir(path):
        raise ValueError(f"checkpoint {path!r} does not exist")
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    steps = sorted(d for d in os.listdir(path) if d.startswith("step-") and not d.endswith(".tmp"))
    if not steps:
        raise ValueError(f"{path!r} holds no checkpoint (no config.json and no step-* folder)")
    return os.path.join(path, steps[-1])


def read_preset(path: str) -> tuple[Preset, str]:
    """→ (preset, ckpt_dir) of a checkpoint (or a run dir's latest) from its config.json alone:
    a look before any weights load, so a CLI can check its inputs against it in a blink."""
    ckpt = find_checkpoint(path)
    try:
        with open(os.path.join(ckpt, "config.json")) as f:
            return Preset.from_dict(json.load(f)), ckpt
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"checkpoint {ckpt!r} has a missing or unreadable config.json ({e})") from None


def load_checkpoint(path: str, which: str = "ema", device="cpu"):
    """→ (model, preset, ckpt_dir). `which` = "ema" (default for sampling) or "model"."""
    from safetensors.torch import load_file

    preset, ckpt = read_preset(path)
    weights = os.path.join(ckpt, f"{which}.safetensors")
    if which == "ema" and not os.path.exists(weights):
        weights = os.path.join(ckpt, "model.safetensors")
    model = build_model(preset.model, device="cpu")
    try:
        model.load_state_dict(load_file(weights))
    except Exception as e:  # safetensors raises several types for truncated/corrupt files
        raise ValueError(f"checkpoint weights {weights!r} are missing or corrupt ({type(e).__name__}: {e})") from None
    return model.to(device).eval(), preset, ckpt


def keep_optimizer_kind(opt: torch.optim.Optimizer, load):
    """Run `load()` (a load_state_dict of some form) and keep opt's own kind. Loading copies every
    saved group flag, `fused` included, so a checkpoint of the for-loop AdamW (FSDP2 runs use it)
    would silently turn a fused optimiser into a for-loop one, and vice versa. The moments and step counts mean the same in both kinds: only the flags go
    back, and the fused kernel's `step` onto the parameter's device, where it keeps it."""
    kind = [{k: g[k] for k in ("fused", "foreach") if k in g} for g in opt.param_groups]
    load()
    for g, f in zip(opt.param_groups, kind):
        g.update(f)
        for p in g["params"] if g.get("fused") else []:
            if "step" in opt.state.get(p, {}):
                opt.state[p]["step"] = opt.state[p]["step"].to(p.device, torch.float32)


def export_weights(ckpt: str, dest: str, preset: Preset, recipe: dict) -> str:
    """The checkpoint a recipe ships: `ckpt`'s EMA weights in train.export_dtype, and a
    config.json holding the preset and the recipe (command, phases, wall time). Written to a
    temporary directory and renamed into place."""
    from safetensors.torch import load_file, save_file

    dtype = getattr(torch, preset.train.export_dtype) if preset.train.export_dtype else None
    weights = load_file(os.path.join(ckpt, "ema.safetensors"))
    if dtype is not None:
        weights = {k: v.to(dtype) if v.is_floating_point() else v for k, v in weights.items()}
    tmp = dest + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file(weights, os.path.join(tmp, "ema.safetensors"))
    config = preset.to_dict()
    config["train"]["init_from"] = ""  # the exported weights stand alone
    config["recipe"] = recipe
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    return dest


#################################################################################
#                   Starting from other weights (--init-from)                   #
#################################################################################


def grow_depth(state: dict, n_old: int, n_new: int, m: int) -> dict:
    """A state dict of n_old generation blocks → one of n_new that computes the same function.

    Function-preserving depth growth (cf. Net2Net, Chen et al. 2016; stacking, Gong et al.
    2019): the a = n_new - n_old new blocks are copies of evenly spaced old blocks, each
    inserted right after its source, with its two output projections (attention `out` and
    FFN `w_down`) zeroed. Every block is residual, x + out(attn) + w_down(ffn), so a copy
    with those zeroed is the identity and the grown model's output equals the old one's;
    the gradients reach the zeroed projections at once (their inputs are the copy's
    well-trained features), so training moves on from the old model's score rather than
    from scratch. Each new block's routing rows (the router head's n×m logit matrix,
    Fig. 5b) start as its source block's. At most doubling (a ≤ n_old) per call.
    """
    a = n_new - n_old
    if not 0 < a <= n_old:
        raise ValueError(f"can grow a {n_old}-block tower to {n_old + 1}..{2 * n_old} blocks, not {n_new}")
    copied = {round((i + 1) * n_old / a) - 1 for i in range(a)}  # old blocks that get a copy
    source = []  # source[j_new] = (old block, is_copy)
    for j in range(n_old):
        source.append((j, False))
        if j in copied:
            source.append((j, True))
    out = {k: v for k, v in state.items() if not k.startswith("gen.blocks.") and not k.startswith("router.head.")}
    for j_new, (j, is_copy) in enumerate(source):
        for k, v in state.items():
            prefix = f"gen.blocks.{j}."
            if k.startswith(prefix):
                zero = is_copy and k.endswith(("out.weight", "ffn.w_down.weight"))
                out[f"gen.blocks.{j_new}." + k[len(prefix):]] = torch.zeros_like(v) if zero else v.clone()
    rows = torch.tensor([j for j, _ in source])  # (n_new,) the source block of each new block
    if "router.head.weight" in state:  # (n·m, D_r) → (n_new·m, D_r): logits view as (n, m)
        w, b = state["router.head.weight"], state["router.head.bias"]
        out["router.head.weight"] = w.view(n_old, m, -1)[rows].reshape(n_new * m, -1).clone()
        out["router.head.bias"] = b.view(n_old, m)[rows].reshape(-1).clone()
    return out


def init_weights(model: MoS, path: str) -> str:
    """Load a (text-to-image) checkpoint's weights into a fresh model: MoS-Image → MoS-Edit,
    or a shallower tower into a deeper one (`grow_depth`).

    `path` is a checkpoint/run dir (its EMA weights) or a .safetensors file; a relative path
    that does not exist from the working directory is tried from this repository. Every key of
    the model must come from the file except the reference type embedding, which an edit model
    adds (gen.ref) and a text-to-image checkpoint cannot have. Returns the file it read.
    """
    from safetensors.torch import load_file

    if not os.path.isabs(path) and not os.path.exists(path):
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), path)
    if os.path.isdir(path):
        ckpt = find_checkpoint(path)
        path = os.path.join(ckpt, "ema.safetensors")
        if not os.path.exists(path):
            path = os.path.join(ckpt, "model.safetensors")
    if not os.path.isfile(path):
        raise ValueError(f"train.init_from {path!r} does not exist (train the toy first, or --set train.init_from=)")
    try:
        state = load_file(path)
        n_old = 1 + max((int(k.split(".")[2]) for k in state if k.startswith("gen.blocks.")), default=-1)
        if 0 < n_old < model.cfg.gen.depth:  # a shallower checkpoint: grow it (see grow_depth)
            state = grow_depth(state, n_old, model.cfg.gen.depth, model.cfg.und_states)
        missing, unexpected = model.load_state_dict(state, strict=False)
    except Exception as e:  # size mismatches (another architecture), corrupt files
        raise ValueError(f"cannot initialise from {path!r}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    new_ok = {"gen.ref_type_embed"}
    if unexpected or set(missing) - new_ok:
        raise ValueError(f"cannot initialise from {path!r}: missing {sorted(set(missing) - new_ok)}, "
                         f"unexpected {sorted(unexpected)}")
    return path
