"""The preset zoo: every setting of a training run, named after the paper's models.

A `Preset` is a `ModelConfig` (gen_tower.py: the understanding tower's shape, the generation
tower, the router, the codec) plus a `TrainConfig` (App. A: AdamW, warm-up + cosine schedule,
EMA, the timestep sampler, caption dropout for CFG; checkpoints and sampling defaults). A
preset is all a model needs to be rebuilt, so a checkpoint's config.json is `Preset.to_dict()`
and sample.py, edit.py and `train.py --resume` read it back with `Preset.from_dict`.

    toy        ShapesWorld 32 px on a laptop CPU, the embedded MiniLM tower, trained in phases
    toy_edit   MoS-Edit (Sec. 3.4) on ShapesWorld edit triplets, from the toy checkpoint
    ablation   Sec. 4.1: LLaMA-3.2-3B tower, ~1B generation tower
    mos_s      MoS-S (Sec. 3.5): PLM-8B tower, 3B generation tower, 100M router
    mos_l      MoS-L (Sec. 3.5): InternVL-14B tower, 5B generation tower, 100M router

The full presets train in the four stages of Sec. 3.5 (`STAGES`, `stage_preset`: `train.py
--stage N`), and any field changes from the command line (`apply_overrides`: `train.py --set
model.gen.depth=8`). docs/design.md §11 (training), §12 (presets).

Neighbours: train.py trains a preset; checkpoint.py builds its model and writes it into every
checkpoint; sizing.py sizes it on the meta device (`train.py --dry-run`).
"""

import copy
import dataclasses
import os
from dataclasses import dataclass, field

from gen_tower import GenConfig, ModelConfig, check_count
from router import RouterConfig


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
    # MoS-Edit (toy_edit): start from these weights (a checkpoint dir or a .safetensors file;
    # relative paths are tried from the repository too) — the paper extends a trained
    # MoS-Image to MoS-Edit (Sec. 3.5). Only the reference type embedding starts fresh.
    init_from: str = ""
    # Edit presets: this fraction of steps trains plain text-to-image (no reference) instead,
    # so the model keeps its text-to-image skill. 0 = edits only.
    t2i_fraction: float = 0.0
    cfg_interval: tuple[float, float] = (0.0, 1.0)  # guide only for t in [lo, hi] (flow.euler_sample)
    # Staged training (Sec. 3.5): 0 = not staged (the toy), 1..4 = the stage `stage_preset` set.
    stage: int = 0
    # dtype the frozen understanding tower is loaded in: "" = as stored (fp32 for the embedded
    # MiniLM), "bfloat16" for the full presets (App. A: "the understanding tower is set
    # entirely in bfloat16"). Its states are cast to fp32 before the router sees them.
    tower_dtype: str = ""
    # Scale-out (torchrun + FSDP2, see distributed.py). micro_batch: rows per forward on
    # each process, 0 = all of its batch_size / world_size rows at once; smaller values
    # accumulate gradients, so the global batch stays batch_size on any number of GPUs.
    micro_batch: int = 0
    act_ckpt: str = "auto"  # activation checkpointing per generation block: auto (on from 1024²), on, off
    # torch.compile backend for the training forward + backward ("" = eager; "inductor" fuses
    # the small ops that dominate a toy step on a CPU: bench/toy_step.py). Single process only.
    # The weights, EMA, checkpoints and sample grids stay those of the plain module.
    compile: str = ""
    # The synthetic world the training data came from (a key of data.WORLDS: "shapesworld"), or
    # "" for real image–caption data. train() records it from its data source (--data,
    # --latents), so a checkpoint says what its prompts can name (sample.py's note).
    world: str = "shapesworld"
    # dtype of the weights a phased recipe exports (`checkpoint.export_weights`): "" = as trained (fp32),
    # "bfloat16" halves the file (the toy's 18 blocks: 33.6 → 16.8 MB) and loads into fp32.
    export_dtype: str = ""

    def check(self) -> None:
        """The counts a run needs, one readable error each (before anything is built)."""
        for name in ("steps", "batch_size", "log_every", "ckpt_every"):
            check_count(f"train.{name}", getattr(self, name))
        for name in ("micro_batch", "sample_every", "warmup"):  # 0 = off / all rows / no warm-up
            check_count(f"train.{name}", getattr(self, name), minimum=0)


@dataclass
class Preset:
    model: ModelConfig
    train: TrainConfig
    about: str = ""
    # A recipe in phases (the toy's): each phase is a list of `--set` assignments applied to
    # this preset, trained as its own run in <out>/phase-k; phase k > 1 starts from phase
    # k-1's EMA weights (`checkpoint.init_weights`, which grows the tower when the phase asks for more
    # blocks), and the last phase's EMA is exported in train.export_dtype. Empty: one run.
    phases: list[list[str]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "Preset":
        t = dict(d["train"])
        t["betas"] = tuple(t["betas"])
        if "cfg_interval" in t:
            t["cfg_interval"] = tuple(t["cfg_interval"])
        if "world" not in t:  # a config without a world: a pixel-codec model is a ShapesWorld toy
            t["world"] = "shapesworld" if d["model"].get("codec") == "pixel" else ""
        return Preset(ModelConfig.from_dict(d["model"]), TrainConfig(**t), d.get("about", ""),
                      [list(a) for a in d.get("phases", [])])


def _toy() -> Preset:
    # The CPU recipe; docs/experiments.md holds the measurements behind each setting.
    # x-prediction (GenConfig.prediction) is what makes pixel-space training work at all; batch
    # 8 buys more updates per CPU-second than 64; training at shifted noise levels (t_shift 2)
    # and lr 1e-3 beat their alternatives at a fixed step budget. `--steps N` trains this base
    # setting alone (eager, 6 blocks) — the quick way to try a change. Without `--steps` the
    # preset runs its phases: 10000 steps at 6 blocks, then the tower grows to 12 blocks
    # (`checkpoint.grow_depth`) for 8000 more and to 18 for 16000 more, and a warm restart at 18
    # blocks for 16000 more; each phase a fresh AdamW with its own warm-up and cosine, compiled
    # (train.compile), ending in a bf16 export that the next phase starts from; the last is
    # runs/toy/export. Most steps go to 18 blocks: depth paid more than steps at a fixed depth
    # (docs/experiments.md §5-6) and binding still improved there (§6, §14), though an 18-block
    # step costs ~3× a 6-block one. checkpoints/toy is this recipe's export (mean 0.802, §14).
    compiled = "train.compile=inductor"
    return Preset(
        model=ModelConfig(
            tower="minilm", und_states=7, und_dim=384, codec="pixel", image_size=32,
            gen=GenConfig(dim=192, depth=6, heads=4, patch_size=4, prediction="x"),
            router=RouterConfig(dim=96, heads=4, k=2, eps=0.05),
        ),
        # Sampling defaults: CFG 3 only for t <= 0.8 (guidance at high noise erases objects
        # whose colour the prompt leaves open; docs/experiments.md "Sampler levers").
        train=TrainConfig(steps=16000, batch_size=8, lr=1e-3, lr_min=1e-4, warmup=200, ema_decay=0.999,
                          t_shift=2.0, log_every=50, sample_every=0, ckpt_every=2000, cfg=3.0,
                          cfg_interval=(0.0, 0.8), export_dtype="bfloat16"),
        about="ShapesWorld 32px on a 2-core CPU, embedded all-MiniLM-L6-v2 tower",
        phases=[
            ["train.steps=10000", compiled],  # 6 blocks from scratch
            ["model.gen.depth=12", "train.steps=8000", "train.lr=3e-4", "train.lr_min=1e-5", "train.seed=1",
             compiled],
            ["model.gen.depth=18", "train.steps=16000", "train.lr=3e-4", "train.lr_min=1e-5", "train.seed=2",
             compiled],
            ["model.gen.depth=18", "train.steps=16000", "train.lr=2e-4", "train.lr_min=1e-5", "train.seed=3",
             compiled],  # a warm restart at the same depth
        ],
    )


def _emoji() -> Preset:
    # EmojiWorld (emojiworld.py): the checkpoint that sample.py and edit.py use by default. The
    # toy's model, settings and depth schedule on OpenMoji glyphs at 32 px (48 px with patch 6
    # scored no better at the same cost, docs/experiments.md §14e): phases 1-3 learn to draw
    # (text to image) while the tower grows 6 -> 12 -> 18 blocks, as the toy's do; phase 4 adds
    # MoS-Edit's reference tokens (Sec. 3.4) at 18 blocks and trains edit triplets and
    # text-to-image pairs half and half, so that one checkpoint both draws ("a dog holding a
    # sign") and edits ("add glasses").
    p = _toy()
    p.train.world = "emojiworld"  # the data, unless --data says otherwise
    p.about = "EmojiWorld 32px (OpenMoji glyphs) on a 2-core CPU: text to image and MoS-Edit in one checkpoint"
    p.phases = [list(a) for a in p.phases[:3]] + [
        ["model.gen.depth=18", "model.gen.ref=true", "train.t2i_fraction=0.5", "train.steps=16000", "train.lr=2e-4",
         "train.lr_min=1e-5", "train.seed=3", "train.compile=inductor"],
    ]
    return p


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
                          ema_decay=0.9999, sample_every=5000, ckpt_every=5000, cfg=5.0, sample_steps=50,
                          stage=1, tower_dtype="bfloat16"),
        about=about,
    )


def _toy_edit() -> Preset:
    # MoS-Edit on ShapesWorld (Sec. 3.4): the toy model + reference-image tokens, initialised
    # from the shipped toy (checkpoints/toy, 18 blocks: the tower's shape must match the weights
    # it starts from) and trained on edit triplets (data.edit_batch). The toy's settings — batch
    # 8, time shift 2, compiled — at a fine-tune's peak lr. Edits learn slowly: at batch 32 the
    # 6-block edit model went 0.35 → 0.62 → 0.72 over 35k → 131k → 300k edits (docs/experiments.md
    # §13), so this run sees 128k. One phase, so its EMA is exported in bf16 to
    # runs/toy_edit/export like the toy's (18 blocks in fp32 would be 34 MB). No sample grid (it
    # is a text-to-image grid); edit.py / eval.py --edit show and score the edits with CFG 4 on
    # every step (TrainConfig's default).
    p = _toy()
    p.model.gen.ref = True
    p.model.gen.depth = 18
    p.train = TrainConfig(steps=16000, batch_size=8, lr=3e-4, lr_min=1e-5, warmup=200, ema_decay=0.999,
                          t_shift=2.0, log_every=50, sample_every=0, ckpt_every=2000, export_dtype="bfloat16",
                          init_from=os.path.join("checkpoints", "toy", "ema.safetensors"))
    p.phases = [["train.compile=inductor"]]
    p.about = "MoS-Edit on ShapesWorld 32px edit triplets, from the toy checkpoint; text-only tower sees the instruction"
    return p


PRESETS = {
    "toy": _toy,
    "toy_edit": _toy_edit,
    "emoji": _emoji,
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


# The four-stage progressive schedule of Sec. 3.5, with App. A's timestep samplers:
#   stage 1  512²   pre-training on O(100M) filtered pairs      logit-normal t
#   stage 2  1024²  same data, "a similar computational budget"  mode sampling 0.8 + shift 3.0
#   stage 3  1024²  aesthetic tuning on an O(10M) HQ subset      mode 0.8 + shift 3.0
#   stage 4  2048²  super-resolution tuning on O(1M) 2K images   mode 0.8 + shift 3.0
# Steps: App. A runs "400k–1200k steps" per pre-training stage and 50k for HQ fine-tuning;
# we take the low end. Where the paper is open we decided: every stage restarts App. A's
# schedule (4k warm-up to 1e-4, cosine to 1.5e-5) from the previous stage's weights
# (`--init-from`, weights only: a fresh optimiser, as the new resolution changes the loss
# landscape); the global batch stays 1024. The data of each stage is the user's (--data).
STAGES = {
    1: dict(image_size=512, t_sampler="logit_normal", t_shift=1.0, steps=400_000,
            about="stage 1: 512² pre-training, logit-normal t"),
    2: dict(image_size=1024, t_sampler="mode", t_shift=3.0, steps=400_000,
            about="stage 2: 1024² pre-training on the same data, mode sampling (0.8) + shift 3.0"),
    3: dict(image_size=1024, t_sampler="mode", t_shift=3.0, steps=50_000,
            about="stage 3: 1024² aesthetic tuning on an HQ subset"),
    4: dict(image_size=2048, t_sampler="mode", t_shift=3.0, steps=50_000,
            about="stage 4: 2048² super-resolution tuning on 2K images"),
}


def stage_preset(preset: Preset, stage: int) -> Preset:
    """The full preset `preset` set up for training stage 1..4 (Sec. 3.5): resolution (the
    bucket area of dynamic-resolution training), timestep sampler and step budget. Returns a
    copy; the model architecture is the same in every stage, so stage s+1 loads stage s's
    weights strictly."""
    if stage not in STAGES:
        raise ValueError(f"--stage must be one of {', '.join(map(str, STAGES))} (Sec. 3.5), got {stage}")
    if preset.model.codec != "wan2.2":
        raise ValueError("stages are for the full presets (ablation, mos_s, mos_l) in Wan 2.2 latent space; "
                         "the toy trains at one resolution")
    p = copy.deepcopy(preset)
    s = STAGES[stage]
    p.model.image_size = s["image_size"]
    p.train.t_sampler, p.train.t_shift, p.train.mode_scale = s["t_sampler"], s["t_shift"], 0.8
    p.train.steps, p.train.stage = s["steps"], stage
    p.train.lr, p.train.lr_min, p.train.warmup = 1e-4, 1.5e-5, 4000  # App. A, restarted per stage
    p.about = f"{preset.about.split(' | ')[0]} | {s['about']}"
    return p


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
