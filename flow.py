"""Rectified flow: timestep sampling, noising, loss, the Euler sampler and guidance.

Implements the training objective of MoS (Liu et al., CVPR 2026, Sec. 3.1, Eq. 1), the
diffusion-step samplers of Appendix A ("logit-normal" at 512^2; "mode" sampling with scale 0.8
and shift 3.0 at high resolution, both from SD3, Esser et al. 2024), and the inference tools of
Appendix B.6: Euler steps, classifier-free guidance with the rescale of Lin et al. (2024), and
the linear-quadratic schedule of Movie Gen (Polyak et al., 2024).

Neighbours: `train.py` calls `sample_t`, `add_noise`, `velocity_target`, `flow_loss`; the
generation tower (`gen_tower.py`) predicts the velocity; `sample.py` / `edit.py` / `eval.py`
build a `sampling_schedule` and call `euler_sample` with the model wrapped as `model_fn(z, t)`.

THE flow convention (docs/design.md §8.1; everything in the repository follows it):
    t in [0, 1]; t = 0 is data, t = 1 is noise.
    z_t = (1 - t) z0 + t z1,          z1 ~ N(0, I)                 (Eq. 1, a straight line)
    v   = dz_t/dt = z1 - z0                                         (the regression target)
    loss = MSE(v_hat, v)
    sampling integrates Euler from t = 1 down to t = 0 in float32:
        z_{t_next} = z_t + (t_next - t_cur) * v_hat                 (t_next < t_cur)

Tensor letters: B batch, b rows seen by the model (B, or 2B under guidance), S schedule
steps; `...` is whatever the latent is, e.g. (C, H, W) -- nothing here cares about its layout.
"""

import math

import torch
from torch import Tensor

SAMPLERS = ("uniform", "logit_normal", "mode")
SCHEDULES = ("linear", "linear_quadratic")


def _per_sample(x: Tensor, like: Tensor) -> Tensor:
    """Reshape a per-sample (B,) tensor, or a scalar, to broadcast over `like` (B, ...)."""
    x = x.to(like.device) if torch.is_tensor(x) else torch.tensor(x, dtype=torch.float64, device=like.device)
    if x.ndim == 0:
        return x
    if x.shape != like.shape[:1]:
        raise ValueError(f"t must be a scalar or have shape ({like.shape[0]},) to match the batch, "
                         f"got {tuple(x.shape)}.")
    return x.view(-1, *([1] * (like.ndim - 1)))  # (B, 1, ..., 1)


########################################################################################
#                                  Training: t, z_t, v, loss                           #
########################################################################################

def time_shift(t, shift: float) -> Tensor:
    """Flux/SD3 time shift t' = s t / (1 + (s - 1) t): monotone, fixes 0 and 1, s > 1 pushes toward noise.

    Why: at high resolution a given t destroys less of the image (more pixels carry the same
    signal), so more of the training and sampling effort has to sit at high noise (SD3, Esser et al. 2024).
    """
    if not shift > 0:
        raise ValueError(f"shift must be a positive number, got {shift}.")
    t = torch.as_tensor(t)
    return shift * t / (1 + (shift - 1) * t)


def sample_t(n: int, kind: str = "logit_normal", *, mean: float = 0.0, std: float = 1.0, scale: float = 0.8,
             shift: float = 1.0, generator=None, device=None) -> Tensor:
    """Draw n training timesteps in (0, 1) (App. A, "Diffusion Step Sampling").

    uniform:      t ~ U(0, 1)
    logit_normal: t = sigmoid(x), x ~ N(mean, std)     -- SD3; the paper's 512^2 stage; minRF's default
    mode:         t = 1 - u - scale (cos^2(pi u / 2) - 1 + u), u ~ U(0, 1)   -- SD3 mode sampling; the
                  paper uses scale 0.8 at 1024^2 / 2048^2. scale 0 gives t = 1 - u, i.e. uniform.
    then, when shift != 1, `time_shift(t, shift)` (paper: shift 3.0 at high resolution).
    """
    if kind not in SAMPLERS:
        raise ValueError(f"unknown timestep sampler {kind!r}; choose one of {', '.join(SAMPLERS)}.")
    # Draw on the generator's device (a CPU generator cannot feed a CUDA draw), then move.
    where = generator.device if generator is not None else device
    if kind == "logit_normal":
        t = torch.sigmoid(mean + std * torch.randn(n, generator=generator, device=where))  # (n,)
    else:
        u = torch.rand(n, generator=generator, device=where)  # (n,)
        if kind == "uniform":
            t = u
        else:
            # NOTE: SD3 states this is monotone (a valid inverse CDF) only for -1 <= scale <= 2 / (pi - 2).
            if not -1.0 <= scale <= 2 / (math.pi - 2):
                raise ValueError(f"mode sampling needs -1 <= scale <= {2 / (math.pi - 2):.3f}, got {scale}.")
            t = 1 - u - scale * (torch.cos(math.pi / 2 * u) ** 2 - 1 + u)
    if shift != 1.0:
        t = time_shift(t, shift)
    # Keep t strictly inside (0, 1): rand() can return exactly 0 and sigmoid() rounds to 1 in
    # float32, and an endpoint would make a training example with no noise (or no signal) at all.
    return t.clamp(1e-5, 1 - 1e-5).to(device)  # (n,)


def add_noise(z0: Tensor, t, z1: Tensor | None = None, generator=None) -> tuple[Tensor, Tensor]:
    """Eq. 1: z_t = (1 - t) z0 + t z1. Returns (z_t, z1); draws z1 ~ N(0, I) when not given."""
    if z1 is None:
        where = generator.device if generator is not None else z0.device
        z1 = torch.randn(z0.shape, generator=generator, device=where, dtype=z0.dtype).to(z0.device)
    elif z1.shape != z0.shape:
        raise ValueError(f"z1 must have the shape of z0 {tuple(z0.shape)}, got {tuple(z1.shape)}.")
    # Mix in (at least) float32 and cast back, so a bf16 latent does not also quantise t.
    dtype = torch.promote_types(z0.dtype, torch.float32)
    t = _per_sample(t, z0).to(dtype)  # (B, 1, ..., 1)
    z_t = (1 - t) * z0.to(dtype) + t * z1.to(dtype)  # (B, ...)
    return z_t.to(z0.dtype), z1


def velocity_target(z0: Tensor, z1: Tensor) -> Tensor:
    """v = dz_t/dt = z1 - z0: the line of Eq. 1 has the same velocity at every t."""
    return z1 - z0


def flow_loss(v_pred: Tensor, v_target: Tensor, reduction: str = "mean") -> Tensor:
    """MSE between predicted and true velocity, in float32. "mean" -> scalar, "none" -> (B,) per sample."""
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}.")
    err = (v_pred.float() - v_target.float()).pow(2)  # (B, ...)
    per_sample = err.flatten(1).mean(1)  # (B,)
    return per_sample.mean() if reduction == "mean" else per_sample


def loss_by_t_bins(per_sample_loss: Tensor, t: Tensor, bins: int = 4) -> list[float]:
    """minRF's diagnostic: mean loss in `bins` equal slices of t (bin 0 = nearest data); nan if empty.

    NOTE: levels are not comparable across bins -- the ends are intrinsically harder (near t = 0
    the noise must be guessed, near t = 1 the image) -- so watch each bin's trend over training.
    """
    idx = (t.detach().float() * bins).long().clamp(0, bins - 1)  # (B,)
    loss = per_sample_loss.detach().float()
    return [loss[idx == i].mean().item() if (idx == i).any() else float("nan") for i in range(bins)]


########################################################################################
#                               Inference: schedule, CFG, Euler                        #
########################################################################################

def sampling_schedule(steps: int, *, shift: float = 1.0, kind: str = "linear",
                      lq_threshold: float = 0.025) -> Tensor:
    """The whole inference schedule: (steps + 1,) float32 timesteps from 1.0 down to 0.0, strictly decreasing.

    linear: t_i = 1 - i / S, i = 0..S.
    linear_quadratic (Movie Gen, Polyak et al. 2024, cited in App. B.6; the formula as publicly
    implemented in genmoai/models `mochi_preview/infer.py`, also ComfyUI / LTX-Video): with
    L = S // 2 linear steps, threshold tau = lq_threshold and x_i = 1 - t_i the distance from noise,
        x_i = tau i / L + [i > L] (L - tau S) (i - L)^2 / (L (S - L)^2),   i = 0..S.
    The first L steps walk linearly through only the first tau of the way (fine steps at
    high noise, where the layout is decided); the rest follow a parabola that leaves at the
    same slope tau / L (C1 join at i = L) and lands exactly on x_S = 1. Written as
    a(i-L)^2 + tau i / L this is the reference's `quadratic_coef i^2 + linear_coef i + const`
    expanded. NOTE: we keep tau < 0.5 so the parabola stays monotone for every S.
    Both kinds then get `time_shift(t, shift)` (a no-op at shift 1), which keeps 1 -> 1 and 0 -> 0.
    """
    if not (isinstance(steps, int) and steps >= 1):
        raise ValueError(f"steps must be a positive integer, got {steps!r}.")
    if kind not in SCHEDULES:
        raise ValueError(f"unknown sampling schedule {kind!r}; choose one of {', '.join(SCHEDULES)}.")
    if kind == "linear_quadratic" and not 0 < lq_threshold < 0.5:
        raise ValueError(f"lq_threshold must be in (0, 0.5), got {lq_threshold}.")
    i = torch.arange(steps + 1, dtype=torch.float64)  # (S+1,); float64 so the endpoints come out exact
    if kind == "linear" or steps == 1:  # one step cannot be split into two phases
        t = 1 - i / steps
    else:
        L, tau = steps // 2, lq_threshold
        quad = (L - tau * steps) * (i - L).clamp(min=0) ** 2 / (L * (steps - L) ** 2)
        t = 1 - (tau * i / L + quad)
    t = time_shift(t, shift)
    t[0], t[-1] = 1.0, 0.0  # pin the ends against rounding: Euler must start at pure noise and end at data
    return t.float()  # (S+1,)


def cfg_combine(v_cond: Tensor, v_uncond: Tensor, scale: float, rescale: float = 0.0) -> Tensor:
    """Classifier-free guidance v = u + w (c - u), with the optional rescale of Lin et al. (2024).

    Large w inflates the prediction's magnitude (over-saturated images). The rescale pulls each
    sample's std back to that of the conditional prediction, v_r = v std(c) / std(v), and blends
    v = r v_r + (1 - r) v. Lin et al. state it for the noise/v-prediction; we apply it to our
    velocity as-is (App. B.6 reports a slight gain from it).
    """
    if not 0.0 <= rescale <= 1.0:
        raise ValueError(f"rescale must be in [0, 1], got {rescale}.")
    v = v_uncond + scale * (v_cond - v_uncond)  # (B, ...)
    if rescale > 0:
        dims = list(range(1, v.ndim))  # every dim but the batch: one std per sample
        std_c = v_cond.std(dim=dims, keepdim=True)  # (B, 1, ..., 1)
        std_v = v.std(dim=dims, keepdim=True).clamp_min(1e-12)  # (B, 1, ..., 1)
        v = rescale * (v * std_c / std_v) + (1 - rescale) * v
    return v


@torch.no_grad()
def euler_sample(model_fn, z1: Tensor, timesteps: Tensor, *, cfg: float = 1.0, rescale: float = 0.0,
                 cfg_interval: tuple[float, float] = (0.0, 1.0), return_trajectory: bool = False,
                 progress: bool = False):
    """Integrate dz/dt = v_hat(z, t) with Euler from timesteps[0] (= 1, noise) to timesteps[-1] (= 0, data).

    model_fn(z (b, ...), t (b,) float32) -> v (b, ...). With cfg != 1 the conditional and
    unconditional branches run in ONE batch of b = 2B: rows [:B] are conditional, rows [B:]
    unconditional, so the caller must build its context batch as [cond; uncond]. With cfg == 1
    the model sees just the B rows. Returns z0 (B, ...) float32, or (z0, trajectory) with the
    steps + 1 states z1, ..., z0.

    cfg_interval (lo, hi): guidance only at steps whose t lies in [lo, hi]; the other steps run
    the conditional branch alone (B rows — so model_fn must accept B or 2B rows, conditional
    first). Kynkäänniemi et al. (2024), "Applying guidance in a limited interval": guidance at
    high noise mostly collapses diversity and can push samples off the data (on ShapesWorld it
    erases colour-less objects: "a circle" comes out blank), while at low noise it does little.
    """
    lo, hi = cfg_interval
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"cfg_interval must satisfy 0 <= lo <= hi <= 1, got {cfg_interval}.")
    if timesteps.ndim != 1 or len(timesteps) < 2:
        raise ValueError(f"timesteps must be a 1-D tensor of at least 2 values (start and end), "
                         f"got shape {tuple(timesteps.shape)}.")
    guided = cfg != 1.0
    # Float32 state: the steps near t = 0 are small, and adding them to a bf16 z loses them.
    z = z1.float()  # (B, ...)
    B = z.shape[0]
    ts = timesteps.float().tolist()  # python floats: no device sync per step
    trajectory = [z]
    pairs = list(zip(ts[:-1], ts[1:]))
    if progress:
        from tqdm import tqdm
        pairs = tqdm(pairs, desc="sampling", leave=False)
    for t_cur, t_next in pairs:
        t = torch.full((B,), t_cur, dtype=torch.float32, device=z.device)  # (B,)
        if guided and lo <= t_cur <= hi:
            v = model_fn(torch.cat([z, z]), t.repeat(2)).float()  # (2B, ...): [cond; uncond]
            v = cfg_combine(v[:B], v[B:], cfg, rescale)  # (B, ...)
        else:
            v = model_fn(z, t).float()  # (B, ...)
        z = z + (t_next - t_cur) * v  # t_next < t_cur: a step toward data
        if return_trajectory:
            trajectory.append(z)
    return (z, trajectory) if return_trajectory else z
