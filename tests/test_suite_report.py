"""The test run explains itself: opt-in sweeps are deselected (not skipped) and the summary
says what was left out and how to run it; skips print their reasons (pytest.ini: -rfEs)."""
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _pytest(*args):
    r = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    return r.returncode, r.stdout + r.stderr


def test_slow_tests_are_deselected_and_the_summary_says_how_to_run_them():
    rc, out = _pytest("-q", "--co", "tests/test_memory.py")
    assert rc == 0, out[-3000:]
    slow = 3                                     # tests/test_memory.py's T = 256 sweep
    assert f"({slow} deselected)" in out and "skipped" not in out, out[-3000:]
    assert f"{slow} opt-in tests left out (marked slow)" in out
    assert "tests/test_memory.py: 3" in out and "python -m pytest --runslow" in out
    rc, out = _pytest("-q", "--co", "--runslow", "tests/test_memory.py")
    assert rc == 0 and "deselected" not in out and "left out" not in out, out[-3000:]


def test_skips_name_their_reason(tmp_path):
    (tmp_path / "test_s.py").write_text(
        "import pytest\n\ndef test_s():\n    pytest.skip('needs a thing: reason here')\n")
    # the project's ini file (addopts -rfEs), on a file outside its testpaths
    rc, out = _pytest("-q", "-c", str(ROOT / "pytest.ini"), "--rootdir", str(tmp_path),
                      str(tmp_path / "test_s.py"))
    assert rc == 0 and "SKIPPED [1]" in out and "needs a thing: reason here" in out, out
