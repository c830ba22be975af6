"""The benchmark suite's own correctness: its providers, its check, its files and its CLI.

Timings are not checked (the machine is shared); what is checked is that the suite compares the
same work, rejects an implementation that computes a different step, and writes what it
promises. CUDA stages of bench/gpu_check.sh are exercised through its dry-run mode.
"""
import csv
import os
import pathlib
import subprocess
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from bench import harness, memory, providers, throughput, timing
from bench.eager import EagerNCA, EagerRunner
from bench.providers import check_same_step, get_providers
from bench.runners import Provider, make_weights, random_state
from nca_fast import NCAConfig, reference

ROOT = pathlib.Path(__file__).resolve().parents[1]
GPU_CHECK = ROOT / "bench" / "gpu_check.sh"


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------ providers
@pytest.mark.parametrize("padding", ["zeros", "circular"])
def test_eager_port_is_the_spec_step_at_fire_rate_half(padding):
    """With nca_fast's masks the port's rollout equals the reference's, mask for mask."""
    cfg = NCAConfig(padding=padding)
    w = make_weights(cfg, seed=4, w2_std=0.1)
    x = random_state(2, 9, 13, cfg, seed=5, dead_fraction=0.5)
    port = EagerNCA(cfg, masks="philox").load(w)
    with torch.no_grad():
        got = port(x, 3, seed=11)
    want = reference.rollout(x.double(), *w.as_tuple(torch.float64), cfg, 3, seed=11)
    assert (want - x.double()).abs().max() > 0.05      # the steps did change the state
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_eager_port_rejects_unknown_mask_source():
    with pytest.raises(ValueError, match="masks"):
        EagerNCA(NCAConfig(), masks="numpy")


def test_get_providers_names_unknown():
    with pytest.raises(ValueError, match="providers: unknown"):
        get_providers(["torch-eager", "tf-eager"])


def test_triton_is_never_timed_on_cpu():
    reason = providers.PROVIDERS["nca_fast-triton"].unavailable("cpu")
    assert reason is not None and "CUDA" in reason


class Mutated(Provider):
    """The eager port with one deliberate mistake, to prove the check catches it."""

    def __init__(self, name, mutate):
        self.name = name
        self.mutate = mutate

    def build(self, config, weights, device):
        runner = EagerRunner(self.name, config, weights, device)
        self.mutate(runner.model)
        return runner


def _swap_sobel(m):
    c = m.config.channels
    m.kernel = m.kernel.view(c, 3, 1, 3, 3)[:, [0, 2, 1]].reshape(3 * c, 1, 3, 3)


def _no_post_mask(m):
    def step(self, x, mask):
        dx = self.fc1(F.relu(self.fc0(self.perceive(x))))
        return (x + dx * mask) * self.alive(x).to(x.dtype)
    m.step = types.MethodType(step, m)


def _transposed_grid(m):
    m.perceive = lambda x: EagerNCA.perceive(m, x.transpose(2, 3)).transpose(2, 3)


def _w2_five_percent_off(m):
    with torch.no_grad():
        m.fc1.weight.mul_(1.05)


WRONG = {"sobel-swapped": _swap_sobel, "no-post-mask": _no_post_mask,
         "transposed-grid": _transposed_grid, "w2-5%": _w2_five_percent_off}


def test_check_accepts_the_faithful_providers():
    res = {r.name: r for r in check_same_step(get_providers(["nca_fast-torch", "torch-eager"]),
                                              "cpu")}
    for name in ("nca_fast-torch", "torch-eager"):
        assert res[name].error is None, res[name].error
        assert res[name].max_err < 1e-4


def test_check_on_cuda_accepts_the_kernels_and_rejects_a_wrong_step():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA: the Triton provider is only timed on a GPU")
    names = ["nca_fast-triton", "nca_fast-torch", "torch-eager"]
    res = check_same_step(get_providers(names) + [Mutated("wrong", _swap_sobel)], "cuda")
    by = {r.name: r for r in res}
    for name in names:
        assert by[name].error is None, by[name].error
    assert by["wrong"].error is not None and "disagrees" in by["wrong"].error


@pytest.mark.parametrize("mistake", sorted(WRONG))
def test_check_rejects_a_wrong_step(mistake):
    (res,) = check_same_step([Mutated(mistake, WRONG[mistake])], "cpu")
    assert res.error is not None and "disagrees with the reference step" in res.error
    assert res.bad_cells > 0


# ------------------------------------------------------------------------------ suite
def test_parse_sizes():
    cases = harness.parse_sizes("8x72x72@64, 256@16,32x48@2/forward,1x4x4@1/train+memory")
    assert [(c.batch, c.height, c.width, c.steps) for c in cases] == [
        (8, 72, 72, 64), (1, 256, 256, 16), (1, 32, 48, 2), (1, 4, 4, 1)]
    assert cases[2].modes == ("forward",) and cases[3].modes == ("train", "memory")
    assert cases[0].cell_steps == 8 * 72 * 72 * 64
    for bad in ("8x72x72", "0x8x8@1", "8x8@0", "axb@2", "8@2/backward", ""):
        with pytest.raises(harness.UsageError, match="--sizes"):
            harness.parse_sizes(bad)


def _read(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def test_suite_rejects_a_wrong_provider_and_times_the_others(tmp_path):
    wrong = Mutated("wrong-port", _swap_sobel)
    res = throughput.run_suite([providers.PROVIDERS["torch-eager"], wrong], "cpu",
                               [harness.Case(2, 8, 8, 2)], repeats=3, out_dir=tmp_path,
                               floor=False, log=lambda s: None)
    assert not res.ok
    header, rows = _read(tmp_path / "throughput.csv")
    assert tuple(header) == harness.COLUMNS
    mine = [r for r in rows if r["provider"] == "wrong-port"]
    assert [r["metric"] for r in mine] == ["rejected"]          # checked, never timed
    eager = {(r["mode"], r["metric"]): r for r in rows if r["provider"] == "torch-eager"}
    for mode in ("forward", "train"):
        r = eager[(mode, "cell_steps_per_s")]
        assert 0 < float(r["p20"]) <= float(r["median"]) <= float(r["p80"])
        sec = float(eager[(mode, "seconds")]["median"])
        # The same calls: 2*8*8*2 cell-steps each; with an odd count the medians correspond.
        assert float(r["median"]) == pytest.approx(256 / sec, rel=1e-4)
    assert float(eager[("train", "saved_bytes")]["median"]) > 0
    for r in rows:
        assert r["device"] and r["torch"] == torch.__version__ and r["commit"] and r["date"]


def test_main_writes_csv_and_plot(tmp_path, capsys):
    rc = throughput.main(["--device", "cpu", "--sizes", "1x8x8@2/forward", "--repeats", "2",
                          "--providers", "nca_fast-triton,nca_fast-torch,torch-eager",
                          "--no-floor", "--out", str(tmp_path)])
    assert rc == 0
    header, rows = _read(tmp_path / "throughput.csv")
    assert tuple(header) == harness.COLUMNS
    assert {r["metric"] for r in rows if r["provider"] == "nca_fast-triton"} == {"unavailable"}
    ratio = [r for r in rows if r["provider"] == "nca_fast-torch" and
             r["metric"] == "ratio_vs_eager"]
    assert len(ratio) == 1 and float(ratio[0]["median"]) > 0
    png = (tmp_path / "throughput.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000
    out = capsys.readouterr().out
    assert "cell-steps/s" in out and "torch-eager" in out


@pytest.mark.parametrize("argv, message", [
    (["--sizes", "8x8"], "--sizes"),
    (["--providers", "torch-eager,jax"], "--providers"),
    (["--modes", "backward"], "--modes"),
    (["--exclude", "torch-eager"], "--exclude"),
    (["--repeats", "0"], "--repeats"),
    (["--bogus"], "unrecognized"),
])
def test_main_usage_errors_are_one_line(argv, message, capsys, tmp_path):
    assert throughput.main(["--device", "cpu", "--out", str(tmp_path)] + argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_main_out_must_be_creatable(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert throughput.main(["--device", "cpu", "--out", str(blocker / "sub")]) == 2
    assert "--out" in capsys.readouterr().err


def test_main_cuda_without_cuda(capsys, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here: the error path needs a machine without it")
    assert throughput.main(["--device", "cuda", "--out", str(tmp_path)]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_ceilings_matmul_rate_is_plausible():
    rates = __import__("bench.ceilings", fromlist=["matmul_flops"]).matmul_flops("cpu", "fp32", 128)
    assert len(rates) >= 3 and all(1e6 < r < 1e14 for r in rates)


# ------------------------------------------------------------------------------ memory
def test_saved_bytes_grow_with_steps_and_cover_the_activations():
    cfg = NCAConfig()
    runner = providers.PROVIDERS["torch-eager"].build(cfg, make_weights(cfg), "cpu")
    x = runner.prepare(random_state(1, 12, 12, cfg))
    t = torch.rand(1, 4, 12, 12)
    got = {}
    for steps in (2, 4):
        metric, nbytes, _ = harness.measure_memory(runner, x, t, steps, 0)
        assert metric == "saved_bytes"
        got[steps] = nbytes
    # Each step keeps at least its perception (F*C) and hidden (128) fp32 values per cell.
    assert got[2] >= 2 * 144 * (48 + 128) * 4
    assert got[4] == pytest.approx(2 * got[2], rel=0.1)


def test_quick_sweeps_write_memory_csv_and_plot(tmp_path):
    ok = memory.run_sweeps(get_providers(["torch-eager", "cax"]), "cpu", ["t", "grid"], tmp_path,
                           repeats=1, check=False, quick=True, log=lambda s: None)
    assert ok
    header, rows = _read(tmp_path / "memory.csv")
    assert tuple(header) == harness.COLUMNS
    assert not any(r["provider"] == "cax" for r in rows)      # JAX memory is not measurable
    saved = {(r["mode"], r["size"], r["steps"]): float(r["median"]) for r in rows
             if r["metric"] == "saved_bytes"}
    assert set(saved) == {("train:t-sweep", "1x16x16", "2"), ("train:t-sweep", "1x16x16", "4"),
                          ("train:grid-sweep", "1x16x16", "2"),
                          ("train:grid-sweep", "1x32x32", "2")}
    assert saved[("train:grid-sweep", "1x32x32", "2")] > 3 * saved[("train:grid-sweep",
                                                                       "1x16x16", "2")]
    assert (tmp_path / "memory.png").read_bytes().startswith(b"\x89PNG")


# ------------------------------------------------------------------------------ gpu_check.sh
# The checks in the order the script runs them: the figures first, the tests last.
GPU_CHECK_STAGES = ("selftest", "suite", "ceilings", "memory", "tests", "hires")


def _gpu_check(*args, env=None, timeout=120):
    # The script's interpreter must be this one (CI runs the tests from a virtual environment).
    e = dict(os.environ, PYTHON=sys.executable)
    e.update(env or {})
    return subprocess.run(["bash", str(GPU_CHECK), *args], capture_output=True, text=True,
                          env=e, timeout=timeout)


def test_gpu_check_without_outdir_is_a_usage_error():
    p = _gpu_check()
    assert p.returncode == 2 and "usage: bench/gpu_check.sh OUTDIR" in p.stderr


def test_gpu_check_outdir_that_cannot_be_created(tmp_path):
    (tmp_path / "file").write_text("x")
    p = _gpu_check(str(tmp_path / "file" / "out"))
    assert p.returncode == 2 and "cannot create" in p.stderr


def test_gpu_check_outdir_not_writable():
    # root writes through permission bits, so use a folder no one can create files in.
    if not os.path.isdir("/proc"):
        pytest.skip("needs Linux /proc: a folder where no file can be created, even by root")
    try:
        open("/proc/.nca_fast_probe", "w").close()
    except OSError:
        pass
    else:
        os.remove("/proc/.nca_fast_probe")
        pytest.skip("/proc accepts new files here: no unwritable folder to test with")
    p = _gpu_check("/proc")
    assert p.returncode == 2 and "not writable" in p.stderr


def test_gpu_check_dry_run_layout(tmp_path):
    out = tmp_path / "out"
    p = _gpu_check(str(out), env={"NCA_FAST_GPU_CHECK_DRY": "1"})
    assert p.returncode == 0, p.stderr
    files = sorted(f.name for f in out.iterdir())
    assert files == ["env.txt", "summary.md"]
    env = (out / "env.txt").read_text()
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    assert f"commit: {commit}" in env
    assert f"torch: {torch.__version__}" in env
    assert "nvidia-smi" in env
    summary = (out / "summary.md").read_text()
    for stage in GPU_CHECK_STAGES:
        assert f"| {stage} | skipped: dry run" in summary
    assert "| env | PASS |" in summary and "every stage passed" in summary


def test_gpu_check_rehearsal_runs_every_stage_in_order(tmp_path):
    """The whole script on the CPU at tiny sizes, the kernels in Triton's interpreter: every
    stage passes, in the order that puts the figures first, the selftest's verdict and the
    suite's Triton rows included, and OUTDIR holds at most 8 flat files under 16 MB each.
    The rehearsal's own limit is 4 minutes, raised to 8 here so that a machine shared with
    other jobs (startups of torch under load) does not fail the check."""
    out = tmp_path / "out"
    env = {"NCA_FAST_GPU_CHECK_REHEARSE": "1", "NCA_FAST_GPU_CHECK_SECONDS": "480"}
    p = _gpu_check(str(out), env=env, timeout=560)
    summary = (out / "summary.md").read_text()
    assert p.returncode == 0, summary[-4000:] + p.stderr[-2000:]
    started = [line.split("] ")[1].split(":")[0] for line in p.stderr.splitlines()
               if line.endswith(" s)") and ": starting (limit" in line]
    assert started == list(GPU_CHECK_STAGES), p.stderr
    for stage in GPU_CHECK_STAGES:
        assert f"| {stage} | PASS" in summary, summary
    assert "- selftest: PASS | cpu |" in summary and "CPU interpreter" in summary
    header, rows = _read(out / "throughput.csv")
    triton = {(r["mode"], r["metric"]) for r in rows if r["provider"] == "nca_fast-triton"}
    assert {("forward", "cell_steps_per_s"), ("train", "cell_steps_per_s")} <= triton, triton
    files = list(out.iterdir())
    assert len(files) <= 8 and all(f.is_file() and f.stat().st_size < 16e6 for f in files)
    assert {"env.txt", "summary.md", "tests.log", "throughput.csv", "memory.csv",
            "hires512.safetensors", "hires512.png"} <= {f.name for f in files}
    assert "1 passed" in (out / "tests.log").read_text()
    assert "## ceilings.csv" in summary
    # The hires run was stopped at its limit and finished at the step it reached: its model
    # loads and its growth picture is a PNG.
    assert "| hires | PASS (" in summary and "steps, torch)" in summary, summary
    assert (out / "hires512.png").read_bytes().startswith(b"\x89PNG")
    import nca_fast
    assert nca_fast.load(out / "hires512.safetensors").config.hidden == 64


# ------------------------------------------------------------------------------ harness
def test_cpu_rounds_last_at_least_100_ms():
    """A 5 ms call is repeated until its round lasts 100 ms: never one scheduler time slice."""
    import time as _time

    calls = []

    def call():
        calls.append(1)
        _time.sleep(0.005)

    got = timing.time_interleaved({"sleep": call}, repeats=3, warmup=1, device="cpu")
    t = got["sleep"]
    assert t.error is None and len(t.times) == 3 and all(s >= 0.005 for s in t.times)
    # Round r made n_r calls of t.times[r] seconds each and lasted >= MIN_ROUND_S.
    assert (len(calls) - 1) * max(t.times) >= 3 * timing.MIN_ROUND_S


def test_bench_writes_into_the_current_folder_by_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc = throughput.main(["--device", "cpu", "--sizes", "1x8x8@1/forward", "--repeats", "1",
                          "--providers", "torch-eager", "--no-floor", "--no-plot"])
    assert rc == 0
    assert (tmp_path / "throughput.csv").is_file()
    assert not list((ROOT / "nca_fast").rglob("throughput.csv"))
    assert not list((ROOT / "bench").glob("throughput.csv"))


def test_gpu_check_fails_loudly_when_the_kernels_cannot_be_imported(tmp_path):
    """No fallback: without an importable nca_fast.kernels no check runs, and the run fails."""
    fake = tmp_path / "python"
    fake.write_text("#!/usr/bin/env bash\n"
                    "case \"$*\" in *'import nca_fast.kernels'*)\n"
                    "    echo \"ModuleNotFoundError: No module named 'nca_fast.kernels'\" >&2\n"
                    "    exit 1;;\n"
                    f"esac\nexec {sys.executable} \"$@\"\n")
    fake.chmod(0o755)
    out = tmp_path / "out"
    p = _gpu_check(str(out), env={"NCA_FAST_GPU_CHECK_REHEARSE": "1", "PYTHON": str(fake)})
    assert p.returncode == 1, p.stderr
    assert "nca_fast.kernels cannot be imported" in p.stderr
    summary = (out / "summary.md").read_text()
    for stage in GPU_CHECK_STAGES:
        assert f"| {stage} | NOT RUN: nca_fast.kernels is not importable" in summary
    assert "a stage FAILED" in summary and "No module named 'nca_fast.kernels'" in summary
