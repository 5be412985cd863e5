"""diffusers export: a single file that ``WanTransformer3DModel.from_single_file(..., quantization_config=
BFLQuantizationConfig())`` loads (diffusers >= 0.42, ``diffusers/quantizers/bfl``), plus the transformer config.

diffusers' BFL layout (= TensorRT Model Optimizer's): the model's original key names (from_single_file converts
them); NVFP4 ``weight`` uint8 ``[out, in/2]`` first element in the LOW nibble, ``weight_scale`` float8_e4m3fn
``[out, in/16]`` row-major, ``weight_scale_2`` and ``input_scale`` float32 ``[]``; FP8 ("fp8r") ``weight``
float8_e4m3fn ``[out, in]`` with a per-row float32 ``weight_scale`` ``[out]`` (a per-tensor scale is repeated).
Load with ``load_diffusers_export(folder)``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from ptq.algorithms.qlinear import CANONICAL_NIBBLE_ORDER, QuantizedLinearState
from ptq.export.base import (
    Exporter,
    ExportResult,
    KeyMap,
    UnsupportedExport,
    cast_unquantized,
    header_metadata,
    plain_tensors,
)
from ptq.export.roundtrip import reference_decode_nvfp4
from ptq.export.safetensors_io import save_safetensors, write_text_atomic
from ptq.formats import nvfp4 as nvfp4_fmt
from ptq.formats.nvfp4 import NibbleOrder

TARGET_NIBBLE_ORDER = NibbleOrder.LOW_FIRST
WEIGHTS_NAME = "diffusion_pytorch_model_bfl.safetensors"


def _bias(layer: str, state: QuantizedLinearState, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {} if state.bias is None else {f"{layer}.bias": cast_unquantized(state.bias, dtype)}


def _check_unsmoothed(layer: str, state: QuantizedLinearState) -> None:
    if state.pre_quant_scale is not None:
        raise UnsupportedExport(f"{layer}: diffusers' BFL loader does not read pre_quant_scale (smoothing); "
                                "export smoothed recipes with export.targets=[comfyui]")


def write_nvfp4(layer: str, state: QuantizedLinearState, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    _check_unsmoothed(layer, state)
    if state.input_scale is None:
        raise UnsupportedExport(f"{layer}: diffusers' BFL loader requires input_scale for nvfp4 (weight-only NVFP4 "
                                "cannot be exported to this target)")
    codes = nvfp4_fmt.unpack_e2m1(state.weight, CANONICAL_NIBBLE_ORDER)
    return {f"{layer}.weight": nvfp4_fmt.pack_e2m1(codes, TARGET_NIBBLE_ORDER),
            f"{layer}.weight_scale": state.weight_scale,
            f"{layer}.weight_scale_2": state.weight_scale_2.float().reshape(()),
            f"{layer}.input_scale": state.input_scale.float().reshape(()), **_bias(layer, state, dtype)}


def write_fp8(layer: str, state: QuantizedLinearState, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    _check_unsmoothed(layer, state)
    out = {f"{layer}.weight": state.weight,
           f"{layer}.weight_scale": state.weight_scale.float().reshape(-1).expand(state.out_features).clone()}
    if state.input_scale is not None:
        out[f"{layer}.input_scale"] = state.input_scale.float().reshape(())
    return {**out, **_bias(layer, state, dtype)}


def read_nvfp4(get: Callable[[str], torch.Tensor], layer: str,
               state: QuantizedLinearState) -> tuple[torch.Tensor, set[str]]:
    keys = {f"{layer}.weight", f"{layer}.weight_scale", f"{layer}.weight_scale_2"}
    w = reference_decode_nvfp4(get(f"{layer}.weight"), get(f"{layer}.weight_scale"), get(f"{layer}.weight_scale_2"),
                               high_first=False)
    return w, keys


def read_fp8(get: Callable[[str], torch.Tensor], layer: str,
             state: QuantizedLinearState) -> tuple[torch.Tensor, set[str]]:
    w, ws = get(f"{layer}.weight"), get(f"{layer}.weight_scale")
    got = w.float() * ws.float().reshape(-1, 1) if ws.numel() > 1 else w.float() * ws.float()
    return got, {f"{layer}.weight", f"{layer}.weight_scale"}


class DiffusersBFLExporter(Exporter):
    """``<stem>_diffusers/<component>/{config.json, WEIGHTS_NAME}``: the layout above (component ``transformer``, and
    ``transformer_2`` for the second expert of a two-expert model)."""

    name = "diffusers"
    folder = True
    writers = {"nvfp4": write_nvfp4, "fp8": write_fp8}
    readers = {"nvfp4": read_nvfp4, "fp8": read_fp8}

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
