"""Image editing with a trained MoS-Edit checkpoint: reference image + instruction → edited image.

Paper Sec. 3.4 and Fig. 4 (MoS-Edit inference), App. B.5 (the reference image goes to both
towers). docs/design.md §10, §15.3 (CLI contract).

    python edit.py examples/dog.png "add glasses"                          # → edited.png
    python edit.py img.png "make the red circle blue" --ckpt checkpoints/toy_edit --seed 3
    python edit.py --edits edits.jsonl --outdir out/   # lines {"image": PATH, "instruction": TEXT}
                                                       # → out/0000.png, 0001.png, … in line order
                                                       # (--grid FILE.png: sources above their edits)

Inference (Fig. 4, Alg. 2 with a reference):
    reference image ──┬─► U (with the instruction, when U is a VLM) ─► states (B, L, m, D_u)
                      └─► codec.encode ─► clean reference tokens in G's stream (never noised)
    z_1 ~ N(0, I);  each step: R(c, t, z_t) ─► top-k ─► G([registers; z_t tokens; ref tokens]) ─► v̂
    CFG on the instruction: the unconditional branch keeps the reference and drops the text.
    z_0 ─► codec.decode ─► edited image

NOTE: the shipped checkpoints' understanding tower is MiniLM, a text-only encoder, so
U reads the instruction only; the reference reaches the model through G's reference tokens.
That is the paper's "w/o understanding-tower context" variant (App. B.5), not the full design;
a VLM tower (plm-8b, internvl-14b) reads image + instruction (und_tower.edit_context).

The sampling machinery (noise seeds, schedule, CFG, rescale) is sample.py's `generate`, with
the reference images passed as `refs`. Input images of another size are resized (and
centre-cropped if not square) to the checkpoint's training size, with a note on stderr.

With no --ckpt the small EmojiWorld checkpoint shipped in checkpoints/emoji/ is used (the one
sample.py draws with); checkpoints/toy_edit/ edits ShapesWorld images.
"""

import argparse
import json
import os
import sys

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_EDIT_CKPT = os.path.join(HERE, "checkpoints", "emoji")  # draws and edits EmojiWorld
TOY_EDIT_CKPT = os.path.join(HERE, "checkpoints", "toy_edit")  # ShapesWorld edits (eval.py --edit's default)


#################################################################################
#                                   Inputs                                      #
#################################################################################


def open_image(path: str):
    """An image file → a PIL RGB image; a missing or unreadable file is one ValueError naming it.
    (Called for every input BEFORE the checkpoint loads, so a typo fails fast.)"""
    from PIL import Image, UnidentifiedImageError

    if os.path.isdir(path):
        raise ValueError(f"image {path!r} is a directory, not an image file")
    if not os.path.isfile(path):
        raise ValueError(f"image {path!r} does not exist")
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"{path!r} is not an image file that can be read ({type(e).__name__})") from None


def to_model_size(img, size: int, name: str = "the image", note=None) -> torch.Tensor:
    """PIL image → (3, size, size) float32 in [-1, 1] (the pixel codec's range). Another size is
    scaled and centre-cropped to size × size (data.resize_center_crop), and `note(message)` is
    called so the CLI can say so on stderr."""
    import data

    if img.size != (size, size):
        if note is not None:
            note(f"note: {name} is {img.width}x{img.height}; resized to the model's {size}x{size}")
        img = data.resize_center_crop(img, (size, size))
    return data.to_tensor(np.asarray(img))  # (3, S, S)


def check_instruction(text) -> str:
    if not isinstance(text, str) or not text.strip():
        raise ValueError("the instruction is empty: say what to change, e.g. \"make the red circle blue\"")
    return text.strip()


def read_edits(path: str) -> list[tuple[str, str]]:
    """A JSONL of {"image": PATH, "instruction": TEXT} lines → [(image path, instruction)].
    Image paths are relative to the file. One ValueError naming the file and line if bad."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"edit file {path!r} is not UTF-8 text (it holds the byte {e.object[e.start]:#04x}); "
                         "save it as UTF-8") from None
    except OSError as e:
        raise ValueError(f"cannot read edit file {path!r}: {e.strerror}") from None
    root, edits = os.path.dirname(os.path.abspath(path)), []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            image, instruction = item["image"], item["instruction"]
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{path}:{n}: expected a JSON object with 'image' and 'instruction'") from None
        try:
            instruction = check_instruction(instruction)
        except ValueError as e:
            raise ValueError(f"{path}:{n}: {e}") from None
        edits.append((os.path.join(root, str(image)), instruction))
    if not edits:
        raise ValueError(f"edit file {path!r} holds no edits")
    return edits


#################################################################################
#                                    Editing                                    #
#################################################################################


def load_edit_model(ckpt: str, device="cpu"):
    """sample.load_everything for an edit checkpoint; a text-to-image one is a clear error."""
    from checkpoint import find_checkpoint
    from presets import Preset
    from sample import load_everything

    try:  # look before loading the tower: a wrong checkpoint fails in a blink
        with open(os.path.join(find_checkpoint(ckpt), "config.json")) as f:
            is_edit = Preset.from_dict(json.load(f)).model.gen.ref
    except (OSError, ValueError, KeyError, TypeError):
        is_edit = True  # let load_everything give its own precise error
    if not is_edit:
        raise ValueError(f"checkpoint {ckpt!r} is a text-to-image model (no reference tokens); "
                         "use sample.py, or an edit checkpoint such as checkpoints/emoji")
    return load_everything(ckpt, device)


def edit_images(model, tower, codec, preset, refs: torch.Tensor, instructions: list[str], *, seed: int = 0,
                seeds: list[int] | None = None, **sampler) -> np.ndarray:
    """refs (B, 3, S, S) in [-1, 1] + B instructions → uint8 edited images (B, S, S, 3).
    Image i uses noise seed seeds[i] (default seed + i); `sampler` = generate's options
    (steps, cfg, shift, schedule, rescale, device)."""
    from sample import generate

    return generate(model, tower, codec, instructions, preset, seed=seed, seeds=seeds, refs=refs, **sampler)


#################################################################################
#                                       CLI                                     #
#################################################################################


def parse_args(argv=None):
    from sample import add_sampler_args

    p = argparse.ArgumentParser(description="Edit an image with a MoS-Edit checkpoint.")
    p.add_argument("image", nargs="?", help="the image to edit")
    p.add_argument("instruction", nargs="?", help='what to change, e.g. "make the red circle blue"')
    p.add_argument("--edits", metavar="FILE.jsonl", help='lines {"image": PATH, "instruction": TEXT} → --outdir')
    p.add_argument("--outdir", default="edits")
    p.add_argument("--grid", metavar="FILE.png", help="with --edits: also write a grid, each source above its edit")
    p.add_argument("--ncol", type=int, default=8, help="grid columns (edits per row pair)")
    p.add_argument("--out", default="edited.png")
    p.add_argument("--ckpt", default=DEFAULT_EDIT_CKPT, help="checkpoint dir or run dir (default: the shipped EmojiWorld model)")
    add_sampler_args(p, guidance_help="guidance scale on the instruction")
    p.add_argument("--batch-size", type=int, default=64, help="edits per forward batch")
    return p.parse_args(argv)


def main(args) -> int:
    from PIL import Image

    from gen_tower import check_count
    from sample import atomic_save

    if args.grid and not args.edits:
        raise ValueError("--grid needs --edits FILE.jsonl (a single edit is one image: --out)")
    if args.edits:
        if args.image is not None:
            raise ValueError("give either IMAGE INSTRUCTION or --edits FILE.jsonl, not both")
        edits = read_edits(args.edits)
    else:
        if args.image is None or args.instruction is None:
            raise ValueError('give an image and an instruction (edit.py IMAGE "INSTRUCTION"), or --edits FILE.jsonl')
        edits = [(args.image, check_instruction(args.instruction))]
    check_count("--steps", args.steps)
    check_count("--batch-size", args.batch_size)
    check_count("--ncol", args.ncol)
    images = [open_image(path) for path, _ in edits]  # every input checked before the model loads
    model, tower, codec, preset = load_edit_model(args.ckpt, args.device)
    size = preset.model.image_size
    note = lambda msg: print(msg, file=sys.stderr)  # noqa: E731
    refs = torch.stack([to_model_size(img, size, path, note) for img, (path, _) in zip(images, edits)])  # (B, 3, S, S)
    kw = dict(steps=args.steps, cfg=args.cfg, shift=args.shift, schedule=args.schedule, rescale=args.rescale,
              cfg_interval=args.cfg_interval, device=args.device)
    if args.edits:
        os.makedirs(args.outdir, exist_ok=True)
        edited = []
        for s in range(0, len(edits), args.batch_size):
            chunk = [text for _, text in edits[s:s + args.batch_size]]
            imgs = edit_images(model, tower, codec, preset, refs[s:s + len(chunk)], chunk, seed=args.seed + s, **kw)
            for i, img in enumerate(imgs):
                atomic_save(Image.fromarray(img), os.path.join(args.outdir, f"{s + i:04d}.png"))
            edited.extend(imgs)
        print(f"wrote {len(edits)} edited images to {args.outdir}/", file=sys.stderr)
        if args.grid:
            save_before_after(refs, np.stack(edited), args.grid, args.ncol)
            print(f"wrote {args.grid}", file=sys.stderr)
    else:
        img = edit_images(model, tower, codec, preset, refs, [edits[0][1]], seed=args.seed, **kw)[0]
        atomic_save(Image.fromarray(img), args.out)
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


def save_before_after(refs: torch.Tensor, edited: np.ndarray, path: str, ncol: int = 8):
    """Sources (B, 3, S, S) in [-1, 1] and their edits (B, S, S, 3) uint8 → one grid PNG: each
    row of up to `ncol` sources sits above the row of their edits (blank tiles pad the last pair)."""
    from sample import save_grid, to_uint8

    before = to_uint8(refs)  # (B, S, S, 3)
    ncol = min(ncol, len(edited))
    tiles = []
    for s in range(0, len(edited), ncol):
        for row in (before[s:s + ncol], edited[s:s + ncol]):
            tiles.extend(row)
            tiles.extend(np.full_like(row[0], 255) for _ in range(ncol - len(row)))
    save_grid(np.stack(tiles), path, ncol=ncol, scale=3)


if __name__ == "__main__":
    try:
        sys.exit(main(parse_args()))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
