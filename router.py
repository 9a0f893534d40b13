"""The MoS router: which understanding states feed which generation block, per token.

Paper Sec. 3.2 (router input/output space, lightweight design, sparsity and ε-greedy),
Eq. 3 (softmax over the m understanding states), Eq. 4 (the top-k weighted sum), and
Algorithm 1 lines 5–11. docs/design.md §3–§5 records the details the paper leaves open.

How it fits:

    und_tower.py ──► S_0..S_{m-1}   (B, L, m, D_u), frozen, once per prompt
    gen_tower.py ──► patch tokens of z_t (the generation tower's own patchify, shared weights)
         t ───────┐
    router.py:  [t ; z_t tokens ; c = S_0 tokens] ─► 2 bidirectional blocks ─► c tokens
                ─► Linear ─► logits (B, L, n, m)              one m×n matrix per context token
    route():    softmax over m (Eq. 3) ─► top-k, ε-greedy ─► idx, w (B, L, n, k)
    mix_states(): block j's context = Σ_{i∈I_j} w̄_ij S_i  (Eq. 4) ─► gen_tower.py's Proj

The router sees the timestep and the noisy latent, so its choice of layers changes along the
denoising trajectory (Table 1: prompt + latent + timestep is best). The generation tower has
no timestep embedding of its own (App. A): t reaches it only through this router.

Also here, behind `RouterConfig.mode`, the baselines of the paper's ablations (Sec. 4.1):
  "mos"          token-wise router (the method)
  "sample"       sample-wise router: a learned [CLS] token predicts one matrix for the whole
                 prompt (Fig. 5a, Table 2)
  "last"         every block gets the tower's final state (the usual cross-attention recipe)
  "hand"         block j gets a fixed, evenly spaced layer (hand-crafted routing, Table 3)
  "static"       ours, not in the paper: one learned m×n logit matrix shared by every prompt,
                 token and timestep, then softmax, top-k and ε-greedy as usual — a layer mix
                 that is learned but not adaptive, which splits Table 3's "learned vs
                 hand-crafted" from "adaptive vs fixed" (ablate.py)
and behind `RouterConfig.inputs` the router-input ablation of Table 1.

Glossary (shape letters used in comments):
  B batch · L context tokens · N image tokens · m understanding states (= layers + 1)
  n generation blocks · k selected states per (token, block) · D_u understanding width
  D_g generation width · D_r router width · H heads · hd head dim
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels import RMSNorm, SwiGLU, mix_states_fused, triton_active

ROUTING_MODES = ("mos", "sample", "last", "hand", "static")
ROUTER_INPUTS = ("prompt", "prompt+latent", "prompt+latent+t")


@dataclass
class RouterConfig:
    dim: int = 128  # D_r: the router is a small transformer (~100M params at MoS-S scale)
    depth: int = 2  # Sec. 3.2: "two transformer blocks with bidirectional self-attention"
    heads: int = 4
    mlp_ratio: float = 4.0
    k: int = 2  # App. A / B.3: top-2 beats k = 1 (too local) and k > 2 (over-smoothed)
    eps: float = 0.05  # App. A / B.3: ε-greedy exploration probability during training
    mode: str = "mos"  # one of ROUTING_MODES
    inputs: str = "prompt+latent+t"  # one of ROUTER_INPUTS (Table 1)
    t_freq_dim: int = 256  # sinusoidal features of t before the MLP

    def __post_init__(self):
        if self.mode not in ROUTING_MODES:
            raise ValueError(f"router mode {self.mode!r} is not one of {ROUTING_MODES}")
        if self.inputs not in ROUTER_INPUTS:
            raise ValueError(f"router inputs {self.inputs!r} is not one of {ROUTER_INPUTS}")
        if self.k < 1:
            raise ValueError(f"router k must be >= 1, got {self.k}")
        if not 0.0 <= self.eps <= 1.0:
            raise ValueError(f"router eps is a probability in [0, 1], got {self.eps}")
        if self.dim % self.heads:
            raise ValueError(f"router dim {self.dim} is not divisible by heads {self.heads}")


#################################################################################
#                      Routing: Eq. 3, ε-greedy top-k, Eq. 4                    #
#################################################################################


def route(logits: torch.Tensor, k: int, eps: float = 0.0, generator: torch.Generator | None = None):
    """Eq. 3 + top-k_ε: logits (..., m) → (idx, weights), both (..., k).

    The softmax runs over the LAST axis, the m understanding states, separately for every
    (sample, token, generation block) — one column w_{1:m, j} of the paper's m×n matrix.

    ε-greedy (Sec. 3.2, docs/design.md §5): independently for each (sample, token, block), with
    probability ε the k indices are k *distinct* uniformly random states instead of the top-k.
    Either way the weights are the softmax values at the chosen indices, NOT renormalised
    (Eq. 4 uses w̄_ij as is), so gradient reaches the router through them — and only through
    them: top-k and the random draw are not differentiable. `generator`: one torch.Generator,
    one per sample (train.py's per-sample randomness), or the draws already made (see `uniforms`).
    """
    m = logits.shape[-1]
    if not 1 <= k <= m:
        raise ValueError(f"cannot select k={k} of m={m} understanding states")
    probs = logits.float().softmax(dim=-1)  # (..., m)  Eq. 3, fp32 for a stable softmax
    idx = probs.topk(k, dim=-1).indices  # (..., k)
    if eps > 0:
        # ONE draw per (sample, token, block): m uniforms to pick the random states, 1 coin.
        u = uniforms((*probs.shape[:-1], m + 1), probs.device, generator)  # (..., m+1)
        random_idx = u[..., :m].argsort(dim=-1)[..., :k]  # (..., k) k distinct uniform states
        explore = u[..., m] < eps  # (...,) explore with probability ε
        idx = torch.where(explore.unsqueeze(-1), random_idx, idx)  # (..., k)
    weights = probs.gather(-1, idx)  # (..., k) w̄_ij at the chosen i
    return idx, weights


def uniforms(shape, device, generator=None) -> torch.Tensor:
    """U(0, 1) draws of `shape` (B, ...) on `device`.

    `generator` is one torch.Generator, or a list of B of them, one per sample: row b is
    then drawn from generator b alone, so a sample's ε-greedy choices do not depend on which
    other samples share its batch — what lets train.py shard a batch over processes (or split
    it into micro-batches) and still train on exactly the same draws. Each row is drawn on
    its generator's device; CPU draws are sequential, so a longer (more padded) context only
    appends draws after the real tokens' (shape[1] is L) and never changes theirs.

    Or `generator` is the draws themselves, a tensor of `shape` made by this function
    beforehand (`MoS.routing_draws`): train.py draws them outside a compiled forward, because
    torch.compile cannot trace a draw from a list of generators and would split the graph there.
    """
    if isinstance(generator, torch.Tensor):
        if tuple(generator.shape) != tuple(shape):
            raise ValueError(f"precomputed routing draws have shape {tuple(generator.shape)}, expected {tuple(shape)}")
        return generator.to(device)
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} per-sample generators for a batch of {shape[0]}")
        rows = [torch.rand(shape[1:], generator=g, device=g.device) for g in generator]
        return torch.stack(rows).to(device)  # (B, ...)
    return torch.rand(shape, device=device, generator=generator)


def mix_states(states: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Eq. 4 for one generation block j: S_j^c = Σ_{i∈I_j} w̄_ij · S_i^c, token by token.

    states  (B, L, m, D)  all understanding states (or their projections, see MoS.forward)
    idx     (B, L, k)     I_j for every token
    weights (B, L, k)     w̄_ij at those indices
    returns (B, L, D)

    Called once per block, just before that block runs, so only one block's mixed context
    exists at a time (never all n of them). The gather materialises (B, L, k, D), k = 2;
    on CUDA, with frozen states, kernels.mix_states_fused reads the k states by index
    instead and never builds that tensor (same result; tested in tests/test_kernels.py).
    """
    if triton_active(states) and not (states.requires_grad and torch.is_grad_enabled()):
        return mix_states_fused(states, idx, weights)  # (B, L, D)
    B, L, m, D = states.shape
    picked = states.gather(2, idx.unsqueeze(-1).expand(B, L, idx.shape[-1], D))  # (B, L, k, D)
    return (weights.unsqueeze(-1).to(states.dtype) * picked).sum(dim=2)  # (B, L, D)


def fixed_routing(mode: str, B: int, L: int, n: int, m: int, device=None):
    """The two static baselines as (idx, weights) of shape (B, L, n, 1), weights all 1.

    "last": every block reads S_{m-1}, the final layer — what cross-attention DiTs do.
    "hand": block j reads layer round(1 + j·(m-2)/(n-1)), evenly spaced from the first to the
            last transformer layer (we skip S_0, the raw embeddings), "evenly skipping a subset
            of text encoder layers" (Sec. 4.1, Table 3).
    """
    if mode == "last":
        layer = torch.full((n,), m - 1, dtype=torch.long, device=device)
    elif mode == "hand":
        j = torch.arange(n, device=device, dtype=torch.float64)
        layer = (1 + j * (m - 2) / max(n - 1, 1)).round().long() if m > 1 else torch.zeros_like(j).long()
    else:
        raise ValueError(f"fixed routing mode must be 'last' or 'hand', got {mode!r}")
    idx = layer.view(1, 1, n, 1).expand(B, L, n, 1)  # (B, L, n, 1)
    weights = torch.ones(B, L, n, 1, device=device)  # (B, L, n, 1)
    return idx, weights


#################################################################################
#                       The router network (Sec. 3.2, Fig. 3)                   #
#################################################################################


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of t (Ho et al. 2020): t (B,) in [0, 1] → (B, dim).

    t is scaled by 1000 first so the fastest frequencies resolve the small steps of a
    sampling schedule (the usual DDPM-era convention for t ∈ [0, 1000]).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]  # (B, dim/2)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, dim)


class RouterBlock(nn.Module):
    """Pre-norm bidirectional transformer block: RMSNorm, QK-norm, SwiGLU, key padding mask."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.heads = heads
        self.norm1 = RMSNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_norm = RMSNorm(dim // heads)
        self.k_norm = RMSNorm(dim // heads)
        self.out = nn.Linear(dim, dim, bias=False)
        self.norm2 = RMSNorm(dim)
        self.ffn = SwiGLU(dim, mlp_ratio)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        B, S, D = x.shape  # S = sequence length of [t; z; c]
        q, k, v = self.qkv(self.norm1(x)).view(B, S, 3, self.heads, D // self.heads).unbind(2)  # (B, S, H, hd)
        q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (a.transpose(1, 2) for a in (q, k, v))  # (B, H, S, hd)
        # Padding keys are masked out; padding *queries* still attend to t and z_t, so no
        # attention row is ever fully masked (which would give NaNs).
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :])  # (B, H, S, hd)
        x = x + self.out(a.transpose(1, 2).reshape(B, S, D))  # (B, S, D)
        return x + self.ffn(self.norm2(x))


class MoSRouter(nn.Module):
    """R(t, c, z_t) → logits (B, L, n, m): one m×n routing matrix per context token.

    Built for a given pair of towers: m states of width D_u (understanding) and n blocks of
    width D_g (generation). The latent enters as the generation tower's patch tokens (its
    patchify layer is shared, Sec. 3.2), so the router never sees raw pixels or latents.
    """

    def __init__(self, cfg: RouterConfig, *, und_dim: int, num_states: int, gen_dim: int, num_blocks: int):
        super().__init__()
        self.cfg, self.m, self.n = cfg, num_states, num_blocks
        D = cfg.dim
        if cfg.mode in ("last", "hand"):
            return  # static baselines: no parameters, see fixed_routing()
        if cfg.mode == "static":  # one learned routing matrix, no inputs (see the header)
            self.static_logits = nn.Parameter(torch.randn(num_blocks, num_states) * 0.02)  # (n, m), not zero: see below
            return
        # Input tokenizers, one per modality: modality RMSNorm → Linear to D_r (Sec. 3.2,
        # App. B.2: separate norms per modality beat one shared norm, Fig. 9c–d).
        self.c_norm, self.c_in = RMSNorm(und_dim), nn.Linear(und_dim, D)
        self.z_norm, self.z_in = RMSNorm(gen_dim), nn.Linear(gen_dim, D)
        self.t_mlp = nn.Sequential(nn.Linear(cfg.t_freq_dim, D), nn.SiLU(), nn.Linear(D, D))
        self.t_norm = RMSNorm(D)
        # A learned type embedding per segment: the blocks are permutation-equivariant, so
        # this is how a token knows whether it is t, a latent patch, a context token or [CLS].
        self.type_embed = nn.Parameter(torch.randn(4, D) * 0.02)  # rows: t, z, c, cls
        if cfg.mode == "sample":
            self.cls = nn.Parameter(torch.randn(1, 1, D) * 0.02)  # Fig. 5a's learned [CLS]
        self.blocks = nn.ModuleList(RouterBlock(D, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.out_norm = RMSNorm(D)
        self.head = nn.Linear(D, num_blocks * num_states)  # token-wise logit matrix, Fig. 5b
        self.reset_parameters()

    def reset_parameters(self):
        for mod in self.modules():
            if isinstance(mod, nn.Linear):
                nn.init.normal_(mod.weight, std=0.02)
                if mod.bias is not None:
                    nn.init.zeros_(mod.bias)
        # NOTE: not zero. Zero logits make every state tie at 1/m and top-k would then always
        # pick the same (lowest) indices; small random logits start from a varied routing.

    def forward(self, t: torch.Tensor, z_tokens: torch.Tensor, c_embeds: torch.Tensor, c_mask: torch.Tensor) -> torch.Tensor:
        """t (B,) · z_tokens (B, N, D_g) · c_embeds = S_0 (B, L, D_u) · c_mask (B, L) bool → (B, L, n, m)."""
        cfg = self.cfg
        B, L = c_mask.shape
        if cfg.mode in ("last", "hand"):
            raise RuntimeError("static routing has no logits; call MoS.routing() or fixed_routing()")
        if cfg.mode == "static":  # the same matrix for every sample and token, whatever t, z_t, c
            return self.static_logits.expand(B, L, self.n, self.m)  # (B, L, n, m)
        parts, masks = [], []
        if cfg.inputs == "prompt+latent+t":
            t_tok = self.t_norm(self.t_mlp(timestep_embedding(t, cfg.t_freq_dim)))  # (B, D_r)
            parts.append(t_tok[:, None] + self.type_embed[0])  # (B, 1, D_r)
        if cfg.inputs in ("prompt+latent", "prompt+latent+t"):
            z = self.z_in(self.z_norm(z_tokens))  # (B, N, D_r)
            parts.append(z + self.type_embed[1])
        n_before = sum(p.shape[1] for p in parts)  # where the context tokens start
        masks = [torch.ones(B, n_before, dtype=torch.bool, device=c_mask.device)]
        parts.append(self.c_in(self.c_norm(c_embeds.to(self.c_in.weight.dtype))) + self.type_embed[2])  # (B, L, D_r)
        masks.append(c_mask)
        if cfg.mode == "sample":
            parts.append(self.cls.expand(B, 1, -1) + self.type_embed[3])  # (B, 1, D_r)
            masks.append(torch.ones(B, 1, dtype=torch.bool, device=c_mask.device))
        x = torch.cat(parts, dim=1)  # (B, S, D_r), S = [1] + [N] + L (+ 1)
        key_mask = torch.cat(masks, dim=1)  # (B, S)
        for block in self.blocks:
            x = block(x, key_mask)
        if cfg.mode == "sample":
            out = x[:, -1:]  # (B, 1, D_r) the [CLS] summary: one matrix for the whole prompt
        else:
            out = x[:, n_before:n_before + L]  # (B, L, D_r) the context tokens only
        logits = self.head(self.out_norm(out)).view(B, out.shape[1], self.n, self.m)  # (B, L|1, n, m)
        return logits.expand(B, L, self.n, self.m)  # (B, L, n, m)

    def select(self, logits: torch.Tensor, eps: float, generator: torch.Generator | None = None):
        """top-k_ε on this router's logits. Sample-wise routing draws once per sample, not per token."""
        if self.cfg.mode == "sample":
            idx, w = route(logits[:, :1], self.cfg.k, eps, generator)  # (B, 1, n, k)
            L = logits.shape[1]
            return idx.expand(-1, L, -1, -1), w.expand(-1, L, -1, -1)  # (B, L, n, k)
        return route(logits, self.cfg.k, eps, generator)
