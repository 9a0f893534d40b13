"""The generation tower G, its image codec, and the whole MoS model (Eq. 1, Algorithm 1).

Paper Sec. 3.3 (how the routed states enter G), App. A (QK-norm, modality-specific norms,
4 registers, no timestep embedding), Algorithms 1–2. docs/design.md §6, §7, §9.

G is a plain DiT-style transformer over image patches. What makes it MoS:

  * Block j attends jointly over [Proj(S_j^c); registers; image tokens] (Alg. 1 l.12–13),
    where S_j^c = Σ_{i∈I_j} w̄_ij S_i^c is the router's mixture for block j (router.py).
  * Only registers and image tokens carry on to block j+1: the context is injected FRESH at
    every block (a different mixture per block), and its block outputs are thrown away.
    So context tokens need keys and values only — no queries, no FFN. `GenBlock.forward` is
    that efficient form; `GenBlock.forward_naive` is the literal "concatenate, run, drop"
    form, kept as the reference the tests compare against.
  * No timestep embedding, no adaLN (App. A: ~20% of parameters for a negligible gain).
    t reaches G only through the router's choice of states.

Data flow of one MoS forward pass (`MoS.forward`, Alg. 1 lines 5–14):

    x_t (B, C, h, w) ─► patchify ─► Linear ─► tokens (B, N, D_g) ─┬─► router ─► idx, w (B, L, n, k)
                                                                   └─► [registers; tokens] (B, R+N, D_g)
    for j in 1..n:  ctx_j = Proj(mix_states(S, idx[:,:,j], w[:,:,j]))   (B, L, D_g)
                    x = block_j(x, ctx_j)
    x ─► drop registers ─► RMSNorm ─► Linear (zero-init) ─► unpatchify ─► v̂ (B, C, h, w)

MoS-Edit (Sec. 3.4, Fig. 4; docs/design.md §10), models built with `GenConfig.ref`: the clean
reference image's tokens (same patch embedding + a learned type embedding, the target's own 2D
RoPE positions, never noised) join the stream as [registers; target; reference] (B, R+2N, D_g).
They are queries too, so they carry on block to block; only the N target tokens reach the head,
so the loss never sees the reference. With `ref=None` the pass is exactly the text-to-image one.

The codec ("the decoder of G", Alg. 2 l.18) maps images to the space the flow runs in:
pixels for the toy presets, Wan 2.2 VAE latents for the full presets (docs/design.md §9).

Glossary:
  B batch · L context tokens · N image tokens (= h/p · w/p) · R registers · m und. states
  n gen blocks · k selected · D_u und. width · D_g gen width · H heads · hd head dim
  C codec channels · h, w codec height/width · p patch size
"""

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels import RMSNorm, SwiGLU
from router import MoSRouter, RouterConfig, fixed_routing, mix_states, uniforms
from und_tower import TOWER_INITS


#################################################################################
#                                   Config                                      #
#################################################################################


@dataclass
class GenConfig:
    dim: int = 256  # D_g
    depth: int = 6  # n: number of generation blocks, = columns of the routing matrix
    heads: int = 4
    mlp_ratio: float = 4.0
    patch_size: int = 2  # p, on the codec's output (pixels for the toy, VAE latents otherwise)
    registers: int = 4  # App. A: "four auxiliary learnable tokens" (Darcet et al. 2023)
    rope_theta: float = 10000.0
    # What the output head predicts. "v": the velocity z1 - z0 directly (the paper's Eq. 1).
    # "x": the clean sample z0, turned into v̂ = (z_t - ẑ0) / t (Li & He 2025, "Back to
    # Basics: Let Denoising Generative Models Denoise"). The loss and the sampler still see a
    # velocity, so nothing else changes. In pixel space the clean image (flat colours on
    # white) is far easier to predict than v, which carries the full noise; the toy uses "x".
    prediction: str = "v"
    t_min: float = 0.05  # floor on t in (z_t - ẑ0) / t, so v̂ stays bounded near the data end
    # MoS-Edit (Sec. 3.4, Fig. 4; docs/design.md §10): the tower also takes the clean reference image's
    # tokens. A config flag rather than a parameter every model has, so a text-to-image model
    # carries no edit weights and a config.json without the key rebuilds one (False) that loads
    # strictly. The toy_edit preset sets it; train.py then starts from a toy checkpoint and only
    # the reference type embedding starts fresh.
    ref: bool = False

    def __post_init__(self):
        if self.prediction not in ("v", "x"):
            raise ValueError(f"gen prediction must be 'v' or 'x', got {self.prediction!r}")
        if self.dim % self.heads or (self.dim // self.heads) % 4:
            raise ValueError(f"gen dim {self.dim} / heads {self.heads} must give a head dim divisible by 4 (2D RoPE)")


@dataclass
class ModelConfig:
    """Everything needed to rebuild a MoS model: towers, router, codec, image size."""

    tower: str = "minilm"  # und_tower.load_tower name, hub id or local path
    # "pretrained" (the method) or "random": the same tower with seeded random weights, the
    # ablation of the paper's premise that the pre-trained states carry the concepts
    # (und_tower.TOWER_INITS). Part of the model's config, so sample.py / eval.py rebuild the
    # same random tower a checkpoint was trained with.
    tower_init: str = "pretrained"
    und_states: int = 7  # m
    und_dim: int = 384  # D_u
    codec: str = "pixel"  # "pixel" or "wan2.2"
    image_size: int = 32  # training / default sampling resolution in pixels (square)
    gen: GenConfig = field(default_factory=GenConfig)
    router: RouterConfig = field(default_factory=RouterConfig)

    def __post_init__(self):
        if self.tower_init not in TOWER_INITS:
            raise ValueError(f"model tower_init must be one of {', '.join(TOWER_INITS)}, got {self.tower_init!r}")

    @staticmethod
    def from_dict(d: dict) -> "ModelConfig":
        d = dict(d)
        d["gen"], d["router"] = GenConfig(**d["gen"]), RouterConfig(**d["router"])
        return ModelConfig(**d)


#################################################################################
#                     Patches and 2D axial RoPE (image tokens)                  #
#################################################################################


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, h, w) → (B, N, p·p·C), N = (h/p)·(w/p), row-major over the patch grid."""
    B, C, h, w = x.shape
    x = x.view(B, C, h // p, p, w // p, p)  # (B, C, h/p, p, w/p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(B, (h // p) * (w // p), p * p * C)


def unpatchify(x: torch.Tensor, p: int, h: int, w: int) -> torch.Tensor:
    """(B, N, p·p·C) → (B, C, h, w); the inverse of `patchify`."""
    B, N, PPC = x.shape
    C = PPC // (p * p)
    x = x.view(B, h // p, w // p, p, p, C)  # (B, h/p, w/p, p, p, C)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(B, C, h, w)


def rope_2d(gh: int, gw: int, head_dim: int, theta: float = 10000.0, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Axial 2D rotary tables for a gh × gw patch grid: (cos, sin), each (N, hd/2).

    The head dim is split in two: the first half of the rotation pairs encodes the row,
    the second half the column, each with the usual 1-D RoPE frequencies. Positions are
    integer patch coordinates, so a larger grid (higher resolution, other aspect ratio)
    simply extends the table — nothing is learned per position.
    """
    quarter = head_dim // 4  # rotation pairs per axis
    freqs = theta ** (-torch.arange(quarter, device=device, dtype=torch.float32) / quarter)  # (hd/4,)
    rows = torch.arange(gh, device=device, dtype=torch.float32).repeat_interleave(gw)  # (N,)
    cols = torch.arange(gw, device=device, dtype=torch.float32).repeat(gh)  # (N,)
    angles = torch.cat([rows[:, None] * freqs, cols[:, None] * freqs], dim=-1)  # (N, hd/2)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs (x_2i, x_2i+1) of the last dim; x (B, N, H, hd), cos/sin (N, hd/2)."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # (B, N, H, hd/2) each
    cos, sin = cos[:, None], sin[:, None]  # (N, 1, hd/2) broadcast over heads
    out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)  # (B, N, H, hd/2, 2)
    return out.flatten(-2).to(x.dtype)  # (B, N, H, hd)


#################################################################################
#                     The generation block (context as keys/values)             #
#################################################################################


class GenBlock(nn.Module):
    """Pre-norm block: joint attention over [context; registers; image], then a SwiGLU FFN.

    Modality-specific norms (App. A): context tokens are normalised by `norm_ctx`, registers
    and image tokens by `norm1`. The same qkv weights serve both, so this really is one joint
    attention over the concatenated sequence — the context just never asks a query.
    """

    def __init__(self, cfg: GenConfig):
        super().__init__()
        D = cfg.dim
        self.heads = cfg.heads
        self.norm1 = RMSNorm(D)  # registers + image tokens
        self.norm_ctx = RMSNorm(D)  # context tokens (modality-specific)
        self.qkv = nn.Linear(D, 3 * D, bias=False)
        self.q_norm = RMSNorm(D // cfg.heads)  # QK-norm (Henry et al. 2020), App. A
        self.k_norm = RMSNorm(D // cfg.heads)
        self.out = nn.Linear(D, D, bias=False)
        self.norm2 = RMSNorm(D)
        self.ffn = SwiGLU(D, cfg.mlp_ratio)

    def _attend(self, q, k, v, key_mask):
        """q (B, Sq, H, hd), k/v (B, Sk, H, hd), key_mask (B, Sk) → (B, Sq, H·hd)."""
        B, Sq = q.shape[:2]
        a = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=key_mask[:, None, None, :]
        )  # (B, H, Sq, hd)
        return a.transpose(1, 2).reshape(B, Sq, -1)  # (B, Sq, D)

    def forward(self, x, ctx, ctx_mask, rope, n_plain):
        """Efficient form. x (B, S, D) = [registers; image] (the first `n_plain` tokens get no
        RoPE), ctx (B, L, D) projected context, ctx_mask (B, L) bool → (B, S, D)."""
        B, S, D = x.shape
        L, H = ctx.shape[1], self.heads
        q, k, v = self.qkv(self.norm1(x)).view(B, S, 3, H, D // H).unbind(2)  # (B, S, H, hd)
        # Context: keys and values only — the last 2/3 of the same qkv matrix.
        w_kv = self.qkv.weight[D:]  # (2D, D)
        k_c, v_c = F.linear(self.norm_ctx(ctx), w_kv).view(B, L, 2, H, D // H).unbind(2)  # (B, L, H, hd)
        q, k, k_c = self.q_norm(q), self.k_norm(k), self.k_norm(k_c)
        q, k = self._rope(q, rope, n_plain), self._rope(k, rope, n_plain)  # RoPE on image tokens only
        k_all = torch.cat([k_c, k], dim=1)  # (B, L+S, H, hd)
        v_all = torch.cat([v_c, v], dim=1)  # (B, L+S, H, hd)
        key_mask = torch.cat([ctx_mask, ctx_mask.new_ones(B, S)], dim=1)  # (B, L+S)
        x = x + self.out(self._attend(q, k_all, v_all, key_mask))  # (B, S, D)
        return x + self.ffn(self.norm2(x))

    def forward_naive(self, x, ctx, ctx_mask, rope, n_plain):
        """The literal Alg. 1 l.12–13: H_j = Concat(Proj(S_j^c), S_j^z), run the whole block
        on H_j (queries and FFN for every token), then drop the context outputs. Reference
        for the tests; `forward` must equal it."""
        B, S, D = x.shape
        L, H = ctx.shape[1], self.heads
        h = torch.cat([self.norm_ctx(ctx), self.norm1(x)], dim=1)  # (B, L+S, D) modality norms
        q, k, v = self.qkv(h).view(B, L + S, 3, H, D // H).unbind(2)  # (B, L+S, H, hd)
        q, k = self.q_norm(q), self.k_norm(k)
        q, k = self._rope(q, rope, L + n_plain), self._rope(k, rope, L + n_plain)
        key_mask = torch.cat([ctx_mask, ctx_mask.new_ones(B, S)], dim=1)  # (B, L+S)
        hcat = torch.cat([ctx, x], dim=1) + self.out(self._attend(q, k, v, key_mask))  # (B, L+S, D)
        hcat = hcat + self.ffn(self.norm2(hcat))  # the context's FFN output is wasted work
        return hcat[:, L:]  # (B, S, D) drop the context

    @staticmethod
    def _rope(x, rope, n_plain):
        cos, sin = rope
        return torch.cat([x[:, :n_plain], apply_rope(x[:, n_plain:], cos, sin)], dim=1)


#################################################################################
#                              The generation tower                             #
#################################################################################


class GenTower(nn.Module):
    """G: patch embedding, registers, n `GenBlock`s, the context projection, the output head.

    The block loop itself lives in `MoS.forward`, where the router's choices are mixed into
    each block's context; this module owns the weights and the entry / exit steps.
    """

    def __init__(self, cfg: GenConfig, *, in_channels: int, und_dim: int):
        super().__init__()
        self.cfg, self.in_channels = cfg, in_channels
        D, p = cfg.dim, cfg.patch_size
        self.patch_embed = nn.Linear(p * p * in_channels, D)  # shared with the router (Sec. 3.2)
        self.registers = nn.Parameter(torch.randn(1, cfg.registers, D) * 0.02)
        if cfg.ref:
            # MoS-Edit: a learned type embedding added to every reference-image token, so G can
            # tell the clean source (to copy from) from the noisy target (to denoise) even
            # though both sit on the same 2D RoPE positions (see MoS.forward). Its name holds
            # "type_embed", so train.make_optimizer exempts it from weight decay.
            self.ref_type_embed = nn.Parameter(torch.randn(1, 1, D) * 0.02)
        # Proj (Sec. 3.3): one Linear(D_u → D_g) shared by all blocks. It is linear, so
        # Proj(Σ w_i S_i) = Σ w_i (W S_i) + b: the states can be projected once per prompt
        # and reused by every block and every sampling step (see MoS.project_states).
        self.ctx_proj = nn.Linear(und_dim, D)
        self.blocks = nn.ModuleList(GenBlock(cfg) for _ in range(cfg.depth))
        self.out_norm = RMSNorm(D)
        self.head = nn.Linear(D, p * p * in_channels)
        self.reset_parameters()

    def reset_parameters(self):
        for mod in self.modules():
            if isinstance(mod, nn.Linear):
                nn.init.xavier_uniform_(mod.weight)
                if mod.bias is not None:
                    nn.init.zeros_(mod.bias)
        # Zero-initialised output layer (as DiT does): at step 0 the tower predicts v̂ = 0.
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def embed(self, x_t: torch.Tensor) -> torch.Tensor:
        """x_t (B, C, h, w) → patch tokens (B, N, D_g)."""
        p = self.cfg.patch_size
        if x_t.shape[-2] % p or x_t.shape[-1] % p:
            raise ValueError(f"latent size {tuple(x_t.shape[-2:])} is not divisible by the patch size {p}")
        return self.patch_embed(patchify(x_t, p))

    def rope(self, h: int, w: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """2D RoPE tables for the patch grid of an h × w latent: (N, hd/2) each."""
        c = self.cfg
        return rope_2d(h // c.patch_size, w // c.patch_size, c.dim // c.heads, c.rope_theta, device=device)

    def velocity(self, x: torch.Tensor, z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Target tokens (B, N, D_g) → v̂ (B, C, h, w). The head predicts v̂ itself, or with
        x-prediction the clean latent ẑ0, and then v̂ = (z_t − ẑ0) / t (docs/design.md §7)."""
        out = unpatchify(self.head(self.out_norm(x)), self.cfg.patch_size, *z_t.shape[-2:])  # (B, C, h, w)
        if self.cfg.prediction == "x":
            return (z_t - out) / t.clamp(min=self.cfg.t_min).view(-1, 1, 1, 1).to(out.dtype)
        return out


#################################################################################
#                     MoS = U (outside) + R + G, Eq. 1 / Algorithm 1            #
#################################################################################


class MoS(nn.Module):
    """The trainable part of MoS: router R and generation tower G.

    The frozen understanding tower U stays outside this module (it is not trained, is kept in
    bf16 and can be replaced by cached features, App. B.4); its output — all m states and the
    padding mask — is an argument of `forward`.
    """

    def __init__(self, cfg: ModelConfig, in_channels: int):
        super().__init__()
        self.cfg = cfg
        self.gen = GenTower(cfg.gen, in_channels=in_channels, und_dim=cfg.und_dim)
        self.router = MoSRouter(
            cfg.router, und_dim=cfg.und_dim, num_states=cfg.und_states, gen_dim=cfg.gen.dim, num_blocks=cfg.gen.depth
        )

    def forward(self, z_t, t, states, mask, draws=None, *, ref=None, projected=None):
        """v̂ = G(z_t, R(c, t, z_t), U(c)) — Algorithm 1 lines 5–16 (Eq. 1, 3, 4).

        z_t (B, C, h, w) noisy latent · t (B,) in [0, 1] · states (B, L, m, D_u) all of U's
        states (line 2, computed outside: U is frozen) · mask (B, L) bool, real context tokens.
        draws: the ε-greedy draws of `routing_draws` (training), or None: plain top-k (inference).
        ref (B, C, h, w): MoS-Edit's clean reference latent, see `add_reference`; None for
        text-to-image. projected: `project_states(states)`, a sampling shortcut (same result).
        """
        B, C, h, w = z_t.shape
        R = self.gen.cfg.registers
        tokens = self.gen.embed(z_t)  # (B, N, D_g) S^z_1: z_t's patch tokens
        # l.5–10: W = R(c, t, z_t); softmax over the m states; I_j = top-k_ε, for every block j.
        idx, wts, _ = self.routing(t, tokens, states, mask, draws)  # (B, L, n, k) each
        x = torch.cat([self.gen.registers.expand(B, -1, -1), tokens], dim=1)  # (B, R+N, D_g)
        rope = self.gen.rope(h, w, z_t.device)  # 2D positions of the image tokens
        if ref is not None:  # MoS-Edit: the reference's tokens join the stream, never noised
            x, rope = self.add_reference(x, rope, ref, z_t)  # (B, R+2N, D_g)
        states = states.to(x.dtype)  # once, not per block (a no-op when the dtypes already match)
        for j, block in enumerate(self.gen.blocks):  # l.9
            ctx = self.context(states, idx[:, :, j], wts[:, :, j], projected)  # l.11–12: Proj(S_j^c), (B, L, D_g)
            x = block(x, ctx, mask, rope, R)  # l.13: block j on H_j = [Proj(S_j^c); S_j^z]
        # l.16's loss (flow.flow_loss) compares this velocity with z1 - z0: target tokens only.
        return self.gen.velocity(x[:, R:R + tokens.shape[1]], z_t, t)

    def routing(self, t, tokens, states, mask, draws=None):
        """R(c, t, z_t), then softmax and top-k_ε (Alg. 1 l.5–10, Eq. 3).

        tokens (B, N, D_g) z_t's patch tokens; c is S_0, U's input embeddings (docs/design.md §3).
        draws: the U(0, 1) draws of `routing_draws` (ε-greedy with router.eps), or None (top-k).
        Returns idx, w (B, L, n, k) and the logits (B, L, n, m), or None for the static baselines.
        """
        B, L = mask.shape
        if self.cfg.router.mode in ("last", "hand"):
            idx, w = fixed_routing(self.cfg.router.mode, B, L, self.cfg.gen.depth, self.cfg.und_states, device=mask.device)
            return idx, w, None
        logits = self.router(t, tokens, states[:, :, 0], mask)  # (B, L, n, m)
        eps = self.cfg.router.eps if draws is not None else 0.0
        idx, w = self.router.select(logits, eps, draws)  # (B, L, n, k) each
        return idx, w, logits

    def routing_draws(self, B: int, L: int, generator=None):
        """The ε-greedy randomness of one forward, drawn up front: U(0, 1) of shape
        (B, L|1, n, m+1) — per (sample, token, block), m draws to pick random states and one coin
        (router.route) — or None when nothing is drawn (router.eps = 0, or a static baseline).

        `generator`: None (the global RNG), one torch.Generator, or one per sample (train.py's
        `sample_generators`, so a sample's draws do not depend on its batch). Drawing here rather
        than inside `forward` makes the randomness one explicit argument, and keeps a compiled
        forward free of the per-sample generator loop that torch.compile cannot trace.
        """
        mode = self.cfg.router.mode
        if self.cfg.router.eps <= 0 or mode in ("last", "hand"):
            return None
        rows = 1 if mode == "sample" else L  # a sample-wise router draws once per sample
        return uniforms((B, rows, self.cfg.gen.depth, self.cfg.und_states + 1), "cpu", generator)

    def context(self, states, idx, w, projected=None):
        """Block j's context Proj(Σ_{i∈I_j} w̄_ij S_i) (Eq. 4, Alg. 1 l.11–12): (B, L, D_g).

        idx, w (B, L, k) block j's choice. With `projected` (B, L, m, D_g) from `project_states`
        the order flips — Proj, then the weighted sum, then the bias — with the same result:
        Proj is linear, and w̄ need not sum to 1, so the bias is added once, unweighted.
        """
        if projected is None:  # the paper's order
            return self.gen.ctx_proj(mix_states(states, idx, w))
        return mix_states(projected, idx, w) + self.gen.ctx_proj.bias  # Σ w (W S) + b

    def project_states(self, states: torch.Tensor) -> torch.Tensor:
        """W·S_i for all m states, WITHOUT the bias: (B, L, m, D_u) → (B, L, m, D_g).

        Sampling calls this once per prompt; every block of every step then mixes projected
        states (`context`). Saves n·steps projections of the context.
        """
        return F.linear(states.to(self.gen.ctx_proj.weight.dtype), self.gen.ctx_proj.weight)

    def add_reference(self, x, rope, ref, z_t):
        """MoS-Edit (Sec. 3.4, Fig. 4; docs/design.md §10): append the clean reference image's
        tokens to the stream x (B, R+N, D_g) → (B, R+2N, D_g), and their positions to rope.

        The router reads the noisy target tokens only (as in text-to-image): what the edit needs
        from the reference reaches it through U's context (a VLM sees the image) and reaches G
        through these tokens. They use the same patch embedding plus their own type embedding,
        and they are queries too (unlike the context), so each block refines them and the
        target reads a deeper view of the source at every block. They take the SAME 2D
        positions as the target: an edit keeps almost every pixel where it was, so "copy the
        patch at my own position" is then the easiest attention pattern to learn (RoPE makes
        q·k depend on the position difference, 0 there), and the type embedding alone tells
        the two copies apart. They produce no output, so the loss never sees them.
        """
        if not self.gen.cfg.ref:
            raise ValueError("this model has no reference-image tokens (gen.ref is False): it is a "
                             "text-to-image model, not an edit model")
        if ref.shape != z_t.shape:
            raise ValueError(f"reference latent {tuple(ref.shape)} must have the target's shape {tuple(z_t.shape)}")
        ref_tokens = self.gen.embed(ref.to(x.dtype)) + self.gen.ref_type_embed  # (B, N, D_g)
        rope = tuple(torch.cat([r, r], dim=0) for r in rope)  # (2N, hd/2): target, then reference
        return torch.cat([x, ref_tokens], dim=1), rope


#################################################################################
#                      Image codecs: "the decoder of G" (Alg. 2)                #
#################################################################################


class PixelCodec(nn.Module):
    """Identity codec for the toy presets: the flow runs on RGB pixels in [-1, 1]."""

    channels, factor = 3, 1

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z.clamp(-1, 1)


# Wan 2.2 VAE (the TI2V-5B one, used by the paper's MoS-S / MoS-L): 16× spatial compression,
# 48 latent channels. Its diffusers config (Wan-AI/Wan2.2-TI2V-5B-Diffusers, vae/config.json):
# base_dim 160, decoder_base_dim 256, z_dim 48, is_residual, patch_size 2 (inside the VAE),
# in/out channels 12, scale_factor_spatial 16. We load it with from_pretrained when a user
# asks, and build tiny random ones in the tests.
WAN22_VAE_HUB_ID = "Wan-AI/Wan2.2-TI2V-5B-Diffusers"


class WanVAECodec(nn.Module):
    """Wan 2.2 VAE through diffusers' `AutoencoderKLWan`, kept in fp32 (App. A).

    Images are single-frame videos (B, 3, 1, H, W). Latents are normalised per channel with
    the VAE's published mean/std so the flow sees roughly unit-variance inputs (docs/design.md §9).
    """

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae.float().eval().requires_grad_(False)
        cfg = vae.config
        self.channels = cfg.z_dim
        self.factor = cfg.scale_factor_spatial
        self.register_buffer("mean", torch.tensor(cfg.latents_mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.latents_std).view(1, -1, 1, 1), persistent=False)

    @staticmethod
    def load(path_or_id: str = WAN22_VAE_HUB_ID) -> "WanVAECodec":
        from diffusers import AutoencoderKLWan  # lazy: only the full presets need diffusers

        sub = {"subfolder": "vae"} if path_or_id == WAN22_VAE_HUB_ID else {}
        return WanVAECodec(AutoencoderKLWan.from_pretrained(path_or_id, torch_dtype=torch.float32, **sub))

    def train(self, mode: bool = True):
        return super().train(False)  # frozen, always

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] → normalised latents (B, C, H/f, W/f)."""
        z = self.vae.encode(x.float().unsqueeze(2)).latent_dist.mode().squeeze(2)  # (B, C, H/f, W/f)
        return (z - self.mean) / self.std

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised latents (B, C, h, w) → images (B, 3, h·f, w·f) in [-1, 1]."""
        z = z.float() * self.std + self.mean
        return self.vae.decode(z.unsqueeze(2)).sample.squeeze(2).clamp(-1, 1)


def load_codec(name: str, path: str | None = None) -> nn.Module:
    if name == "pixel":
        return PixelCodec()
    if name == "wan2.2":
        return WanVAECodec.load(path or WAN22_VAE_HUB_ID)
    raise ValueError(f"unknown codec {name!r}: expected 'pixel' or 'wan2.2'")


def codec_shape(name: str) -> tuple[int, int]:
    """(channels, spatial factor) of a codec without loading it."""
    return {"pixel": (3, 1), "wan2.2": (48, 16)}[name]


def check_size(image_size: int, codec: str, patch_size: int) -> None:
    """One readable error for a resolution the codec × patch grid cannot tile."""
    factor = codec_shape(codec)[1] * patch_size
    if image_size <= 0:
        raise ValueError(f"image size {image_size} must be positive: a multiple of {factor} pixels "
                         f"(codec '{codec}' downsamples ×{codec_shape(codec)[1]}, patch size {patch_size})")
    if image_size % factor:
        raise ValueError(
            f"image size {image_size} cannot be tiled: it must be a multiple of {factor} "
            f"(codec '{codec}' downsamples ×{codec_shape(codec)[1]}, patch size {patch_size})"
        )


def check_count(name: str, value: int | None, minimum: int = 1) -> None:
    """One readable error for a count a CLI takes (--steps, --batch-size, train.steps, …) that is
    below `minimum`; None (the flag not given) passes. Shared by the CLIs, which import this file."""
    if value is not None and value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{name} must be {what}, got {value}")
