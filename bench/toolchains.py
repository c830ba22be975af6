"""The kernels on every supported Triton: one virtual environment per release, the same checks in
each, one table.

    python -m bench.toolchains [--versions 3.6.0 3.7.0 3.8.0 3.9.0] [--torch 2.13.0]
                               [--venvs .toolchains] [--out bench/results/toolchains.md]
                               [--no-tests] [--no-count]

Per Triton release: a virtual environment ``VENVS/triton-X`` (made once, then reused; the
project is installed editable, so each run checks the working tree as it is), then

- the kernel checks (``--tests``): the interpreter tests (tests/test_kernels.py), the property tests
  (tests/test_properties.py) and the compile checks of the CI subset (tests/test_compile.py:
  every variant spill-free, tensor cores used);
- the executed-instruction count of the default model, ``sass_count.py`` (``--sass-count``, by
  default ../shared/tools/sass_count.py beside the checkout; skipped, saying so, when absent).

Triton 3.6's interpreter needs numpy < 2.4 (tests/conftest.py says why), so its environment
gets that pin; the others get the newest numpy. The table (markdown, with the date and commit) is
printed and written to ``--out``; bench/NOTES.md, section 7, keeps the latest one.
"""
from __future__ import annotations

import argparse
import datetime
import json
import re
import subprocess
import sys
import tempfile
import venv
from pathlib import Path
from typing import Dict, List, Optional

from nca_fast.files import atomic_write

ROOT = Path(__file__).resolve().parents[1]
VERSIONS = ("3.6.0", "3.7.0", "3.8.0", "3.9.0")
KERNEL_TESTS = ("tests/test_kernels.py", "tests/test_properties.py", "tests/test_compile.py")
SASS_COUNT = ROOT.parent / "shared" / "tools" / "sass_count.py"


def requirements(triton: str, torch: str) -> List[str]:
    """The pins of one environment (the project and its test extra come with them)."""
    reqs = [f"torch=={torch}", f"triton=={triton}"]
    if tuple(int(p) for p in triton.split(".")[:2]) < (3, 7):
        reqs.append("numpy<2.4")
    return reqs


def environment(folder: Path, triton: str, torch: str, log) -> Path:
    """The Python of ``folder``'s environment, made and installed when it is missing or was made
    for other requirements."""
    python = folder / "bin" / "python"
    stamp = folder / "nca_fast-requirements.txt"
    want = "\n".join(requirements(triton, torch)) + "\n"
    if python.exists() and stamp.exists() and stamp.read_text() == want:
        return python
    if not python.exists():
        venv.create(folder, with_pip=True)
    # one resolution: the pins above with the project's own requirements and test extra
    args = ["-m", "pip", "install", "-q", *requirements(triton, torch), "-e", f"{ROOT}[test]"]
    r = subprocess.run([str(python), *args], capture_output=True, text=True)
    log.write(r.stdout + r.stderr)
    if r.returncode != 0:
        raise RuntimeError(f"triton {triton}: pip {' '.join(args[2:])} failed:\n"
                           f"{r.stderr[-2000:]}")
    stamp.write_text(want)
    return python


def run_tests(python: Path, tests: List[str], log) -> str:
    """pytest's closing counts over the kernel checks, e.g. '214 passed, 1 skipped'."""
    r = subprocess.run([str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
                       cwd=ROOT, capture_output=True, text=True)
    log.write(r.stdout[-20000:] + r.stderr[-5000:])
    counts = re.findall(r"(\d+ (?:passed|failed|skipped|errors?))", r.stdout.splitlines()[-1]
                        if r.stdout.strip() else "")
    summary = ", ".join(counts) or f"no result (exit {r.returncode})"
    return summary if r.returncode == 0 else f"**{summary}**"


def run_count(python: Path, sass_count: Path, log) -> Dict[str, str]:
    """sass_count's summary fields and the largest spill (bytes stored) of any kernel it
    compiled, read from its ``--json`` document."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "sass_count.json"
        r = subprocess.run([str(python), str(sass_count), "--json", str(out)], cwd=ROOT,
                           capture_output=True, text=True)
        log.write(r.stdout + r.stderr[-5000:])
        try:
            doc = json.loads(out.read_text())
        except (OSError, ValueError):
            doc = None
    if r.returncode != 0 or doc is None:
        return {"error": (r.stderr.strip().splitlines() or ["no output"])[-1][:200]}
    fields = {k: f"{v:.1f}" if isinstance(v, float) else str(v)
              for k, v in doc["summary"].items()}
    fields["max_spill"] = str(max((k["spill_stores"] for k in doc["kernels"]), default=0))
    return fields


def table(rows: List[Dict[str, str]], torch: str, commit: str, tests: List[str]) -> str:
    lines = [f"Triton matrix, {datetime.date.today().isoformat()}, commit {commit}, torch {torch} "
             f"(CPU build; the interpreter and ahead-of-time compiles for sm_90a/sm_80), "
             f"`python -m bench.toolchains`; kernel checks: {', '.join(tests)}:",
             "",
             "| triton | kernel checks | fwd warp-instr/cell | training warp-instr/cell "
             "| fwd registers | spilled bytes (worst kernel) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            count = ("-", "-", "-", r["error"])
        elif "fwd_warp_instr_per_cell" in r:
            count = (r["fwd_warp_instr_per_cell"], r["train_warp_instr_per_cell"],
                     r.get("fwd_regs", "-"), r["max_spill"])
        else:
            count = ("-", "-", "-", "not counted")
        lines.append(f"| {r['triton']} | {r['tests']} | " + " | ".join(count) + " |")
    return "\n".join(lines) + "\n"


def commit_id() -> str:
    r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                       text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip()
    return (r.stdout.strip() or "unknown") + (" + uncommitted changes" if dirty else "")


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--versions", nargs="+", default=list(VERSIONS), metavar="X.Y.Z")
    ap.add_argument("--torch", default="2.13.0", help="the torch release of every environment")
    ap.add_argument("--venvs", type=Path, default=ROOT / ".toolchains",
                    help="where the environments live (reused between runs)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "toolchains.md")
    ap.add_argument("--sass-count", type=Path, default=SASS_COUNT)
    ap.add_argument("--tests", nargs="+", default=list(KERNEL_TESTS), metavar="PATH",
                    help="the test files of the kernel checks (default: %(default)s)")
    ap.add_argument("--no-tests", action="store_true", help="only count instructions")
    ap.add_argument("--no-count", action="store_true", help="only run the kernel checks")
    args = ap.parse_args(argv)
    for v in args.versions:
        if not re.fullmatch(r"\d+\.\d+\.\d+", v):
            ap.error(f"--versions: expected releases such as 3.9.0, got {v!r}")
    args.venvs.mkdir(parents=True, exist_ok=True)
    rows = []
    for version in args.versions:
        print(f"== triton {version}", flush=True)
        with open(args.venvs / f"triton-{version}.log", "w") as log:
            row = {"triton": version, "tests": "not run"}
            try:
                python = environment(args.venvs / f"triton-{version}", version, args.torch, log)
            except RuntimeError as exc:
                print(exc, file=sys.stderr)
                rows.append(dict(row, tests="**install failed**"))
                continue
            if not args.no_tests:
                row["tests"] = run_tests(python, args.tests, log)
            if not args.no_count:
                if args.sass_count.is_file():
                    row.update(run_count(python, args.sass_count, log))
                else:
                    row["error"] = f"no {args.sass_count}"
        print(f"   {row}", flush=True)
        rows.append(row)
    text = table(rows, args.torch, commit_id(), args.tests)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out, lambda tmp: tmp.write_text(text))
    print(text)
    bad = [r for r in rows if r["tests"].startswith("**") or "error" in r
           or r.get("max_spill", "0") != "0"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
