"""data.py real-data path: folders, JSONL manifests, buckets, unreadable files; the feature cache."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import data
import presets
import train
from gen_tower import GenConfig
from router import RouterConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_images(folder, sizes):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(os.path.join(folder, f"img{i}.png"))
        with open(os.path.join(folder, f"img{i}.txt"), "w") as f:
            f.write(f"caption number {i}\n")


def test_folder_buckets_one_bucket_per_batch_and_determinism(tmp_path):
    write_images(tmp_path, [(64, 64), (60, 64), (128, 64), (130, 60), (64, 128)])
    (tmp_path / "no_caption.png").write_bytes(b"")  # no .txt: not a pair, ignored
    d = data.ImageCaptionData(str(tmp_path), area=32 * 32, multiple=4, seed=1)
    assert len(d) == 5
    for step in range(6):
        images, caps = d.batch(step, 3)
        assert images.shape[0] == 3 == len(caps) and images.dtype == torch.float32
        h, w = images.shape[-2:]
        assert (h, w) in d.buckets and h % 4 == 0 and w % 4 == 0
        assert images.min() >= -1 and images.max() <= 1
        assert all(c.startswith("caption number") for c in caps)
        again, caps2 = d.batch(step, 3)
        assert torch.equal(images, again) and caps == caps2  # a pure function of (seed, step)
    wide = {d.batch(s, 1)[0].shape[-1] for s in range(40)}
    assert max(wide) > 32  # the 2:1 images land in a wide bucket


def test_manifest_and_unreadable_files_are_skipped_with_a_warning(tmp_path):
    write_images(tmp_path / "imgs", [(40, 40), (40, 40)])
    (tmp_path / "imgs" / "broken.png").write_bytes(b"not a png")
    lines = [{"image": "imgs/img0.png", "caption": "a"}, {"image": "imgs/broken.png", "caption": "b"},
             {"image": "imgs/img1.png", "caption": "c"}]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        d = data.ImageCaptionData(str(manifest), area=16 * 16, multiple=4)
    assert len(d) == 2
    assert set(d.batch(0, 8)[1]) <= {"a", "c"}


def test_bad_data_specs_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="neither a folder"):
        data.read_records(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="holds no"):
        data.read_records(str(tmp_path))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "x.png"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        data.read_records(str(bad))
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--data", str(tmp_path / "nope"),
                        "--steps", "1", "--out", str(tmp_path / "run")], capture_output=True, text=True, env=env)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: data")


def test_feature_cache_roundtrip_and_training_without_the_tower(tmp_path, monkeypatch):
    from und_tower import load_tower

    tower = load_tower("minilm")
    captions = [data.sample_example(data.example_rng(0, i))[1] for i in range(16)] + [""]
    n = data.build_feature_cache(tower, captions, str(tmp_path / "cache"), shard_size=5, progress=False)
    assert n == len(set(captions)) and len(os.listdir(tmp_path / "cache")) == -(-n // 5)
    memo = data.load_feature_cache(str(tmp_path / "cache"))
    ref = tower([captions[3]])
    L = int(ref.mask.sum())
    assert memo[captions[3]].shape == (L, 7, 384)
    # stored in fp16: 11 significant bits, relative rounding error <= 2^-11 ≈ 4.9e-4
    assert torch.allclose(memo[captions[3]], ref.states[0, :L].float(), rtol=1e-3, atol=1e-4)

    # Training on 2 steps of batch 4 (examples 0..7, caption dropout draws "") reads only the cache.
    p = presets.get_preset("toy")
    p.model.gen, p.model.router = GenConfig(dim=32, depth=2, heads=2, patch_size=8), RouterConfig(dim=16, heads=2)
    p.train.steps, p.train.batch_size, p.train.ckpt_every, p.train.sample_every = 2, 4, 2, 0

    def no_tower(*a, **k):
        raise AssertionError("the understanding tower was loaded despite a complete feature cache")

    monkeypatch.setattr("und_tower.load_tower", no_tower)
    hist = train.train(p, str(tmp_path / "run"), quiet=True, features=str(tmp_path / "cache"))
    assert len(hist) == 2 and all(np.isfinite(l) for _, l in hist)
