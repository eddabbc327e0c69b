"""A normal (non-editable) install trains: the Hydra configs ship inside the wheel as ``clip_train.configs``.

The wheel is built from a copy of the source tree, installed into a fresh virtual environment, and run from
an unrelated directory. The fresh environment reaches the shared environment's third-party packages
through a plain path entry (a ``.pth`` line), which adds the directory to ``sys.path`` without running the
``.pth`` files inside it, so the shared environment's editable clip_train is not importable there: only the
wheel's copy is.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import yaml

from tests.cli_helpers import REPO, cli_env, read_metrics

# What a source distribution carries; the build reads nothing else.
_SOURCE_ITEMS = ("clip_train", "configs", "pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "LICENSE")

USER_EXPERIMENT = """\
# @package _global_
defaults:
  - demo
  - _self_
train:
  max_steps: 2
  log_every_n_steps: 1
data:
  batch_size: 16
  num_workers: 0
eval:
  zeroshot: []
logger:
  wandb:
    project: from-the-user-config-dir
"""


def _copy_source(dest: Path) -> Path:
    for item in _SOURCE_ITEMS:
        if (REPO / item).is_dir():
            shutil.copytree(REPO / item, dest / item, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / item, dest / item)
    return dest


def _fresh_venv(venv: Path) -> Path:
    """A new virtual environment that sees the shared environment's packages but not its clip_train."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site_packages = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        check=True, capture_output=True, text=True).stdout.strip())
    (site_packages / "shared_environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def _pip_install(python: Path, *args: str) -> None:
    # No build isolation: it would fetch setuptools from the network; the shared environment has it.
    subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--no-build-isolation",
                    "--quiet", *args], check=True, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def built_wheel(tmp_path_factory) -> tuple[Path, str]:
    """The wheel and what its build printed (pip shows the build backend's output with -v)."""
    source = _copy_source(tmp_path_factory.mktemp("source"))
    out = tmp_path_factory.mktemp("wheelhouse")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-v",
                            "-w", str(out), str(source)], check=True, capture_output=True, text=True, timeout=120)
    (built,) = out.glob("clip_train-*.whl")
    return built, build.stdout + build.stderr


@pytest.fixture(scope="module")
def wheel(built_wheel: tuple[Path, str]) -> Path:
    return built_wheel[0]


@pytest.fixture(scope="module")
def installed_python(wheel: Path, tmp_path_factory) -> Path:
    python = _fresh_venv(tmp_path_factory.mktemp("venv"))
    _pip_install(python, str(wheel))
    return python


def _env(tmp_path: Path) -> dict[str, str]:
    env = cli_env(tmp_path / "cache")
    env.pop("PYTHONPATH", None)
    return env


def test_the_wheel_holds_the_configs_and_no_launch_or_tests(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {n.removeprefix("clip_train/configs/") for n in names if n.startswith("clip_train/configs/")}
    expected = {str(p.relative_to(REPO / "configs")) for p in (REPO / "configs").rglob("*.yaml")}
    assert expected and expected <= shipped
    assert not [n for n in names if n.split("/")[0] in ("launch", "tests", "configs", "docs")]


def test_the_build_declares_every_config_group_and_ships_the_licenses(built_wheel: tuple[Path, str]) -> None:
    wheel, build_log = built_wheel
    # setuptools warns about (and means to stop shipping) data directories that are importable but undeclared.
    assert "would be ignored" not in build_log, build_log[-3000:]
    assert "`project.license` as a TOML table is deprecated" not in build_log, build_log[-3000:]
    archive = zipfile.ZipFile(wheel)
    (metadata,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
    assert "License-Expression: MIT" in archive.read(metadata).decode()
    licenses = {n.split(".dist-info/licenses/")[1] for n in archive.namelist() if ".dist-info/licenses/" in n}
    assert {"LICENSE", "clip_train/assets/NOTICE.md"} <= licenses


def test_a_fresh_install_trains_the_demo_from_another_directory_with_a_users_config_dir(
    installed_python: Path, tmp_path: Path
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run([str(installed_python), "-c", "import clip_train; print(clip_train.__file__)"],
                           cwd=elsewhere, env=_env(tmp_path), capture_output=True, text=True, check=True)
    assert Path(where.stdout.strip()).is_relative_to(installed_python.parents[1]), where.stdout

    # The user's experiment extends the packaged demo experiment (and model/tiny, data, loss, ...).
    user_dir = tmp_path / "my_configs"
    (user_dir / "experiment").mkdir(parents=True)
    (user_dir / "experiment" / "mine.yaml").write_text(USER_EXPERIMENT)

    # --config-dir DIR: a real run of a few steps.
    result = subprocess.run(
        [str(installed_python), "-m", "clip_train", "--config-dir", str(user_dir), "+experiment=mine",
         "hydra.run.dir=run"], check=False, cwd=elsewhere, env=_env(tmp_path), capture_output=True, text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = elsewhere / "run"
    assert [m["step"] for m in read_metrics(run_dir) if "loss" in m] == [1, 2]
    hydra_yaml = yaml.safe_load((run_dir / ".hydra" / "hydra.yaml").read_text())["hydra"]
    sources = {s["provider"]: (s["schema"], s["path"]) for s in hydra_yaml["runtime"]["config_sources"]}
    assert sources["main"] == ("pkg", "clip_train.configs")
    assert sources["command-line"] == ("file", str(user_dir))
    assert yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())["model"]["name"] == "tiny"

    # hydra.searchpath=[file://DIR]: composed only (--cfg job prints the config and exits).
    printed = subprocess.run(
        [str(installed_python), "-m", "clip_train", "+experiment=mine", f"hydra.searchpath=[file://{user_dir}]",
         "--cfg", "job"], check=False, cwd=elsewhere, env=_env(tmp_path), capture_output=True, text=True,
        timeout=120,
    )
    assert printed.returncode == 0, printed.stderr[-3000:]
    composed = yaml.safe_load(printed.stdout)
    assert composed["logger"]["wandb"]["project"] == "from-the-user-config-dir"
    assert composed["model"]["name"] == "tiny" and composed["train"]["max_steps"] == 2  # demo's, then mine


def test_an_editable_install_reads_the_checkouts_configs(tmp_path: Path) -> None:
    source = _copy_source(tmp_path / "checkout")
    (source / "configs" / "experiment" / "edited.yaml").write_text(USER_EXPERIMENT)  # a config added in place
    python = _fresh_venv(tmp_path / "venv")
    _pip_install(python, "-e", str(source))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    printed = subprocess.run([str(python), "-m", "clip_train", "+experiment=edited", "--cfg", "job"], check=False,
                             cwd=elsewhere, env=_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert printed.returncode == 0, printed.stderr[-3000:]
    assert yaml.safe_load(printed.stdout)["logger"]["wandb"]["project"] == "from-the-user-config-dir"


def test_a_checkout_reads_its_own_configs_directory() -> None:
    from clip_train.config_source import hydra_config_path

    assert Path(hydra_config_path()) == REPO / "configs"
    assert not os.path.exists(REPO / "clip_train" / "configs")  # one tree of YAML, at the top level
