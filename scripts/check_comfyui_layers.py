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

import torch
from safetensors import safe_open


def comfy_ops(comfyui: str, device: str, compute_dtype: torch.dtype):
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("file")
    ap.add_argument("--comfyui", required=True, help="ComfyUI source folder")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    ops, disabled = comfy_ops(args.comfyui, args.device, dtype)

    from ptq.algorithms.qlinear import QuantLinear
    from ptq.targets.comfyui.target import ComfyUITarget
    from ptq.tools.verify import DYNAMIC_FORMATS, _layer_format, file_layer_state  # TODO

    readers = ComfyUITarget.readers
    worst = {"weight_mismatch": 0, "max_output_rel_diff": 0.0, "layers": 0}
    with safe_open(args.file, framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("_quantization_metadata", "{}")).get("layers", {})
        for layer, conf in meta.items():
            sd = {k.removeprefix(layer + "."): f.get_tensor(k) for k in f.keys() if k.startswith(layer + ".")}
            if _layer_format(sd, conf) not in DYNAMIC_FORMATS:
                print(f"{layer}: {conf['format']} skipped (this script checks {', '.join(DYNAMIC_FORMATS)})")
                continue
            out_f, in_f = sd["weight"].shape
            lin = ops.Linear(in_f, out_f, bias="bias" in sd, device=args.device)
            lin.load_state_dict(dict(sd), strict=False)
            state = file_layer_state(sd, conf, in_f, out_f, sd.get("bias"))
            w_ptq, _ = readers[state.format](lambda k, _sd=sd, _l=layer: _sd[k.removeprefix(_l + ".")], layer, state)
            w_comfy = lin.weight.dequantize().float() if hasattr(lin.weight, "dequantize") else lin.weight.float()
            mismatch = int((w_comfy != w_ptq.to(dtype).float()).sum())
            x = torch.randn(args.tokens, in_f, generator=torch.Generator().manual_seed(0)).to(dtype) * 3
            with torch.no_grad():
                y_comfy = lin(x).float()
                QuantLinear.fp8_act_mode = "ck_eager"
                native = conf["format"] not in disabled and not conf.get("full_precision_matrix_mult")
                ql = QuantLinear(state if native else _weight_only(state), compute_dtype=dtype)
                y_ptq = ql(x).float()
            rel = float((y_comfy - y_ptq).norm() / y_comfy.norm().clamp_min(1e-30))
            exact = bool(torch.equal(y_comfy, y_ptq))
            print(f"{layer}: {conf} weight mismatches {mismatch}, output {'bit-exact' if exact else f'rel {rel:.2e}'}"
                  f"{'' if native else ' (ComfyUI runs it dequantized here)'}")
            worst["weight_mismatch"] += mismatch
            worst["max_output_rel_diff"] = max(worst["max_output_rel_diff"], rel)
            worst["layers"] += 1
    print(json.dumps(worst))


def _weight_only(state):
    from dataclasses import replace

    return replace(state, input_scale=None, dynamic_activations=False)


if __name__ == "__main__":
    main()
