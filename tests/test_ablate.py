"""ablate.py: the study's rows, --dry, resume, the verdicts, the report, and the random-tower row.

Nothing here trains or evaluates for real: `ablate.run_command` (the one place a train.py or
eval.py subprocess starts) is replaced by a stand-in that writes what the real one would.
"""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

import ablate
from presets import apply_overrides, get_preset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fake_eval(overall: float, per_category: int = 50) -> dict:
    """An eval.py JSON whose six categories all score `overall`."""
    return {c: overall for c in ablate.CATEGORIES} | {
        "overall": overall, "held_out": overall / 2, "n": per_category * 12, "per_category": per_category,
        "images_per_prompt": 2}


def write_eval(runs, name, seed, overall, times=None):
    d = os.path.join(runs, name, f"seed-{seed}")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "eval.json"), "w") as f:
        json.dump(fake_eval(overall), f)
    if times:
        with open(os.path.join(d, "times.json"), "w") as f:
            json.dump(times, f)


# -----------------------------------------------------------------------------
# The rows


def flat(d: dict, prefix="") -> dict:
    out = {}
    for k, v in d.items():
        out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def test_every_row_changes_exactly_one_setting_of_mos_as_shipped():
    assert len(ablate.VARIANTS) >= 10 and ablate.SEEDS >= 3
    assert {"mos", "last", "hand", "sample", "prompt", "prompt_latent", "k1", "k4", "eps0",
            "random_tower"} <= set(ablate.BY_NAME)
    mos = apply_overrides(get_preset("toy"), list(ablate.BY_NAME["mos"].sets))
    r = mos.model.router
    assert (r.mode, r.inputs, r.k, r.eps, mos.model.tower_init) == ("mos", "prompt+latent+t", 2, 0.05, "pretrained")
    reference = flat(mos.to_dict())
    expected = {"last": ("model.router.mode", "last"), "hand": ("model.router.mode", "hand"),
                "sample": ("model.router.mode", "sample"), "prompt": ("model.router.inputs", "prompt"),
                "prompt_latent": ("model.router.inputs", "prompt+latent"), "k1": ("model.router.k", 1),
                "k4": ("model.router.k", 4), "eps0": ("model.router.eps", 0.0),
                "random_tower": ("model.tower_init", "random"), "static": ("model.router.mode", "static")}
    for v in ablate.VARIANTS[1:]:
        preset = flat(apply_overrides(get_preset("toy"), list(v.sets)).to_dict())
        changed = {k: preset[k] for k in reference if preset[k] != reference[k]}
        assert changed == dict([expected[v.name]]), v.name
        assert v.paper and v.tests and v.label  # every row carries the paper's result
    # EmojiWorld's pair: the emoji preset as shipped, and the same with an untrained tower.
    mos_e, random_e = ablate.EMOJI_VARIANTS
    assert (mos_e.world, random_e.world, mos_e.sets) == ("emoji", "emoji", ())
    emoji = flat(get_preset("emoji").to_dict())
    preset = flat(apply_overrides(get_preset("emoji"), list(random_e.sets)).to_dict())
    assert {k: preset[k] for k in emoji if preset[k] != emoji[k]} == {"model.tower_init": "random"}


def test_the_category_names_are_eval_pys():
    # ablate.py reads eval.py's JSON without importing it (each run is a subprocess).
    import eval as eval_py

    assert ablate.CATEGORIES == tuple(eval_py.CATEGORIES) and len(ablate.CATEGORY_LABELS) == len(ablate.CATEGORIES)
    assert ablate.EMOJI_CATEGORIES == tuple(eval_py.EMOJI_CATEGORIES)


def test_train_and_eval_commands_share_the_recipe_and_resume_from_a_checkpoint(tmp_path):
    run = ablate.plan(str(tmp_path), ["k4"], 2)[1]
    cmd = ablate.train_command(run, 9000, compiled=True, threads=None)
    assert cmd[1].endswith("train.py") and cmd[cmd.index("--steps") + 1] == "9000"
    sets = cmd[cmd.index("--set") + 1:]
    assert {"model.router.k=4", "train.seed=1", "train.sample_every=0", "train.compile=inductor"} <= set(sets)
    assert cmd[cmd.index("--out") + 1] == run.dir == os.path.join(str(tmp_path), "k4", "seed-1")
    os.makedirs(os.path.join(run.dir, "step-003000"))
    resume = ablate.train_command(run, 9000, compiled=True, threads=2)
    assert resume[2:] == ["--resume", run.dir, "--threads", "2"]  # the checkpoint's config holds the recipe
    ev = ablate.eval_command(run, 50, 0)
    assert ev[1].endswith("eval.py") and ev[2:] == ["--ckpt", run.dir, "--seed", "0", "--per-category", "50",
                                                     "--out", run.eval_json]
    # An EmojiWorld row trains the emoji preset for its own budget and is scored with its synonyms.
    emoji = ablate.plan(str(tmp_path), ["emoji_random_tower"], 1)[0]
    steps = ablate.run_steps(emoji, 3000, 8000)
    cmd = ablate.train_command(emoji, steps, compiled=True, threads=None)
    assert cmd[cmd.index("--preset") + 1] == "emoji" and cmd[cmd.index("--steps") + 1] == "8000"
    assert "model.tower_init=random" in cmd[cmd.index("--set") + 1:]
    ev = ablate.eval_command(emoji, 50, 0)
    assert ev[ev.index("--world") + 1] == "emoji" and ev[ev.index("--synonyms") + 1] == str(ablate.EMOJI_SYNONYMS)
    assert ev[ev.index("--per-category") + 1] == str(ablate.EMOJI_PER_CATEGORY)


# -----------------------------------------------------------------------------
# --dry


def dry_rows(out: str) -> list[list[str]]:
    return [line.split() for line in out.splitlines() if line.split()[:1] and line.split()[0] in ablate.BY_NAME]


def test_dry_lists_every_run_with_its_estimate_and_runs_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(ablate, "run_command", lambda *a, **k: pytest.fail("--dry must not run anything"))
    runs = str(tmp_path / "abl")
    assert ablate.main(ablate.parse_args(["--dry", "--runs", runs])) == 0
    out = capsys.readouterr().out
    rows = dry_rows(out)
    every = ablate.VARIANTS + ablate.EMOJI_VARIANTS
    assert len(rows) == len(every) * 3 >= 30
    assert {(r[0], r[1]) for r in rows} == {(v.name, str(s)) for v in every for s in range(3)}
    assert all(r[2] == "todo" for r in rows)
    per_run = ablate.STEPS * ablate.TRAIN_CPU_S_PER_STEP + 600 * ablate.EVAL_CPU_S_PER_IMAGE
    per_emoji_run = (ablate.EMOJI_STEPS * ablate.TRAIN_CPU_S_PER_STEP
                     + ablate.EMOJI_EVAL_IMAGES * ablate.EVAL_CPU_S_PER_IMAGE)
    total = (len(ablate.VARIANTS) * 3 * per_run + len(ablate.EMOJI_VARIANTS) * 3 * per_emoji_run
             + len(every) * ablate.COMPILE_CPU_S)  # one compile per variant
    assert f"estimated CPU time: {ablate.hours(total)} to go, of {ablate.hours(total)}" in out
    assert total > 5 * 3600  # many CPU-hours: the reason it resumes
    assert not os.path.exists(runs)  # nothing written either

    # A finished run costs nothing more; a half-trained one only its remaining steps and the eval.
    write_eval(runs, "mos", 0, 0.5)
    os.makedirs(os.path.join(runs, "last", "seed-1", "step-001500"))
    ablate.main(ablate.parse_args(["--dry", "--runs", runs]))
    rows = {(r[0], r[1]): r for r in dry_rows(capsys.readouterr().out)}
    assert rows[("mos", "0")][2:5] == ["done", "0", "s"]
    assert rows[("last", "1")][2:4] == ["step", "1500"]
    left = (ablate.STEPS - 1500) * ablate.TRAIN_CPU_S_PER_STEP + 600 * ablate.EVAL_CPU_S_PER_IMAGE
    assert rows[("last", "1")][4:6] == ablate.hours(left).split()


# -----------------------------------------------------------------------------
# Running and resuming (train.py / eval.py replaced by a stand-in)


class FakeWorker:
    """Stands in for `run_command`: records each call and writes what train.py / eval.py would."""

    def __init__(self, steps, fail=()):
        self.calls, self.steps, self.fail = [], steps, set(fail)

    def __call__(self, cmd, run_dir, part, threads=None):
        name = os.path.relpath(run_dir, os.path.dirname(os.path.dirname(run_dir)))
        self.calls.append((name, part, "--resume" in cmd))
        if (name, part) in self.fail:
            return 1
        if part == "train":
            os.makedirs(os.path.join(run_dir, f"step-{self.steps:06d}"), exist_ok=True)
        else:
            with open(cmd[cmd.index("--out") + 1], "w") as f:
                json.dump(fake_eval(0.5), f)
        ablate.add_times(run_dir, part, 10.0, 5.0)
        return 0


def test_resume_skips_finished_runs_and_continues_the_rest(tmp_path, monkeypatch):
    runs = str(tmp_path / "abl")
    write_eval(runs, "mos", 0, 0.5)  # done: nothing to do
    os.makedirs(os.path.join(runs, "mos", "seed-1", "step-000004"))  # trained: evaluate only
    for step in ("step-000001", "step-000002"):  # interrupted at step 2: resume, then evaluate
        os.makedirs(os.path.join(runs, "last", "seed-0", step))
    worker = FakeWorker(steps=4)  # last seed 1: nothing yet, train from scratch
    monkeypatch.setattr(ablate, "run_command", worker)
    argv = ["--only", "mos,last", "--seeds", "2", "--steps", "4", "--runs", runs]
    assert ablate.main(ablate.parse_args(argv)) == 0
    assert worker.calls == [  # seed by seed: every row's seed 0 before any row's seed 1
        ("last/seed-0", "train", True), ("last/seed-0", "eval", False),
        ("mos/seed-1", "eval", False),
        ("last/seed-1", "train", False), ("last/seed-1", "eval", False),
    ]
    assert sorted(os.listdir(os.path.join(runs, "last", "seed-0"))) == [
        "eval.json", "step-000004", "times.json"]  # only the final checkpoint is kept
    assert os.path.exists(os.path.join(runs, "ablations.md"))  # a study elsewhere reports beside its runs
    with open(os.path.join(runs, "study.json")) as f:
        assert json.load(f) == {"steps": 4, "emoji_steps": ablate.EMOJI_STEPS, "per_category": 50, "eval_seed": 0,
                                "compile": "inductor"}

    worker.calls.clear()
    assert ablate.main(ablate.parse_args(argv)) == 0
    assert worker.calls == []  # everything done: a rerun only rewrites the report
    with pytest.raises(ValueError, match=r"holds a study with steps 4 \(asked 5\)"):
        ablate.main(ablate.parse_args(argv[:-4] + ["--steps", "5", "--runs", runs]))
    # --report runs nothing and describes the recipe the runs were made with, whatever it is asked.
    assert ablate.main(ablate.parse_args(["--report", "--runs", runs])) == 0 and worker.calls == []
    assert "for 4 steps of batch 8" in open(os.path.join(runs, "ablations.md")).read()


def test_a_failed_run_is_one_line_and_the_others_go_on(tmp_path, monkeypatch, capsys):
    runs = str(tmp_path / "abl")
    worker = FakeWorker(steps=3, fail={("hand/seed-0", "train")})
    monkeypatch.setattr(ablate, "run_command", worker)
    assert ablate.main(ablate.parse_args(["--only", "hand,k1", "--seeds", "1", "--steps", "3", "--runs", runs])) == 1
    assert worker.calls == [("hand/seed-0", "train", False),  # failed: no eval of it
                            ("k1/seed-0", "train", False), ("k1/seed-0", "eval", False)]
    err = capsys.readouterr().err
    assert "error: training hand seed 0 stopped (exit 1) at step 0; see" in err
    assert "1 of 2 runs failed; run the same command again to retry them" in err


def test_jobs_run_side_by_side_with_a_share_of_the_cores(tmp_path, monkeypatch):
    """--jobs 2 on 2 cores: two runs at once (a barrier that only two concurrent trainings pass),
    one thread each; every run still trains and is evaluated."""
    runs = str(tmp_path / "abl")
    worker, barrier, threads = FakeWorker(steps=3), threading.Barrier(2, timeout=10), []

    def side_by_side(cmd, run_dir, part, threads_=None):
        threads.append(threads_)
        if part == "train":
            barrier.wait()  # BrokenBarrierError unless the other run is training at the same time
        return worker(cmd, run_dir, part)

    monkeypatch.setattr(ablate, "run_command", side_by_side)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    argv = ["--only", "hand,k1", "--seeds", "1", "--steps", "3", "--runs", runs, "--jobs", "2"]
    assert ablate.main(ablate.parse_args(argv)) == 0
    assert sorted(worker.calls) == [("hand/seed-0", "eval", False), ("hand/seed-0", "train", False),
                                    ("k1/seed-0", "eval", False), ("k1/seed-0", "train", False)]
    assert threads == [1, 1, 1, 1]


def test_each_run_is_charged_its_own_cpu_time_when_runs_overlap(tmp_path):
    """run_command counts the CPU seconds of its own child only: a run that sleeps beside one that
    computes is charged (almost) nothing, though the other finishes while it waits."""
    busy = [sys.executable, "-c", "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.6: pass"]
    idle = [sys.executable, "-c", "import time; time.sleep(1.5)"]
    dirs = [str(tmp_path / "busy"), str(tmp_path / "idle")]
    for d in dirs:
        os.makedirs(d)
    with ThreadPoolExecutor(2) as pool:
        codes = list(pool.map(lambda a: ablate.run_command(*a), [(busy, dirs[0], "train"), (idle, dirs[1], "train")]))
    assert codes == [0, 0]
    busy_t, idle_t = ablate.read_times(dirs[0]), ablate.read_times(dirs[1])
    assert busy_t["train_cpu_s"] >= 0.6 and idle_t["train_cpu_s"] < 0.4, (busy_t, idle_t)
    assert idle_t["train_wall_s"] >= 1.5
    assert ablate.run_command([sys.executable, "-c", "raise SystemExit(3)"], dirs[0], "eval") == 3


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_a_background_study_and_its_running_child(tmp_path, sig):
    """`pkill -f ablate.py` (SIGTERM) or SIGINT stops the study also when it was started in the
    background with SIGINT ignored (`nohup ... &`): the running training is stopped too, its time
    is recorded, and the study exits 130 saying how to continue."""
    runs, started = str(tmp_path / "abl"), str(tmp_path / "started")
    train = [sys.executable, "-c", "import os, sys, time; open(sys.argv[1], 'w').write(str(os.getpid())); "
             "time.sleep(60)", started]  # a training that runs until it is stopped
    script = (f"import ablate; ablate.train_command = lambda *a: {train!r}; import sys; "
              f"sys.argv = ['ablate.py', '--only', 'mos', '--seeds', '1', '--steps', '3', '--runs', {runs!r}]; "
              "ablate.cli()")
    study = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    deadline = time.time() + 60
    while not (os.path.exists(started) and open(started).read()) and time.time() < deadline:
        time.sleep(0.05)
    child = int(open(started).read())
    time.sleep(0.5)
    study.send_signal(sig)
    _, err = study.communicate(timeout=30)
    assert study.returncode == 130
    assert "interrupted: run the same command again to continue where it stopped" in err
    with pytest.raises(ProcessLookupError):  # stopped and reaped, not left running
        os.kill(child, 0)
    times = ablate.read_times(os.path.join(runs, "mos", "seed-0"))
    assert 0.5 <= times["train_wall_s"] < 30, times


def test_bad_input_is_one_line_and_exit_2(tmp_path):
    for argv, message in ((["--only", "mos,attention"], "error: unknown variant 'attention'; choose from mos, last,"),
                          (["--seeds", "0"], "error: --seeds must be at least 1, got 0"),
                          (["--steps", "-5"], "error: --steps must be at least 1, got -5")):
        p = subprocess.run([sys.executable, os.path.join(ROOT, "ablate.py"), "--dry", "--runs", str(tmp_path), *argv],
                           capture_output=True, text=True, cwd=ROOT)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith(message), (argv, p.stderr)
        assert p.stdout == ""  # nothing listed, nothing run


# -----------------------------------------------------------------------------
# Verdicts and the report


def test_verdict_compares_the_difference_with_its_standard_error():
    assert ablate.verdict(-0.10, 0.02, 3) == "reproduces"  # MoS ahead beyond 2 SE
    assert ablate.verdict(+0.10, 0.02, 3) == "reverses"
    assert ablate.verdict(-0.03, 0.02, 3) == "within noise"
    assert ablate.verdict(-0.10, 0.02, 1) == "too few seeds"  # one seed in common
    # Three seeds that land on the same score have std 0, but 600 images still carry their own
    # sampling error (≈ 0.02 on overall at p = 0.5): 0.02 apart is then noise, not a finding.
    same = ablate.stats([fake_eval(0.5)] * 3)
    assert same["std"] == 0 and same["se"] == pytest.approx(np.sqrt(0.25 / 100 / 6 / 3), rel=1e-6)
    rows = ablate.summarise({"mos": [fake_eval(0.5)] * 3, "last": [fake_eval(0.48)] * 3})
    assert rows[1]["verdict"] == "within noise" and rows[1]["delta"] == pytest.approx(-0.02)


def test_runs_are_compared_seed_by_seed(tmp_path):
    # A seed that is lucky for MoS is lucky for the variant too (same data, noise and ε draws): a
    # variant 0.04 behind at every seed is a finding, though each row's own spread (0.03) is not.
    runs = str(tmp_path)
    for seed, (m, worse, mixed) in enumerate([(0.23, 0.19, 0.27), (0.29, 0.25, 0.21), (0.26, 0.22, 0.24)]):
        for name, x in (("mos", m), ("last", worse), ("hand", mixed)):
            write_eval(runs, name, seed, x)
    write_eval(runs, "sample", 1, 0.10)  # a single seed in common with MoS
    rows = {r["variant"].name: r for r in ablate.summarise(ablate.load_results(runs, 3))}
    assert rows["last"]["delta"] == pytest.approx(-0.04) and rows["last"]["verdict"] == "reproduces"
    # Unpaired, the same numbers are noise: SE(Δ) = √2 · 0.03/√3 ≈ 0.0245, and 0.04 < 2·SE.
    assert abs(rows["last"]["delta"]) < 2 * np.sqrt(2) * 0.03 / np.sqrt(3)
    assert rows["hand"]["delta"] == pytest.approx(-0.02) and rows["hand"]["verdict"] == "within noise"
    assert rows["sample"]["delta"] == pytest.approx(0.10 - 0.29) and rows["sample"]["verdict"] == "too few seeds"
    # The floor: the paired differences of "last" are all -0.04 (std 0), so SE(Δ) is the two
    # evals' sampling error, √(Σ_s (var_mos,s + var_last,s)) / 3.
    var = lambda p: sum(p * (1 - p) / 100 for _ in range(6)) / 36  # noqa: E731
    floor = np.sqrt(sum(var(m) + var(m - 0.04) for m in (0.23, 0.29, 0.26))) / 3
    assert rows["last"]["delta_se"] == pytest.approx(floor, rel=1e-6)


def test_report_writes_the_table_and_chart_from_eval_jsons_and_keeps_the_discussion(tmp_path):
    runs, doc, chart = str(tmp_path / "abl"), str(tmp_path / "docs" / "ablations.md"), str(tmp_path / "docs" / "a.png")
    t = {"train_cpu_s": 3000.0, "train_wall_s": 1600.0, "eval_cpu_s": 360.0, "eval_wall_s": 200.0}
    for seed, (m, last, hand, sample) in enumerate([(0.50, 0.30, 0.70, 0.49), (0.52, 0.32, 0.72, 0.53),
                                                    (0.54, 0.31, 0.71, 0.51)]):
        for name, x in (("mos", m), ("last", last), ("hand", hand), ("sample", sample)):
            write_eval(runs, name, seed, x, times=t)
    write_eval(runs, "k1", 0, 0.9, times=t)  # one seed only
    recipe = {"steps": 9000, "per_category": 50, "eval_seed": 0, "compile": "inductor"}
    ablate.write_report(runs, 3, doc, chart, "python ablate.py", recipe)
    text = open(doc).read()
    line = {v.name: next(ln for ln in text.splitlines() if ln.startswith(f"| {v.label} |")) for v in ablate.VARIANTS}
    cells = {k: [c.strip() for c in ln.strip("|").split("|")] for k, ln in line.items()}
    assert cells["mos"][2] == "**0.520** ± 0.020 (3)" and cells["mos"][-1] == "reference"
    assert cells["last"][2] == "**0.310** ± 0.010 (3)" and cells["last"][3].startswith("-0.210 ± ")
    assert cells["last"][-1] == "reproduces" and cells["hand"][-1] == "reverses"
    assert cells["sample"][-1] == "within noise" and cells["k1"][-1] == "too few seeds"
    assert cells["eps0"][2] == "—" and cells["eps0"][-1] == "not run"
    assert cells["hand"][4:10] == ["0.71"] * 6 and cells["hand"][10] == "0.35"  # categories, held-out
    assert "FID 21.51 vs 17.77" in cells["hand"][-2]  # the paper's Table 3 numbers
    assert "**Total CPU time:** 12.1 h" in text  # 13 runs × (3000 + 360) CPU-s = 43680 s
    assert "Tally: 1 reproduce, 1 reverse,\n1 within noise" in text
    assert "`python ablate.py`" in text and "](a.png)" in text

    img = np.asarray(Image.open(chart).convert("RGB"))
    assert img.shape[0] > 300 and img.shape[1] > 600
    for colour in ("reproduces", "reverses", "within noise", "reference"):  # each verdict's bar is drawn
        rgb = np.array([int(ablate.VERDICT_COLOURS[colour][i:i + 2], 16) for i in (1, 3, 5)])
        assert (np.abs(img.astype(int) - rgb).sum(-1) == 0).sum() > 200, colour

    # A hand-written discussion below the marker survives a rewrite; the table above it is redone.
    with open(doc, "a") as f:
        f.write("Our own words.\n")
    write_eval(runs, "eps0", 0, 0.4, times=t)
    ablate.write_report(runs, 3, doc, chart, "python ablate.py", recipe)
    text = open(doc).read()
    assert text.count(ablate.DISCUSSION_MARKER) == 1 and text.rstrip().endswith("Our own words.")
    assert re.search(r"\| ε = 0 \|.*\*\*0\.400\*\* ± 0\.000 \(1\)", text)


def write_emoji_eval(runs, name, seed, single, synonyms, times=None):
    """An eval.py --world emoji JSON: 25 prompts per category × 2 images and 100 synonym prompts × 2."""
    d = os.path.join(runs, name, f"seed-{seed}")
    os.makedirs(d, exist_ok=True)
    ev = {c: single for c in ablate.EMOJI_CATEGORIES} | {
        "overall": single, "synonyms": synonyms, "n": 25 * 6 * 2 + 100 * 2, "per_category": 25,
        "images_per_prompt": 2, "world": "emoji"}
    with open(os.path.join(d, "eval.json"), "w") as f:
        json.dump(ev, f)
    if times:
        with open(os.path.join(d, "times.json"), "w") as f:
            json.dump(times, f)


def test_emoji_rows_compare_the_held_out_synonyms_and_draw_their_own_panel(tmp_path):
    runs, doc, chart = str(tmp_path / "abl"), str(tmp_path / "ablations.md"), str(tmp_path / "a.png")
    for seed in range(3):
        write_eval(runs, "mos", seed, 0.4)
        # The same single-glyph score, synonyms far apart: the verdict reads the synonyms.
        write_emoji_eval(runs, "emoji_mos", seed, 0.6, 0.30 + 0.01 * seed)
        write_emoji_eval(runs, "emoji_random_tower", seed, 0.6, 0.05 + 0.01 * seed)
    recipe = {"steps": 3000, "emoji_steps": 8000, "per_category": 50, "eval_seed": 0, "compile": "inductor"}
    ablate.write_report(runs, 3, doc, chart, "python ablate.py", recipe)
    text = open(doc).read()
    line = next(ln for ln in text.splitlines() if ln.startswith("| random tower | Sec. 3.1, App. B.4 | 0.600"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[3] == "0.60 ± 0.00" and cells[4] == "**0.060** ± 0.010 (3)"
    assert cells[5].startswith("-0.250 ± ") and cells[-1] == "reproduces"
    # SE of a synonym score: 200 images each, so never below √(p(1 − p)/200)/√3.
    se = float(cells[5].split("± ")[1])
    assert se >= np.sqrt(0.31 * 0.69 / 200 / 3) - 1e-3
    assert "for 8000 steps of batch 8" in text and "--synonyms 100" in text
    img = np.asarray(Image.open(chart).convert("RGB"))
    assert img.shape[1] > 1400  # the EmojiWorld panel beside the main one (12.5 in at 120 dpi)
    rgb = np.array([int(ablate.VERDICT_COLOURS["reproduces"][i:i + 2], 16) for i in (1, 3, 5)])
    assert (np.abs(img.astype(int) - rgb).sum(-1) == 0).sum() > 100  # the random tower's synonym bar


# -----------------------------------------------------------------------------
# The random-tower row: the same untrained tower at train and at eval time


def test_random_tower_row_trains_and_evaluates_with_the_same_seeded_tower(tmp_path, monkeypatch):
    import data
    import train
    from checkpoint import build_model, save_checkpoint
    from sample import load_everything
    from und_tower import load_tower

    preset = apply_overrides(get_preset("toy"), list(ablate.BY_NAME["random_tower"].sets))
    model = build_model(preset.model)
    save_checkpoint(str(tmp_path), 1, model, model, preset, None)
    _, memo, _, loaded = load_everything(str(tmp_path))  # what eval.py does
    assert loaded.model.tower_init == "random"
    tower_at_train, *_ = train.load_inputs(preset, "cpu", "shapesworld", None, None, quiet=True)
    captions = ["a red circle", "two blue squares"]
    at_eval, at_train = memo.tower(captions), tower_at_train.tower(captions)
    real = load_tower("minilm")(captions)
    assert torch.equal(at_eval.states, at_train.states) and at_eval.states.shape == real.states.shape
    assert (at_eval.states - real.states).abs().amax() > 1.0  # not the pre-trained tower
    # A feature cache holds the pre-trained states, so it cannot stand in for the random tower.
    monkeypatch.setattr(data, "load_feature_cache", lambda path: {})
    with pytest.raises(ValueError, match="feature cache holds the pre-trained tower's states"):
        train.load_inputs(preset, "cpu", "shapesworld", "some-cache", None, quiet=True)
    with pytest.raises(ValueError, match="model tower_init must be one of pretrained, random"):
        apply_overrides(get_preset("toy"), ["model.tower_init=shuffled"])
