"""Lower layers never import higher ones: formats -> calibration -> algorithms -> models -> export -> eval -> tools
-> run/cli/config. Checked on every import statement (also the lazy ones inside functions)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "ptq"
LAYERS = ["formats", "calibration", "algorithms", "models", "export", "eval", "tools"]
TOP = len(LAYERS)  # ptq/run.py, ptq/cli.py, ptq/config.py, ptq/__main__.py


def _rank(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "ptq":
        return None
    if len(parts) == 1:
        return -1  # `import ptq` (version only)
    return LAYERS.index(parts[1]) if parts[1] in LAYERS else TOP


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append(node.module)
    return out


@pytest.mark.parametrize("layer", LAYERS)
def test_layer_imports_only_lower_layers(layer: str) -> None:
    own = LAYERS.index(layer)
    bad = []
    for path in sorted((PKG / layer).rglob("*.py")):
        for mod in _imports(path):
            rank = _rank(mod)
            if rank is not None and rank > own:
                bad.append(f"{path.relative_to(PKG.parent)} imports {mod}")
    assert not bad, "\n".join(bad)


def test_every_layer_exists() -> None:
    for layer in LAYERS:
        assert (PKG / layer / "__init__.py").is_file()
