"""Cross-check exports with ComfyUI's own code (a local ComfyUI checkout; never run from CI).

1. ``detect``: ComfyUI's WAN detection (``comfy.model_detection``) on every stored WAN config's state dict (meta
   tensors, original names from ptq's name map): model class, dim, heads, layers, in/out channels, model type.
2. ``load FILE [FILE ...] --model FOLDER``: load ComfyUI files with ``comfy.sd.load_diffusion_model`` and compare
   ComfyUI's WAN forward (dequantized weights, float32, CPU) with diffusers' ``WanTransformer3DModel`` built from
   the folder's component config holding the same weights (component from the file's ``ptq_component``).
   ``--comfy-reader`` reads the files with ComfyUI's own safetensors reader (``comfy.utils.load_safetensors``, what
   ComfyUI uses with DynamicVRAM, its default on NVIDIA GPUs; needs the ``comfy-aimdo`` package, whose memory map
   works on the CPU) instead of the safetensors library.
3. ``dtypes``: ptq's table of the dtypes ComfyUI's reader reads (``ptq.targets.comfyui.layout.READER_DTYPES``) against
   ComfyUI's own (``comfy.utils._TYPES``).

    python scripts/comfyui_crosscheck.py --comfyui /path/to/ComfyUI detect
    python scripts/comfyui_crosscheck.py --comfyui /path/to/ComfyUI load out/*_comfyui.safetensors --model DIR
    python scripts/comfyui_crosscheck.py --comfyui /path/to/ComfyUI load FILE --model DIR --comfy-reader
    python scripts/comfyui_crosscheck.py --comfyui /path/to/ComfyUI dtypes

ComfyUI imports torchvision/torchaudio at module level for other models; they are stubbed here (WAN needs neither).
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import json
import sys
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from diffusers import WanTransformer3DModel  # noqa: E402  (before the stubs: transformers probes torchvision)
from safetensors import safe_open  # noqa: E402

from ptq.models.wan import build_meta_transformer  # noqa: E402
from ptq.models.wan.family import wan_models  # noqa: E402
from ptq.models.wan.names import convert_state_dict_keys, original_to_diffusers  # noqa: E402


class _Stub(types.ModuleType):
    """An importable stand-in module: every attribute is a class that accepts and does anything."""

    __path__: list[str] = []

    def __getattr__(self, key: str):
        if key.startswith("__"):
            raise AttributeError(key)
        return type(key, (), {"__init__": lambda *a, **k: None, "__call__": lambda *a, **k: None})


class StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """``sys.meta_path`` finder that stubs torchvision and torchaudio (ComfyUI imports them at top level for other
    models; WAN needs neither)."""

    def find_spec(self, name, path, target=None):  # noqa: ANN001
        return importlib.machinery.ModuleSpec(name, self) if name.split(".")[0] in ("torchvision", "torchaudio") \
            else None

    def create_module(self, spec):  # noqa: ANN001
        return _Stub(spec.name)

    def exec_module(self, module) -> None:  # noqa: ANN001
        return None


def import_comfy(root: str) -> None:
    sys.meta_path.insert(0, StubFinder())
    sys.path.insert(0, root)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True


def detect() -> None:
    import comfy.model_detection as md

    for name, spec in wan_models().items():
        sd = convert_state_dict_keys(build_meta_transformer(spec.transformer_kwargs()).state_dict(), "original")
        cfg = md.detect_unet_config(sd, "")
        cls = type(md.model_config_from_unet_config(cfg, sd)).__name__
        print(f"{name:22} {cls:12} dim {cfg['dim']} heads {cfg['num_heads']} layers {cfg['num_layers']} "
              f"in {cfg['in_dim']} out {cfg['out_dim']} type {cfg['model_type']}")


def use_comfy_reader() -> None:
    """Make ``comfy.utils.load_torch_file`` read safetensors with ComfyUI's own reader, as with DynamicVRAM."""
    import comfy.memory_management
    import comfy_aimdo.control

    if not comfy_aimdo.control.init("cuda"):
        raise SystemExit("comfy-aimdo did not initialise: pip install comfy-aimdo")
    comfy.memory_management.aimdo_enabled = True


def dtypes() -> None:
    import comfy.utils

    from ptq.targets.comfyui.layout import READER_DTYPES

    theirs = set(comfy.utils._TYPES)
    print(json.dumps({"comfyui_reader_dtypes": sorted(theirs), "ptq_table_equal": theirs == set(READER_DTYPES),
                      "only_in_ptq": sorted(set(READER_DTYPES) - theirs), "only_in_comfyui": sorted(theirs -
                                                                                                  set(READER_DTYPES))}))


def load(files: list[str], model: Path, comfy_reader: bool = False) -> None:
    import comfy.sd

    if comfy_reader:
        use_comfy_reader()
    for path in files:
        with safe_open(path, "pt") as f:
            component = (f.metadata() or {}).get("ptq_component", "transformer")
        dm = comfy.sd.load_diffusion_model(path).model.diffusion_model.float()
        tensors = {**dict(dm.named_parameters()), **dict(dm.named_buffers())}
        scales = [k for k in tensors if k.endswith(("input_scale", "weight_scale", "weight_scale_2", "comfy_quant",
                                                    "pre_quant_scale"))]
        state = {original_to_diffusers(k): (v.dequantize() if hasattr(v, "dequantize") else v).float()
                 for k, v in tensors.items() if k not in scales}
        for k in scales:  # smoothing: the stored weight is W / pre_quant_scale per input column
            if k.endswith(".pre_quant_scale"):
                state[original_to_diffusers(k[: -len("pre_quant_scale")] + "weight")] *= tensors[k].float()
        quantized = sum(type(v).__name__ == "QuantizedTensor" for v in tensors.values())
        ref = WanTransformer3DModel.from_config(WanTransformer3DModel.load_config(model / component)).float()
        ref.load_state_dict(state, strict=True)
        cfg = ref.config
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1, cfg.in_channels, 3, 8, 8, generator=g)
        ctx = torch.randn(1, 32, cfg.text_dim, generator=g)
        t = torch.tensor([700.0])
        with torch.no_grad():
            a = dm(x, t, ctx)
            b = ref(hidden_states=x, timestep=t, encoder_hidden_states=ctx, return_dict=False)[0]
        print(json.dumps({"file": Path(path).name, "component": component, "comfy_quantized_weights": quantized,
                          "comfy_input_scales": sum(k.endswith("input_scale") for k in scales),
                          "comfy_heads": dm.num_heads,
                          "comfy_dim": dm.dim, "reader": "comfy.utils.load_safetensors" if comfy_reader else
                          "safetensors", "rel_l2_vs_diffusers": float((a - b).norm() / b.norm())}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--comfyui", required=True, help="a ComfyUI checkout")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("detect")
    sub.add_parser("dtypes")
    lo = sub.add_parser("load")
    lo.add_argument("files", nargs="+")
    lo.add_argument("--model", required=True, help="the bf16 diffusers folder the files were made from")
    lo.add_argument("--comfy-reader", action="store_true", help="read with ComfyUI's own safetensors reader")
    args = ap.parse_args()
    import_comfy(args.comfyui)
    if args.cmd == "load":
        load(args.files, Path(args.model), args.comfy_reader)
    else:
        {"detect": detect, "dtypes": dtypes}[args.cmd]()


if __name__ == "__main__":
    main()
