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

int8 (ComfyUI ``int8_tensorwise``, with or without ConvRot) and MXFP8 layers are recognised from their
``comfy_quant`` / ``_quantization_metadata`` entry (else from dtypes: int8 weights; float8 weights with E8M0 block
scales) and decoded in ComfyUI's layout; their activations are scaled at run time, so they have no input_scale.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ptq.algorithms.methods import quantize_weight
from ptq.algorithms.qlinear import CANONICAL_NIBBLE_ORDER, QuantizedLinearState, QuantLinear
from ptq.algorithms.weight_quant import WeightContext
from ptq.eval.metrics import rel_l2
from ptq.formats import INT8_CONVROT, get_format
from ptq.formats import nvfp4 as nvfp4_fmt
from ptq.formats.nvfp4 import NibbleOrder
from ptq.models.wan.names import NameMapError, original_to_diffusers
from ptq.targets.comfyui.target import ComfyUITarget
from ptq.targets.decoders import reference_decode_nvfp4, reference_untile
from ptq.targets.safetensors_header import read_header

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
    if weight.dtype == torch.int8:
        return "int8"
    return None


#: Formats decoded by :func:`file_layer_state` (activation scales computed at run time: no input_scale).
DYNAMIC_FORMATS = ("int8", "int8_convrot", "mxfp8")


def _layer_conf(raw: dict[str, torch.Tensor], layer: str, header_layers: dict[str, Any]) -> dict[str, Any]:
    """The layer's ComfyUI JSON (``comfy_quant`` tensor, else the header ``_quantization_metadata``), or {}."""
    t = raw.get(f"{layer}.comfy_quant")
    if t is not None:
        try:
            conf = json.loads(bytes(t.tolist()))
            return conf if isinstance(conf, dict) else {}
        except (ValueError, AttributeError):
            return {}
    conf = header_layers.get(layer, {})
    return conf if isinstance(conf, dict) else {}


def _layer_format(g: dict[str, torch.Tensor], conf: dict[str, Any]) -> str | None:
    """ptq's format name of a file layer: from its ComfyUI JSON when present, else from dtypes and shapes."""
    name = conf.get("format")
    if name == "int8_tensorwise":
        return "int8_convrot" if conf.get("convrot") else "int8"
    if name == "mxfp8":
        return "mxfp8"
    fmt = _quant_format(g["weight"])
    scale = g.get("weight_scale")
    if fmt == "fp8" and scale is not None and (scale.dtype == torch.float8_e8m0fnu or (
            scale.dtype == torch.uint8 and scale.dim() == 2)):
        return "mxfp8"
    return fmt


def file_layer_state(g: dict[str, torch.Tensor], conf: dict[str, Any], inp: int, out: int,
                     bias: torch.Tensor | None = None) -> QuantizedLinearState:
    """A ComfyUI-layout layer of a dynamic-activation format (``g``: suffix -> tensor) in ptq's in-memory layout:
    int8 / int8_convrot codes with their float32 scale, MXFP8 codes with untiled uint8 E8M0 scales; weight-only as
    ComfyUI runs it (MXFP8 with ``full_precision_matrix_mult``; int8 never: ComfyUI ignores the flag for int8)."""
    fmt = _layer_format(g, conf)
    # ComfyUI dequantizes weight-only MXFP8 layers, but runs int8_tensorwise as W8A8 whatever the flag says
    weight_only = bool(conf.get("full_precision_matrix_mult")) and fmt == "mxfp8"
    if fmt == "mxfp8":
        codes = reference_untile(g["weight_scale"].view(torch.uint8), out, inp // 32).contiguous()
        return QuantizedLinearState("mxfp8", g["weight"], codes, None, None, bias, inp, out, not weight_only)
    if fmt in ("int8", "int8_convrot"):
        scale = g["weight_scale"].float()
        scale = scale.reshape(()) if scale.numel() == 1 else scale.reshape(-1, 1)
        return QuantizedLinearState(fmt, g["weight"], scale, None, None, bias, inp, out, not weight_only)
    raise ValueError(f"file_layer_state: format {fmt!r} is not one of {DYNAMIC_FORMATS}")


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
            pre_quant_scale=pre_quant_scale,
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
    # an image-conditioned model (WAN 2.1 I2V) splits its context into image tokens + 512 text tokens
    text = torch.randn(1, 512 if cfg.image_dim else 32, cfg.text_dim, generator=g).to(device, model.dtype)
    extra = {} if not cfg.image_dim else {
        "encoder_hidden_states_image": torch.randn(1, 257, cfg.image_dim, generator=g).to(device, model.dtype)}
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
            model(x, timestep, text, **extra)
    finally:
        for h_ in handles:
            h_.remove()
    return captured


def model_component(path: str | Path, metadata: dict[str, str], root: Path, component: str | None) -> str:
    """Which component of the model folder a file holds: ``component`` if given, else the file's ``ptq_component``
    header entry, else ``transformer_2`` for a ``*low_noise*`` file of a two-expert folder, else ``transformer``."""
    from ptq.models.base import ModelLoadError

    if component:
        chosen = component
    elif metadata.get("ptq_component"):
        chosen = metadata["ptq_component"]
    elif "low_noise" in Path(path).name and (root / "transformer_2").is_dir():
        chosen = "transformer_2"
    else:
        chosen = "transformer"
    if not (root / chosen / "config.json").is_file():
        raise ModelLoadError(f"--model: {root} has no {chosen}/config.json (the component {Path(path).name} holds; "
                             "--component names another)")
    return chosen


def _cache_dir() -> Path:
    import os

    return Path(os.environ.get("PTQ_CACHE_DIR", ".ptq_cache"))


def transformer_folder(model_path: str | os.PathLike[str] | None, *, file: str | Path = "",
                       metadata: dict[str, str] | None = None, component: str | None = None) -> Path:
    """The transformer folder of ``--model``: a diffusers model folder (its ``transformer/``, or the component the
    file holds, see :func:`model_component`), the transformer folder itself (``config.json`` + weights), a hub id in
    the HF cache, None for the packaged tiny model, ``tiny_wan_moe`` for the packaged two-expert one."""
    from ptq.models.base import ModelLoadError
    from ptq.models.tiny_wan.model import TINY_WAN_PATH
    from ptq.models.tiny_wan.moe_adapter import TinyWanMoEAdapter
    from ptq.models.wan import loading

    if model_path in ("tiny_moe", "tiny_wan_moe"):
        root = TinyWanMoEAdapter.resolve(model_path)
    else:
        root = TINY_WAN_PATH if model_path is None else loading.resolve_model_path(model_path, key="--model")
    if (root / "transformer" / "config.json").is_file():
        return root / model_component(file, metadata or {}, root, component)
    if (root / "config.json").is_file():
        return root
    raise ModelLoadError(f"--model={str(model_path)!r} ({root}) has neither transformer/config.json nor config.json: "
                         "pass the diffusers model folder or its transformer folder")


def verify_file(
    path: str | Path,
    model_path: str | None,
    *,
    tolerance: float = 1.5,
    device: str = "cpu",
    check_load: bool = True,
    component: str | None = None,
) -> VerifyReport:
    """Verify ``path`` against the bf16 model at ``model_path`` (diffusers folder, hub id in the HF cache, or
    None for the packaged tiny model); ``component``: the folder's transformer the file holds (default: from the
    file, see :func:`model_component`). Raises HeaderError for unreadable files."""
    from diffusers import WanTransformer3DModel

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

    tdir = transformer_folder(model_path, file=path, metadata=header.metadata, component=component)
    recorded = header.metadata.get("ptq_source_sha256")
    if recorded:
        actual = loading.transformer_content_hash(tdir.parent, _cache_dir(), component=tdir.name)
        if actual != recorded:
            source = header.metadata.get("ptq_source_model", "?")
            report.problems.append(
                f"wrong model: the file was made from {source!r} (transformer sha256 {recorded[:12]}), --model "
                f"{str(model_path) if model_path else 'tiny_wan'} has sha256 {actual[:12]}; pass the bf16 model the "
                "file was quantized from")
            return report
    model = WanTransformer3DModel.from_pretrained(tdir, torch_dtype=torch.bfloat16).to(device).eval()
    model.requires_grad_(False)
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
    header_layers = _header_layers(header.metadata)
    dequant_state: dict[str, torch.Tensor] = {}
    for dname, layer in names.items():
        if dname in missing:
            continue
        g = quant_layers[layer]
        conf = _layer_conf(raw, layer, header_layers)
        fmt = _layer_format(g, conf)
        w_ref = ref_state[f"{dname}.weight"].float()
        if fmt in DYNAMIC_FORMATS:
            chk, w_file = _check_dynamic_layer(dname, layer, g, conf, w_ref, ref_state, inputs.get(dname),
                                               tolerance, device)
            report.layers.append(chk)
            if w_file is not None:
                dequant_state[f"{dname}.weight"] = w_file.to(ref_state[f"{dname}.weight"].dtype)
                if "bias" in g:
                    dequant_state[f"{dname}.bias"] = g["bias"]
            continue
        chk = LayerCheck(dname, fmt)
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
        _check_diffusers_load(report, tdir, groups, quant_layers, dequant_state)
    return report


def _header_layers(metadata: dict[str, str]) -> dict[str, Any]:
    try:
        layers = json.loads(metadata.get("_quantization_metadata", "{}")).get("layers", {})
    except (ValueError, AttributeError):
        return {}
    return layers if isinstance(layers, dict) else {}


def _check_dynamic_layer(dname: str, layer: str, g: dict[str, torch.Tensor], conf: dict[str, Any],
                         w_ref: torch.Tensor, ref_state: dict[str, torch.Tensor], x: torch.Tensor | None,
                         tolerance: float, device: str) -> tuple[LayerCheck, torch.Tensor | None]:
    """int8 / int8_convrot / mxfp8 (ComfyUI layout): decode with the exporter's reference reader, compare the weight
    error with ptq's round-to-nearest and the layer output of ComfyUI's runtime kernel (dynamic activation scales)
    with ptq's own simulation."""
    fmt = _layer_format(g, conf)
    assert fmt is not None
    chk = LayerCheck(dname, fmt)
    out, inp = w_ref.shape
    if "weight_scale" not in g:
        chk.problems.append("no weight_scale tensor")
        chk.ok = False
        return chk, None
    if fmt == "int8_convrot" and int(conf.get("convrot_groupsize", 256)) != INT8_CONVROT.group_size:
        chk.problems.append(f"convrot_groupsize {conf.get('convrot_groupsize')}: ptq simulates ConvRot groups of "
                            f"{INT8_CONVROT.group_size} only")
        chk.ok = False
        return chk, None
    bias = g.get("bias")
    bias_t = None if bias is None else bias.to(device)
    try:
        state = file_layer_state(g, conf, inp, out, bias_t)
        w_file, _ = ComfyUITarget.readers[fmt](lambda k: g[k.rpartition(".")[2]], layer, state)
    except (RuntimeError, ValueError, KeyError) as exc:
        chk.problems.append(f"cannot be decoded as {fmt} ({type(exc).__name__}: {exc})")
        chk.ok = False
        return chk, None
    per_row = state.weight_scale.numel() > 1
    chk.packing = "per-channel" if per_row else "per-tensor"
    if fmt == "mxfp8":
        chk.packing = "e8m0/tiled"
    chk.weight_err_file = rel_l2(w_ref, w_file)
    qw = get_format(fmt).quantize_weight(w_ref, f"{dname}.weight", per_channel=per_row)
    ptq_state = QuantizedLinearState(fmt, qw.weight, qw.scale, qw.scale_2, None, bias_t, inp, out,
                                     state.dynamic_activations)
    chk.weight_err_ptq = rel_l2(w_ref, ptq_state.dequantized_weight())
    if x is not None:
        chk.observed_amax = float(x.float().abs().max())
        y_ref = torch.nn.functional.linear(x, ref_state[f"{dname}.weight"], ref_state.get(f"{dname}.bias"))
        chk.output_err_file = rel_l2(y_ref, QuantLinear(state.to(device))(x))
        chk.output_err_ptq = rel_l2(y_ref, QuantLinear(ptq_state)(x))
        if chk.output_err_file > tolerance * chk.output_err_ptq + 1e-3:
            chk.problems.append(f"Linear output error {chk.output_err_file:.4f} exceeds {tolerance}x ptq's "
                                f"simulation ({chk.output_err_ptq:.4f})")
    chk.ok = not chk.problems
    return chk, w_file


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
    """Strict load of the dequantized, diffusers-named state into a meta-built WanTransformer3DModel (``root``: the
    component's folder)."""
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
    config = WanTransformer3DModel.load_config(root)
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
