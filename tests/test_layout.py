"""The package's shape: imports flow one way, every module imports alone, the two backends
share one signature, both custom ops one schema, and the maths the code cites is in this
repository.
"""
import ast
import inspect
import os
import pathlib
import re
import subprocess
import sys
import types

import pytest
import torch

import nca_fast
from nca_fast import backends
from nca_fast.backends import torch_backend, triton_backend
from nca_fast.params import Params

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Where each importable package lives in the checkout (kernels/ is installed as nca_fast.kernels).
PACKAGES = {"nca_fast": ROOT / "nca_fast", "nca_fast.kernels": ROOT / "kernels",
            "bench": ROOT / "bench"}


def _modules():
    """{module name: file} of every module of nca_fast (kernels included) and bench."""
    out = {}
    for pkg, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("").parts
            if "assets" in rel or (pkg == "nca_fast" and rel[0] == "kernels"):
                continue                 # a script folder; the kernels are listed on their own
            if rel[-1] == "__init__":
                rel = rel[:-1]
            out[".".join((pkg,) + rel)] = path
    return out


MODULES = _modules()


def _resolve(module, node):
    """The internal modules an import statement of ``module`` names (ImportFrom names that are
    submodules count as such; attributes count as their module)."""
    is_pkg = MODULES[module].name == "__init__.py"
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in MODULES]
    if node.level:
        parts = module.split(".")
        base = parts if is_pkg else parts[:-1]
        base = base[:len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    found = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in MODULES]
    if target in MODULES and len(found) < len(node.names):
        found.append(target)
    return found


def _graph():
    graph = {}
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        graph[name] = sorted({t for node in ast.walk(tree)
                              if isinstance(node, (ast.Import, ast.ImportFrom))
                              for t in _resolve(name, node) if t != name})
    return graph


def test_the_import_graph_has_no_cycle():
    """Every import counts, those inside functions too: a cycle hidden in a function is one."""
    graph = _graph()
    assert graph["nca_fast.model"] and "nca_fast.backends" in graph["nca_fast.model"]
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for t in graph[m]:
            if state.get(t) == "open":
                cycle = stack[stack.index(t):] + [t]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = "done"

    for m in graph:
        if m not in state:
            visit(m)


# The layers above the model: training and the commands built on it. Nothing below imports them.
TOP = ("nca_fast.training", "nca_fast.train", "nca_fast.cli", "nca_fast.export",
       "nca_fast.selftest", "nca_fast.__main__")


def _is_top(module):
    return any(module == t or module.startswith(t + ".") for t in TOP)


def test_nothing_below_training_and_the_commands_imports_them():
    """The model, backends, kernels and file formats import no training module and no command,
    not even inside a function."""
    graph = _graph()
    assert "nca_fast.training.run_folder" in graph["nca_fast.training.stability"]
    for name, targets in graph.items():
        if name.startswith("nca_fast") and not _is_top(name):
            up = [t for t in targets if _is_top(t)]
            assert not up, f"{name} imports {up}, a layer above it"


def test_no_private_name_is_imported_from_another_module():
    """(The kernels' ``@triton.jit`` helpers are shared inside their own package.)"""
    for name, path in MODULES.items():
        if name.startswith("nca_fast.kernels"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or node.level):
                private = [a.name for a in node.names if a.name.startswith("_")
                           and not a.name.startswith("__")]
                assert not private, f"{name} imports private names {private}"


FRESH = r"""
import importlib, os, sys, traceback
import numpy, torch            # third-party, loaded once; every child imports ours afresh
failed = []
for name in sys.argv[1:]:
    pid = os.fork()
    if pid == 0:
        try:
            importlib.import_module(name)
        except BaseException:
            print(f"--- {name}", file=sys.stderr)
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    if os.waitpid(pid, 0)[1] != 0:
        failed.append(name)
print("failed:", " ".join(failed))
sys.exit(1 if failed else 0)
"""


def test_every_module_imports_alone():
    """Each module first, in a process that has imported none of the project (forked from one
    that has loaded torch only): an import that works only after another one fails here."""
    if not hasattr(os, "fork"):
        pytest.skip("needs os.fork (one process per module, forked after torch is loaded)")
    names = [n for n in MODULES if not n.endswith("__main__")]
    r = subprocess.run([sys.executable, "-c", FRESH, *names], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-6000:]
    assert r.stdout.strip() == "failed:"


# ----------------------------------------------------------------------------- backends
def test_the_backends_have_one_signature():
    want = inspect.signature(torch_backend.rollout)
    assert list(want.parameters)[:3] == ["x", "params", "config"]
    assert inspect.signature(triton_backend.rollout) == want
    assert backends.get("torch") is torch_backend and backends.get("triton") is triton_backend
    with pytest.raises(ValueError, match="backend"):
        backends.get("auto")


def test_auto_looks_for_triton_once_per_process(monkeypatch):
    """``resolve("auto")`` runs on every forward on CUDA: the installed triton is read once."""
    import builtins
    import warnings

    from nca_fast.backends import interface

    imports = []
    real_import = builtins.__import__

    def counting(name, *args, **kwargs):
        if name == "triton":
            imports.append(name)
        return real_import(name, *args, **kwargs)

    interface.triton_version.cache_clear()
    monkeypatch.setattr(builtins, "__import__", counting)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")     # an unverified or missing triton warns
            answers = {backends.resolve("auto", torch.device("cuda")) for _ in range(5)}
    finally:
        monkeypatch.undo()
        interface.triton_version.cache_clear()
    assert len(answers) == 1 and len(imports) == 1


def test_forward_hands_the_backend_tensors_and_the_config(monkeypatch):
    seen = {}

    def rollout(x, params, config, **kwargs):
        seen.update(x=x, params=params, config=config, **kwargs)
        return x.clone()

    monkeypatch.setitem(backends._MODULES, "torch", types.SimpleNamespace(rollout=rollout))
    model = nca_fast.NCA(backend="torch")
    x = model.seed_state(1, 6, 6)
    model(x, 3, seed=4, checkpoint="sqrt", first_step=2)
    assert isinstance(seen["params"], Params) and seen["config"] is model.config
    assert all(isinstance(t, torch.Tensor) for t in seen["params"])
    assert seen["params"].w1 is model.w1.weight and seen["params"].filters is model.filters
    assert (seen["steps"], seen["seed"], seen["checkpoint"], seen["first_step"],
            seen["frames"]) == (3, 4, "sqrt", 2, None)


def test_the_torch_backend_runs_from_tensors_alone():
    torch.manual_seed(0)
    model = nca_fast.NCA(backend="torch")
    torch.nn.init.normal_(model.w2.weight, std=0.05)
    x = model.seed_state(1, 9, 9)
    params = Params(*(t.detach().clone() for t in model.params()))
    with torch.no_grad():
        assert torch.equal(torch_backend.rollout(x, params, model.config, steps=5, seed=3),
                           model(x, 5, seed=3))


# ----------------------------------------------------------------------------- the custom ops
def test_both_ops_take_the_same_numbers_and_an_optional_threshold():
    from nca_fast import functional

    fwd = torch.ops.nca_fast.rollout.default._schema.arguments
    bwd = torch.ops.nca_fast.rollout_backward.default._schema.arguments
    fields = list(functional.Static._fields)
    assert [a.name for a in fwd[-len(fields):]] == fields
    assert [str(a.type) for a in fwd[-len(fields):]] == [str(a.type) for a in bwd[-len(fields):]]
    threshold = next(a for a in fwd if a.name == "alive_threshold")
    assert str(threshold.type) == "Optional[float]"


# ----------------------------------------------------------------------------- the maths
CITATION = re.compile(r'docs/MODEL\.md(?:,? \(?"([^"]+)")?')


def test_the_code_cites_the_repository_s_own_maths():
    headings = {m.group(1).strip() for m in
                re.finditer(r"^#+ (.+)$", (ROOT / "docs" / "MODEL.md").read_text(), re.M)}
    cited = 0
    files = [*MODULES.values(), ROOT / "README.md", *(ROOT / "tests").glob("*.py")]
    for path in files:
        text = path.read_text()
        if path.name != "test_layout.py":
            assert "NCA_SPEC" not in text, f"{path} cites shared/docs/NCA_SPEC.md"
        for m in CITATION.finditer(text):
            cited += 1
            if m.group(1):
                assert m.group(1) in headings, f"{path}: docs/MODEL.md has no section {m.group(1)!r}"
    assert cited >= 8


# ------------------------------------------------------------------------------ the tree's size
MAX_LINES = 500


def test_no_module_is_over_500_lines():
    """A file a reader can hold: kernels, package and bench alike."""
    long = {name: n for name, path in MODULES.items()
            if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


# Documents that name a script to run (``python -m NAME`` or its path).
_RUNNERS = ("README.md", "docs", "bench/NOTES.md", "bench/NOTES_cpu.md", "bench/RESULTS.md",
            "bench/__init__.py", ".ci/run", "bench/gpu_check.sh", "setup.py")


def _runner_text():
    out = []
    for rel in _RUNNERS:
        p = ROOT / rel
        files = sorted(p.rglob("*")) if p.is_dir() else [p]
        out += [f.read_text(errors="replace") for f in files
                if f.is_file() and f.suffix in ("", ".md", ".sh", ".py")]
    return "\n".join(out)


def test_every_module_is_imported_or_run():
    """No dead module: each is imported by another module or a test, or is a script
    (``if __name__ == "__main__"``) that a document or CI runs by name."""
    graph = _graph()
    imported = {t for targets in graph.values() for t in targets}
    tests_text = "\n".join(p.read_text() for p in (ROOT / "tests").glob("*.py"))
    runners = _runner_text()
    dead = []
    for name, path in MODULES.items():
        if name in imported or name in PACKAGES or name.endswith("__main__"):
            continue
        short = name.replace("nca_fast.kernels", "kernels")
        if re.search(rf"\b(import|from) {re.escape(name)}\b", tests_text):
            continue
        if re.search(rf"from {re.escape(name.rpartition('.')[0])} import [^\n]*\b"
                     rf"{re.escape(name.rpartition('.')[2])}\b", tests_text):
            continue
        rel = str(path.relative_to(ROOT))
        script = '__name__ == "__main__"' in path.read_text()
        if script and (f"-m {name}" in runners or rel in runners or f"-m {short}" in runners):
            continue
        if path.name.startswith("test_") and f"pytest {path.parent.relative_to(ROOT)}" in runners:
            continue                     # a pytest(-benchmark) module run by its folder
        dead.append(name)
    assert not dead, f"modules nothing imports or runs: {dead}"


# History belongs in bench/NOTES.md, docs/ and commit messages, not in code or test names.
_HISTORY = re.compile(r"\bissues? #?\d+\b|\bcommit [0-9a-f]{7,40}\b|(?<!\w)\(v\d+\)"
                      r"|(?<!\w)\(v\d+, (?!v\d)|\bv\d+ kernels?\b", re.IGNORECASE)


def test_code_names_no_tracker_numbers_version_tags_or_commits():
    folders = [ROOT / "kernels", ROOT / "nca_fast", ROOT / "bench", ROOT / "tests"]
    found = []
    for folder in folders:
        for path in sorted(folder.rglob("*.py")):
            for i, line in enumerate(path.read_text().splitlines(), 1):
                if _HISTORY.search(line) or (line.lstrip().startswith("def test_")
                                              and re.search(r"issue|_v\d+_|_v\d+\(", line)):
                    found.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()[:80]}")
    assert not found, "history in code:\n" + "\n".join(found)
