"""The paper's router ablations in miniature: does learned token-wise routing beat the alternatives?

Issue #30. The paper's case for MoS rests on its ablations (Sec. 4.1 with the LLaMA-3.2-3B tower
and a 1B generation tower, scored by FID / CLIP on MJHQ): Table 1 (what the router reads),
Table 2 (token-wise vs sample-wise), Table 3 and Table 4 (learned routing vs hand-crafted and
final-layer features), App. B.3 / Fig. 10 (top-k and ε-greedy). This script re-runs each of
them on the toy: every variant is trained with the same short recipe and budget, from three
training seeds, and scored with eval.py on the same ShapesWorld prompts and noise.

    python ablate.py --dry              # the runs, their state and estimated CPU time; runs nothing
    python ablate.py                    # run (or continue) the study, then write the report
    python ablate.py --report           # only rewrite the report from the evaluations done so far
    python ablate.py --jobs 2           # two runs at a time, one thread each (faster on a small CPU)
    python ablate.py --only mos,last --seeds 2 --runs runs/abl-try   # a subset, elsewhere

The rows (`VARIANTS`; each is `train.py --set` assignments on the toy preset, and each changes
one thing against MoS as shipped):
    mos            MoS as shipped: token-wise, router reads prompt + latent + t, k = 2, ε = 0.05
    last           every block reads the last state S_{m-1}         Table 4 (fixed final layer)
    hand           block j reads a fixed, evenly spaced layer        Table 3, Fig. 11c–d
    sample         one routing matrix per prompt ([CLS])             Table 2
    prompt         router reads the prompt only                      Table 1
    prompt_latent  router reads prompt + latent (no t)               Table 1
    k1, k4         top-1 and top-4 instead of top-2                  App. B.3, Fig. 10
    eps0           no ε-greedy exploration                           App. B.3, Fig. 10
    random_tower   an untrained MiniLM of the same shape             Sec. 3.1's premise, App. B.4
    static         ours: one learned layer mix for all inputs        Sec. 4.1's "adaptive, not fixed"
and on EmojiWorld (`EMOJI_VARIANTS`, the emoji preset's base setting; scored on held-out synonyms):
    emoji_mos           MoS as shipped, the pre-trained MiniLM tower
    emoji_random_tower  the same with the untrained tower: can it draw "a puppy" having seen only "dog"?
Not here: MoT (Fig. 6) needs symmetric towers with one-to-one blocks.

The budget (`STEPS`, `PER_CATEGORY`): 6000 steps of batch 8 (lr 1e-3 → 1e-4, t_shift 2). The MoS
row must sit clear of the floor (blank or junk images score ~0) and of the ceiling (the shipped
toy scores 0.80), at a cost that 3 × 11 runs can pay on a 2-core CPU. The toy's 20-minute recipe,
9000 such steps, scored 0.540 / 0.517 on two prompt sets (docs/experiments.md §4) but costs about
50 CPU-minutes a run with its eval, 28 CPU-hours for 33 runs. A first try at 3000 steps sat on
the floor: MoS scored 0.072 (0.083 from the raw weights instead of the EMA, so not the average's
lag), 52 of its 100 single-object images junk; at batch 8 the toy takes off between 3000 and 9000
steps. At 6000 MoS's first seed scored 0.233 (single objects 0.51, colours 0.58, the binding
categories below 0.1), so the study speaks mostly to how fast each variant learns to draw what it
is told. Each run is scored on the standard 600-image set (50 prompts per category × 2 images,
prompt set 0), whose sampling error on "overall" is about ±0.02 (§0). `--dry` gives the estimated
CPU time.

The EmojiWorld rows (`EMOJI_STEPS`, 8000 steps): the emoji preset's first phase scored 0.16
overall and 0.09 on synonyms at its step 6000 and 0.43 / 0.25 at step 14000 (10 prompts per
category, 40 synonym prompts); 8000 steps with their own cosine are meant to put the
pre-trained row's synonyms well above zero, where an untrained tower's failure can show.

Resumable: every run lives in <runs>/<variant>/seed-<s>/ (train.log, eval.log, eval.json,
times.json). A run whose eval.json exists is done; one whose final checkpoint exists is only
evaluated; an interrupted training continues with `train.py --resume` (exact resume). Once a
training is complete its intermediate checkpoints are deleted (44 MB each), keeping the last.
<runs>/study.json records the recipe, so a study is never continued with another one. Under the
default runs/ablations/, git ignores the checkpoints and logs but tracks study.json and each
run's eval.json and times.json: commit them, and a clone on another machine continues the
study where this one left off (a run cut short in training starts that run again).

The verdict per row (`verdict`): the runs are paired by seed. Seed s fixes the data stream, the
noise and t draws and the ε draws for every row alike, and every run is scored on the same prompts
and noise, so much of what one seed's luck does to MoS it does to each variant too (common random
numbers). Δ_s = variant − MoS at seed s; Δ is their mean and SE(Δ) = std(Δ_s) / √n (never below
the two evals' own sampling error, taken as independent). |Δ| ≤ 2·SE(Δ) is "within noise";
otherwise "reproduces" when MoS is ahead, as the paper finds in every row, and "reverses" when the
variant is. With 3 seeds this is a loose test (a t of 2 at 2 degrees of freedom, p ≈ 0.18): a
difference it calls real is worth a second look, one it calls noise is not shown to exist.

Neighbours: train.py and eval.py do the work, as subprocesses (one run's memory and compiled
graphs end with it); router.py holds the routing modes, und_tower.py the random tower.
"""

import argparse
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.abspath(__file__))  # train.py and eval.py live here
DEFAULT_RUNS = os.path.join("runs", "ablations")  # results tracked by git, checkpoints and logs ignored

#################################################################################
#                        The rows and the paper's results                       #
#################################################################################


@dataclass(frozen=True)
class Variant:
    name: str  # directory and --only name
    label: str  # table and chart
    sets: tuple[str, ...]  # train.py --set assignments on the toy preset
    tests: str  # where in the paper
    paper: str  # the paper's corresponding result, in its own numbers (MJHQ FID ↓ / CLIP ↑ unless said)
    world: str = "shapes"  # "shapes": the main table; "emoji": the synonym test (EMOJI_VARIANTS)


# In every row the paper finds (or its premise predicts) that MoS as shipped is the better one.
VARIANTS: tuple[Variant, ...] = (
    Variant("mos", "MoS (as shipped)", (),
            "App. A",
            "the reference: token-wise, prompt + latent + t, k = 2, ε = 0.05; FID 20.15 / CLIP 21.74 "
            "(Table 1), 20.17 / 21.63 (Table 2), 17.77 / 22.91 (Table 3)"),
    Variant("last", "last layer", ("model.router.mode=last",),
            "Table 4",
            "a cross-attention model on final-layer features: GenEval 0.74 vs 0.79, DPG 83.40 vs 85.61 "
            "(5B; its blocks differ too, ours changes only the routing)"),
    Variant("hand", "hand-crafted", ("model.router.mode=hand",),
            "Table 3, Fig. 11c–d",
            "evenly skipped layers: FID 21.51 vs 17.77, CLIP 22.04 vs 22.91; behind at every training step"),
    Variant("sample", "sample-wise", ("model.router.mode=sample",),
            "Table 2",
            "one matrix per prompt: FID 21.66 vs 20.17, CLIP 21.48 vs 21.63"),
    Variant("prompt", "router: prompt only", ("model.router.inputs=prompt",),
            "Table 1",
            "FID 21.12 vs 20.15, CLIP 21.40 vs 21.74: the weakest CLIP"),
    Variant("prompt_latent", "router: prompt + latent", ("model.router.inputs=prompt+latent",),
            "Table 1",
            "FID 21.89 vs 20.15, CLIP 21.53 vs 21.74 (its FID is worse than prompt-only's 21.12)"),
    Variant("k1", "k = 1", ("model.router.k=1",),
            "App. B.3, Fig. 10",
            "k = 2 beats k = 1 'consistently' (a single layer is 'a local view'); numbers only in the figure"),
    Variant("k4", "k = 4", ("model.router.k=4",),
            "App. B.3, Fig. 10",
            "larger k 'dilutes representations'; k = 2 best; numbers only in the figure"),
    Variant("eps0", "ε = 0", ("model.router.eps=0",),
            "App. B.3, Fig. 10",
            "ε = 0.05 'notably accelerates convergence' over no exploration; numbers only in the figure"),
    Variant("random_tower", "random tower", ("model.tower_init=random",),
            "Sec. 3.1, App. B.4",
            "no such run; the method rests on the pre-trained tower's states, and a larger pre-trained "
            "tower scores better (Fig. 11a–b)"),
    Variant("static", "static learned mix", ("model.router.mode=static",),
            "ours; Sec. 4.1",
            "no such run; 'layer selection should be adaptive, not fixed' predicts MoS ahead of a "
            "learned mix that ignores the input"),
)
# The premise test on EmojiWorld. ShapesWorld's vocabulary is closed — every word of a test
# prompt was in training — so an untrained tower, whose states still tell tokens apart, may fit
# it as well as a pre-trained one. EmojiWorld holds out synonyms (puppy, shades, spectacles; see
# emojiworld.py) that no training caption uses: only a tower that already knows "puppy" is near
# "dog" can draw them. These rows train the emoji preset's base setting (6 blocks, text to image)
# and are scored on its benchmark and its held-out synonyms; the verdict reads the synonyms.
EMOJI_VARIANTS: tuple[Variant, ...] = (
    Variant("emoji_mos", "MoS (as shipped)", (), "App. A",
            "the reference: the pre-trained all-MiniLM-L6-v2 tower", world="emoji"),
    Variant("emoji_random_tower", "random tower", ("model.tower_init=random",), "Sec. 3.1, App. B.4",
            "no such run; the premise that a pre-trained tower's states carry the concepts predicts "
            "held-out words fail", world="emoji"),
)
BY_NAME = {v.name: v for v in VARIANTS + EMOJI_VARIANTS}
REFERENCE, EMOJI_REFERENCE = "mos", "emoji_mos"

#################################################################################
#                              The recipe and its cost                          #
#################################################################################

STEPS = 6000  # two thirds of the 20-minute batch-8 recipe (docs/experiments.md §4): see the header
SEEDS = 3  # training seeds 0, 1, 2: model init, data order, noise, ε draws
PER_CATEGORY = 50  # eval prompts per category, × 2 images = 600 images
EVAL_SEED = 0  # prompt set and noise of the benchmark: the same for every run
CKPT_EVERY = 1000  # an interruption loses at most this many steps
# The EmojiWorld rows: long enough for the pre-trained row to draw named glyphs (see the header),
# scored on 25 prompts per category × 2 images and 100 held-out-synonym prompts × 2.
EMOJI_STEPS = 8000
EMOJI_PER_CATEGORY = 25
EMOJI_SYNONYMS = 100
# Every run: the toy preset's base setting (batch 8, 6 blocks, lr 1e-3 → 1e-4, warm-up 200,
# t_shift 2), no sample grids, compiled (1.3× a step, the same score: docs/experiments.md §4).
COMMON_SETS = ("train.sample_every=0",)
COMPILE_SET = "train.compile=inductor"

# CPU-seconds, for --dry. Measured on the shared 2-core CPU, whose speed varies up to ~3× from
# day to day (docs/experiments.md), so these are estimates; the report gives measured times.
TRAIN_CPU_S_PER_STEP = 0.33  # 9000 compiled steps in 24.6 min wall on 2 cores (§4)
COMPILE_CPU_S = 400  # a cold Inductor compile, ~3.3 min wall (§4); once per variant, cached after
EVAL_CPU_S_PER_IMAGE = 0.6  # 600 images in ~9 min wall on 2 cores at 18 blocks (§12), × 6/18 blocks

CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")  # eval.CATEGORIES
CATEGORY_LABELS = ("single", "two obj.", "counting", "colours", "position", "colour attr.")
EMOJI_CATEGORIES = ("single", "two", "counting", "position", "holding", "wearing")  # eval.py --world emoji
EMOJI_EVAL_IMAGES = (EMOJI_PER_CATEGORY * len(EMOJI_CATEGORIES) + EMOJI_SYNONYMS) * 2  # benchmark + synonyms


@dataclass(frozen=True)
class Run:
    variant: Variant
    seed: int
    dir: str

    @property
    def eval_json(self) -> str:
        return os.path.join(self.dir, "eval.json")

    def __str__(self) -> str:
        return f"{self.variant.name} seed {self.seed}"


def plan(runs_dir: str, names: list[str], seeds: int) -> list[Run]:
    """The runs of the study, seed by seed: every row's seed 0 before any row's seed 1, so a study
    cut short leaves every row with the same number of seeds (and the table already comparable)."""
    return [Run(BY_NAME[n], s, os.path.join(runs_dir, n, f"seed-{s}")) for s in range(seeds) for n in names]


def last_step(run_dir: str) -> int:
    """The step of the run's latest complete checkpoint (train.py's step-XXXXXX folders), 0 if none."""
    if not os.path.isdir(run_dir):
        return 0
    steps = [int(d[5:]) for d in os.listdir(run_dir) if d.startswith("step-") and d[5:].isdigit()]
    return max(steps, default=0)


def run_steps(run: Run, steps: int, emoji_steps: int) -> int:
    """The training budget of this run's world."""
    return emoji_steps if run.variant.world == "emoji" else steps


def state(run: Run, steps: int) -> str:
    """"done" (evaluated), "trained" (to evaluate), "step N" (to resume) or "todo"."""
    if os.path.exists(run.eval_json):
        return "done"
    done = last_step(run.dir)
    return "trained" if done >= steps else f"step {done}" if done else "todo"


def estimate_cpu_s(steps_left: int, evaluate: bool, images: int, compiles: bool) -> float:
    """CPU-seconds for `steps_left` training steps (+ a cold compile) and, if asked, an eval of `images`."""
    return (steps_left * TRAIN_CPU_S_PER_STEP + (COMPILE_CPU_S if compiles and steps_left else 0.0)
            + (images * EVAL_CPU_S_PER_IMAGE if evaluate else 0.0))


def eval_images(run: Run, per_category: int) -> int:
    return EMOJI_EVAL_IMAGES if run.variant.world == "emoji" else per_category * len(CATEGORIES) * 2


def train_command(run: Run, steps: int, compiled: bool, threads: int | None) -> list[str]:
    """train.py for this run: a fresh start, or --resume where a checkpoint exists (its config.json
    holds the recipe, so nothing else is passed)."""
    cmd = [sys.executable, os.path.join(ROOT, "train.py")]
    if last_step(run.dir):
        cmd += ["--resume", run.dir]
    else:
        sets = [*run.variant.sets, f"train.seed={run.seed}", f"train.ckpt_every={min(CKPT_EVERY, steps)}",
                *COMMON_SETS, *([COMPILE_SET] if compiled else [])]
        preset = "emoji" if run.variant.world == "emoji" else "toy"  # --steps: the preset's base setting alone
        cmd += ["--preset", preset, "--steps", str(steps), "--out", run.dir, "--set", *sets]
    return cmd + (["--threads", str(threads)] if threads else [])


def eval_command(run: Run, per_category: int, eval_seed: int) -> list[str]:
    """eval.py on the run's final checkpoint (its EMA), the preset's sampler (30 steps, CFG 3, t ≤ 0.8);
    an EmojiWorld row on the emoji benchmark and its held-out synonyms."""
    world = (["--world", "emoji", "--synonyms", str(EMOJI_SYNONYMS)] if run.variant.world == "emoji" else [])
    per_category = EMOJI_PER_CATEGORY if run.variant.world == "emoji" else per_category
    return [sys.executable, os.path.join(ROOT, "eval.py"), "--ckpt", run.dir, "--seed", str(eval_seed),
            "--per-category", str(per_category), *world, "--out", run.eval_json]


#################################################################################
#                                  Running it                                   #
#################################################################################


def run_command(cmd: list[str], run_dir: str, part: str, threads: int | None = None) -> int:
    """Run one train.py / eval.py (`part` "train" / "eval") to completion, its output appended
    to <run_dir>/<part>.log, and add the child's CPU and wall seconds to times.json — also when
    the study is interrupted (the child is stopped too; it resumes from its last checkpoint).
    The CPU seconds are this child's own (os.wait4), so runs going side by side (--jobs) do not
    count each other's. → the exit status."""
    env = dict(os.environ) | ({"OMP_NUM_THREADS": str(threads)} if threads else {})
    t0, cpu = time.time(), 0.0
    with open(os.path.join(run_dir, f"{part}.log"), "a") as log:
        log.write(f"$ {shlex.join(cmd)}\n")
        log.flush()
        child = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    RUNNING.add(child)
    if STOPPING.is_set():  # the study was interrupted while this child was starting
        child.terminate()
    try:
        _, status, usage = os.wait4(child.pid, 0)
        cpu = usage.ru_utime + usage.ru_stime
        child.returncode = os.waitstatus_to_exitcode(status)
        return child.returncode
    finally:
        RUNNING.discard(child)
        add_times(run_dir, part, cpu, time.time() - t0)


RUNNING: set[subprocess.Popen] = set()  # the children now running, to stop when the study is
STOPPING = threading.Event()  # interrupted (Ctrl-C or SIGTERM)


def read_times(run_dir: str) -> dict:
    try:
        with open(os.path.join(run_dir, "times.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def add_times(run_dir: str, part: str, cpu: float, wall: float) -> None:
    """Accumulate CPU and wall seconds of `part` ("train" or "eval") over sessions in times.json."""
    times = read_times(run_dir)
    times[f"{part}_cpu_s"] = round(times.get(f"{part}_cpu_s", 0.0) + cpu, 1)
    times[f"{part}_wall_s"] = round(times.get(f"{part}_wall_s", 0.0) + wall, 1)
    with open(os.path.join(run_dir, "times.json"), "w") as f:
        json.dump(times, f, indent=2)


def prune_checkpoints(run_dir: str, keep: int) -> None:
    """Delete the step folders before the final one: a finished run only needs its last."""
    for d in os.listdir(run_dir):
        if d.startswith("step-") and d[5:].isdigit() and int(d[5:]) != keep:
            shutil.rmtree(os.path.join(run_dir, d))


def do_run(run: Run, args, bar) -> str | None:
    """Train (or resume) and evaluate one run, skipping what is done. → an error line, or None."""
    os.makedirs(run.dir, exist_ok=True)
    if os.path.exists(run.eval_json):
        return None
    steps = run_steps(run, args.steps, args.emoji_steps)
    if last_step(run.dir) < steps:
        bar.set_description(f"{run}: {'resuming' if last_step(run.dir) else 'training'}")
        rc = run_command(train_command(run, steps, not args.eager, args.threads), run.dir, "train", args.threads)
        if rc != 0 or last_step(run.dir) < steps:
            return f"training {run} stopped (exit {rc}) at step {last_step(run.dir)}; see {run.dir}/train.log"
        prune_checkpoints(run.dir, last_step(run.dir))
    bar.set_description(f"{run}: evaluating")
    rc = run_command(eval_command(run, args.per_category, args.eval_seed), run.dir, "eval", args.threads)
    if rc != 0 or not os.path.exists(run.eval_json):
        return f"evaluating {run} failed (exit {rc}); see {run.dir}/eval.log"
    return None


def check_study(runs_dir: str, recipe: dict) -> None:
    """Record the recipe in <runs>/study.json, or check that the study there used the same one."""
    path = os.path.join(runs_dir, "study.json")
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        diff = [f"{k} {old[k]} (asked {recipe[k]})" for k in recipe if k in old and old[k] != recipe[k]]
        if diff:
            raise ValueError(f"{runs_dir} holds a study with {', '.join(diff)}: continue it with the same "
                             "settings, or choose another --runs")
    os.makedirs(runs_dir, exist_ok=True)
    with open(path, "w") as f:
        json.dump(recipe, f, indent=2)


#################################################################################
#                           The report: table and chart                         #
#################################################################################


def load_results(runs_dir: str, seeds: int) -> dict[str, list[dict]]:
    """{variant: the eval JSONs of its seeds 0..seeds-1 that exist}, each with its seed and times.json."""
    out = {}
    for run in plan(runs_dir, list(BY_NAME), seeds):
        if os.path.exists(run.eval_json):
            with open(run.eval_json) as f:
                out.setdefault(run.variant.name, []).append(
                    json.load(f) | {"seed": run.seed, "times": read_times(run.dir)})
    return out


def sampling_var(ev: dict, categories: tuple[str, ...] = CATEGORIES) -> float:
    """Variance of one eval's overall score from its finite image set: overall is the mean of C
    category accuracies, each a binomial proportion over n_c images."""
    n_c = ev.get("per_category", 0) * ev.get("images_per_prompt", 0) or ev["n"] / len(categories)
    return sum(ev[c] * (1 - ev[c]) / n_c for c in categories) / len(categories) ** 2


def spread(xs: list[float], sampling_vars: list[float]) -> tuple[float, float, float]:
    """Mean, std over seeds, and the standard error of the mean. The seeds' spread already holds
    the eval's sampling error, but 3 seeds can land close by chance; the standard error is never
    taken below what the images alone allow."""
    n = len(xs)
    mean = sum(xs) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else 0.0
    return mean, std, max(std / math.sqrt(n), math.sqrt(sum(sampling_vars)) / n)


def stats(evals: list[dict]) -> dict:
    """Mean, std (over seeds), standard error and per-category means of a row's evals."""
    xs = [ev["overall"] for ev in evals]
    n = len(xs)
    mean, std, se = spread(xs, [sampling_var(ev) for ev in evals])
    held = [ev["held_out"] for ev in evals if ev.get("held_out") is not None]
    return {"n": n, "mean": mean, "std": std, "se": se, "values": xs,
            "categories": {c: sum(ev[c] for ev in evals) / n for c in CATEGORIES},
            "held_out": sum(held) / len(held) if held else None}


def paired_delta(ref: list[dict], var: list[dict], score, score_var) -> tuple[float, float, int]:
    """Δ = variant − MoS seed by seed over the seeds both rows have: (mean Δ, SE(Δ), n pairs).
    score(ev) reads the compared number, score_var(ev) its sampling variance from the eval's
    images; an eval without a "seed" (a test's list) counts by position."""
    r, v = ({ev.get("seed", i): ev for i, ev in enumerate(evals)} for evals in (ref, var))
    seeds = sorted(r.keys() & v.keys())
    if not seeds:
        return float("nan"), float("nan"), 0
    mean, _, se = spread([score(v[s]) - score(r[s]) for s in seeds],
                         [score_var(v[s]) + score_var(r[s]) for s in seeds])
    return mean, se, len(seeds)


def verdict(delta: float, se: float, n_pairs: int) -> str:
    """The paper finds MoS ahead in every row: Δ = variant − MoS beyond 2·SE(Δ) below zero
    reproduces that, beyond 2·SE(Δ) above zero reverses it, anything nearer is noise."""
    if n_pairs < 2:
        return "too few seeds"
    if abs(delta) <= 2 * se:
        return "within noise"
    return "reproduces" if delta < 0 else "reverses"


def summarise(results: dict[str, list[dict]]) -> list[dict]:
    """One row per variant (in VARIANTS order): its stats, the paired Δ vs MoS, SE(Δ), the verdict."""
    ref = results.get(REFERENCE)
    rows = []
    for v in VARIANTS:
        row = {"variant": v, "stats": stats(results[v.name]) if results.get(v.name) else None}
        if v.name == REFERENCE:
            row["verdict"] = "reference" if ref else "not run"
        elif row["stats"] is None or not ref:
            row["verdict"] = "not run"
        else:
            row["delta"], row["delta_se"], n = paired_delta(ref, results[v.name], lambda ev: ev["overall"],
                                                            sampling_var)
            row["verdict"] = verdict(row["delta"], row["delta_se"], n)
        rows.append(row)
    return rows


def synonym_var(ev: dict) -> float:
    """Sampling variance of an EmojiWorld eval's synonym score, a binomial proportion over its
    synonym images (all of the eval's images less the benchmark's)."""
    n = ev["n"] - len(EMOJI_CATEGORIES) * ev["per_category"] * ev["images_per_prompt"]
    return ev["synonyms"] * (1 - ev["synonyms"]) / n


def emoji_summary(results: dict[str, list[dict]]) -> list[dict]:
    """The EmojiWorld rows: benchmark overall, single glyphs and held-out synonyms, each (mean,
    std, SE) over seeds; the paired Δ and the verdict compare the synonyms with the MoS row's."""
    rows = []
    for v in EMOJI_VARIANTS:
        evals = results.get(v.name, [])
        if not evals:
            rows.append({"variant": v, "stats": None, "verdict": "not run"})
            continue
        s = {"n": len(evals),
             "overall": spread([ev["overall"] for ev in evals], [sampling_var(ev, EMOJI_CATEGORIES) for ev in evals]),
             "single": spread([ev["single"] for ev in evals],
                              [ev["single"] * (1 - ev["single"]) / (ev["per_category"] * ev["images_per_prompt"])
                               for ev in evals]),
             "synonyms": spread([ev["synonyms"] for ev in evals],
                                [synonym_var(ev) for ev in evals]),
             "values": [ev["synonyms"] for ev in evals], "single_values": [ev["single"] for ev in evals]}
        rows.append({"variant": v, "stats": s})
    ref = rows[0]["stats"]
    rows[0]["verdict"] = "reference" if ref else "not run"
    for row in rows[1:]:
        s = row["stats"]
        if s is None or ref is None:
            row["verdict"] = "not run"
            continue
        row["delta"], row["delta_se"], n = paired_delta(
            results[EMOJI_VARIANTS[0].name], results[row["variant"].name], lambda ev: ev["synonyms"], synonym_var)
        row["verdict"] = verdict(row["delta"], row["delta_se"], n)
    return rows


def emoji_table(rows: list[dict]) -> str:
    head = ["variant", "paper", "benchmark overall", "single glyph", "held-out synonyms, mean ± std (seeds)",
            "Δ synonyms vs MoS ± SE", "the paper's premise", "verdict"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        v, s = row["variant"], row["stats"]
        if s is None:
            cells = ["—"] * 4
        else:
            cells = [f"{s['overall'][0]:.3f} ± {s['overall'][1]:.3f}", f"{s['single'][0]:.2f} ± {s['single'][1]:.2f}",
                     f"**{s['synonyms'][0]:.3f}** ± {s['synonyms'][1]:.3f} ({s['n']})",
                     f"{row['delta']:+.3f} ± {row['delta_se']:.3f}" if "delta" in row else "—"]
        lines.append("| " + " | ".join([v.label, v.tests, *cells, v.paper, row["verdict"]]) + " |")
    return "\n".join(lines)


def markdown_table(rows: list[dict]) -> str:
    head = ["variant", "paper", "overall, mean ± std (seeds)", "Δ vs MoS ± SE", *CATEGORY_LABELS, "held-out",
            "the paper's result", "verdict"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        v, s = row["variant"], row["stats"]
        if s is None:
            cells = ["—"] * (len(head) - 4)
        else:
            cells = [f"**{s['mean']:.3f}** ± {s['std']:.3f} ({s['n']})",
                     f"{row['delta']:+.3f} ± {row['delta_se']:.3f}" if "delta" in row else "—",
                     *(f"{s['categories'][c]:.2f}" for c in CATEGORIES),
                     "—" if s["held_out"] is None else f"{s['held_out']:.2f}"]
        lines.append("| " + " | ".join([v.label, v.tests, *cells, v.paper, row["verdict"]]) + " |")
    return "\n".join(lines)


VERDICT_COLOURS = {"reference": "#1f77b4", "reproduces": "#2ca02c", "reverses": "#d62728",
                   "within noise": "#9e9e9e", "too few seeds": "#cfcfcf", "not run": "#ffffff"}


def write_chart(rows: list[dict], path: str, title: str, emoji: list[dict] | None = None) -> None:
    """Bars of mean overall per variant, error bars one std over seeds, each seed a dot; the
    bar's colour is its verdict, the dashed line MoS's mean. With EmojiWorld results, a second
    panel: single glyphs (light) beside held-out synonyms (coloured by verdict) per row."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    emoji = [r for r in emoji or [] if r["stats"]]
    if emoji:
        fig, (ax, ax_e) = plt.subplots(1, 2, figsize=(12.5, 4.5), gridspec_kw={"width_ratios": [len(rows), 3]})
        for i, row in enumerate(emoji):
            s = row["stats"]
            ax_e.bar(i - 0.2, s["single"][0], width=0.4, yerr=s["single"][1], capsize=3, color="#dddddd",
                     edgecolor="black", linewidth=0.6, label="single glyph" if i == 0 else None)
            ax_e.bar(i + 0.2, s["synonyms"][0], width=0.4, yerr=s["synonyms"][1], capsize=3,
                     color=VERDICT_COLOURS[row["verdict"]], edgecolor="black", linewidth=0.6,
                     label="held-out synonyms" if i == 0 else None)
            ax_e.scatter([i - 0.2] * s["n"], s["single_values"], s=10, color="black", zorder=3)
            ax_e.scatter([i + 0.2] * s["n"], s["values"], s=10, color="black", zorder=3)
        ax_e.set_xticks(range(len(emoji)), [r["variant"].label for r in emoji], rotation=30, ha="right")
        ax_e.set_ylim(0, 1)
        ax_e.set_ylabel("EmojiWorld accuracy (mean ± std over seeds)")
        ax_e.set_title("EmojiWorld: words never in training", fontsize=10)
        ax_e.legend(fontsize=8, loc="upper right")
    else:
        fig, ax = plt.subplots(figsize=(10, 4.5))
    for i, row in enumerate(rows):
        s = row["stats"]
        if s is None:
            continue
        ax.bar(i, s["mean"], yerr=s["std"], capsize=4, color=VERDICT_COLOURS[row["verdict"]], edgecolor="black",
               linewidth=0.6)
        ax.scatter([i] * s["n"], s["values"], s=10, color="black", zorder=3)
    if rows[0]["stats"] is not None:
        ax.axhline(rows[0]["stats"]["mean"], color=VERDICT_COLOURS["reference"], linestyle="--", linewidth=1)
    ax.set_xticks(range(len(rows)), [r["variant"].label for r in rows], rotation=30, ha="right")
    ax.set_ylabel("ShapesWorld overall (mean ± std over seeds)")
    tops = [r["stats"]["mean"] + r["stats"]["std"] for r in rows if r["stats"]] or [1.0]
    ax.set_ylim(0, min(1.0, round(max(tops) * 1.25 + 0.05, 1)))  # the floor always in view, the top near the bars
    ax.set_title(title, fontsize=10)
    used = dict.fromkeys(r["verdict"] for r in rows if r["stats"] is not None)
    if used:  # a study with no ShapesWorld result yet has no bars to explain
        ax.legend(handles=[plt.Rectangle((0, 0), 1, 1, facecolor=VERDICT_COLOURS[k], edgecolor="black")
                           for k in used], labels=list(used), fontsize=8, loc="upper right")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path + ".tmp.png", dpi=120)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)


# Everything below this line in an existing report is kept when the script rewrites it: the
# discussion is written by hand once the numbers are in.
DISCUSSION_MARKER = "<!-- discussion: written by hand; ablate.py keeps everything below this line -->"


def write_report(runs_dir: str, seeds: int, doc: str, chart: str, command: str, recipe: dict) -> list[dict]:
    """docs/ablations.md (table, chart, command, CPU time) and docs/ablations.png from the eval
    JSONs under runs_dir. Returns the rows, ShapesWorld's then EmojiWorld's."""
    results = load_results(runs_dir, seeds)
    rows = summarise(results)
    evals = [ev for evs in results.values() for ev in evs]
    cpu = {part: sum(ev["times"].get(f"{part}_cpu_s", 0.0) for ev in evals) for part in ("train", "eval")}
    wall = sum(ev["times"].get("train_wall_s", 0.0) + ev["times"].get("eval_wall_s", 0.0) for ev in evals)
    untimed = sum(1 for ev in evals if "train_cpu_s" not in ev["times"])
    emoji = emoji_summary(results)
    write_chart(rows, chart, f"ShapesWorld, {recipe['steps']} steps of batch 8, {seeds} training seeds, "
                             f"{recipe['per_category'] * len(CATEGORIES) * 2} eval images per run", emoji)
    complete = sum(1 for r in rows + emoji if r["stats"] and r["stats"]["n"] >= seeds)
    counts = {k: sum(1 for r in rows + emoji if r["verdict"] == k) for k in ("reproduces", "reverses", "within noise")}
    inside = os.path.commonpath([runs_dir, ROOT]) == ROOT
    where = os.path.relpath(runs_dir, ROOT) if inside else runs_dir
    compiled = ", compiled" if recipe["compile"] else ""
    images = recipe["per_category"] * len(CATEGORIES) * 2
    cpu_line = (f"{hours(cpu['train'] + cpu['eval'])} (training {hours(cpu['train'])}, evaluation "
                f"{hours(cpu['eval'])}; the runs' wall times add up to {hours(wall)})")
    cpu_line += f"; {untimed} runs have no timing record" if untimed else ""
    chart_link = os.path.relpath(chart, os.path.dirname(os.path.abspath(doc)))
    text = f"""# The paper's ablations in miniature

Generated by `ablate.py` from the runs in `{where}`; the table, the chart and the
figures above the discussion are rewritten every time it runs.

**Command** (from a clean checkout): `{command}`

**Recipe.** Every variant trains the toy preset's base setting for {recipe['steps']} steps of batch 8
(6 blocks, lr 1e-3 → 1e-4 cosine, t_shift 2{compiled}; the budget is explained in `ablate.py`'s
header) with training seeds {', '.join(map(str, range(seeds)))}, and is scored with
`python eval.py --seed {recipe['eval_seed']} --per-category {recipe['per_category']}`: the same
{images} images (prompts and noise) for every run, 30 Euler steps, CFG 3 for t ≤ 0.8.
Each row changes one thing against MoS as shipped (`ablate.VARIANTS` gives its `--set`).

**Rows complete:** {complete} of {len(rows) + len(emoji)} at {seeds} seeds. **Total CPU time:** {cpu_line}.

**Verdict.** Runs are paired by seed (a seed fixes the data, noise and ε draws of every row, and
every run is scored on the same prompts and noise): Δ = mean of variant − MoS over the seeds both
have;
SE(Δ) = std/√n of those differences (never below the two evals' own sampling error).
|Δ| ≤ 2·SE(Δ): within noise; else *reproduces* when MoS is ahead (the paper's finding in every
row) and *reverses* when the variant is. With 3 seeds this is a loose test (p ≈ 0.18). Tally: {counts['reproduces']} reproduce, {counts['reverses']} reverse,
{counts['within noise']} within noise. The paper's numbers are MJHQ FID ↓ / CLIP ↑ of its Sec. 4.1
setting (LLaMA-3.2-3B tower, 1B generation tower) unless the row says otherwise.

{markdown_table(rows)}

**The premise on EmojiWorld.** ShapesWorld's test prompts use only training words, which even an
untrained tower's states tell apart. EmojiWorld's held-out synonyms (puppy, shades, spectacles, …)
never appear in a training caption. These rows train the `emoji` preset's base setting (6 blocks,
text to image) for {recipe.get('emoji_steps', EMOJI_STEPS)} steps of batch 8 and are scored with
`python eval.py --world emoji --seed {recipe['eval_seed']} --per-category {EMOJI_PER_CATEGORY} --synonyms {EMOJI_SYNONYMS}`
({EMOJI_EVAL_IMAGES} images); the verdict compares the synonyms.

{emoji_table(emoji)}

![mean ± std over seeds per variant, a dot per seed, coloured by verdict; EmojiWorld beside]({chart_link})

Not in the study: MoT (Fig. 6), which needs symmetric towers with one-to-one blocks; Table 4's
cross-attention blocks (our *last layer* row keeps MoS's in-context blocks and changes only which
state they read).

"""
    tail = "## Discussion\n\nTo be written from the table once every row has its seeds.\n"
    if os.path.exists(doc):
        with open(doc) as f:
            old = f.read()
        if DISCUSSION_MARKER in old:
            tail = old.split(DISCUSSION_MARKER, 1)[1].lstrip("\n")
    with open(doc + ".tmp", "w") as f:
        f.write(text + DISCUSSION_MARKER + "\n\n" + tail)
    os.replace(doc + ".tmp", doc)
    return rows + emoji


#################################################################################
#                                      CLI                                      #
#################################################################################


def hours(seconds: float) -> str:
    """A duration the way a person reads it: 31.7 h, 56 min, 40 s."""
    return (f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min" if seconds >= 60
            else f"{seconds:.0f} s")


def print_dry(runs: list[Run], args) -> None:
    """The runs, their state, --set and estimated CPU time; nothing runs."""
    # A variant's first seed compiles its graphs; Inductor's on-disk cache serves the others.
    compiles = [not args.eager and r.seed == 0 for r in runs]
    todo = [not os.path.exists(r.eval_json) for r in runs]  # an evaluated run needs nothing, checkpoint or not
    steps = [run_steps(r, args.steps, args.emoji_steps) for r in runs]
    est = [estimate_cpu_s(n - min(last_step(r.dir), n) if t else 0, t, eval_images(r, args.per_category), c)
           for r, n, t, c in zip(runs, steps, todo, compiles)]
    full = [estimate_cpu_s(n, True, eval_images(r, args.per_category), c)  # as if nothing had run
            for r, n, c in zip(runs, steps, compiles)]
    measured = sum(sum(read_times(r.dir).get(k, 0.0) for k in ("train_cpu_s", "eval_cpu_s")) for r in runs)
    names = dict.fromkeys(r.variant.name for r in runs)
    print(f"ablation study: {len(names)} variants × {args.seeds} seeds = {len(runs)} runs in {args.runs}")
    print(f"train: python train.py --preset toy --steps {args.steps} --set <variant> train.seed=S "
          f"train.ckpt_every={min(CKPT_EVERY, args.steps)} {' '.join(COMMON_SETS)}"
          f"{'' if args.eager else ' ' + COMPILE_SET}")
    print("       (batch 8, 6 blocks, lr 1e-3 → 1e-4, t_shift 2: the toy preset's base setting)")
    print(f"eval:  python eval.py --ckpt RUN --seed {args.eval_seed} --per-category {args.per_category} "
          f"({args.per_category * len(CATEGORIES) * 2} images per run)")
    print(f"emoji rows: python train.py --preset emoji --steps {args.emoji_steps} …; python eval.py --world emoji "
          f"--per-category {EMOJI_PER_CATEGORY} --synonyms {EMOJI_SYNONYMS} ({EMOJI_EVAL_IMAGES} images per run)")
    print(f"\n{'variant':<18} {'seed':>4}  {'state':<10} {'est. CPU':>9}  tests / --set")
    for r, n, e in zip(runs, steps, est):
        print(f"{r.variant.name:<18} {r.seed:>4}  {state(r, n):<10} {hours(e):>9}  "
              f"{r.variant.tests}: {' '.join(r.variant.sets) or '(the preset as shipped)'}")
    print(f"\nestimated CPU time: {hours(sum(est))} to go, of {hours(sum(full))} for the whole study "
          f"(≈ {hours(sum(est) / 2)} wall on 2 cores); measured so far: {hours(measured)}")
    print(f"estimates: {TRAIN_CPU_S_PER_STEP} CPU-s a training step, {COMPILE_CPU_S} CPU-s to compile once per "
          f"variant, {EVAL_CPU_S_PER_IMAGE} CPU-s an eval image (docs/experiments.md §4, §12; the machine's speed "
          "varies up to 3×)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="The paper's router ablations on the toy: train, evaluate, report "
                                            "(see the header of ablate.py).")
    p.add_argument("--dry", action="store_true", help="list the runs and their estimated CPU time; run nothing")
    p.add_argument("--report", action="store_true", help="only rewrite the table and chart from the evals done")
    p.add_argument("--only", default="", help=f"comma-separated variants (default all: {','.join(BY_NAME)})")
    p.add_argument("--seeds", type=int, default=SEEDS, help="training seeds per variant (0 … N-1)")
    p.add_argument("--steps", type=int, default=STEPS, help="training steps of every ShapesWorld run")
    p.add_argument("--emoji-steps", type=int, default=EMOJI_STEPS, help="training steps of every EmojiWorld run")
    p.add_argument("--per-category", type=int, default=PER_CATEGORY, help="eval prompts per category (× 2 images)")
    p.add_argument("--eval-seed", type=int, default=EVAL_SEED, help="the eval's prompt set and noise")
    p.add_argument("--eager", action="store_true", help="train without torch.compile")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (default 1); each gets cores / jobs "
                                                      "threads unless --threads says otherwise")
    p.add_argument("--threads", type=int, help="CPU threads for each train.py / eval.py (default: cores / jobs)")
    p.add_argument("--runs", default=DEFAULT_RUNS, help=f"where the runs live (default {DEFAULT_RUNS})")
    p.add_argument("--doc", help="the report (default: docs/ablations.md for the default --runs, "
                                 "else <runs>/ablations.md)")
    p.add_argument("--chart", help="its chart (default: beside the report, .png)")
    return p.parse_args(argv)


def main(args) -> int:
    from tqdm import tqdm

    for flag in ("seeds", "steps", "emoji_steps", "per_category", "threads", "jobs"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(BY_NAME)
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        raise ValueError(f"unknown variant {', '.join(map(repr, unknown))}; choose from {', '.join(BY_NAME)}")
    # The study's own command, as the report prints it: the settings that change its results.
    command = "python ablate.py" + "".join(
        f" --{k.replace('_', '-')} {getattr(args, k)}" for k, d in
        (("steps", STEPS), ("emoji_steps", EMOJI_STEPS), ("seeds", SEEDS), ("per_category", PER_CATEGORY),
         ("eval_seed", EVAL_SEED), ("runs", DEFAULT_RUNS)) if getattr(args, k) != d
    ) + (" --eager" if args.eager else "")
    if args.doc is None:  # a trial study elsewhere must not overwrite the repository's report
        args.doc = (os.path.join(ROOT, "docs", "ablations.md") if args.runs == DEFAULT_RUNS
                    else os.path.join(args.runs, "ablations.md"))
    args.chart = args.chart or os.path.splitext(args.doc)[0] + ".png"
    args.runs = os.path.abspath(args.runs)
    runs = plan(args.runs, names, args.seeds)
    recipe = {"steps": args.steps, "emoji_steps": args.emoji_steps, "per_category": args.per_category,
              "eval_seed": args.eval_seed,
              "compile": "" if args.eager else COMPILE_SET.split("=")[1]}
    if args.dry:
        print_dry(runs, args)
        return 0
    errors = []
    if args.report and os.path.exists(os.path.join(args.runs, "study.json")):
        with open(os.path.join(args.runs, "study.json")) as f:
            recipe = json.load(f)  # the report describes the recipe the runs were made with
    if not args.report:
        check_study(args.runs, recipe)
        done = sum(1 for r in runs if os.path.exists(r.eval_json))
        todo = [r for r in runs if not os.path.exists(r.eval_json)]
        # --jobs N: N runs side by side, each with cores / N threads. A toy step is mostly
        # per-op overhead, so one thread does ~3/4 of two threads' work and two one-thread runs
        # together ~1.5× one two-thread run (docs/experiments.md §4). Still in seed-major order.
        args.threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
        with tqdm(total=len(runs), initial=done, unit="run", dynamic_ncols=True) as bar, \
                ThreadPoolExecutor(args.jobs) as pool:
            futures = [pool.submit(do_run, run, args, bar) for run in todo]
            try:
                for future in futures:
                    error = future.result()
                    if error:
                        errors.append(error)
                        tqdm.write(f"error: {error}", file=sys.stderr)
                    else:
                        bar.update(1)
            except KeyboardInterrupt:  # start no new run; stop the running ones (they resume later)
                STOPPING.set()
                for child in list(RUNNING):
                    child.terminate()  # SIGTERM: train.py's checkpoints are atomic, so it resumes
                pool.shutdown(wait=True, cancel_futures=True)
                raise
        if errors:  # the other runs went on; a rerun retries these
            print(f"{len(errors)} of {len(runs)} runs failed; run the same command again to retry them",
                  file=sys.stderr)
    rows = write_report(args.runs, args.seeds, args.doc, args.chart, command, recipe)
    have = sum(1 for r in rows if r["stats"])
    print(f"report: {args.doc} and {args.chart} ({have} of {len(rows)} rows have results)")
    return 1 if errors else 0


def stop(signum, frame):
    raise KeyboardInterrupt


def cli() -> None:
    # Ctrl-C and SIGTERM (`pkill -f ablate.py`) both stop the study cleanly. SIGINT gets Python's
    # handler back explicitly: a study started in the background (`nohup ... &`) inherits SIGINT
    # ignored, and Python then leaves it ignored, for this process and every child it starts.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, stop)
    try:
        sys.exit(main(parse_args()))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("\ninterrupted: run the same command again to continue where it stopped", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    cli()
