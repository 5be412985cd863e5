"""Prompts and conditioning images of a job: from a text file (one prompt per line, ``#`` comments), a ``datasets``
dataset, or the prompt files shipped in ``ptq/data``."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from ptq.pipeline.settings import SamplingConfig

log = logging.getLogger("ptq")
#: The prompt files and images shipped with ptq.
DATA_DIR = Path(__file__).resolve().parents[1] / "data"


class PromptError(ValueError):
    """Prompt file or dataset missing or empty."""


def resolve_data_path(p: str | os.PathLike[str]) -> Path:
    """A path as given (absolute, or relative to the current directory) if it exists, else the shipped file of that
    name in ``ptq/data`` (also for the old ``calibration_data/NAME`` spelling)."""
    path = Path(os.path.expanduser(str(p)))
    if path.is_absolute() or path.exists():
        return path
    shipped = DATA_DIR / path
    if shipped.exists():
        return shipped
    if path.parts and path.parts[0] == "calibration_data":
        return DATA_DIR / Path(*path.parts[1:])
    return path


def load_prompts(cfg: SamplingConfig, what: str) -> list[str]:
    """``cfg.num_prompts`` prompts from ``cfg.dataset`` (if named) or ``cfg.prompts_file``."""
    if cfg.dataset.name:
        import datasets

        try:
            kwargs = {"data_files": str(resolve_data_path(cfg.dataset.data_files))} if cfg.dataset.data_files else {}
            ds = datasets.load_dataset(cfg.dataset.name, cfg.dataset.config_name, split=cfg.dataset.split, **kwargs)
        except Exception as exc:  # noqa: BLE001
            raise PromptError(f"{what}.dataset: cannot load {cfg.dataset.name!r} split {cfg.dataset.split!r}: {exc}") from exc
        if cfg.dataset.column not in ds.column_names:
            raise PromptError(f"{what}.dataset.column={cfg.dataset.column!r} not in {ds.column_names}")
        prompts = [str(x).strip() for x in ds[cfg.dataset.column] if str(x).strip()]
        source = f"dataset {cfg.dataset.name}"
    else:
        path = resolve_data_path(cfg.prompts_file)
        if not path.is_file():
            raise PromptError(f"{what}.prompts_file={cfg.prompts_file!r}: no such file ({path})")
        prompts = [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
        source = str(path)
    if not prompts:
        raise PromptError(f"{what}: no prompts in {source}")
    if len(prompts) < cfg.num_prompts:
        log.warning("%s: %d prompts requested, %s has %d; using all", what, cfg.num_prompts, source, len(prompts))
    return prompts[: cfg.num_prompts]


def load_images(paths: list[str], height: int, width: int) -> list[torch.Tensor]:
    """Conditioning images ``[3, height, width]`` float32 in [0, 1] (resized)."""
    import numpy as np
    from PIL import Image

    out = []
    for p in paths:
        path = resolve_data_path(p)
        if not path.is_file():
            raise FileNotFoundError(f"conditioning image {p!r} not found ({path})")
        img = Image.open(path).convert("RGB").resize((width, height))
        out.append(torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1) / 255)
    return out
