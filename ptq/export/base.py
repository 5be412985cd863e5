"""Shared pieces of the exporters: atomic safetensors writes and splitting a quantized model's state."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from ptq.algorithms.qlinear import QuantizedLinearState, QuantLinear

UNQUANTIZED_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class ExportResult:
    """One written artefact. ``verified`` is None when verification was not run."""

    target: str
    path: str
    bytes: int = 0
    quantized_layers: int = 0
    tensors: int = 0
    verified: bool | None = None
    verify_detail: str = ""
    skipped: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> int:
    """Write ``tensors`` to ``path`` via a temp file in the same folder + rename; returns the file size in bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file normal permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path.stat().st_size


def atomic_write_text(path: Path, text: str) -> None:
    """Write a small text file atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def split_model_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, QuantizedLinearState]]:
    """(unquantized tensors by diffusers key, quantized layers by module name). QuantLinear buffers are excluded
    from the first dict; their bias travels in the QuantizedLinearState."""
    quant = {n: m.state() for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    plain = {}
    for key, value in model.state_dict().items():
        module = key.rsplit(".", 1)[0]
        if module in quant:
            continue
        plain[key] = value
    return plain, quant


def cast_unquantized(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Float tensors -> ``dtype``; float32 tensors stay float32 (diffusers keeps time_embedder, scale_shift_table
    and norm2 in fp32 on purpose). Never float16: WAN's unquantized tensors must be bf16 or fp32."""
    if not t.is_floating_point() or t.dtype == torch.float32:
        return t
    return t.to(dtype)


def header_metadata(extra: dict[str, Any]) -> dict[str, str]:
    """safetensors header metadata: str -> str (JSON-encode non-strings)."""
    return {k: v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in extra.items()}
