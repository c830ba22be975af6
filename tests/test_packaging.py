"""The wheel: built from a copy of the source tree, it ships the kernels, assets and the command."""
import configparser
import os
import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Build outputs, caches and local environments: never part of a build.
IGNORE = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__",
                                "*.pyc", "runs", ".benchmarks", ".pytest_cache")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    for module in ("build", "setuptools"):
        pytest.importorskip(module, reason=f"building a wheel needs the {module!r} package "
                                           f"(pip install -e '.[test]')")
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=IGNORE)            # the source tree stays untouched
    dist = tmp / "dist"
    r = subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation",
                        "--outdir", str(dist), str(src)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"wheel build failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    wheels = list(dist.glob("*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def _names(wheel):
    with zipfile.ZipFile(wheel) as z:
        return set(z.namelist())


def _dist_info(wheel, name):
    with zipfile.ZipFile(wheel) as z:
        (path,) = [n for n in z.namelist() if n.endswith(f".dist-info/{name}")]
        return z.read(path).decode()


def test_wheel_contains_the_packages(wheel):
    names = _names(wheel)
    # Every module of the package, subpackages included (setup.py lists them one by one).
    sources = [p.relative_to(ROOT).as_posix() for p in (ROOT / "nca_fast").rglob("*.py")]
    assert "nca_fast/backends/torch_backend/rollout.py" in sources
    for required in sources + ["nca_fast/kernels/__init__.py"]:
        assert required in names, f"{required} missing from {wheel.name}"
    kernel_sources = {p.name for p in (ROOT / "kernels").glob("*.py")}
    assert kernel_sources <= {pathlib.PurePath(n).name for n in names
                              if n.startswith("nca_fast/kernels/")}
    # kernels/ is installed as nca_fast.kernels, never as a top-level package; no tests or bench.
    assert not [n for n in names if n.split("/")[0] in ("kernels", "tests", "bench")]


def test_wheel_ships_the_assets(wheel):
    names = _names(wheel)
    assets = [p for p in (ROOT / "nca_fast" / "assets").glob("*") if p.is_file()]
    if not assets:
        pytest.skip("nca_fast/assets holds no files yet")
    for p in assets:
        assert f"nca_fast/assets/{p.name}" in names


def test_wheel_ships_the_web_page_files(wheel):
    names = _names(wheel)
    files = [p for p in (ROOT / "nca_fast" / "export").glob("*") if p.suffix in (".js", ".html")]
    assert len(files) >= 4
    for p in files:
        assert f"nca_fast/export/{p.name}" in names


def test_wheel_declares_the_console_script(wheel):
    ep = configparser.ConfigParser()
    ep.read_string(_dist_info(wheel, "entry_points.txt"))
    assert ep["console_scripts"]["nca-fast"].strip() == "nca_fast.cli:main"
    meta = _dist_info(wheel, "METADATA")
    assert "Provides-Extra: video" in meta and "Requires-Dist: safetensors" in meta
    # What users install: any triton from the oldest verified release on (the one torch 2.11
    # pins) and any numpy: no upper bound that would keep a current PyTorch out.
    from nca_fast.backends.interface import VERIFIED_TRITON

    requires = [line.split(":", 1)[1].strip() for line in meta.splitlines()
                if line.startswith("Requires-Dist:")]
    triton = [r for r in requires if r.startswith("triton")]
    assert len(triton) == 1 and _spec(triton[0]) == {f">={VERIFIED_TRITON[0]}"}, triton
    assert "Linux" in triton[0]
    numpy = [r for r in requires if r.startswith("numpy")]
    assert len(numpy) == 1 and _spec(numpy[0]) == set(), numpy
    assert not [r for r in requires if "<" in r.split(";")[0]], requires


def _spec(requirement):
    from packaging.requirements import Requirement
    return {str(s) for s in Requirement(requirement).specifier}


def test_installed_triton_is_in_the_supported_range():
    """CI installs what setup.py requires (no pin of its own): the triton that the compile
    checks (tests/test_compile.py) and the interpreter tests run with is the users' one, and a
    verified release."""
    import importlib.metadata as md
    from packaging.requirements import Requirement
    from packaging.version import Version

    from nca_fast.backends.interface import VERIFIED_TRITON

    if not sys.platform.startswith("linux"):
        pytest.skip("triton is required on Linux only")
    reqs = [Requirement(r) for r in md.requires("nca-fast") or []]
    (triton,) = [r for r in reqs if r.name == "triton"]
    version = md.version("triton")
    assert Version(version) in triton.specifier, (version, triton)
    assert ".".join(version.split(".")[:2]) in VERIFIED_TRITON, version


def test_installed_wheel_runs(wheel, tmp_path):
    target = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index",
                        "--quiet", "--target", str(target), str(wheel)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    script = target / "bin" / "nca-fast"
    assert script.exists()
    env = dict(os.environ, PYTHONPATH=str(target))
    # Import from the installed copy (not the source checkout), then run the generated script.
    probe = ("import nca_fast, nca_fast.kernels, pathlib, runpy, sys; "
             f"assert pathlib.Path(nca_fast.__file__).is_relative_to({str(target)!r}), "
             "nca_fast.__file__; "
             f"sys.argv = [{str(script)!r}, '--help']; "
             f"runpy.run_path({str(script)!r}, run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env,
                       timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "grow" in r.stdout
