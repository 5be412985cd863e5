"""Whether a component folder's weight files are there and whole, read from their headers only (no tensor data):
missing weights, a shard an index names that is not there, a safetensors file cut short (its header promises more
bytes than the file holds) or with an unreadable header. Each problem is one line naming the file."""

from __future__ import annotations

import json
import struct
from pathlib import Path

#: Weight file names diffusers / transformers read in a component folder (single file or sharded with an index).
WEIGHT_GLOBS = ("*.safetensors", "*.bin", "*.pth", "*.pt")
INDEX_SUFFIX = ".index.json"


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def safetensors_problem(path: Path) -> str | None:
    """What is wrong with a safetensors file's header or length (None when it is whole)."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{path.name} is empty or cut short ({size} bytes)"
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                return f"{path.name} is cut short: its header alone needs {_mib(n + 8)}, the file has {_mib(size)}"
            header = json.loads(f.read(n))
    except (OSError, ValueError) as exc:
        return f"{path.name} has an unreadable safetensors header ({type(exc).__name__})"
    ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    need = 8 + n + max(ends, default=0)
    if size < need:
        return f"{path.name} is cut short: {_mib(size)} of {_mib(need)} (an interrupted download or copy)"
    return None


def component_problems(folder: Path, *, required: bool = True) -> list[str]:
    """Problems of a component's weights (``folder``: e.g. ``transformer/``), as ``<folder>/<file> ...``;
    ``required=False``: a component that may hold no weights (built from its config alone)."""
    if not folder.is_dir():
        return [f"{folder.name}/ is missing"]
    files = sorted({p for g in WEIGHT_GLOBS for p in folder.glob(g)})
    problems: list[str] = []
    for index in sorted(folder.glob(f"*{INDEX_SUFFIX}")):
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError):
            problems.append(f"{folder.name}/{index.name} is not a weight index (no weight_map)")
            continue
        problems += [f"{folder.name}/{s} is missing (listed in {index.name})" for s in shards
                     if not (folder / s).is_file()]
    if not files and required:
        problems.append(f"{folder.name}/ has no weight files ({', '.join(WEIGHT_GLOBS)})")
    for f in files:
        if f.suffix == ".safetensors":
            problem = safetensors_problem(f)
            if problem:
                problems.append(f"{folder.name}/{problem}")
        elif f.stat().st_size == 0:
            problems.append(f"{folder.name}/{f.name} is empty")
    return problems


__all__ = ["WEIGHT_GLOBS", "component_problems", "safetensors_problem"]
