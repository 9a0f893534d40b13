"""Tests for flow.py: the flow convention, samplers, schedules, guidance and the Euler sampler."""

import math

import pytest
import torch

from flow import (add_noise, cfg_combine, euler_sample, flow_loss, loss_by_t_bins, sample_t,
                  sampling_schedule, time_shift, velocity_target)


def _pair(seed=0, shape=(3, 2, 5, 7)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)  # z0, z1


# ---------------------------------------------------------------- interpolation and target

def test_interpolation_endpoints():
    z0, z1 = _pair()
    B = z0.shape[0]
    assert torch.equal(add_noise(z0, torch.zeros(B), z1)[0], z0)  # t = 0 is data
    assert torch.equal(add_noise(z0, torch.ones(B), z1)[0], z1)  # t = 1 is noise
    z_t, z1_back = add_noise(z0, 0.25, z1)  # a scalar t broadcasts too
    assert z1_back is z1 and torch.allclose(z_t, 0.75 * z0 + 0.25 * z1)


def test_add_noise_per_sample_t_and_drawn_noise():
    z0, z1 = _pair()
    t = torch.tensor([0.1, 0.5, 0.9])
    z_t, _ = add_noise(z0, t, z1)
    for b in range(3):
        assert torch.allclose(z_t[b], (1 - t[b]) * z0[b] + t[b] * z1[b])
    a, n1 = add_noise(z0, t, generator=torch.Generator().manual_seed(3))
    b, n2 = add_noise(z0, t, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and torch.equal(n1, n2) and n1.shape == z0.shape
    with pytest.raises(ValueError):
        add_noise(z0, torch.rand(5), z1)


def test_velocity_is_dzdt():
    z0, z1 = (x.double() for x in _pair())
    v = velocity_target(z0, z1)
    h = 1e-4
    for t in (0.1, 0.5, 0.9):
        fd = (add_noise(z0, t + h, z1)[0] - add_noise(z0, t - h, z1)[0]) / (2 * h)
        assert torch.allclose(fd, v, atol=1e-6)


def test_flow_loss_reductions():
    v_pred, v_tgt = _pair()
    per = flow_loss(v_pred, v_tgt, reduction="none")
    assert per.shape == (3,)
    assert torch.allclose(per, ((v_pred - v_tgt) ** 2).flatten(1).mean(1))
    assert torch.allclose(flow_loss(v_pred, v_tgt), torch.nn.functional.mse_loss(v_pred, v_tgt))
    with pytest.raises(ValueError):
        flow_loss(v_pred, v_tgt, reduction="sum")


def test_loss_by_t_bins():
    loss = torch.tensor([1.0, 3.0, 5.0, 7.0])
    t = torch.tensor([0.1, 0.2, 0.8, 0.999])
    out = loss_by_t_bins(loss, t, bins=4)
    assert out[0] == 2.0 and math.isnan(out[1]) and math.isnan(out[2]) and out[3] == 6.0


# ---------------------------------------------------------------- timestep sampling

@pytest.mark.parametrize("kind", ["uniform", "logit_normal", "mode"])
def test_sample_t_range_shape_determinism(kind):
    t = sample_t(10_000, kind, shift=3.0, generator=torch.Generator().manual_seed(0))
    assert t.shape == (10_000,) and t.dtype == torch.float32
    assert (t > 0).all() and (t < 1).all()
    again = sample_t(10_000, kind, shift=3.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(t, again)


def test_logit_normal_median_and_shift():
    t = sample_t(200_000, "logit_normal", generator=torch.Generator().manual_seed(0))
    assert abs(t.median().item() - 0.5) < 0.01
    shifted = sample_t(200_000, "logit_normal", shift=3.0, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(shifted, time_shift(t, 3.0).clamp(1e-5, 1 - 1e-5))
    assert shifted.median() > 0.7  # shift > 1 moves mass toward noise


def test_mode_scale_zero_is_uniform():
    u = sample_t(1000, "uniform", generator=torch.Generator().manual_seed(1))
    m = sample_t(1000, "mode", scale=0.0, generator=torch.Generator().manual_seed(1))
    # Same u: SD3's f_mode(u; 0) = 1 - u, which is again U(0, 1).
    assert torch.allclose(m, (1 - u).clamp(1e-5, 1 - 1e-5), atol=1e-6)
    # scale 0.8 concentrates mass in the middle compared with uniform.
    mid = sample_t(100_000, "mode", scale=0.8, generator=torch.Generator().manual_seed(2))
    assert ((mid > 0.25) & (mid < 0.75)).float().mean() > 0.55


def test_sample_t_bad_args():
    with pytest.raises(ValueError, match="uniform"):
        sample_t(4, "cosine")
    with pytest.raises(ValueError):
        sample_t(4, "mode", scale=5.0)
    with pytest.raises(ValueError):
        time_shift(torch.rand(3), 0.0)


def test_time_shift_properties():
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    for s in (0.5, 1.0, 3.0):
        ts = time_shift(t, s)
        assert ts[0] == 0 and ts[-1] == 1
        assert (ts[1:] > ts[:-1]).all()
    assert (time_shift(t, 3.0) >= t).all() and torch.allclose(time_shift(t, 1.0), t)


# ---------------------------------------------------------------- sampling schedules

@pytest.mark.parametrize("kind", ["linear", "linear_quadratic"])
@pytest.mark.parametrize("steps", [1, 2, 3, 7, 28, 50])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_schedule_endpoints_and_monotone(kind, steps, shift):
    s = sampling_schedule(steps, shift=shift, kind=kind)
    assert s.shape == (steps + 1,) and s.dtype == torch.float32
    assert s[0] == 1.0 and s[-1] == 0.0
    assert (s[1:] < s[:-1]).all()


def test_schedule_shift_applied():
    base = sampling_schedule(10)
    assert torch.allclose(base, torch.linspace(1, 0, 11))
    assert torch.allclose(sampling_schedule(10, shift=3.0), time_shift(base, 3.0))
    lq = sampling_schedule(10, kind="linear_quadratic")
    assert torch.allclose(sampling_schedule(10, kind="linear_quadratic", shift=3.0), time_shift(lq, 3.0))


def _movie_gen_reference(steps, tau):
    """The loop of genmoai/models mochi_preview/infer.py, in its own convention (0 = noise)."""
    L = steps // 2
    lin = [i * tau / L for i in range(L)]
    diff = L - tau * steps
    q = steps - L
    qa = diff / (L * q ** 2)
    qb = tau / L - 2 * diff / q ** 2
    qc = qa * L ** 2
    quad = [qa * i ** 2 + qb * i + qc for i in range(L, steps)]
    return [1.0 - x for x in lin + quad + [1.0]]


@pytest.mark.parametrize("steps", [2, 9, 50])
def test_linear_quadratic(steps):
    tau = 0.025
    s = sampling_schedule(steps, kind="linear_quadratic", lq_threshold=tau)
    assert torch.allclose(s, torch.tensor(_movie_gen_reference(steps, tau)), atol=1e-6)
    L = steps // 2
    # the first half of the steps covers only the first tau of the way, in equal steps...
    assert abs(s[L].item() - (1 - tau)) < 1e-6 and (s[: L + 1] >= 1 - tau - 1e-6).all()
    assert torch.allclose(s[:L].diff(), torch.full((L - 1,), -tau / L), atol=1e-6) if L > 1 else True
    # ...and the second half takes the rest.
    assert (s[L + 1:] < 1 - tau).all()


def test_schedule_bad_args():
    for bad in (dict(steps=0), dict(steps=2.5), dict(steps=4, kind="cosine"),
                dict(steps=4, kind="linear_quadratic", lq_threshold=0.7)):
        with pytest.raises(ValueError):
            sampling_schedule(**bad)


# ---------------------------------------------------------------- guidance

def test_cfg_combine_and_rescale():
    c, u = _pair(1)
    assert torch.allclose(cfg_combine(c, u, 1.0), c)
    assert torch.allclose(cfg_combine(c, u, 5.0), u + 5.0 * (c - u))
    assert torch.allclose(cfg_combine(c, u, 5.0, rescale=0.0), u + 5.0 * (c - u))
    v1 = cfg_combine(c, u, 5.0, rescale=1.0)
    assert torch.allclose(v1.flatten(1).std(1), c.flatten(1).std(1), atol=1e-5)
    plain = u + 5.0 * (c - u)
    assert torch.allclose(cfg_combine(c, u, 5.0, rescale=0.7), 0.7 * v1 + 0.3 * plain, atol=1e-5)
    with pytest.raises(ValueError):
        cfg_combine(c, u, 5.0, rescale=1.5)


# ---------------------------------------------------------------- Euler sampler

@pytest.mark.parametrize("timesteps", [sampling_schedule(1), sampling_schedule(7, shift=3.0),
                                       sampling_schedule(20, kind="linear_quadratic")])
def test_euler_exact_on_straight_path(timesteps):
    z0, z1 = _pair(2)
    v = velocity_target(z0, z1)
    out = euler_sample(lambda z, t: v, z1, timesteps)
    assert out.dtype == torch.float32 and torch.allclose(out, z0, atol=1e-5)


def test_euler_model_fn_sees_plain_batch_and_trajectory():
    z0, z1 = _pair(3)
    seen = []

    def model_fn(z, t):
        seen.append((z.shape, t.clone()))
        return z1 - z0

    ts = sampling_schedule(5)
    out, traj = euler_sample(model_fn, z1, ts, return_trajectory=True, progress=True)
    assert len(traj) == 6 and torch.equal(traj[0], z1) and torch.equal(traj[-1], out)
    assert all(shape == z1.shape for shape, _ in seen)
    assert all(t.dtype == torch.float32 and t.shape == (3,) for _, t in seen)
    assert torch.allclose(torch.stack([t[0] for _, t in seen]), ts[:-1])


def test_euler_cfg_batch_layout():
    z0, z1 = _pair(4)
    B = z1.shape[0]
    c, u = _pair(5)  # cond and uncond velocities: the two halves differ
    rows = []

    def model_fn(z, t):
        rows.append(z.shape[0])
        assert torch.equal(z[:B], z[B:]) and torch.equal(t[:B], t[B:])
        return torch.cat([c, u])  # first B rows answer the conditional branch

    ts = sampling_schedule(1)  # one step of size -1: z0 = z1 - v
    w = 4.0
    out = euler_sample(model_fn, z1, ts, cfg=w)
    assert rows == [2 * B]
    assert torch.allclose(out, z1 - (u + w * (c - u)), atol=1e-5)
    # with rescale the same batch goes through cfg_combine's rescale
    out_r = euler_sample(model_fn, z1, ts, cfg=w, rescale=1.0)
    assert torch.allclose(out_r, z1 - cfg_combine(c, u, w, rescale=1.0), atol=1e-5)


def test_euler_cfg_one_is_conditional():
    z0, z1 = _pair(6)
    B = z1.shape[0]
    c, u = _pair(7)
    rows = []

    def model_fn(z, t):
        rows.append(z.shape[0])
        return c if z.shape[0] == B else torch.cat([c, u])

    ts = sampling_schedule(3)
    out = euler_sample(model_fn, z1, ts, cfg=1.0)
    assert rows == [B] * 3  # no doubled batch when guidance is off
    assert torch.allclose(out, z1 - c, atol=1e-5)
    assert torch.allclose(out, z1 - cfg_combine(c, u, 1.0), atol=1e-5)


def test_euler_bad_timesteps():
    with pytest.raises(ValueError):
        euler_sample(lambda z, t: z, torch.zeros(1, 2), torch.ones(1))


def test_euler_cfg_interval_limits_guidance():
    # Guidance only where lo <= t <= hi: outside it the model sees the B conditional rows alone.
    torch.manual_seed(0)
    B, w = 3, 4.0
    z1 = torch.randn(B, 2, 4, 4)
    ts = torch.linspace(1, 0, 6)  # t_cur = 1.0, 0.8, 0.6, 0.4, 0.2
    seen = []

    def model_fn(z, t):
        seen.append((z.shape[0], round(t[0].item(), 3)))
        sign = torch.ones(z.shape[0], 1, 1, 1)
        sign[B:] = -1.0  # uncond rows give the opposite velocity
        return sign * z

    out = euler_sample(model_fn, z1, ts, cfg=w, cfg_interval=(0.3, 0.7))
    assert seen == [(B, 1.0), (B, 0.8), (2 * B, 0.6), (2 * B, 0.4), (B, 0.2)]
    # Reference: the same Euler steps written out by hand.
    z = z1.clone()
    for t_cur, t_next in zip(ts[:-1].tolist(), ts[1:].tolist()):
        v = z if not 0.3 <= t_cur <= 0.7 else -z + w * (z - -z)
        z = z + (t_next - t_cur) * v
    torch.testing.assert_close(out, z)
    # The full interval is plain CFG; an empty one never guides.
    full = euler_sample(model_fn, z1, ts, cfg=w, cfg_interval=(0.0, 1.0))
    torch.testing.assert_close(full, euler_sample(model_fn, z1, ts, cfg=w))
    seen.clear()
    euler_sample(model_fn, z1, ts, cfg=w, cfg_interval=(0.0, 0.0))
    assert all(b == B for b, _ in seen)
    with pytest.raises(ValueError, match="cfg_interval"):
        euler_sample(model_fn, z1, ts, cfg=w, cfg_interval=(0.8, 0.2))
