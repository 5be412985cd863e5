"""A non-editable install carries everything ``ptq run`` needs: the config tree, the prompt files and the tiny
model, read from the installed package (not the checkout)."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                           str(out), str(REPO)], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        pytest.skip(f"cannot build a wheel here: {proc.stderr[-500:]}")
    return next(out.glob("ptq-*.whl"))


def test_wheel_ships_configs_prompts_and_the_tiny_model(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for recipe in (REPO / "ptq" / "configs" / "quant").glob("*.yaml"):
        assert f"ptq/configs/quant/{recipe.name}" in names
    for f in ("ptq/configs/ptq.yaml", "ptq/configs/config/tiny_nvfp4.yaml", "ptq/configs/model/tiny_wan.yaml",
              "ptq/data/tiny_calib.txt", "ptq/data/wan_eval.txt", "ptq/assets/tiny_wan/model_index.json",
              "ptq/assets/tiny_wan/transformer/diffusion_pytorch_model.safetensors"):
        assert f in names, f


def test_installed_package_composes_the_main_job_from_another_directory(wheel: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    code = (
        "import ptq, ptq.run\n"
        "from hydra import compose, initialize_config_dir\n"
        "from omegaconf import OmegaConf\n"
        "from ptq.config import register_configs, validate_config\n"
        "from ptq.pipeline.prompts import load_prompts\n"
        "from ptq.models import get_adapter\n"
        "register_configs()\n"
        "with initialize_config_dir(config_dir=str(ptq.run.CONFIG_DIR), version_base=None):\n"
        "    cfg = OmegaConf.to_object(compose('ptq', overrides=['config=tiny_nvfp4', 'quant=nvfp4_gptq_4o6_act_mse']))\n"
        "validate_config(cfg)\n"
        "print(ptq.__file__)\n"
        "print(len(load_prompts(cfg.calib, 'calib')), len(load_prompts(cfg.eval, 'eval')))\n"
        "print(get_adapter(cfg.model.adapter)(cfg.model.path).root)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    file, counts, root = proc.stdout.split("\n")[:3]
    assert file.startswith(str(site)) and root.startswith(str(site))
    assert counts == "8 2"
