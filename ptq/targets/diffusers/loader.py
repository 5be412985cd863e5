"""Load a diffusers export with diffusers' own BFL quantizer (no ptq code in the loading path)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ptq.targets.diffusers.layout import WEIGHTS_NAME


def load_diffusers_export(folder: str | Path, compute_dtype: torch.dtype = torch.bfloat16,
                          component: str = "transformer") -> torch.nn.Module:
    """Load an export of this module (``component``: ``transformer_2`` for a second expert) with diffusers' own BFL
    quantizer: the model class the component's ``config.json`` names (``_class_name``), ``from_single_file``."""
    import diffusers

    folder = Path(folder)
    cls = getattr(diffusers, json.loads((folder / component / "config.json").read_text())["_class_name"])
    return cls.from_single_file(
        str(folder / component / WEIGHTS_NAME), config=str(folder), subfolder=component,
        quantization_config=diffusers.BFLQuantizationConfig(compute_dtype=compute_dtype), torch_dtype=compute_dtype,
    )
