"""The repository's layout never shadows an installed package when Python runs from the repository root.

`python -m ...`, `python -c ...` and notebooks put the working directory first on `sys.path`. The top-level source
folders (kernels/, pipelines/, eval/, demos/) therefore have no `__init__.py`: a folder without one is only a
namespace portion, which Python ranks below any installed package of the same name. Their code is reached as
sub-packages of `accel`, each mapped in pyproject.toml.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]
SOURCE_FOLDERS = ("kernels", "pipelines", "eval", "demos")


def _run_from_root(args: list[str], env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONSAFEPATH", "PYTHONPATH")}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_source_folders_are_not_packages_and_every_sub_package_is_mapped():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapped = {folder: name for name, folder in setuptools["package-dir"].items()}
    for top in SOURCE_FOLDERS:
        assert not (ROOT / top / "__init__.py").exists(), f"{top}/__init__.py would shadow an installed `{top}`"
        assert (ROOT / "accel" / top / "__init__.py").is_file(), f"accel.{top} needs its index in accel/{top}/"
        for init in (ROOT / top).rglob("__init__.py"):
            folder = init.parent.relative_to(ROOT).as_posix()
            parent = init.parent.parent.relative_to(ROOT).as_posix()
            if parent in SOURCE_FOLDERS:  # a sub-package right under a source folder: mapped explicitly
                assert mapped.get(folder) == f"accel.{folder.replace('/', '.')}", f"{folder} is not in package-dir"
            assert f"accel.{folder.replace('/', '.')}" in setuptools["packages"], f"{folder} is not in packages"
    for init in (ROOT / "accel").rglob("__init__.py"):  # accel's own sub-packages (accel.attention.sparse, ...)
        name = init.parent.relative_to(ROOT).as_posix().replace("/", ".")
        assert name in setuptools["packages"], f"{name} is not in packages: a non-editable install would leave it out"


def test_installed_packages_named_like_the_source_folders_win_from_the_repo_root(tmp_path):
    # Stand-ins for installed packages named eval / pipelines / demos; Hugging Face's `kernels` is the real one
    # (transformers requires it today), and diffusers imports it through `diffusers.loaders.peft`.
    for name in ("eval", "pipelines", "demos"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("INSTALLED = True\n")
    check = ["import accel, accel.pipelines, accel.eval, accel.kernels, accel.demos, diffusers.loaders.peft",
             "import eval, pipelines, demos",
             "assert eval.INSTALLED and pipelines.INSTALLED and demos.INSTALLED"]
    try:
        importlib.metadata.distribution("kernels")
        check += ["import kernels", f"assert not kernels.__file__.startswith({str(ROOT / 'kernels')!r}), kernels.__file__"]
    except importlib.metadata.PackageNotFoundError:
        pass
    result = _run_from_root(["-c", "; ".join(check)], {"PYTHONPATH": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.skipif(not any(d.metadata["Name"] == "kernels" for d in importlib.metadata.distributions()),
                    reason="Hugging Face's `kernels` is not installed")
def test_the_readme_entry_points_run_from_the_repo_root_beside_hugging_faces_kernels():
    result = _run_from_root(["-c", "import accel, accel.pipelines, accel.eval"])
    assert result.returncode == 0, result.stderr[-3000:]
    result = _run_from_root(["-m", "accel.demos.patching", "--steps", "2", "--layers", "2"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines()[0].split()[0] == "method"
