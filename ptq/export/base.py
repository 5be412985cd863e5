"""Shared pieces of the exporters: atomic safetensors writes and splitting a quantized model's state."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ptq.algorithms.qlinear import QuantizedLinearState, QuantLinear
from ptq.export.safetensors_io import save_safetensors, write_text_atomic

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
    """Write ``tensors`` to ``path`` deterministically and atomically; returns the file size in bytes."""
    return save_safetensors(tensors, path, metadata)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a small text file atomically."""
    write_text_atomic(path, text)


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
