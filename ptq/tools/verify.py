"""``ptq verify``: decode a quantized checkpoint independently and check it against the bf16 model.

For every quantized Linear of the file:
1. decode it with the table-driven reference decoder of ``ptq.export.roundtrip`` under every packing convention
   (nibble order x scale layout) and keep the one closest to the bf16 weight: a file whose best convention differs
   from what its loader reads (ComfyUI: high nibble first + cuBLAS tiled scales; diffusers BFL / ModelOpt: low
   nibble first + row-major) has its nibbles or scales in the wrong order;
2. compare the file's weight error against ptq's own round-to-nearest quantization of the same bf16 weight;
3. run the layer on real inputs (captured from one bf16 forward of the model) through the simulated target
   kernel with the file's tensors and ``input_scale``, and compare its output error with ptq's own simulation:
   it must be within ``tolerance`` x ptq's error (+ 1e-3);
4. load the dequantized state dict into a diffusers ``WanTransformer3DModel`` (strict: no missing or unexpected key).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ptq.algorithms.methods import quantize_weight
from ptq.algorithms.qlinear import CANONICAL_NIBBLE_ORDER, QuantizedLinearState, QuantLinear
from ptq.algorithms.weight_quant import WeightContext
from ptq.eval.metrics import rel_l2
from ptq.export.roundtrip import reference_decode_nvfp4, reference_untile
from ptq.formats import nvfp4 as nvfp4_fmt
from ptq.formats.nvfp4 import NibbleOrder
from ptq.models.wan.names import NameMapError, original_to_diffusers
from ptq.tools.safetensors_header import read_header

KNOWN_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.")
SCALE_NAMES = ("weight_scale", "scale_weight")  # ComfyUI/ModelOpt, Kijai-style FP8


@dataclass
class LayerCheck:
    """Result for one quantized layer (diffusers name)."""

    name: str
    format: str
    packing: str = ""  # detected "high_first/tiled" etc. for nvfp4
    weight_err_file: float | None = None  # rel. L2 of the file's weight vs bf16
    weight_err_ptq: float | None = None  # same for ptq's own RTN quantization
    output_err_file: float | None = None
    output_err_ptq: float | None = None
    input_scale: float | None = None
    observed_amax: float | None = None
    ok: bool = True
    problems: list[str] = field(default_factory=list)


@dataclass
class VerifyReport:
    path: str
    convention: str
    expected_packing: str
    tolerance: float
    layers: list[LayerCheck] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    loads_into_diffusers: bool | None = None
    load_detail: str = ""

    @property
    def ok(self) -> bool:
        return (
            not self.problems
            and all(layer.ok for layer in self.layers)
            and self.loads_into_diffusers is not False
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ok"] = self.ok
        return d


def _strip_prefix(keys: list[str]) -> str:
    for p in KNOWN_PREFIXES:
        if sum(k.startswith(p) for k in keys) > len(keys) // 2:
            return p
    return ""


def _to_diffusers(key: str) -> str:
    try:
        return original_to_diffusers(key)
    except NameMapError:
        return key  # already diffusers-named (or unknown: reported by the strict load)


def _quant_format(weight: torch.Tensor) -> str | None:
    if weight.dtype == torch.uint8:
        return "nvfp4"
    if weight.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        return "fp8"
    return None


def _nvfp4_candidates(
    w: torch.Tensor, scales: torch.Tensor, ts: torch.Tensor, out: int, inp: int
) -> dict[str, torch.Tensor]:
    """Decodings of one NVFP4 weight under each (nibble order, scale layout) the shapes allow."""
    cands = {}
    layouts = {}
    if scales.shape == (out, inp // 16):
        layouts["row_major"] = scales
    tiled_numel = nvfp4_fmt.tiled_shape(out, inp // 16)
    if scales.numel() == tiled_numel[0] * tiled_numel[1]:
        layouts["tiled"] = reference_untile(scales, out, inp // 16)
    for layout, s in layouts.items():
        for order in ("high_first", "low_first"):
            cands[f"{order}/{layout}"] = reference_decode_nvfp4(
                w, s.view(torch.float8_e4m3fn), ts, high_first=order == "high_first"
            )
    return cands


def _canonical_state(
    fmt: str,
    w: torch.Tensor,
    scales: torch.Tensor,
    ts: torch.Tensor | None,
    input_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    packing: str,
    out: int,
    inp: int,
    pre_quant_scale: torch.Tensor | None = None,
) -> QuantizedLinearState:
    """The file's tensors converted to ptq's in-memory layout (for the simulated kernel)."""
    if fmt == "nvfp4":
        order, layout = packing.split("/")
        s = reference_untile(scales, out, inp // 16) if layout == "tiled" else scales
        packed = w
        if NibbleOrder(order) != CANONICAL_NIBBLE_ORDER:
            packed = nvfp4_fmt.pack_e2m1(nvfp4_fmt.unpack_e2m1(w, NibbleOrder(order)), CANONICAL_NIBBLE_ORDER)
        return QuantizedLinearState(
            "nvfp4",
            packed,
            s.view(torch.float8_e4m3fn).contiguous(),
            ts.float().reshape(()),
            input_scale,
            bias,
            inp,
            out,
            pre_quant_scale,
        )
    scale = scales.float()
    scale = scale.reshape(()) if scale.numel() == 1 else scale.reshape(-1, 1)
    return QuantizedLinearState("fp8", w.to(torch.float8_e4m3fn), scale, None, input_scale, bias, inp, out)


def capture_linear_inputs(
    model: torch.nn.Module, names: list[str], *, tokens: int = 256, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Inputs of the named Linears during one forward on seeded random latents/text (first ``tokens`` rows)."""
    cfg = model.config
    device = next(model.parameters()).device
    g = torch.Generator("cpu").manual_seed(seed)
    p = cfg.patch_size
    frames, h, w = 3, 4 * p[1], 4 * p[2]
    x = torch.randn(1, cfg.in_channels, frames, h, w, generator=g).to(device, model.dtype)
    text = torch.randn(1, 32, cfg.text_dim, generator=g).to(device, model.dtype)
    seq = frames * (h // p[1]) * (w // p[2])
    timestep = torch.full((1, seq), 500.0, device=device)
    captured: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    handles = []
    for n in names:

        def hook(_m: torch.nn.Module, args: tuple, _n: str = n) -> None:
            captured.setdefault(_n, args[0].detach().reshape(-1, args[0].shape[-1])[:tokens].clone())

        handles.append(modules[n].register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model(x, timestep, text)
    finally:
        for h_ in handles:
            h_.remove()
    return captured


def verify_file(
    path: str | Path,
    model_path: str | None,
    *,
    tolerance: float = 1.5,
    device: str = "cpu",
    check_load: bool = True,
) -> VerifyReport:
    """Verify ``path`` against the bf16 model at ``model_path`` (diffusers folder, hub id in the HF cache, or
    None for the packaged tiny model). Raises HeaderError for unreadable files."""
    from ptq.models.tiny_wan.adapter import TinyWanAdapter
    from ptq.models.wan import loading
    from ptq.tools.conventions import detect_convention

    header = read_header(path)
    conv = detect_convention(header.tensors, header.metadata)
    comfy = (
        "comfy" in conv.name.lower()
        or "_quantization_metadata" in header.metadata
        or any(k.endswith(".comfy_quant") for k in header.tensors)
    )
    expected = "high_first/tiled" if comfy else "low_first/row_major"
    report = VerifyReport(str(path), conv.name, expected, tolerance)

    root = TinyWanAdapter.resolve(model_path)
    model = loading.load_transformer(root, device=device)
    ref_state = model.state_dict()
    prefix = _strip_prefix(list(header.tensors))
    with safe_open(str(path), framework="pt") as f:
        raw = {k[len(prefix) :] if prefix and k.startswith(prefix) else k: f.get_tensor(k) for k in f.keys()}
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in raw.items():
        layer, _, suffix = key.rpartition(".")
        groups.setdefault(layer, {})[suffix] = t
    quant_layers = {
        layer: g for layer, g in groups.items() if "weight" in g and _quant_format(g["weight"]) is not None
    }
    if not quant_layers:
        report.problems.append("no quantized Linear found (no uint8/float8 weight)")
    names = {_to_diffusers(layer): layer for layer in quant_layers}
    missing = [n for n in names if not isinstance(dict(model.named_modules()).get(n), torch.nn.Linear)]
    if missing:
        report.problems.append(
            f"{len(missing)} quantized layers are not Linears of the model (first: {missing[0]})"
        )
    inputs = capture_linear_inputs(model, [n for n in names if n not in missing])
    dequant_state: dict[str, torch.Tensor] = {}
    for dname, layer in names.items():
        if dname in missing:
            continue
        g = quant_layers[layer]
        fmt = _quant_format(g["weight"])
        chk = LayerCheck(dname, fmt)
        w_ref = ref_state[f"{dname}.weight"].float()
        out, inp = w_ref.shape
        scale_key = next((s for s in SCALE_NAMES if s in g), None)
        if scale_key is None:
            chk.problems.append("no weight_scale (or scale_weight) tensor")
            chk.ok = False
            report.layers.append(chk)
            continue
        if scale_key == "scale_weight":
            chk.problems.append(
                "scale named `scale_weight` (Kijai FP8 naming): ComfyUI's quantized loader reads "
                "`weight_scale`"
            )
        input_scale = g.get("input_scale")
        input_scale = None if input_scale is None else input_scale.float().reshape(()).to(device)
        chk.input_scale = None if input_scale is None else float(input_scale)
        bias = g.get("bias")
        if fmt == "nvfp4":
            ts = g.get("weight_scale_2")
            if ts is None:
                chk.problems.append("no weight_scale_2 (NVFP4 global scale)")
                chk.ok = False
                report.layers.append(chk)
                continue
            cands = _nvfp4_candidates(g["weight"], g[scale_key], ts.float(), out, inp)
            errs = {k: rel_l2(w_ref, v) for k, v in cands.items()}
            best = min(errs, key=errs.get)
            chk.packing = best
            w_file = cands[best]
            if best != expected and errs[best] < 0.8 * errs.get(expected, float("inf")):
                order, layout = best.split("/")
                want_order, want_layout = expected.split("/")
                what = []
                if order != want_order:
                    what.append(f"nibble order is {order} but the loader reads {want_order}")
                if layout != want_layout:
                    what.append(f"block scales are {layout} but the loader reads {want_layout}")
                chk.problems.append(
                    "; ".join(what) + f" (weight error {errs[best]:.3f} as stored vs "
                    f"{errs.get(expected, float('nan')):.3f} as the loader will read it)"
                )
        else:
            w_file = g["weight"].float() * g[scale_key].float().reshape(
                -1, 1 if g[scale_key].numel() > 1 else 1
            )
            chk.packing = "per-tensor" if g[scale_key].numel() == 1 else "per-channel"
        pqs = g.get("pre_quant_scale")
        if pqs is not None and fmt != "nvfp4":
            chk.problems.append("pre_quant_scale on a non-nvfp4 layer: ComfyUI does not apply it")
            pqs = None
        if pqs is not None:  # the stored weight is W / pre_quant_scale (ComfyUI multiplies the input by it)
            pqs = pqs.to(device)
            w_file = w_file * pqs.float().reshape(1, -1)
        chk.weight_err_file = rel_l2(w_ref, w_file)
        qw = quantize_weight(
            w_ref,
            fmt,
            "max",
            WeightContext(name=dname, fp8_per_channel=g[scale_key].numel() > 1),
        )
        chk.weight_err_ptq = rel_l2(
            w_ref,
            QuantizedLinearState(
                fmt, qw.weight, qw.scale, qw.scale_2, None, None, inp, out
            ).dequantized_weight(),
        )
        x = inputs.get(dname)
        if x is not None:
            chk.observed_amax = float(x.float().abs().max())
            bias_t = None if bias is None else bias.to(device)
            ptq_state = QuantizedLinearState(
                fmt, qw.weight, qw.scale, qw.scale_2, input_scale, bias_t, inp, out
            )
            file_state = _canonical_state(
                fmt,
                g["weight"],
                g[scale_key],
                g.get("weight_scale_2"),
                input_scale,
                bias_t,
                chk.packing if fmt == "nvfp4" else "",
                out,
                inp,
                pqs,
            )
            y_ref = torch.nn.functional.linear(
                x, ref_state[f"{dname}.weight"], ref_state.get(f"{dname}.bias")
            )
            y_file = QuantLinear(file_state)(x)
            y_ptq = QuantLinear(ptq_state)(x)
            chk.output_err_file, chk.output_err_ptq = rel_l2(y_ref, y_file), rel_l2(y_ref, y_ptq)
            if chk.output_err_file > tolerance * chk.output_err_ptq + 1e-3:
                chk.problems.append(
                    f"Linear output error {chk.output_err_file:.4f} exceeds {tolerance}x ptq's "
                    f"simulation ({chk.output_err_ptq:.4f})"
                )
            if input_scale is not None:
                fmax = 6 * 448 if fmt == "nvfp4" else 448
                if chk.observed_amax > 16 * fmax * chk.input_scale:
                    chk.problems.append(
                        f"input_scale {chk.input_scale:.3g} clips activations: amax "
                        f"{chk.observed_amax:.3g} > 16x its range {fmax * chk.input_scale:.3g}"
                    )
        if fmt in ("nvfp4", "fp8") and input_scale is None and not _weight_only_marked(raw, layer):
            chk.problems.append(
                "no input_scale: W4A4/W8A8 kernels need a calibrated activation scale "
                "(ComfyUI falls back to dynamic NVFP4 / unit-scale FP8 activations)"
            )
        chk.ok = not chk.problems
        report.layers.append(chk)
        dequant_state[f"{dname}.weight"] = w_file.to(ref_state[f"{dname}.weight"].dtype)
        if bias is not None:
            dequant_state[f"{dname}.bias"] = bias
    if check_load:
        _check_diffusers_load(report, root, groups, quant_layers, dequant_state)
    return report


def _weight_only_marked(raw: dict[str, torch.Tensor], layer: str) -> bool:
    t = raw.get(f"{layer}.comfy_quant")
    if t is None:
        return False
    try:
        return bool(json.loads(bytes(t.tolist())).get("full_precision_matrix_mult"))
    except (ValueError, AttributeError):
        return False


_AUX = {
    "weight_scale",
    "weight_scale_2",
    "input_scale",
    "comfy_quant",
    "scale_weight",
    "scale_input",
    "pre_quant_scale",
}


def _check_diffusers_load(
    report: VerifyReport,
    root: Path,
    groups: dict[str, dict[str, torch.Tensor]],
    quant_layers: dict[str, dict[str, torch.Tensor]],
    dequant_state: dict[str, torch.Tensor],
) -> None:
    """Strict load of the dequantized, diffusers-named state into a meta-built WanTransformer3DModel."""
    from diffusers import WanTransformer3DModel

    state: dict[str, torch.Tensor] = {}
    for layer, g in groups.items():
        if layer in quant_layers:
            continue
        for suffix, t in g.items():
            if suffix in _AUX:
                continue
            state[_to_diffusers(f"{layer}.{suffix}")] = t
    fp16 = [k for k, t in state.items() if t.dtype == torch.float16]
    if fp16:
        report.problems.append(
            f"{len(fp16)} unquantized tensors are float16 (e.g. {fp16[0]}): WAN's unquantized "
            "tensors must be bf16 or float32 (fp16 overflows in the modulation/norm paths)"
        )
    state.update(dequant_state)
    config = WanTransformer3DModel.load_config(root / "transformer")
    with torch.device("meta"):
        model = WanTransformer3DModel.from_config(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shape_bad = [k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or shape_bad:
        report.loads_into_diffusers = False
        report.load_detail = (
            f"missing {len(missing)} {missing[:3]}, unexpected {len(unexpected)} {unexpected[:3]}, "
            f"shape mismatches {len(shape_bad)} {shape_bad[:3]}"
        )
        return
    model.load_state_dict(state, strict=True, assign=True)
    report.loads_into_diffusers = True
    report.load_detail = f"all {len(expected)} WanTransformer3DModel tensors loaded (strict)"
