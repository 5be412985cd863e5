"""The README's key table names every preset and recipe the package ships (``{a,b}`` alternatives expanded)."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "ptq" / "configs"


def readme_names() -> set[str]:
    """Every backticked word of README.md, ``wan21_{nvfp4,fp8}`` expanded to both names."""
    names: set[str] = set()
    for word in re.findall(r"`([^`\s]+)`", (REPO / "README.md").read_text()):
        parts = re.split(r"\{([^}]*)\}", word)
        choices = [[p] if i % 2 == 0 else p.split(",") for i, p in enumerate(parts)]
        names.update("".join(c) for c in itertools.product(*choices))
    return names


def test_readme_lists_every_preset_and_recipe() -> None:
    names = readme_names()
    for group in ("config", "quant"):
        shipped = {p.stem for p in (CONFIGS / group).glob("*.yaml")}
        assert shipped, group
        missing = sorted(shipped - names)
        assert not missing, f"README.md does not name these {group}= files: {missing}"
