"""Load every quantized Linear of a ptq ComfyUI export through ComfyUI's own mixed-precision ops and compare.

For each layer of the file: build ``comfy.ops.mixed_precision_ops(...).Linear``, load the layer's tensors with its
``_load_from_state_dict`` (``comfy_quant`` parsing, scale names, layout classes: exactly what "Load Diffusion Model"
does per layer), then compare (1) ComfyUI's dequantized weight with ptq's decoding of the file, bit for bit, and
(2) ComfyUI's forward on a random input with ptq's simulation of the same layer (``QuantLinear`` with the
arithmetic of comfy-kitchen's eager backend, ``fp8_act_mode="ck_eager"``), for the int8 / int8_convrot / mxfp8
layers. ComfyUI disables the formats the device cannot run natively exactly as ``comfy.ops.pick_operations`` does
on this device (on CPU: nvfp4, mxfp8 and fp8 run dequantized, int8_tensorwise runs its W8A8 eager kernel).

ComfyUI is not a dependency of ptq: pass a source checkout (e.g. the fork ``silveroxides/ComfyUI``, its ``*.py``
files are enough). Modules ComfyUI imports at top level for other models may need stubs on ``PYTHONPATH``.

    python scripts/check_comfyui_layers.py --comfyui /tmp/comfyui outputs/.../model_comfyui.safetensors
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from typing import Any

import torch
from safetensors import safe_open


def comfy_ops(comfyui: str, device: str, compute_dtype: torch.dtype) -> tuple[Any, set[str]]:
    """ComfyUI's mixed-precision ops for ``device`` and the formats it runs dequantized there."""
    sys.path.insert(0, comfyui)
    sys.argv = [sys.argv[0], "--cpu"] if device == "cpu" else [sys.argv[0]]
    import comfy.options

    comfy.options.enable_args_parsing()
    import comfy.model_management as mm
    import comfy.ops

    dev = torch.device(device)
    disabled = set()
    if not mm.supports_nvfp4_compute(dev):
        disabled.add("nvfp4")
    if not mm.supports_mxfp8_compute(dev):
        disabled.add("mxfp8")
    if not mm.supports_fp8_compute(dev):
        disabled |= {"float8_e4m3fn", "float8_e5m2"}
    return comfy.ops.mixed_precision_ops({}, compute_dtype, disabled=disabled), disabled


def weight_only(state: Any) -> Any:
    """``state`` (a ``QuantizedLinearState``) with high-precision activations, as ComfyUI runs a disabled format."""
    return replace(state, input_scale=None, dynamic_activations=False)


def check_layer(layer: str, raw: dict[str, torch.Tensor], metadata: dict[str, str], ops: Any, disabled: set[str],
                args: argparse.Namespace) -> tuple[int, float] | None:
    """Compare one layer (``raw``: its tensors by file key): (weight mismatches, output rel. difference), or None
    when it is skipped."""
    from ptq.algorithms.qlinear import QuantLinear, kernel_options
    from ptq.formats import FORMATS
    from ptq.targets.file_decoders import FILE_DECODERS
    from ptq.targets.registry import get_target

    target = get_target("comfyui")
    sd = {k.removeprefix(layer + "."): t for k, t in raw.items()}
    conf = target.layer_declaration(raw, layer, metadata)
    fmt = target.file_layer_format(sd, conf)
    runtime_scaled = sorted(f for f in FILE_DECODERS if FORMATS[f].dynamic_activations)
    if fmt not in runtime_scaled:
        print(f"{layer}: {conf['format']} skipped (this script checks {', '.join(runtime_scaled)})")
        return None
    dtype = getattr(torch, args.dtype)
    out_f, in_f = sd["weight"].shape
    lin = ops.Linear(in_f, out_f, bias="bias" in sd, device=args.device)
    lin.load_state_dict(dict(sd), strict=False)
    # no unquantized reference here: the decoders of run-time-scaled formats do not read it
    decoded = FILE_DECODERS[fmt](sd, conf, out_f, in_f, torch.empty(0), target.nvfp4_packing, "cpu")
    if not decoded.readable:
        print(f"{layer}: {conf} not decodable: {'; '.join(decoded.problems)}")
        return None
    w_comfy = lin.weight.dequantize().float() if hasattr(lin.weight, "dequantize") else lin.weight.float()
    mismatch = int((w_comfy != decoded.weight.to(dtype).float()).sum())
    x = torch.randn(args.tokens, in_f, generator=torch.Generator().manual_seed(0)).to(dtype) * 3
    native = conf["format"] not in disabled and not conf.get("full_precision_matrix_mult")
    with torch.no_grad(), kernel_options(fp8_act_mode="ck_eager"):
        y_comfy = lin(x).float()
        ql = QuantLinear(decoded.state if native else weight_only(decoded.state), compute_dtype=dtype)
        y_ptq = ql(x).float()
    rel = float((y_comfy - y_ptq).norm() / y_comfy.norm().clamp_min(1e-30))
    exact = bool(torch.equal(y_comfy, y_ptq))
    print(f"{layer}: {conf} weight mismatches {mismatch}, output {'bit-exact' if exact else f'rel {rel:.2e}'}"
          f"{'' if native else ' (ComfyUI runs it dequantized here)'}")
    return mismatch, rel


def main() -> None:
    from ptq.targets.comfyui.layout import METADATA_KEY

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("file")
    ap.add_argument("--comfyui", required=True, help="ComfyUI source folder")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()
    ops, disabled = comfy_ops(args.comfyui, args.device, getattr(torch, args.dtype))
    worst = {"weight_mismatch": 0, "max_output_rel_diff": 0.0, "layers": 0}
    with safe_open(args.file, framework="pt") as f:
        metadata = f.metadata() or {}
        for layer in json.loads(metadata.get(METADATA_KEY, "{}")).get("layers", {}):
            raw = {k: f.get_tensor(k) for k in f.keys() if k.startswith(layer + ".")}
            res = check_layer(layer, raw, metadata, ops, disabled, args)
            if res is None:
                continue
            worst["weight_mismatch"] += res[0]
            worst["max_output_rel_diff"] = max(worst["max_output_rel_diff"], res[1])
            worst["layers"] += 1
    print(json.dumps(worst))


if __name__ == "__main__":
    main()
