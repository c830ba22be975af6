"""Outputs bitwise equal to those recorded before the layout refactor.

``tests/data/rollout_hashes.json`` holds SHA-256 digests of states and gradients computed by the
code before the backends, the op schema and the training modules were reorganised (the commit
that recorded them says which), on this project's CPU machine: the shipped model and the Distill lizard, each on
the torch backend and on the triton backend in Triton's interpreter. A refactor that changes
what is computed, in any bit, fails here.

Bitwise equality is only defined for the build that recorded them (torch version, the CPU's
vector instructions that MKL and oneDNN pick; for the triton digests, the interpreter's Triton
release and the numpy it computes with, both major.minor): elsewhere the test skips and says
what differs. The triton digests are kept per (Triton, numpy) pair. Regenerate (only when a
change of results is intended, and say so in the commit), or add the installed pair's digests
(only when the code still matches every recorded pair):
``TRITON_INTERPRET=1 python tests/test_same_outputs.py --write`` (``--add-triton``).
"""
import hashlib
import json
import os
import pathlib
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXPECTED = ROOT / "tests" / "data" / "rollout_hashes.json"
SHIPPED = ROOT / "nca_fast" / "assets" / "default_model.safetensors"
LIZARD = ROOT.parent / "shared" / "data" / "distill" / "ex1_lizard.json"
THREADS = 2      # the torch backend splits a batch by thread: weight-gradient sums follow it


def _environment():
    return {"torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def _triton_release():
    """"triton X.Y, numpy X.Y": what the interpreter's bits depend on (None: no triton)."""
    import numpy

    from nca_fast.backends.interface import triton_version

    version = triton_version()
    if version is None:
        return None
    return (f"triton {'.'.join(version.split('.')[:2])}, "
            f"numpy {'.'.join(numpy.__version__.split('.')[:2])}")


def _digest(*tensors):
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().to("cpu").contiguous().numpy().tobytes())
    return h.hexdigest()


def _load(which, backend):
    import nca_fast

    if which == "shipped":
        return nca_fast.load(SHIPPED, backend=backend)
    return nca_fast.load_distill(LIZARD, backend=backend)


def compute(which, backend):
    """Digests of: a 24-step rollout from the seed (batch 2, 32 x 32), the frames of an 8-step
    rollout, and the gradients of a 5-step rollout from the grown state, with and without
    checkpointing."""
    model = _load(which, backend)
    out = {}
    with torch.no_grad():
        x0 = model.seed_state(2, 32, 32)
        grown = model(x0, 24, seed=5)
        out["rollout"] = _digest(grown)
        last, frames = model(x0, 8, seed=9, frames=3)
        out["frames"] = _digest(last, *frames)
    for checkpoint in (None, 2):
        model.zero_grad()
        x = grown[:1, :, 4:20, 6:26].clone().requires_grad_()
        y = model(x, 5, seed=13, checkpoint=checkpoint)
        (y[:, :4] ** 2).sum().backward()
        out[f"grads_checkpoint_{checkpoint}"] = _digest(
            y, x.grad, *(p.grad for p in model.parameters()))
    return out


CASES = [(which, backend) for which in ("shipped", "lizard") for backend in ("torch", "triton")]


@pytest.mark.parametrize("which,backend", CASES, ids=[f"{w}-{b}" for w, b in CASES])
def test_outputs_equal_the_recorded_ones(which, backend):
    from nca_fast.backends.interface import triton_usable

    recorded = json.loads(EXPECTED.read_text())
    here = _environment()
    if recorded["environment"] != here:
        pytest.skip(f"bitwise expectations were recorded with {recorded['environment']}; this "
                    f"machine has {here}")
    if which == "lizard" and not LIZARD.is_file():
        pytest.skip(f"the Distill lizard is not at {LIZARD} (../shared absent)")
    if backend == "triton" and not triton_usable(torch.device("cpu")):
        pytest.skip("the triton expectations come from Triton's CPU interpreter: needs "
                    "TRITON_INTERPRET=1 (conftest sets it when there is no CUDA)")
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        got = compute(which, backend)
    finally:
        torch.set_num_threads(before)
    if backend == "triton":
        release = _triton_release()
        by_release = recorded["triton_digests"]
        if release not in by_release:
            pytest.skip(f"the triton digests were recorded under {sorted(by_release)}; this "
                        f"machine has {release}")
        want = by_release[release][which]
    else:
        want = recorded["digests"][f"{which}-{backend}"]
    differ = sorted(k for k in want if got.get(k) != want[k])
    assert not differ, f"{which} on {backend}: {differ} differ from the recorded outputs"


def _write(add_triton: bool):
    torch.set_num_threads(THREADS)
    triton_now = {w: compute(w, "triton") for w in ("shipped", "lizard")}
    if add_triton:
        doc = json.loads(EXPECTED.read_text())
        doc["triton_digests"][_triton_release()] = triton_now
    else:
        doc = {"recorded_at_commit": os.environ.get("RECORDED_AT", "unknown"),
               "environment": _environment(),
               "digests": {f"{w}-torch": compute(w, "torch") for w in ("shipped", "lizard")},
               "triton_digests": {_triton_release(): triton_now}}
    text = json.dumps(doc, indent=1, sort_keys=True) + "\n"
    EXPECTED.parent.mkdir(exist_ok=True)
    tmp = EXPECTED.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, EXPECTED)
    print(text)


if __name__ == "__main__":
    if sys.argv[1:] not in (["--write"], ["--add-triton"]):
        sys.exit("usage: TRITON_INTERPRET=1 python tests/test_same_outputs.py --write | "
                 "--add-triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("set TRITON_INTERPRET=1 first: the triton digests are the interpreter's")
    _write(sys.argv[1] == "--add-triton")
