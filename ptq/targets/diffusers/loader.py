"""Load a diffusers export with diffusers' own BFL quantizer (no ptq code in the loading path)."""

from __future__ import annotations

from pathlib import Path

import torch

from ptq.targets.diffusers.layout import WEIGHTS_NAME


def load_diffusers_export(folder: str | Path, compute_dtype: torch.dtype = torch.bfloat16,
                          component: str = "transformer") -> torch.nn.Module:
    """Load an export of this module (``component``: ``transformer_2`` for a second expert) with diffusers' own BFL
    quantizer (no ptq code in the loading path)."""
    from diffusers import BFLQuantizationConfig, WanTransformer3DModel

    folder = Path(folder)
    return WanTransformer3DModel.from_single_file(
        str(folder / component / WEIGHTS_NAME), config=str(folder), subfolder=component,
        quantization_config=BFLQuantizationConfig(compute_dtype=compute_dtype), torch_dtype=compute_dtype,
    )
