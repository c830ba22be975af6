"""Which Triton the kernels run with: the verified releases, what happens outside them, and
how `bench.toolchains` reads the executed-instruction count of each."""
import pathlib
import subprocess
import sys
import warnings

import pytest
import torch

import nca_fast
from nca_fast import backends
from nca_fast.backends import interface, triton_backend


def test_the_verified_releases_are_the_ones_current_pytorch_pins():
    # torch 2.11 pins triton 3.6, 2.12 3.7, 2.14 3.8, 2.15 3.9: each must be verified.
    assert interface.VERIFIED_TRITON == ("3.6", "3.7", "3.8", "3.9")


@pytest.mark.parametrize("version", ["3.6.0", "3.7.1", "3.8.0", "3.9.0"])
def test_a_verified_triton_has_no_problem(monkeypatch, version):
    monkeypatch.setattr(interface, "triton_version", lambda: version)
    assert interface.triton_problem() is None


@pytest.mark.parametrize("version", ["3.5.1", "3.10.0", "4.0.0"])
def test_an_unverified_triton_is_named_with_the_verified_range(monkeypatch, version):
    monkeypatch.setattr(interface, "triton_version", lambda: version)
    problem = interface.triton_problem()
    assert f"triton {version} is installed" in problem and "3.6 to 3.9" in problem


def test_auto_on_cuda_falls_back_to_torch_with_a_warning(monkeypatch):
    monkeypatch.setattr(interface, "triton_version", lambda: "3.10.0")
    with pytest.warns(RuntimeWarning, match=r"torch backend.*triton 3\.10\.0.*3\.6 to 3\.9"):
        assert backends.resolve("auto", torch.device("cuda")) == "torch"
    monkeypatch.setattr(interface, "triton_version", lambda: None)
    with pytest.warns(RuntimeWarning, match="triton is not installed"):
        assert backends.resolve("auto", torch.device("cuda")) == "torch"


def test_auto_picks_triton_on_cuda_when_verified_and_torch_on_cpu(monkeypatch):
    monkeypatch.setattr(interface, "triton_version", lambda: "3.9.0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backends.resolve("auto", torch.device("cuda")) == "triton"
        assert backends.resolve("auto", torch.device("cpu")) == "torch"


def test_triton_backend_without_triton_says_so(monkeypatch):
    monkeypatch.setattr(interface, "triton_version", lambda: None)
    monkeypatch.setattr(triton_backend, "has_triton", lambda: False)
    model = nca_fast.NCA(nca_fast.NCAConfig(), backend="triton")
    with pytest.raises(RuntimeError, match=r"triton is not installed.*3\.6 to 3\.9.*"
                                           r"backend='torch'"):
        model(model.seed_state(1, 8, 8), steps=1)


@pytest.mark.skipif(not interface.has_triton(), reason="needs triton (the interpreter) to run")
def test_triton_backend_warns_outside_the_verified_range_and_runs(monkeypatch):
    import os

    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("the kernels need CUDA or TRITON_INTERPRET=1")
    monkeypatch.setattr(triton_backend, "triton_problem",
                        lambda: "triton 3.10.0 is installed; the kernels are verified on "
                                "triton 3.6 to 3.9 only")
    model = nca_fast.NCA(nca_fast.NCAConfig(), backend="triton")
    x = model.seed_state(1, 5, 7)
    with pytest.warns(RuntimeWarning, match="triton 3.10.0"):
        y = model(x, steps=1)
    assert y.shape == x.shape and torch.isfinite(y).all()


def test_the_package_imports_and_the_torch_backend_runs_without_triton():
    probe = ("import sys; sys.modules['triton'] = None\n"
             "import nca_fast\n"
             "m = nca_fast.NCA(nca_fast.NCAConfig())\n"
             "y = m(m.seed_state(1, 9, 9), steps=3)\n"
             "assert m.resolve_backend(y.device) == 'torch', m.resolve_backend(y.device)\n"
             "print(tuple(y.shape))\n")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                       timeout=120, env={"PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "(1, 16, 9, 9)"


# ---------------------------------------------------------------- bench.toolchains's count
FAKE_SASS_COUNT = """
import json, sys
args = sys.argv[1:]
if "--fail" in open(__file__).read().split("#")[-1]:
    print("sass_count: error: no kernels found", file=sys.stderr)
    sys.exit(2)
doc = {"summary": {"fwd_warp_instr_per_cell": 40.123, "train_warp_instr_per_cell": 150.449,
                   "fwd_regs": 255, "fwd_spill_bytes": 0},
       "kernels": [{"name": "_nca_step_fwd_kernel", "spill_stores": 0},
                   {"name": "_nca_step_bwd_weights_kernel", "spill_stores": 116},
                   {"name": "_nca_step_bwd_gp_kernel", "spill_stores": 24}]}
with open(args[args.index("--json") + 1], "w") as f:
    json.dump(doc, f)
print("a table whose columns may move")
#"""


def test_run_count_reads_sass_counts_json(tmp_path):
    import io

    from bench import toolchains

    script = tmp_path / "sass_count.py"
    script.write_text(FAKE_SASS_COUNT)
    fields = toolchains.run_count(pathlib.Path(sys.executable), script, io.StringIO())
    assert fields == {"fwd_warp_instr_per_cell": "40.1", "train_warp_instr_per_cell": "150.4",
                      "fwd_regs": "255", "fwd_spill_bytes": "0", "max_spill": "116"}
    script.write_text(FAKE_SASS_COUNT + "--fail")
    fields = toolchains.run_count(pathlib.Path(sys.executable), script, io.StringIO())
    assert fields == {"error": "sass_count: error: no kernels found"}
