"""The diffusers file target: a folder that diffusers' BFL single-file loader reads (the layout:
:mod:`ptq.targets.diffusers.layout`; load it with :func:`ptq.targets.diffusers.loader.load_diffusers_export`)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from ptq.algorithms.qlinear import QuantizedLinearState
from ptq.targets.base import ExportResult, FileTarget, KeyMap, header_metadata, plain_tensors
from ptq.targets.diffusers.layout import NIBBLE_ORDER, WEIGHTS_NAME
from ptq.targets.diffusers.reader import READERS
from ptq.targets.diffusers.writer import WRITERS
from ptq.targets.safetensors_io import save_safetensors, write_text_atomic


class DiffusersBFLTarget(FileTarget):
    """``<stem>_diffusers/<component>/{config.json, WEIGHTS_NAME}``: the layout above (component ``transformer``, and
    ``transformer_2`` for the second expert of a two-expert model)."""

    name = "diffusers"
    folder = True
    writers = WRITERS
    readers = READERS
    nvfp4_packing = f"{NIBBLE_ORDER.value}/row_major"

    def claims(self, metadata: Mapping[str, str], keys: Iterable[str], convention: str) -> bool:
        return True  # every quantized file without another loader's markers is read the ModelOpt way

    def write(self, plain: Mapping[str, torch.Tensor], quant: Mapping[str, QuantizedLinearState], out_dir: Path,
              stem: str, *, dtype: torch.dtype, key_map: KeyMap, metadata: dict[str, Any],
              module_config: dict[str, Any], component: str = "transformer") -> ExportResult:
        tensors = plain_tensors(plain, dtype, key_map)
        tensors.update(self.layer_tensors(quant, dtype, key_map))
        folder = out_dir / f"{stem}_diffusers"
        cfg = {k: v for k, v in module_config.items() if not k.startswith("_") or k == "_class_name"}
        write_text_atomic(folder / component / "config.json", json.dumps(cfg, indent=2, default=list) + "\n")
        path = folder / component / WEIGHTS_NAME
        size = save_safetensors(tensors, path, header_metadata(metadata))
        return ExportResult(self.name, str(path), size, len(quant), len(tensors))
