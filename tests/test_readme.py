"""The README's code, run as written, so that it cannot drift from the package.

Python blocks are executed on the CPU. What the test changes, and why, is all here:
- ``.cuda()`` (the README's example targets a GPU): on a machine without CUDA, Module.cuda and
  Tensor.cuda return their object unchanged, so the example runs on the CPU;
- ``range``: the example trains for 8000 iterations; its ``range`` is replaced by one that
  yields at most the first 3 values (the snippet's own calls only, not the library's).

Shell blocks: the set-up commands are the two the README promises and the test command is
what CI runs; ``nca-fast grow`` runs as written (seconds), the MP4 example too (or, without
imageio-ffmpeg, it must fail in one line saying what to install); every training command's
flags are parsed and validated without training; ``nca-fast bench`` answers ``--help``;
``nca-fast selftest`` runs as written (the kernels in Triton's interpreter at tiny sizes, about
15 CPU-seconds).
"""
import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

from nca_fast import train as T

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
SHARED = ROOT.parent / "shared"
BIN = pathlib.Path(sys.executable).parent


def _blocks(lang):
    return re.findall(rf"^```{lang}\n(.*?)^```", README, flags=re.S | re.M)


def _commands():
    """Every shell command of the README, comments removed, as argument lists."""
    out = []
    for block in _blocks("bash"):
        for line in block.splitlines():
            for part in line.split("&&"):
                argv = shlex.split(part, comments=True)
                if argv:
                    out.append(argv)
    return out


def _env():
    return dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                OMP_NUM_THREADS="1")


def test_there_is_python_to_run():
    assert len(_blocks("python")) >= 1


# Runs a README block in a fresh interpreter (so ``import nca_fast`` is all the block has, as
# for a reader), with the substitutions the module docstring lists and nothing else.
HARNESS = """
import builtins, sys, torch
code = open(sys.argv[1]).read()
if not torch.cuda.is_available():
    torch.nn.Module.cuda = lambda self, *a, **k: self      # the README's .cuda(): identity
    torch.Tensor.cuda = lambda self, *a, **k: self
def short_range(*args):                                   # 8000 iterations: the first 3
    return builtins.range(*args)[:3]
ns = {"__name__": "__readme__", "range": short_range}
exec(compile(code, "README.md python block", "exec"), ns)
if "loss" in ns:
    assert torch.isfinite(ns["loss"]), ns["loss"]
if "model" in ns:
    assert ns["model"].w2.weight.abs().sum() > 0, "w2 starts at zero; training did not move it"
print("README block ran")
"""


@pytest.mark.parametrize("index", range(len(_blocks("python"))))
def test_python_block_runs(index, tmp_path):
    block = tmp_path / "block.py"
    block.write_text(_blocks("python")[index])
    r = subprocess.run([sys.executable, "-c", HARNESS, str(block)], cwd=tmp_path, env=_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "README block ran" in r.stdout, r.stderr[-3000:]


def test_set_up_is_two_commands_and_ci_runs_the_test_one():
    setup = _blocks("bash")[0].strip().splitlines()
    assert len(setup) == 2, setup
    install, _, main_job = setup[0].partition("&&")
    test_install, _, test_run = setup[1].partition("&&")
    assert shlex.split(main_job, comments=True) == ["nca-fast", "grow"]
    assert shlex.split(test_run, comments=True) == ["python", "-m", "pytest", "-q"]
    ci = (ROOT / ".ci" / "run").read_text()
    # CI installs what the README's test command installs, and nothing pinned beside it.
    pip_args = shlex.split(test_install)[2:]              # after "pip install"
    assert f'"$PY" -m pip install {shlex.join(pip_args)}' in ci
    assert "triton==" not in ci and "triton>=" not in ci
    assert '"$PY" -m pytest -q' in ci
    # ... then the kernel checks under the oldest supported Triton, the first verified one.
    assert "VERIFIED_TRITON as v; print(v[0])" in ci
    assert '"$PY" -m bench.toolchains --versions "$oldest.0"' in ci


def test_grow_as_written(tmp_path):
    argv = next(a for a in _commands() if a == ["nca-fast", "grow"])
    r = subprocess.run(argv, cwd=tmp_path, env=_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "growth.gif").is_file() and (tmp_path / "growth.png").is_file()


def test_grow_shipped_model_by_name_as_written(tmp_path):
    from nca_fast.model import shipped_models

    named = shipped_models()
    found = [a for a in _commands() if a[:2] == ["nca-fast", "grow"] and "--model" in a
             and a[a.index("--model") + 1] in named]
    assert found, "the README names no shipped model in a grow command"
    for argv in found:
        r = subprocess.run(argv, cwd=tmp_path, env=_env(), capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        assert "long-horizon score" in r.stdout, r.stdout[-3000:]
        rows = [ln.split() for ln in r.stdout.splitlines() if ln.strip().startswith("1x")]
        assert rows and 0 <= float(rows[0][2]) < 0.05, r.stdout[-3000:]   # MSE of a grown flower


def test_mp4_example_as_written(tmp_path):
    argv = next(a for a in _commands() if a[:2] == ["nca-fast", "grow"] and "--out" in a
                and a[a.index("--out") + 1].endswith(".mp4"))
    if not (SHARED / "data" / "distill").is_dir():
        pytest.skip(f"the example's Distill model is not at {SHARED / 'data' / 'distill'} "
                    "(../shared absent)")
    # The example's ../shared is the repository's sibling: the same layout in a scratch folder.
    work = tmp_path / "repo"
    work.mkdir()
    (tmp_path / "shared").symlink_to(SHARED)
    r = subprocess.run(argv, cwd=work, env=_env(), capture_output=True, text=True, timeout=300)
    try:
        import imageio_ffmpeg  # noqa: F401
    except ImportError:
        assert r.returncode == 2, r.stderr[-3000:]
        assert "nca-fast[video]" in r.stderr and len(r.stderr.strip().splitlines()) == 1
        assert "pip install -e '.[video]'" in r.stderr         # the checkout's form first
        assert "pip install -e '.[video]'" in README           # and the README says so
        return
    assert r.returncode == 0, r.stderr[-3000:]
    assert (work / "lizard.mp4").stat().st_size > 0


def _train_argv(argv):
    """The arguments of a README command that trains, or None."""
    for i in range(len(argv) - 1):
        if argv[i:i + 2] == ["nca-fast", "train"] or argv[i:i + 2] == ["-m", "nca_fast.train"]:
            return argv[i + 2:]
    return None


def test_every_training_command_parses_and_validates():
    found = [a for a in map(_train_argv, _commands()) if a is not None]
    assert len(found) >= 7, found
    parser = T.build_parser()
    for argv in found:
        ns = parser.parse_args(argv)
        if getattr(ns, "resume", None) is None:       # a resume needs the run folder: parsed
            o = T.options_from_args(ns).resolved()
            assert o.steps >= 1, argv


def test_bench_answers_help():
    argv = next(a for a in _commands() if a[:2] == ["nca-fast", "bench"])
    r = subprocess.run(argv + ["--help"], cwd=ROOT, env=_env(), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "usage" in r.stdout, r.stderr[-3000:]


def test_export_commands_as_written(tmp_path):
    """Each ``nca-fast export`` command of the README writes its page (run from a scratch
    folder with ../shared beside it, as for a clone)."""
    found = [a for a in _commands() if a[:2] == ["nca-fast", "export"]]
    assert found, "the README has no nca-fast export command"
    work = tmp_path / "repo"
    work.mkdir()
    if (SHARED / "data" / "distill").is_dir():
        (tmp_path / "shared").symlink_to(SHARED)
    for argv in found:
        if any("../shared" in a for a in argv) and not (SHARED / "data" / "distill").is_dir():
            continue                                         # that model is not on this machine
        r = subprocess.run(argv, cwd=work, env=_env(), capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0, r.stderr[-3000:]
        page = (work / argv[argv.index("--html") + 1]).read_text()
        assert '<script type="application/json" id="nca-model">' in page


def test_selftest_as_written():
    argv = next(a for a in _commands() if a[:2] == ["nca-fast", "selftest"])
    env = _env()
    env.pop("TRITON_INTERPRET", None)            # the command sets it for itself on a CPU
    r = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    verdict = [ln for ln in r.stdout.splitlines() if ln.startswith("selftest: PASS")]
    assert len(verdict) == 1, r.stdout[-3000:]
    for part in ("default tf32 err", "odd ieee err", "forward", "train", "cell-steps/s"):
        assert part in verdict[0], verdict[0]
    if "cuda" not in verdict[0]:
        assert "[CPU interpreter: not kernel speed]" in verdict[0]


def test_install_beside_your_own_torch_keeps_it():
    """The README's install for a user with their own PyTorch, resolved (--dry-run, offline)
    in this environment: it would install the project and nothing else, torch and triton kept."""
    argv = next(a for a in _commands() if a == ["pip", "install", "-e", "."])
    r = subprocess.run([sys.executable, "-m", *argv, "--dry-run", "--no-index",
                        "--no-build-isolation"], cwd=ROOT, env=_env(), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    would = [ln for ln in r.stdout.splitlines() if ln.startswith("Would install")]
    packages = would[0].split()[2:] if would else []
    assert len(packages) == 1 and packages[0].startswith("nca-fast-"), r.stdout[-2000:]
