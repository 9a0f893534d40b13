"""Train MoS: the preset zoo, the training loop, checkpoints and exact resume.

Paper App. A (optimiser, schedule, ε-greedy, k), Sec. 3.5 (staged training), Algorithm 1.
DESIGN §3.10 (training), §4 (presets), §6 (CLI).

    python train.py --preset toy                       # ShapesWorld on a laptop CPU
    python train.py --preset toy --steps 200 --out runs/try
    python train.py --resume runs/try                  # continue from the latest checkpoint
    python train.py --preset mos_s --dry-run           # sizes on the meta device, no weights

One training step (Alg. 1):
    captions ─► U (frozen; memoised per caption) ─► states S (B, L, m, D_u), mask (B, L)
    images ─► codec.encode ─► z0 (B, C, h, w);   t ~ p(t);   z_t = (1-t) z0 + t z1
    v̂ = MoS(z_t, t, S, mask, ε)        loss = ||v̂ - (z1 - z0)||²

Exact resume: every random draw of step s (timesteps, noise, caption dropout, ε-greedy)
comes from a generator seeded with (seed, s), and ShapesWorld example i is a pure function
of (seed, i). So a run resumed at step s draws exactly what the uninterrupted run drew —
no RNG state has to be captured mid-stream for the data path; the optimiser, schedule, EMA
and step counter are saved. The global torch RNG is saved too, for anything else.

Checkpoints are directories `run/step-000500/` with model.safetensors, ema.safetensors,
config.json (the preset, enough to rebuild the model) and state.pt (optimiser, schedule,
step, RNG). They are written to a temporary directory and renamed into place, so a crash
mid-write never leaves a half checkpoint behind.

Glossary: B batch · L context tokens · m und. states · D_u und. width · C, h, w latent shape.
"""

import argparse
import copy
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from flow import add_noise, flow_loss, loss_by_t_bins, sample_t, velocity_target
from gen_tower import GenConfig, ModelConfig, MoS, check_size, codec_shape
from router import RouterConfig


#################################################################################
#                               Configs and presets                             #
#################################################################################


@dataclass
class TrainConfig:
    steps: int = 3000
    batch_size: int = 64
    lr: float = 1e-4  # App. A: AdamW 1e-4, wd 0.01, betas (0.9, 0.95)
    lr_min: float = 1.5e-5  # cosine floor (App. A)
    warmup: int = 4000  # linear warm-up steps (App. A: 4k)
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    t_sampler: str = "logit_normal"  # App. A: logit-normal at low resolution
    t_shift: float = 1.0  # App. A: 3.0 with "mode" sampling at high resolution
    mode_scale: float = 0.8
    caption_dropout: float = 0.1  # empty prompt 10% of the time → the CFG unconditional branch
    seed: int = 0
    log_every: int = 50
    sample_every: int = 500  # a sample grid PNG in the run directory
    ckpt_every: int = 500
    # default sampling settings for checkpoints of this preset (sample.py / eval.py)
    sample_steps: int = 30
    cfg: float = 4.0


@dataclass
class Preset:
    model: ModelConfig
    train: TrainConfig
    about: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "Preset":
        t = dict(d["train"])
        t["betas"] = tuple(t["betas"])
        return Preset(ModelConfig.from_dict(d["model"]), TrainConfig(**t), d.get("about", ""))


def _toy() -> Preset:
    # The CPU recipe; see README "What mattered for the toy" for how it was tuned.
    return Preset(
        model=ModelConfig(
            tower="minilm", und_states=7, und_dim=384, codec="pixel", image_size=32,
            gen=GenConfig(dim=192, depth=6, heads=4, patch_size=4, prediction="x"),
            router=RouterConfig(dim=96, heads=4, k=2, eps=0.05),
        ),
        train=TrainConfig(steps=4000, batch_size=64, lr=1e-3, lr_min=1e-4, warmup=200, ema_decay=0.998,
                          log_every=25, sample_every=500, ckpt_every=250),
        about="ShapesWorld 32px on a 2-core CPU, embedded all-MiniLM-L6-v2 tower",
    )


# Tower shapes (m = layers + 1, D) from the published configs:
#   LLaMA-3.2-3B: 28 layers × 3072 (meta-llama/Llama-3.2-3B config.json)
#   PLM-8B: its Llama-3.1-8B backbone, 32 × 4096 (facebook/Perception-LM-8B config.json, text_config)
#   InternVL3-14B: its Qwen2.5-14B backbone, 48 × 5120 (OpenGVLab/InternVL3-14B-hf config.json, text_config)
# Generation towers are plain DiTs of ≈ 12·D²·n parameters (qkv + out + SwiGLU at ratio 4):
#   ablation D 2048 × 20 ≈ 1.02B;  mos_s D 3072 × 26 ≈ 2.96B;  mos_l D 3840 × 28 ≈ 4.98B.
# Routers (2 blocks ≈ 24·D_r² plus the input/output projections): 32M / 95M / 100M.
def _full(tower, m, du, dim, depth, heads, rdim, rheads, about) -> Preset:
    return Preset(
        model=ModelConfig(
            tower=tower, und_states=m, und_dim=du, codec="wan2.2", image_size=512,
            gen=GenConfig(dim=dim, depth=depth, heads=heads, patch_size=2),
            router=RouterConfig(dim=rdim, heads=rheads, k=2, eps=0.05),
        ),
        train=TrainConfig(steps=400_000, batch_size=1024, lr=1e-4, lr_min=1.5e-5, warmup=4000,
                          ema_decay=0.9999, sample_every=5000, ckpt_every=5000, cfg=5.0, sample_steps=50),
        about=about,
    )


PRESETS = {
    "toy": _toy,
    "ablation": lambda: _full("llama-3.2-3b", 29, 3072, 2048, 20, 16, 1024, 8,
                              "Sec. 4.1 ablation setting: LLaMA-3.2-3B tower, ~1B generation tower"),
    "mos_s": lambda: _full("plm-8b", 33, 4096, 3072, 26, 24, 1792, 14,
                           "MoS-S (Sec. 3.5): PLM-8B tower, 3B generation tower, 100M router"),
    "mos_l": lambda: _full("internvl-14b", 49, 5120, 3840, 28, 30, 1792, 14,
                           "MoS-L (Sec. 3.5): InternVL-14B tower, 5B generation tower, 100M router"),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]()


def apply_overrides(preset: Preset, assignments: list[str]) -> Preset:
    """`--set model.gen.dim=256 train.lr=2e-3`: change any preset field from the command line.

    The value is parsed with the type of the field it replaces, so typos fail loudly."""
    for item in assignments:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects key=value, got {item!r}")
        *path, leaf = key.split(".")
        obj = preset
        for part in path:
            if not hasattr(obj, part):
                raise ValueError(f"--set {key}: no field {part!r}")
            obj = getattr(obj, part)
        if not dataclasses.is_dataclass(obj) or leaf not in {f.name for f in dataclasses.fields(obj)}:
            raise ValueError(f"--set {key}: no field {leaf!r} in {type(obj).__name__}")
        old = getattr(obj, leaf)
        try:
            if isinstance(old, bool):
                value = raw.lower() in ("1", "true", "yes")
            elif isinstance(old, tuple):
                value = tuple(type(old[0])(v) for v in raw.split(","))
            else:
                value = type(old)(raw)
        except ValueError:
            raise ValueError(f"--set {key}: {raw!r} is not a valid {type(old).__name__}") from None
        setattr(obj, leaf, value)
        if hasattr(obj, "__post_init__"):
            obj.__post_init__()  # re-validate (e.g. heads must divide dim)
    return preset


def build_model(cfg: ModelConfig, device="cpu") -> MoS:
    check_size(cfg.image_size, cfg.codec, cfg.gen.patch_size)
    with torch.device(device):
        return MoS(cfg, in_channels=codec_shape(cfg.codec)[0])


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def dry_run(preset: Preset) -> dict:
    """Build router + generation tower on the meta device (no memory, no weights) and report sizes."""
    model = build_model(preset.model, device="meta")
    sizes = {"generation_tower": count(model.gen), "router": count(model.router),
             "und_states": preset.model.und_states, "und_dim": preset.model.und_dim, "tower": preset.model.tower}
    return sizes


#################################################################################
#                          Schedule, EMA, understanding states                  #
#################################################################################


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


class TowerMemo:
    """The understanding tower behind a per-caption memo.

    U is frozen (Sec. 3.1), so a caption's states never change: compute them once and reuse
    them. ShapesWorld's captions repeat a lot, so training soon runs U only for the few new
    captions of each batch — the in-memory form of the paper's producer–consumer feature
    cache (App. B.4). `memo` can be pre-filled from an on-disk cache (data.load_feature_cache),
    and `tower` may be a zero-argument loader: U is then only loaded if a caption is missing.
    Returns padded (B, L, m, D) float32 states and a (B, L) bool mask.

    NOTE: bounded in bytes, not items: a MiniLM caption is ~160 KB of states and ShapesWorld's
    full-scene captions are nearly all unique, so an item cap let a 3000-step toy run reach
    6.5 GB. Past `max_bytes`, new captions are encoded and used but not kept.
    """

    def __init__(self, tower, memo: dict | None = None, max_bytes: int = 2 << 30):
        self._tower, self.max_bytes, self.memo = tower, max_bytes, dict(memo or {})
        self.nbytes = sum(x.numel() * x.element_size() for x in self.memo.values())

    @property
    def tower(self):
        if callable(self._tower) and not isinstance(self._tower, nn.Module):
            self._tower = self._tower()  # lazy load on first miss
        return self._tower

    def __call__(self, captions: list[str]):
        todo = sorted({c for c in captions if c not in self.memo})
        extra = {}
        if todo:
            out = self.tower(todo)
            for i, c in enumerate(todo):
                states = out.states[i, : int(out.mask[i].sum())].float()  # (L_i, m, D) real tokens only
                if self.nbytes + states.numel() * states.element_size() <= self.max_bytes:
                    self.memo[c] = states
                    self.nbytes += states.numel() * states.element_size()
                else:
                    extra[c] = states
        seqs = [self.memo[c] if c in self.memo else extra[c] for c in captions]
        L = max(x.shape[0] for x in seqs)
        states = torch.zeros(len(seqs), L, *seqs[0].shape[1:])  # (B, L, m, D)
        mask = torch.zeros(len(seqs), L, dtype=torch.bool)  # (B, L)
        for i, x in enumerate(seqs):
            states[i, : x.shape[0]], mask[i, : x.shape[0]] = x, True
        return states, mask


#################################################################################
#                                 Checkpoints                                   #
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


def load_checkpoint(path: str, which: str = "ema", device="cpu"):
    """→ (model, preset, ckpt_dir). `which` = "ema" (default for sampling) or "model"."""
    from safetensors.torch import load_file

    ckpt = find_checkpoint(path)
    try:
        with open(os.path.join(ckpt, "config.json")) as f:
            preset = Preset.from_dict(json.load(f))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"checkpoint {ckpt!r} has a missing or unreadable config.json ({e})") from None
    weights = os.path.join(ckpt, f"{which}.safetensors")
    if which == "ema" and not os.path.exists(weights):
        weights = os.path.join(ckpt, "model.safetensors")
    model = build_model(preset.model, device="cpu")
    try:
        model.load_state_dict(load_file(weights))
    except Exception as e:  # safetensors raises several types for truncated/corrupt files
        raise ValueError(f"checkpoint weights {weights!r} are missing or corrupt ({type(e).__name__}: {e})") from None
    return model.to(device).eval(), preset, ckpt


#################################################################################
#                                  Training                                     #
#################################################################################


def step_generator(seed: int, step: int, device="cpu") -> torch.Generator:
    """All randomness of one step from (seed, step): the key to exact resume."""
    return torch.Generator(device).manual_seed(seed * 1_000_003 + step)


def training_step(model, batch, tower_fn, codec, preset: Preset, step: int, device="cpu"):
    """One forward pass of Algorithm 1; returns (loss, per-sample loss, t)."""
    tcfg, mcfg = preset.train, preset.model
    g = step_generator(tcfg.seed, step)
    images, captions = batch
    drop = torch.rand(len(captions), generator=g) < tcfg.caption_dropout
    captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
    states, mask = tower_fn(captions)  # (B, L, m, D_u), (B, L)
    z0 = codec.encode(images.to(device))  # (B, C, h, w)
    t = sample_t(len(captions), tcfg.t_sampler, scale=tcfg.mode_scale, shift=tcfg.t_shift, generator=g).to(device)
    z_t, z1 = add_noise(z0, t, generator=g)  # (B, C, h, w)
    v = model(z_t, t, states.to(device), mask.to(device), eps=mcfg.router.eps, generator=g)
    per_sample = flow_loss(v, velocity_target(z0, z1), reduction="none")  # (B,)
    return per_sample.mean(), per_sample.detach(), t


def make_optimizer(model: nn.Module, cfg: TrainConfig):
    # No weight decay on gains, biases, registers and embeddings (1-D or token tables).
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "registers" not in n and "type_embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "registers" not in n and "type_embed" not in n)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=cfg.betas)


def make_data(spec: str, mcfg: ModelConfig, seed: int):
    """→ batch_fn(step, B) for ShapesWorld ("shapesworld") or a folder / .jsonl of real pairs."""
    import data

    if spec == "shapesworld":
        return lambda step, B: data.shapes_batch(seed, step * B, B, mcfg.image_size)
    real = data.ImageCaptionData(spec, area=mcfg.image_size ** 2,
                                 multiple=codec_shape(mcfg.codec)[1] * mcfg.gen.patch_size, seed=seed)
    return real.batch


def train(preset: Preset, out: str, resume: str | None = None, device="cpu", quiet=False, stop_at: int | None = None,
          data_spec: str = "shapesworld", features: str | None = None):
    """The single-process training loop. Returns the list of (step, loss) it logged.

    data_spec: "shapesworld" or a folder / .jsonl of image–caption pairs.
    features: an on-disk understanding-feature cache (data.build_feature_cache); U is then
    loaded only if a caption is missing from it.
    """
    from tqdm import tqdm

    import data
    from gen_tower import load_codec
    from und_tower import load_tower

    tcfg, mcfg = preset.train, preset.model
    check_size(mcfg.image_size, mcfg.codec, mcfg.gen.patch_size)
    torch.manual_seed(tcfg.seed)
    model = build_model(mcfg, device).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = make_optimizer(model, tcfg)
    start = 0
    if resume:
        ckpt = find_checkpoint(resume)
        state = torch.load(os.path.join(ckpt, "state.pt"), weights_only=False)
        from safetensors.torch import load_file
        model.load_state_dict(load_file(os.path.join(ckpt, "model.safetensors")))
        ema.load_state_dict(load_file(os.path.join(ckpt, "ema.safetensors")))
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        start = state["step"]
        log(f"resumed from {ckpt} at step {start}", quiet)
    memo = data.load_feature_cache(features) if features else None
    tower = TowerMemo(lambda: load_tower(mcfg.tower, device=device), memo=memo)
    if memo is None:
        log(f"understanding tower {mcfg.tower}: {count(tower.tower) / 1e6:.1f}M (frozen, m={mcfg.und_states})", quiet)
    else:
        log(f"understanding states for {len(memo)} captions from the feature cache {features}", quiet)
    batch_fn = make_data(data_spec, mcfg, tcfg.seed)
    codec = load_codec(mcfg.codec).to(device)
    log(f"generation tower {count(model.gen) / 1e6:.2f}M · router {count(model.router) / 1e6:.2f}M", quiet)
    os.makedirs(out, exist_ok=True)
    end = tcfg.steps if stop_at is None else min(stop_at, tcfg.steps)
    history, last_good = [], None
    bar = tqdm(range(start, end), initial=start, total=tcfg.steps, disable=quiet, dynamic_ncols=True)
    t0 = time.time()
    for step in bar:
        batch = batch_fn(step, tcfg.batch_size)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, tcfg)
        loss, per_sample, t = training_step(model, batch, tower, codec, preset, step, device)
        if not torch.isfinite(loss):
            msg = f"non-finite loss {loss.item()} at step {step}; stopping."
            msg += f" The last good checkpoint is {last_good}." if last_good else " No checkpoint was written yet."
            raise FloatingPointError(msg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
        opt.step()
        ema_update(ema, model, tcfg.ema_decay if step > tcfg.warmup else min(tcfg.ema_decay, (1 + step) / (10 + step)))
        history.append((step, loss.item()))
        if step % tcfg.log_every == 0 or step == end - 1:
            bins = loss_by_t_bins(per_sample, t, bins=4)
            bar.set_postfix(loss=f"{loss.item():.4f}", gnorm=f"{gnorm:.2f}", lr=f"{lr_at(step, tcfg):.2e}")
            with open(os.path.join(out, "log.jsonl"), "a") as f:
                f.write(json.dumps({"step": step, "loss": loss.item(), "loss_by_t": bins, "grad_norm": gnorm.item(),
                                    "lr": lr_at(step, tcfg), "elapsed_s": round(time.time() - t0, 1)}) + "\n")
        done = step + 1
        if done % tcfg.ckpt_every == 0 or done == end:
            state = {"optimizer": opt.state_dict(), "step": done, "torch_rng": torch.get_rng_state(),
                     "data_position": done * tcfg.batch_size}
            last_good = save_checkpoint(out, done, model, ema, preset, state)
        if tcfg.sample_every and (done % tcfg.sample_every == 0 or done == end):
            write_sample_grid(ema, tower, codec, preset, os.path.join(out, f"samples-{done:06d}.png"), device)
    return history


def write_sample_grid(model, tower_fn, codec, preset, path, device="cpu"):
    from sample import generate, save_grid  # lazy: sample.py imports this file

    prompts = ["a red circle", "a blue square", "a green triangle", "two circles", "three squares",
               "a red circle to the left of a blue square", "a yellow square and a purple circle", "a triangle"]
    images = generate(model, tower_fn, codec, prompts, preset, seed=0, device=device)
    save_grid(images, path, ncol=4)


def log(msg: str, quiet: bool = False):
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


#################################################################################
#                                      CLI                                      #
#################################################################################


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train a MoS model (see README).")
    p.add_argument("--preset", default="toy", help=f"one of: {', '.join(PRESETS)}")
    p.add_argument("--steps", type=int, help="total training steps (overrides the preset)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--out", default=None, help="run directory (default runs/<preset>)")
    p.add_argument("--resume", default=None, help="a run directory (latest checkpoint) or one checkpoint")
    p.add_argument("--data", default="shapesworld", help="'shapesworld', a folder of images + .txt captions, or a .jsonl")
    p.add_argument("--features", default=None, help="understanding-feature cache dir (python data.py --cache ...)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="override preset fields, e.g. --set model.gen.depth=8 train.lr=2e-3")
    p.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dry-run", action="store_true", help="print sizes (meta device) and exit")
    return p.parse_args(argv)


def main(args) -> int:
    if args.resume:
        with open(os.path.join(find_checkpoint(args.resume), "config.json")) as f:
            preset = Preset.from_dict(json.load(f))
    else:
        preset = get_preset(args.preset)
    for key in ("steps", "batch_size", "lr"):
        if getattr(args, key) is not None:
            setattr(preset.train, key, getattr(args, key))
    apply_overrides(preset, args.set)
    if args.dry_run:
        sizes = dry_run(preset)
        print(f"preset {args.preset}: {preset.about}")
        print(f"  understanding tower  {sizes['tower']}  (m = {sizes['und_states']} states × {sizes['und_dim']})")
        print(f"  generation tower     {sizes['generation_tower'] / 1e6:10.2f} M parameters")
        print(f"  router               {sizes['router'] / 1e6:10.2f} M parameters")
        print(json.dumps(sizes))
        return 0
    out = args.out or (args.resume if args.resume and not os.path.exists(os.path.join(args.resume, "config.json"))
                       else os.path.join("runs", args.preset))
    torch.set_num_threads(args.threads or max(1, os.cpu_count() or 1))
    train(preset, out, resume=args.resume, device=args.device, data_spec=args.data, features=args.features)
    print(f"done: checkpoints in {out}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(parse_args()))
    except (ValueError, FloatingPointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
