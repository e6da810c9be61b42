"""The package as users install it: a wheel built from the checkout, installed into a fresh venv, gives a working
`lora-train` command (version, help, a dry run), carries its bundled configs, and never asks for torch, gradio or
transformers unless the [standalone] extra is chosen.

The fresh venv sees this environment's packages through a .pth file, so torch is reused, not downloaded again.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest
import yaml

from lora_train import __version__

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "torchvision", "transformers", "gradio", "xformers")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built from a copy of the sources (setuptools writes its build folders beside them)."""
    source, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("dist")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "lora_train", source / "lora_train", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                    "-w", str(out), str(source)], check=True, cwd=out)
    (path,) = out.glob("*.whl")
    return path


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """A fresh venv with the wheel installed; returns its bin folder."""
    root = tmp_path_factory.mktemp("venv")
    venv.EnvBuilder(with_pip=True).create(root)
    python = root / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    Path(site, "reuse-test-env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n", encoding="utf-8")
    subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--quiet", str(wheel)],
                   check=True)
    return root / "bin"


def run(command, **options) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, cwd=options.pop("cwd", None), **options)


def test_the_wheel_carries_the_configs_and_asks_for_no_heavy_package(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = Parser().parsestr(archive.read(next(n for n in names if n.endswith("METADATA"))).decode())
    assert {"lora_train/configs/lora_default.yaml", "lora_train/configs/ldm/sd1.yaml"} <= names
    assert not any(name.startswith(("scripts/", "tests/", "javascript/")) for name in names)
    assert metadata["Version"] == __version__
    required = [r for r in metadata.get_all("Requires-Dist") if "extra ==" not in r]
    assert required and not [r for r in required if r.split()[0].split("=")[0].split(">")[0] in HEAVY]
    assert any(r.startswith("torch") and 'extra == "standalone"' in r for r in metadata.get_all("Requires-Dist"))


def test_the_installed_command_reports_its_version_and_does_a_dry_run(installed, tmp_path):
    command = installed / "lora-train"
    version = run([str(command), "--version"], cwd=tmp_path)
    assert version.returncode == 0 and version.stdout.strip() == f"lora-train {__version__}"
    assert "train" in run([str(command), "--help"], cwd=tmp_path).stdout
    build = ("from pathlib import Path; from lora_train.tiny import build_tiny_checkpoint; "
             "from lora_train.cli_demo import make_sample_dataset; import lora_train; "
             "assert 'site-packages' in lora_train.__file__, lora_train.__file__; "
             "build_tiny_checkpoint(Path('models')); make_sample_dataset(Path('images'))")
    assert run([str(installed / "python"), "-c", build], cwd=tmp_path, check=True).returncode == 0
    config = {"data": {"train_data_dir": "images", "resolution": 64, "min_bucket_reso": 64},
              "model": {"base_model": "models/tiny-sd1.safetensors"}, "training": {"max_train_steps": 2}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    dry = run([str(command), "train", "--config", "run.yaml", "--dry-run"], cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr
    assert "8 usable images" in dry.stdout and "-> 2 steps" in dry.stdout
