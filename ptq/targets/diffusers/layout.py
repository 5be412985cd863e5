"""What diffusers' BFL single-file loader reads (``WanTransformer3DModel.from_single_file(...,
quantization_config=BFLQuantizationConfig())``, diffusers >= 0.42, ``diffusers/quantizers/bfl``; = TensorRT Model
Optimizer's layout), as data.

The model's original key names (``from_single_file`` converts them); NVFP4 ``weight`` uint8 ``[out, in/2]`` first
element in the LOW nibble, ``weight_scale`` float8_e4m3fn ``[out, in/16]`` row-major, ``weight_scale_2`` and
``input_scale`` float32 ``[]`` (``input_scale`` required); FP8 ("fp8r") ``weight`` float8_e4m3fn ``[out, in]`` with
a per-row float32 ``weight_scale`` ``[out]`` (a per-tensor scale is repeated); no ``pre_quant_scale``; no int8 or
MXFP8 layout. One folder per export: ``<stem>_diffusers/<component>/{config.json, WEIGHTS_NAME}``.
"""

from __future__ import annotations

from ptq.formats.nvfp4 import NibbleOrder

#: Order of the two E2M1 codes in an NVFP4 byte (ModelOpt: the first element in the low nibble).
NIBBLE_ORDER = NibbleOrder.LOW_FIRST
#: The weights file of each component folder.
WEIGHTS_NAME = "diffusion_pytorch_model_bfl.safetensors"

__all__ = ["NIBBLE_ORDER", "WEIGHTS_NAME"]
