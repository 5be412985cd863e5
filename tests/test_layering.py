"""Lower layers never import higher ones: formats -> calibration -> algorithms -> models -> targets -> eval ->
pipeline -> tools -> run/cli/config. Checked on every import statement (also the lazy ones inside functions). No
model family's names appear below ``ptq/models``."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "ptq"
LAYERS = ["formats", "calibration", "algorithms", "models", "targets", "eval", "pipeline", "tools"]
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


#: Names that belong to the WAN family (its modules, block numbering, classes): only ``ptq/models`` may use them.
WAN_NAMES = re.compile(r"blocks\\?\.|\battn[12]\b|\bto_[qkv]\b|to_out|ffn\.net|condition_embedder|patch_embedding|"
                       r"proj_out|scale_shift_table|\bWan[A-Z]\w*|\bwan\b|\bWAN\b", re.IGNORECASE)


@pytest.mark.parametrize("layer", LAYERS[: LAYERS.index("models")])
def test_no_model_names_below_the_model_layer(layer: str) -> None:
    bad = []
    for path in sorted((PKG / layer).rglob("*.py")):
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if WAN_NAMES.search(line):
                bad.append(f"{path.relative_to(PKG.parent)}:{i}: {line.strip()}")
    assert not bad, "\n".join(bad)


def _module_imports(path: Path) -> list[str]:
    """Modules ``path`` imports, with ``from package import submodule`` resolved to the submodule."""
    def is_module(name: str) -> bool:
        p = PKG.parent / Path(*name.split("."))
        return p.with_suffix(".py").exists() or (p / "__init__.py").exists()

    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            subs = [f"{node.module}.{a.name}" for a in node.names if is_module(f"{node.module}.{a.name}")]
            out += subs if subs else [node.module]
    return [m for m in out if m.split(".")[0] == "ptq"]


def test_no_import_circle() -> None:
    """No module of ptq imports (directly or through others) itself; a package's __init__ importing its own
    submodules does not count."""
    graph: dict[str, set[str]] = {}
    for path in sorted(PKG.rglob("*.py")):
        mod = ".".join(path.relative_to(PKG.parent).with_suffix("").parts).removesuffix(".__init__")
        graph[mod] = set(_module_imports(path))
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph.get(m, ())):
            if n == m or n.startswith(m + ".") or m.startswith(n + "."):  # a package and its own submodules
                continue
            if state.get(n) == 1:
                raise AssertionError("import circle: " + " -> ".join([*stack[stack.index(n):], n]))
            if n not in state:
                visit(n, [*stack, n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


@pytest.mark.parametrize("layer", ["targets", "tools"])
def test_targets_and_tools_reach_model_families_through_the_adapters(layer: str) -> None:
    """File targets and the file tools know no model family: they import ``ptq.models`` (the registry) and its
    generic modules, never a family's package."""
    generic = {"ptq.models", "ptq.models.base", "ptq.models.files"}
    bad = [f"{p.relative_to(PKG.parent)} imports {m}" for p in sorted((PKG / layer).rglob("*.py"))
           for m in _imports(p) if m.startswith("ptq.models") and m not in generic]
    assert not bad, "\n".join(bad)


def test_the_file_tools_decide_nothing_by_format_name() -> None:
    """``ptq/tools`` compares no layer format against a literal format name (the formats and targets say it)."""
    from ptq.formats import FORMATS

    names = "|".join(sorted(FORMATS, key=len, reverse=True))
    literal = re.compile(rf"""(==|!=|\bin)\s*\(?\s*["'](?:{names})["']|["'](?:{names})["']\s*(==|!=)""")
    bad = [f"{p.relative_to(PKG.parent)}:{i}: {line.strip()}" for p in sorted((PKG / "tools").rglob("*.py"))
           for i, line in enumerate(p.read_text().splitlines(), 1) if literal.search(line)]
    assert not bad, "\n".join(bad)
