"""train.py under torchrun on CPU (gloo, 2 processes): FSDP2 training, DCP checkpoints, elastic restart.

One torchrun launch does most of the work (a torchrun start costs ~15 s on a busy 2-core
machine): `torchrun --standalone --nproc_per_node 2 --max-restarts 1 lose_a_worker.py --preset
toy` with a tiny model, 4 steps of global batch 4 and a DCP checkpoint every 2 steps.
lose_a_worker.py (written by the test, `LOSE_A_WORKER`) is train.py's command line with
`train.training_step` wrapped from the outside: the last worker dies once at step 3 —
torchrun restarts both workers and train.py resumes from step-000002 by itself. Its log then
holds step 2 twice: once from the first life, once after the restart.

Reference runs are in-process, single-process `train.train` calls with the same preset.
Every run reads its understanding states from one feature cache (data.build_feature_cache,
built here with MiniLM): the children then never load the tower, which saves ~13 s of
transformers start-up per process, and all runs see the same (fp16-cached) states.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import checkpoint
import distributed
import presets
import sizing
import train
import und_tower

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["model.gen.dim=32", "model.gen.depth=2", "model.gen.heads=2", "model.gen.patch_size=8",
        "model.router.dim=16", "model.router.heads=2", "train.warmup=2", "train.ckpt_every=2",
        "train.log_every=1"]
STEPS, BATCH = 4, 4

# train.py's command line, with the last worker lost once at step FAIL_AT (in its first life:
# TORCHELASTIC_RESTART_COUNT 0) — injected from the outside by wrapping train.training_step.
LOSE_A_WORKER = """
import inspect
import os
import sys

sys.path.insert(0, {repo!r})
import torch  # noqa: E402

import train  # noqa: E402

FAIL_AT = {step}
real_step = train.training_step


def training_step(*args, **kwargs):
    step = inspect.signature(real_step).bind(*args, **kwargs).arguments["step"]
    if step == FAIL_AT and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
        # Rank 0 has logged every step before this one (else a slow rank 0 can be killed
        # mid-write, and the test sees a step missing).
        torch.distributed.barrier()
        if torch.distributed.get_rank() == torch.distributed.get_world_size() - 1:
            os._exit(17)  # like a lost GPU: no cleanup; torchrun --max-restarts restarts every worker
    return real_step(*args, **kwargs)


train.training_step = training_step
sys.exit(train.main(train.parse_args()))
"""


def tiny_preset(micro_batch=0, sample_every=0):
    p = presets.get_preset("toy")
    p.train.steps, p.train.batch_size = STEPS, BATCH
    presets.apply_overrides(p, TINY + [f"train.sample_every={sample_every}", f"train.micro_batch={micro_batch}"])
    return p


def rel(a, b):
    return abs(a - b) / abs(b)


@pytest.fixture(scope="module")
def minilm():
    from und_tower import load_tower

    return load_tower("minilm")


@pytest.fixture(scope="module")
def features(tmp_path_factory, minilm):
    """States of every caption the runs meet: 4 steps × 4 ShapesWorld examples, the empty
    caption (dropout, CFG) and the sample-grid prompts."""
    import data

    _, captions = data.shapes_batch(seed=0, start=0, batch_size=STEPS * BATCH, size=32)
    path = str(tmp_path_factory.mktemp("features"))
    data.build_feature_cache(minilm, captions + [""] + train.GRID_PROMPTS, path, progress=False)
    return path


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, features):
    """The 2-process torchrun run (with one lost worker); → (run dir, {step: [losses]}, output)."""
    tmp = tmp_path_factory.mktemp("dist")
    out, launcher = str(tmp / "run"), tmp / "lose_a_worker.py"
    launcher.write_text(LOSE_A_WORKER.format(repo=REPO, step=3))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--max-restarts", "1",
           str(launcher), "--preset", "toy", "--steps", str(STEPS), "--batch-size", str(BATCH),
           "--out", out, "--threads", "1", "--device", "cpu", "--features", features,
           "--set", *TINY, "train.sample_every=4"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    losses = {}
    with open(os.path.join(out, "log.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            losses.setdefault(rec["step"], []).append(rec["loss"])
    return out, losses, output


def test_two_process_run_checkpoints_and_survives_a_lost_worker(two_process_run):
    out, losses, output = two_process_run
    for step in (2, 4):
        ckpt = os.path.join(out, f"step-{step:06d}")
        files = set(os.listdir(ckpt))
        # DCP: one shard file per rank + the global metadata; plus the consolidated export.
        assert {".metadata", "__0_0.distcp", "__1_0.distcp", "ema.safetensors", "config.json"} <= files, files
    assert not any(d.endswith(".tmp") for d in os.listdir(out))
    assert os.path.exists(os.path.join(out, "samples-000004.png"))  # every rank sampled, rank 0 wrote
    assert f"resumed from {os.path.join(out, 'step-000002')} at step 2" in output
    assert sorted(losses) == [0, 1, 2, 3] and len(losses[2]) == 2  # step 2 ran before and after the restart
    # DCP save → stop → resume: the resumed step 2 is the uninterrupted step 2, bit for bit.
    assert losses[2][0] == losses[2][1]


def test_two_processes_match_one_process_with_the_same_global_batch(two_process_run, tmp_path, features):
    """Rank r trains rows 2r, 2r+1 of each global batch of 4; per-sample randomness makes
    every row draw the same caption dropout, t, noise and ε-greedy choices in any layout.

    Against one process with micro-batches of 2 (the same per-forward shapes) the losses
    agree to 1e-6 (measured: bit-identical — FSDP2's fp32 average of 2 gradients equals
    accumulating two halves). Against one process running all 4 rows in one forward they
    agree to 1e-5: larger matmuls sum in another order (measured ~1e-7 relative)."""
    _, losses, _ = two_process_run
    split = dict(train.train(tiny_preset(micro_batch=2), str(tmp_path / "split"), quiet=True, features=features))
    whole = dict(train.train(tiny_preset(), str(tmp_path / "whole"), quiet=True, features=features))
    for step in range(STEPS):
        two = losses[step][-1]  # after the restart where a step ran twice
        assert rel(two, split[step]) <= 1e-6, (step, two, split[step])
        assert rel(two, whole[step]) <= 1e-5, (step, two, whole[step])
    # The consolidated EMA export equals the single-process EMA (same tolerance argument).
    from safetensors.torch import load_file

    ema2 = load_file(os.path.join(two_process_run[0], "step-000004", "ema.safetensors"))
    ema1 = load_file(str(tmp_path / "split" / "step-000004" / "ema.safetensors"))
    assert ema2.keys() == ema1.keys()
    for k in ema1:
        assert torch.allclose(ema2[k], ema1[k], rtol=1e-5, atol=1e-6), k  # measured ≤ 2e-7


# Loading a DCP checkpoint without a process group is the point here; DCP warns that it
# assumes one process, which is what we ask of it.
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_two_process_checkpoint_resumes_in_one_process(two_process_run, tmp_path, features):
    """N → M: a plain process reads the 2 ranks' shards of step-000002 into full tensors and
    continues with the losses of the 2-process run."""
    out, losses, _ = two_process_run
    resumed = train.train(tiny_preset(micro_batch=2), str(tmp_path / "one"), resume=os.path.join(out, "step-000002"),
                          quiet=True, features=features)
    assert [s for s, _ in resumed] == [2, 3]
    for step, loss in resumed:
        assert rel(loss, losses[step][-1]) <= 1e-6, (step, loss, losses[step])


def test_consolidated_export_loads_in_sample_py(two_process_run, minilm, monkeypatch):
    import sample

    monkeypatch.setattr("und_tower.load_tower", lambda *a, **k: minilm)
    model, tower, codec, preset = sample.load_everything(two_process_run[0])
    assert preset.model.gen.dim == 32 and preset.train.batch_size == BATCH
    images = sample.generate(model, tower, codec, ["a red circle"], preset, steps=2, cfg=1.0)
    assert images.shape == (1, 32, 32, 3) and images.dtype == np.uint8


def test_per_sample_draws_do_not_depend_on_the_batch_or_its_padding():
    """router.uniforms with one generator per sample: sample b's draws are the same alone,
    in a bigger batch, or with its context padded to a longer L."""
    from router import uniforms

    gens = lambda rows: train.sample_generators(0, 5, rows)  # noqa: E731
    alone = uniforms((1, 3, 2, 4), "cpu", gens([1]))  # (B=1, L=3, n, m+1)
    batch = uniforms((2, 7, 2, 4), "cpu", gens([0, 1]))  # padded to L=7 in a batch of 2
    assert torch.equal(batch[1, :3], alone[0])
    assert not torch.equal(batch[0, :3], alone[0])  # another row, other draws
    with pytest.raises(ValueError, match="2 per-sample generators for a batch of 3"):
        uniforms((3, 2), "cpu", gens([0, 1]))


def test_memory_estimate_shards_states_and_checkpointing_cuts_activations():
    p = presets.get_preset("mos_s")
    m1, m8 = sizing.memory_estimate(p, 1, False, micro_batch=8), sizing.memory_estimate(p, 8, False, micro_batch=8)
    assert m1["params_grads_adam_ema"] == pytest.approx(8 * m8["params_grads_adam_ema"])
    # 20 bytes per trained parameter (fp32 weights, grads, 2 Adam moments, EMA) on one GPU
    assert m1["params_grads_adam_ema"] * 1024 ** 3 == pytest.approx(20 * m1["params"])
    ck = sizing.memory_estimate(p, 8, True, micro_batch=8)
    assert ck["activations"] < m8["activations"] / 5 and ck["understanding_tower_bf16"] == m8["understanding_tower_bf16"]


def test_dry_run_prints_per_gpu_memory_for_a_world_size(capsys):
    assert train.main(train.parse_args(["--preset", "ablation", "--dry-run", "--world-size", "16"])) == 0
    lines = [l for l in capsys.readouterr().out.splitlines() if "memory per GPU, 16 GPUs" in l]
    assert len(lines) == 2 and "checkpointing off" in lines[0] and "checkpointing on" in lines[1]


def test_micro_batch_must_divide_the_per_process_batch(tmp_path):
    with pytest.raises(ValueError, match="micro_batch 3 must divide the 4 rows"):
        train.train(tiny_preset(micro_batch=3), str(tmp_path / "x"), quiet=True)


def test_real_data_shards_are_the_rows_of_the_global_batch(tmp_path):
    """Bucket-aware sharding: each process reads only its rows, all of one bucket, and the
    shards of 2 processes put together are the 1-process batch."""
    import data
    from PIL import Image

    for i in range(6):
        w = 48 if i % 2 else 32  # two aspect ratios → two buckets
        Image.new("RGB", (w, 32), (40 * i, 255 - 40 * i, 7 * i)).save(tmp_path / f"im{i}.png")
        (tmp_path / f"im{i}.txt").write_text(f"picture {i}")
    batch_fn = train.make_data(str(tmp_path), presets.get_preset("toy").model, seed=0)  # ImageCaptionData.batch
    assert isinstance(batch_fn.__self__, data.ImageCaptionData)
    for step in range(4):
        images, caps = batch_fn(step, 4)
        parts = [distributed.shard_batch(batch_fn, step, 4, r * 2, 2) for r in range(2)]
        assert torch.equal(torch.cat([p[0] for p in parts]), images)
        assert parts[0][1] + parts[1][1] == caps


def test_fsdp2_in_one_process_with_activation_checkpointing_matches_the_plain_model(features):
    """A 1-rank gloo group in this process: FSDP2 (with and without per-block activation
    checkpointing) computes the plain model's loss, and checkpointing leaves the gradients as
    they were (it only recomputes the blocks' insides in backward)."""
    import torch.distributed as tdist

    import data
    from gen_tower import PixelCodec

    p = tiny_preset()
    batch = data.shapes_batch(0, 0, 4, 32)
    tower = und_tower.TowerMemo(lambda: None, memo=data.load_feature_cache(features))
    head = torch.randn(p.model.gen.patch_size ** 2 * 3, p.model.gen.dim, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(p.train.seed)
    plain = checkpoint.build_model(p.model)
    with torch.no_grad():
        plain.gen.head.weight.copy_(0.02 * head)  # the zero-initialised head would stop every gradient
    ref = train.training_step(plain, batch, tower, PixelCodec(), p, 0)[0]
    tdist.init_process_group("gloo", store=tdist.HashStore(), rank=0, world_size=1)
    try:
        grads, saved = [], []
        for act_ckpt in (False, True):
            model, _ = distributed.build_sharded(p, distributed.Dist(0, 1, "cpu", True), act_ckpt)
            with torch.no_grad():
                model.gen.head.weight.to_local().copy_(0.02 * head)  # one rank holds the whole tensor
            packed = []  # tensors autograd keeps for backward (checkpointed blocks keep their own)
            with torch.autograd.graph.saved_tensors_hooks(lambda x: packed.append(x.numel()) or x, lambda x: x):
                loss = train.training_step(model, batch, tower, PixelCodec(), p, 0)[0]
            loss.backward()
            assert rel(loss.item(), ref.item()) <= 1e-6
            grads.append({n: q.grad.full_tensor() for n, q in model.named_parameters()})
            saved.append(sum(packed))
    finally:
        tdist.destroy_process_group()
    assert saved[1] < 0.8 * saved[0], saved  # checkpointing really dropped the blocks' activations
    assert any(g.abs().sum() > 0 for n, g in grads[0].items() if "blocks" in n)
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-8), n
