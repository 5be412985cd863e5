"""Shared fixtures: small WAN models (random and packaged) and GPU markers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# before torch starts its OpenMP runtime (ptq sets the same defaults on import): see ptq/__init__.py
os.environ.setdefault("GOMP_SPINCOUNT", "1000")
os.environ.setdefault("KMP_BLOCKTIME", "1")

import torch  # noqa: E402


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def random_tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny WAN diffusers folder with seeded random weights (bf16 on disk)."""
    from ptq.models.tiny_wan import build_random_tiny_wan, save_tiny_wan

    path = tmp_path_factory.mktemp("models") / "tiny_random"
    save_tiny_wan(build_random_tiny_wan(seed=0), path)
    return path


@pytest.fixture(scope="session")
def packaged_tiny_dir() -> Path:
    """The trained tiny WAN model shipped in ptq/assets/tiny_wan."""
    from ptq.models.tiny_wan import TINY_WAN_PATH

    path = Path(TINY_WAN_PATH)
    assert (path / "transformer" / "config.json").is_file(), f"packaged tiny model missing at {path}"
    return path


@pytest.fixture(scope="session")
def random_tiny_moe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A two-expert tiny WAN folder (transformer + transformer_2, boundary 0.875) with seeded random weights."""
    from ptq.models.tiny_wan.moe import build_random_tiny_moe, save_tiny_moe

    path = tmp_path_factory.mktemp("models") / "tiny_moe_random"
    save_tiny_moe(build_random_tiny_moe(seed=0), path)
    return path
