"""The scripts use ptq's public API only (read as source, nothing imported): no private names imported from ptq or
from another script, no private attribute of a ptq name read, no attribute of a ptq name assigned (class options go
through ``ptq.algorithms.qlinear.kernel_options``)."""

from __future__ import annotations

import ast
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
#: modules whose names the scripts import: ptq's, and the scripts' own (imported across files)
OWN = ("ptq", "bench_wan5b", "comfyui_crosscheck")


def _problems(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    imported: dict[str, str] = {}  # local name -> top-level module it came from
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in OWN:
            for a in node.names:
                imported[a.asname or a.name] = node.module.split(".")[0]
                if a.name.startswith("_"):
                    out.append(f"{path.name}:{node.lineno}: imports {node.module}.{a.name}")
        elif isinstance(node, ast.Import):
            imported.update({(a.asname or a.name).split(".")[0]: a.name.split(".")[0] for a in node.names
                             if a.name.split(".")[0] in OWN})
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in imported):
            continue
        if node.attr.startswith("_") and not node.attr.startswith("__"):
            out.append(f"{path.name}:{node.lineno}: reads {ast.unparse(node)}")
        if isinstance(node.ctx, ast.Store) and imported[node.value.id] == "ptq":
            out.append(f"{path.name}:{node.lineno}: assigns {ast.unparse(node)}")
    return out


def test_scripts_use_public_names_only() -> None:
    files = sorted(SCRIPTS.rglob("*.py"))
    assert len(files) > 10
    assert [p for f in files for p in _problems(f)] == []


def test_the_check_sees_a_flag_flip_and_a_private_import(tmp_path: Path) -> None:
    f = tmp_path / "bad.py"
    f.write_text("from ptq.algorithms.qlinear import QuantLinear\nfrom ptq.models.tiny_wan.model import _encode\n"
                 "QuantLinear.fast_path = False\nQuantLinear._act_cache = None\n")
    assert len(_problems(f)) == 4
