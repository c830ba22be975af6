"""``nca-fast selftest`` fails (exit 1) when the kernels are wrong; that it passes on a working
install, as the README writes it, is tests/test_readme.py's.

On a CPU it runs the kernels in Triton's interpreter at tiny sizes (about 10 CPU-seconds) and
says so; the GPU check (bench/gpu_check.sh) starts with it on a GPU.
"""
import os

import pytest
import torch

from nca_fast import functional, selftest

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs CUDA or TRITON_INTERPRET=1 (set by conftest before importing kernels)",
                allow_module_level=True)


def _verdict(out: str) -> str:
    lines = [line for line in out.splitlines() if line.startswith("selftest: PASS")
             or line.startswith("selftest: FAIL")]
    assert len(lines) == 1, out
    return lines[0]


def test_selftest_fails_when_the_kernels_are_wrong(monkeypatch, capsys):
    real = functional.rollout

    def off_by_a_little(*args, **kwargs):
        return real(*args, **kwargs) * 1.001        # 0.1 %: over the "ieee" limit, not tf32's

    monkeypatch.setattr(functional, "rollout", off_by_a_little)
    assert selftest.main([]) == 1
    out = capsys.readouterr().out
    assert "odd ieee" in out and "FAILED" in out
    verdict = _verdict(out)
    assert verdict.startswith("selftest: FAIL") and "cell-steps/s" not in verdict


def test_selftest_refuses_a_device_it_cannot_use(capsys):
    with pytest.raises(SystemExit) as e:
        selftest.main(["--device", "meta"])
    assert e.value.code == 2 and "--device meta" in capsys.readouterr().err
