"""Text → image with a trained MoS: the sampler CLI, the latency profile and the router maps.

Paper Algorithm 2 (inference), Sec. 4.1 / Fig. 7 (latency breakdown), App. B.6 (steps, CFG,
rescale, linear-quadratic schedule), App. B.7 / Fig. 14 (router visualisation).
docs/design.md §15.2 (CLI contract).

    python sample.py "a dog holding a sign"                               # → sample.png
    python sample.py "three squares" --ckpt checkpoints/toy --seed 3 --out three.png  # ShapesWorld
    python sample.py --prompts prompts.txt --outdir out/                  # out/0000.png, …
    python sample.py "a blue triangle" --profile                          # Fig. 7-style table
    python sample.py "a blue triangle" --router-viz viz/                  # Fig. 14-style PNGs
    python sample.py "Einstein's favourite instrument" --ckpt runs/mos_s-stage2 --self-cot  # Sec. 4.4

Inference (Alg. 2):
    U(c) once per prompt ─► states (B, L, m, D_u) ─► W·S_i once per prompt (Proj is linear)
    z_1 ~ N(0, I);  for each step: R(c, t, z_t) ─► top-k (ε = 0) ─► G ─► v̂ ─► Euler step
    z_0 ─► codec.decode ─► image

With no --ckpt the small EmojiWorld checkpoint shipped in checkpoints/emoji/ is used (it also
edits: edit.py), so this works on a fresh machine right after `pip install -r requirements.txt`,
without a GPU or a download. checkpoints/toy/ is the ShapesWorld benchmark model.

Glossary: B batch · L context tokens · m und. states · n gen blocks · k selected · T steps.
"""

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
from PIL import Image

from flow import euler_sample, sampling_schedule

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CKPT = os.path.join(HERE, "checkpoints", "emoji")  # EmojiWorld: draws and edits (train.py --preset emoji)
TOY_CKPT = os.path.join(HERE, "checkpoints", "toy")  # ShapesWorld, the benchmark model (eval.py's default)


#################################################################################
#                                   Sampling                                    #
#################################################################################


def initial_noise(seeds: list[int], shape: tuple) -> torch.Tensor:
    """z_1, one image per seed, each drawn on its own generator: a picture depends only on its
    prompt and its seed, never on the batch it was generated in. (Line i of a prompt file with
    --seed S is the same image as that prompt alone with --seed S+i — up to float rounding: the
    CPU's matrix kernels may round a batch differently from one image alone, a pixel one
    level off now and then.)"""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])


@torch.no_grad()
def generate(model, tower_fn, codec, prompts: list[str], preset, *, seed: int = 0, seeds: list[int] | None = None,
             steps: int | None = None,
             cfg: float | None = None, shift: float = 1.0, schedule: str = "linear", rescale: float = 0.0,
             cfg_interval: tuple[float, float] | None = None,
             size: int | None = None, device="cpu", trace: dict | None = None,
             refs: torch.Tensor | None = None) -> np.ndarray:
    """Prompts → uint8 images (B, H, W, 3). Image i uses noise seed `seeds[i]` (default
    `seed + i`). `trace`, if given, collects the trajectory and the router's logits at every
    step (for --router-viz)."""
    mcfg, tcfg = preset.model, preset.train
    steps = steps or tcfg.sample_steps
    cfg = tcfg.cfg if cfg is None else cfg
    cfg_interval = tuple(tcfg.cfg_interval if cfg_interval is None else cfg_interval)
    size = size or mcfg.image_size
    channels, factor = codec.channels, codec.factor
    B = len(prompts)
    guided = cfg != 1.0
    # U once per prompt (and once for the empty prompt of the unconditional branch).
    texts = list(prompts) + ([""] * B if guided else [])
    ref_z = None
    if refs is None:
        states, mask = tower_fn(texts)  # (B or 2B, L, m, D_u)
    else:
        # MoS-Edit (edit.py): `prompts` are instructions, `refs` (B, 3, H, W) in [-1, 1] the source
        # images. CFG is on the instruction: the unconditional rows keep the reference (in G,
        # and in U when U is a VLM) and drop only the text.
        if refs.shape[0] != B:
            raise ValueError(f"got {refs.shape[0]} reference images for {B} instructions")
        size = refs.shape[-1]  # the target is drawn at the reference's (square) size
        ref_px = torch.cat([refs, refs]) if guided else refs  # (B or 2B, 3, H, W)
        states, mask = tower_fn(texts, images=ref_px)  # (B or 2B, L, m, D_u)
        ref_z = codec.encode(ref_px.to(device))  # (B or 2B, C, h, w), clean
    states, mask = states.to(device), mask.to(device)
    projected = model.project_states(states)  # (B or 2B, L, m, D_g): once for all steps and blocks
    seeds = [seed + i for i in range(B)] if seeds is None else list(seeds)
    z1 = initial_noise(seeds, (channels, size // factor, size // factor)).to(device)
    ts = sampling_schedule(steps, shift=shift, kind=schedule)

    def model_fn(z, t):
        # 2B rows [cond; uncond] on guided steps, B conditional rows outside the CFG interval.
        n = z.shape[0]
        v = model(z, t, states[:n], mask[:n], ref=None if ref_z is None else ref_z[:n], projected=projected[:n])
        if trace is not None:  # the router's logits of this step, conditional rows (the router is cheap)
            _, _, logits = model.routing(t[:B], model.gen.embed(z[:B]), states[:B], mask[:B])
            trace.setdefault("logits", []).append(logits.float().cpu())  # (B, L, n, m)
        return v

    out = euler_sample(model_fn, z1, ts, cfg=cfg, rescale=rescale, cfg_interval=cfg_interval,
                       return_trajectory=trace is not None)
    if trace is not None:
        z0, traj = out
        trace["trajectory"] = [codec.decode(z.to(device)).cpu() for z in traj]
        trace["timesteps"] = ts
    else:
        z0 = out
    images = codec.decode(z0.to(device))  # (B, 3, H, W) in [-1, 1]
    return to_uint8(images)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def save_grid(images: np.ndarray, path: str, ncol: int = 4, scale: int = 2, pad: int = 2):
    """uint8 (B, H, W, 3) → one PNG grid, each image upscaled ×scale (nearest) for viewing."""
    B, H, W, _ = images.shape
    ncol = min(ncol, B)
    nrow = (B + ncol - 1) // ncol
    h, w = H * scale, W * scale
    grid = Image.new("RGB", (ncol * (w + pad) + pad, nrow * (h + pad) + pad), (128, 128, 128))
    for i, img in enumerate(images):
        tile = Image.fromarray(img).resize((w, h), Image.NEAREST)
        grid.paste(tile, (pad + (i % ncol) * (w + pad), pad + (i // ncol) * (h + pad)))
    atomic_save(grid, path)


def atomic_save(img: Image.Image, path: str):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    img.save(tmp, format="PNG")
    os.replace(tmp, path)


#################################################################################
#                        --profile: the Fig. 7 latency breakdown                #
#################################################################################


@torch.no_grad()
def profile(model, tower, codec, prompt: str, preset, *, steps, cfg, device="cpu", repeats: int = 3) -> dict:
    """Seconds spent in U (once), R (per step), G (per step) and decode, best of `repeats`.

    R is timed with forward hooks on the router module; G is the rest of each model call.
    """
    def sync():
        if device != "cpu" and torch.cuda.is_available():
            torch.cuda.synchronize()

    best = None
    for _ in range(repeats):
        router_time = [0.0]
        start = {}

        def pre(_m, _i):
            sync()
            start["r"] = time.perf_counter()

        def post(_m, _i, _o):
            sync()
            router_time[0] += time.perf_counter() - start["r"]

        hooks = [model.router.register_forward_pre_hook(pre), model.router.register_forward_hook(post)]
        sync()
        t0 = time.perf_counter()
        prompts = [prompt] + ([""] if cfg != 1.0 else [])
        tower.tower(prompts)  # time U itself, not a hit in the per-caption memo
        sync()
        t_u = time.perf_counter() - t0
        states, mask = tower(prompts)
        states, mask = states.to(device), mask.to(device)
        projected = model.project_states(states)
        sync()
        t1 = time.perf_counter()
        size = preset.model.image_size
        z = initial_noise([0], (codec.channels, size // codec.factor, size // codec.factor)).to(device)
        z = euler_sample(lambda zz, tt: model(zz, tt, states, mask, projected=projected), z,
                         sampling_schedule(steps), cfg=cfg)
        sync()
        t2 = time.perf_counter()
        codec.decode(z)
        sync()
        t3 = time.perf_counter()
        for h in hooks:
            h.remove()
        r = router_time[0]
        res = {"understanding_tower_s": t_u, "router_per_step_s": r / steps,
               "generation_tower_per_step_s": (t2 - t1 - r) / steps, "decode_s": t3 - t2,
               "steps": steps, "cfg": cfg, "total_s": t3 - t0, "device": str(device)}
        if best is None or res["total_s"] < best["total_s"]:
            best = res
    return best


def print_profile(p: dict):
    rows = [("understanding tower (once)", p["understanding_tower_s"]),
            ("router (per step)", p["router_per_step_s"]),
            ("generation tower (per step)", p["generation_tower_per_step_s"]),
            ("decode (once)", p["decode_s"]),
            (f"total ({p['steps']} steps, cfg {p['cfg']})", p["total_s"])]
    print(f"{'stage':<34}{'ms':>10}")
    for name, s in rows:
        print(f"{name:<34}{1000 * s:>10.2f}")
    print(json.dumps(p))


#################################################################################
#                    --router-viz: the Fig. 14 router visualisation             #
#################################################################################


def plot_map(values: np.ndarray, path: str, *, title: str, ylabel: str, yticks: list[str], xlabel: str,
             xticks: list[str]):
    """One routing map as a labelled heat map with a colour scale, written atomically.

    values (rows, cols) are routing weights w̄ (Eq. 3's softmax over the m states), so the
    colour scale starts at 0. matplotlib is imported here: only figures need it.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    rows, cols = values.shape
    fig, ax = plt.subplots(figsize=(1.2 + 0.45 * cols, 1.2 + 0.28 * rows), dpi=150)
    im = ax.imshow(values, cmap="Blues", vmin=0.0, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(cols), xticks)
    ax.set_yticks(range(rows), yticks, fontsize=7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="routing weight w̄")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path + ".tmp", format="png", bbox_inches="tight")
    plt.close(fig)
    os.replace(path + ".tmp", path)


def router_viz(model, tower, codec, prompt: str, preset, outdir: str, *, steps, cfg, seed=0, at_step=0, device="cpu"):
    """The router's choices for one prompt, as in App. B.7 / Fig. 14, written to outdir:

    trajectory.png        the denoising trajectory, ~8 frames from noise to image
    layers_over_steps.png t × layers: the mean routing weight of each state S_i at each step
                          (averaged over generation blocks and real context tokens)
    tokens_x_layers.png   context tokens × layers at step `at_step` (averaged over blocks)
    blocks_x_layers.png   generation blocks × layers at step `at_step` (averaged over tokens):
                          the paper's m×n routing matrix, transposed
    router.json           the numbers behind the three maps
    Returns the first two maps: (T, m) and (L, m).
    """
    if model.cfg.router.mode in ("last", "hand"):
        raise ValueError("this checkpoint uses static routing: there is no router to visualise")
    trace = {}
    generate(model, tower, codec, [prompt], preset, seed=seed, steps=steps, cfg=cfg, device=device, trace=trace)
    os.makedirs(outdir, exist_ok=True)
    traj = trace["trajectory"]
    pick = np.linspace(0, len(traj) - 1, min(8, len(traj))).round().astype(int)
    save_grid(to_uint8(torch.cat([traj[i][:1] for i in pick])), os.path.join(outdir, "trajectory.png"),
              ncol=len(pick), scale=4)
    ts = trace["timesteps"]
    _, mask = tower([prompt])
    real = mask[0]  # (L,) the prompt's tokens, padding excluded
    probs = [lg[0][real].float().softmax(-1) for lg in trace["logits"]]  # T × (L, n, m)
    m = probs[0].shape[-1]
    layers = [f"S$_{{{i}}}$" for i in range(m)]
    per_step = torch.stack([p.mean(dim=(0, 1)) for p in probs]).numpy()  # (T, m)
    at = min(at_step, len(probs) - 1)
    tok = probs[at].mean(dim=1).numpy()  # (L, m)
    blocks = probs[at].mean(dim=0).numpy()  # (n, m)
    tokens = tower.tower.processor.tokenize(prompt) if hasattr(tower.tower.processor, "tokenize") else None
    names = (["[CLS]"] + list(tokens) + ["[SEP]"]) if tokens and len(tokens) + 2 == tok.shape[0] else \
        [f"token {i}" for i in range(tok.shape[0])]
    understanding = "understanding state (S$_0$ = embeddings)"
    plot_map(per_step, os.path.join(outdir, "layers_over_steps.png"), xlabel=understanding, xticks=layers,
             ylabel="denoising step t (1 = noise)", yticks=[f"{float(t):.2f}" for t in ts[:-1]],
             title=f"mean routing weight over blocks and tokens\n\"{prompt}\"")
    plot_map(tok, os.path.join(outdir, "tokens_x_layers.png"), xlabel=understanding, xticks=layers,
             ylabel="context token", yticks=names,
             title=f"routing weight per token at t = {float(ts[at]):.2f} (mean over blocks)")
    plot_map(blocks, os.path.join(outdir, "blocks_x_layers.png"), xlabel=understanding, xticks=layers,
             ylabel="generation block j", yticks=[str(j) for j in range(blocks.shape[0])],
             title=f"routing weight per block at t = {float(ts[at]):.2f} (mean over tokens)")
    with open(os.path.join(outdir, "router.json"), "w") as f:
        json.dump({"prompt": prompt, "timesteps": [float(t) for t in ts[:-1]], "layers_over_steps": per_step.tolist(),
                   "tokens": names, "tokens_x_layers": tok.tolist(), "blocks_x_layers": blocks.tolist(),
                   "at_step": at}, f)
    return per_step, tok


#################################################################################
#                                       CLI                                     #
#################################################################################


def load_everything(ckpt: str, device="cpu"):
    """Checkpoint → (model, memoised tower, codec, preset)."""
    from gen_tower import load_codec
    from checkpoint import load_checkpoint
    from und_tower import TowerMemo, load_tower

    model, preset, _ = load_checkpoint(ckpt, which="ema", device=device)
    dtype = getattr(torch, preset.train.tower_dtype) if getattr(preset.train, "tower_dtype", "") else None
    # bf16 for full presets; a random-tower ablation rebuilds the same seeded tower it trained with
    tower = TowerMemo(load_tower(preset.model.tower, device=device, dtype=dtype, init=preset.model.tower_init))
    codec = load_codec(preset.model.codec).to(device)
    return model, tower, codec, preset


def apply_self_cot(tower, prompts: list[str], max_new_tokens: int = 128) -> list[str]:
    """Self-CoT (Sec. 4.4): U's own LM rewrites every prompt (und_tower.self_cot); the rewrites
    are then what U encodes and R routes. `tower` is the TowerMemo of load_everything."""
    from und_tower import self_cot

    if max_new_tokens < 1:
        raise ValueError(f"--cot-tokens must be >= 1, got {max_new_tokens}")
    und = tower.tower
    rewritten = self_cot(und, prompts, max_new_tokens=max_new_tokens)
    # NOTE: U truncates text contexts at max_length (77 by default); a reasoning caption runs
    # longer, so make room for all of it (plus bos/eos) rather than cut the reasoning off.
    und.max_length = max(und.max_length, max_new_tokens + 8)
    for before, after in zip(prompts, rewritten):
        print(f"self-CoT: {before!r} → {after!r}", file=sys.stderr)
    return rewritten


def read_prompts(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            prompts = [line.strip() for line in f if line.strip()]
    except UnicodeDecodeError as e:
        raise ValueError(f"prompt file {path!r} is not UTF-8 text (it holds the byte {e.object[e.start]:#04x}); "
                         "save it as UTF-8") from None
    except OSError as e:
        raise ValueError(f"cannot read prompt file {path!r}: {e.strerror}") from None
    if not prompts:
        raise ValueError(f"prompt file {path!r} is empty")
    return prompts


def note_unknown_prompts(prompts: list[str], world: str) -> str | None:
    """One line for prompts that use no word of the world the checkpoint was trained on (its
    train.world, a key of data.WORLDS): the model has never seen what they ask for, so say what
    it can draw. None when every prompt names something (or the world is not a synthetic one)."""
    import data

    if world not in data.WORLDS:
        return None
    w = data.WORLDS[world]
    unknown = [p for p in prompts if p.strip() and not w.knows(p)]  # "" is the unconditional prompt
    if not unknown:
        return None
    if len(prompts) == 1:
        which = f"{unknown[0]!r} names"
    else:
        which = f"{len(unknown)} of {len(prompts)} prompts (e.g. {unknown[0]!r}) name"
    return f"note: {which} nothing this checkpoint was trained to draw; {w.name} knows {w.describe()}"


def add_sampler_args(p: argparse.ArgumentParser, guidance_help: str = "classifier-free guidance scale"):
    """The sampler options sample.py and edit.py share (Sec. 3, App. B.6; flow.py)."""
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, help="Euler steps (default: the preset's)")
    p.add_argument("--cfg", type=float, help=f"{guidance_help} (default: the preset's)")
    p.add_argument("--shift", type=float, default=1.0, help="time shift of the sampling schedule")
    p.add_argument("--schedule", default="linear", choices=["linear", "linear_quadratic"])
    p.add_argument("--rescale", type=float, default=0.0, help="CFG rescale φ in [0, 1]")
    p.add_argument("--cfg-interval", type=float, nargs=2, metavar=("LO", "HI"),
                   help="guide only for t in [LO, HI] (t = 1 is noise; default: the preset's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Sample images from a MoS checkpoint.")
    p.add_argument("prompt", nargs="?", help="the text prompt")
    p.add_argument("--prompts", help="a text file, one prompt per line → --outdir/0000.png, …")
    p.add_argument("--outdir", default="samples")
    p.add_argument("--out", default="sample.png")
    p.add_argument("--grid", metavar="FILE.png", help="with --prompts: also write all images as one grid")
    p.add_argument("--ncol", type=int, default=8, help="grid columns")
    p.add_argument("--ckpt", default=DEFAULT_CKPT, help="checkpoint dir or run dir (default: the shipped EmojiWorld model)")
    add_sampler_args(p)
    p.add_argument("--size", type=int, help="image size in pixels (default: the preset's)")
    p.add_argument("--batch-size", type=int, default=64, help="prompts per forward batch")
    p.add_argument("--profile", action="store_true", help="print the latency breakdown (Fig. 7)")
    p.add_argument("--router-viz", metavar="DIR", help="write router visualisations (Fig. 14) to DIR")
    p.add_argument("--viz-step", type=int, default=0, help="sampling step of the per-token map")
    p.add_argument("--self-cot", action="store_true",
                   help="Sec. 4.4: the tower's LM first rewrites each prompt as a reasoning caption (LLM/VLM towers)")
    p.add_argument("--cot-tokens", type=int, default=128, help="most tokens a self-CoT caption may have")
    return p.parse_args(argv)


def main(args) -> int:
    from checkpoint import read_preset
    from gen_tower import check_count, check_size

    if args.prompt is None and args.prompts is None:
        raise ValueError("give a prompt, or --prompts FILE")
    for flag, value in (("--steps", args.steps), ("--batch-size", args.batch_size), ("--ncol", args.ncol),
                        ("--cot-tokens", args.cot_tokens)):
        check_count(flag, value)
    check_count("--viz-step", args.viz_step, minimum=0)
    prompts = read_prompts(args.prompts) if args.prompts else [args.prompt]
    preset, _ = read_preset(args.ckpt)  # its config.json only: check the inputs before the weights load
    size = preset.model.image_size if args.size is None else args.size
    check_size(size, preset.model.codec, preset.model.gen.patch_size)
    note = note_unknown_prompts(prompts, preset.train.world)
    if note:
        print(note, file=sys.stderr)  # a note, not an error: the images are still drawn
    model, tower, codec, preset = load_everything(args.ckpt, args.device)
    if getattr(args, "self_cot", False):
        prompts = apply_self_cot(tower, prompts, args.cot_tokens)
    opts = dict(steps=args.steps or preset.train.sample_steps, cfg=preset.train.cfg if args.cfg is None else args.cfg)
    if args.profile:
        print_profile(profile(model, tower, codec, prompts[0], preset, device=args.device, **opts))
    if args.router_viz:
        router_viz(model, tower, codec, prompts[0], preset, args.router_viz, seed=args.seed,
                   at_step=args.viz_step, device=args.device, **opts)
        print(f"router visualisation written to {args.router_viz}/", file=sys.stderr)
    kw = dict(shift=args.shift, schedule=args.schedule, rescale=args.rescale, size=size, device=args.device,
              cfg_interval=args.cfg_interval, **opts)
    if args.prompts:
        os.makedirs(args.outdir, exist_ok=True)
        everything = []
        for s in range(0, len(prompts), args.batch_size):
            imgs = generate(model, tower, codec, prompts[s:s + args.batch_size], preset, seed=args.seed + s, **kw)
            for i, img in enumerate(imgs):
                atomic_save(Image.fromarray(img), os.path.join(args.outdir, f"{s + i:04d}.png"))
            everything.append(imgs)
        if args.grid:
            save_grid(np.concatenate(everything), args.grid, ncol=args.ncol, scale=3)
        print(f"wrote {len(prompts)} images to {args.outdir}/", file=sys.stderr)
    else:
        img = generate(model, tower, codec, prompts, preset, seed=args.seed, **kw)[0]
        atomic_save(Image.fromarray(img), args.out)
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(parse_args()))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
