"""``ptq inspect``'s checks of a checkpoint that hold for every loader: names (mixed namings, prefixes), the dtype of
unquantized tensors, sensitive layers quantized, NaN / Inf / zero values, and the closing notes. One registered
function per problem code (:func:`ptq.targets.inspection.register_check`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ptq.targets.file_layout import FLOAT_DTYPES, PER_TENSOR_SCALE_SUFFIXES
from ptq.targets.inspection import FileView, register_check
from ptq.targets.safetensors_header import TensorInfo

# ----------------------------------------------------------------------------------------------------- names


@register_check("mixed_naming", order=32)
def check_mixed_naming(view: FileView) -> None:
    naming = view.naming
    if naming.style != "mixed":
        return
    view.problem(
        "mixed_naming", "error", naming.examples.get("diffusers", [])[:2] + naming.examples.get("original", [])[:2],
        f"the file mixes diffusers names ({naming.diffusers_keys} keys, e.g. blocks.N.attn1.to_q) and original "
        f"Wan names ({naming.original_keys} keys, e.g. blocks.N.self_attn.q). Any loader expects one of them: "
        "the other keys are 'unexpected' and their layers stay uninitialised (noise).",
        "rename every key to original Wan names for ComfyUI (pure rename: table in shared/README.md)")


@register_check("mixed_prefix", order=34)
def check_mixed_prefix(view: FileView) -> None:
    naming = view.naming
    if not (naming.prefix and naming.unprefixed_keys):
        return
    bare = [k for k in view.tensors if not k.startswith(naming.prefix)]
    view.problem(
        "mixed_prefix", "warning", bare,
        f"{naming.prefixed_keys} keys start with {naming.prefix!r} and {naming.unprefixed_keys} do not; "
        "ComfyUI strips the prefix only from keys that have it (and drops the others when loading a "
        "diffusion model from a full checkpoint).",
        "use the same prefix on every key - preferably none (models/diffusion_models convention)")


# -------------------------------------------------------------------------------------- unquantized tensors


@register_check("float16_base_tensors", order=60)
def check_float16_base(view: FileView) -> None:
    f16: list[str] = []
    others = 0
    for group in view.groups.values():
        for s, info in group.items():
            if s in PER_TENSOR_SCALE_SUFFIXES or s in ("weight_scale", "scale_weight") or s.endswith("_amax"):
                continue
            if info.dtype == "F16":
                f16.append(info.name)
            elif info.dtype in ("BF16", "F32"):
                others += 1
    if not f16:
        return
    if not any(li.quantized for li in view.layers) and not others:
        view.notes.append("all tensors are float16: ComfyUI may run WAN in fp16 (risk of activation overflow); bf16 "
                          "is the reference dtype")
        return
    view.problem(
        "float16_base_tensors", "warning", f16,
        f"{len(f16)} unquantized tensors (biases, norms, modulation, embeddings, high-precision layers) are "
        "float16. WAN is trained and run in bf16 (diffusers keeps time_embedder, scale_shift_table and norm2 in "
        "fp32); ComfyUI picks its compute dtype from the stored weights, so an fp16 base can make it run in "
        "fp16, where WAN activations overflow (inf/NaN -> black or noisy frames); any source value above 65504 "
        "became inf in the conversion (checked below when values are read).",
        "write unquantized tensors as bfloat16 (float32 for time_embedding.*, *.modulation / scale_shift_table "
        "and blocks.N.norm3), converted from the original bf16/fp32 weights")


@register_check("sensitive_layer_quantized", order=70)
def check_sensitive(view: FileView) -> None:
    """Quantized embeddings / output head (small layers that dominate the error). Quantized first or last blocks
    are ptq's default and usually fine (calibrated; the report measures them), so they are not a problem."""
    hits: list[str] = []
    kinds: set[str] = set()
    for li in view.layers:
        kind = view.family.sensitive_layer_kind(li.canonical, view.arch) if li.quantized else None
        if kind and kind not in ("first block", "last block"):
            hits.append(li.name)
            kinds.add(kind)
    if hits:
        view.problem(
            "sensitive_layer_quantized", "warning", hits,
            f"quantized layers that are usually kept in bf16 ({', '.join(sorted(kinds))}): they are small, see "
            "every token / the timestep signal, and dominate the quantization error.",
            "keep patch_embedding, text/time embeddings, time_projection and head.head in bf16 unless verify "
            "shows the loss is acceptable (ptq keeps patch_embedding, condition_embedder.* and proj_out by "
            "default: quant.layers.exclude)")


# ---------------------------------------------------------------------------------------------------- values


@dataclass
class ValueSurvey:
    """NaN / Inf / non-positive scales, all-zero block scales, NaN / Inf in small unquantized tensors."""

    nonfinite: list[str] = field(default_factory=list)
    nonpos: list[str] = field(default_factory=list)
    zero_blocks: list[str] = field(default_factory=list)
    bad_base: list[str] = field(default_factory=list)
    nf_detail: list[str] = field(default_factory=list)
    np_detail: list[str] = field(default_factory=list)
    skipped: int = 0


def _value_items(view: FileView) -> tuple[list[tuple[str, TensorInfo]], list[tuple[str, TensorInfo]]]:
    """(per-tensor and weight scales, small unquantized float tensors) whose values are checked."""
    scales: list[tuple[str, TensorInfo]] = []
    small: list[tuple[str, TensorInfo]] = []
    for layer, group in view.groups.items():
        for s, info in group.items():
            if info.dtype not in FLOAT_DTYPES:
                continue
            if s in PER_TENSOR_SCALE_SUFFIXES or s in ("weight_scale", "scale_weight"):
                if info.numel <= 65536 and not (s == "scale_input" and info.numel == 1):
                    scales.append((layer, info))
            elif not s.endswith("_amax") and info.nbytes <= (1 << 20):
                small.append((layer, info))
    return scales, small


def _scan_block_scales(view: FileView, sv: ValueSurvey) -> None:
    """NVFP4 block scales, scanned as float8_e4m3fn bytes: NaN = 0x7F / 0xFF, sign bit 0x80 (0x80 = -0)."""
    for li in view.layers:
        if li.format != "nvfp4":
            continue
        group = view.groups[li.name]
        block = group.get("weight_scale") or group.get("scale_weight")
        if block is None or block.dtype not in ("F8_E4M3", "U8") or len(block.shape) != 2:
            continue
        data = view.load_bytes(block)
        if data is None:
            sv.skipped += 1
            continue
        a = np.frombuffer(data, dtype=np.uint8)
        top = int(a.max()) if a.size else 0
        if top == 0:
            sv.zero_blocks.append(li.name)
            continue
        if top < 0x7F:  # fast path: all positive and finite (E4M3 448 = 0x7E)
            continue
        mag = a & 0x7F
        nan = mag == 0x7F
        if nan.any():
            sv.nonfinite.append(li.name)
            sv.nf_detail.append(f"{block.name}: {int(nan.sum())} NaN block scales")
        elif ((a > 0x80) & ~nan).any():
            sv.nonpos.append(li.name)
            sv.np_detail.append(f"{block.name}: negative block scales")
        elif a.size and not mag.any():
            sv.zero_blocks.append(li.name)


def value_survey(view: FileView) -> ValueSurvey:
    """The :class:`ValueSurvey` of ``view`` (computed once, in this order: per-tensor scales, NVFP4 block
    scales, small float tensors)."""
    if "values" not in view.cache:
        sv = ValueSurvey()
        scales, small = _value_items(view)
        bad_nf, bad_np, sv.skipped = view.batch_float_check(scales)
        for i in bad_nf:
            sv.nonfinite.append(scales[i][0])
            sv.nf_detail.append(f"{scales[i][1].name} is NaN/Inf")
        for i in sorted(set(bad_np) - set(bad_nf)):
            sv.nonpos.append(scales[i][0])
            sv.np_detail.append(f"{scales[i][1].name} <= 0")
        _scan_block_scales(view, sv)
        bad_nf, _, skipped = view.batch_float_check(small, positive=False)
        sv.skipped += skipped
        sv.bad_base = [small[i][1].name for i in bad_nf]
        view.cache["values"] = sv
    return view.cache["values"]


def _values_read(view: FileView) -> bool:
    return view.read_bytes is not None


@register_check("nonfinite_scale", order=90)
def check_nonfinite_scale(view: FileView) -> None:
    if not _values_read(view) or not (sv := value_survey(view)).nonfinite:
        return
    view.problem(
        "nonfinite_scale", "error", sv.nonfinite,
        f"NaN/Inf in scale tensors ({'; '.join(sv.nf_detail[:2])}); every output of these layers becomes NaN "
        "(black frames). Typical cause: an unclamped float8 cast (E4M3 has no Inf; overflow gives NaN).",
        "clamp to +-448 before casting block scales to float8_e4m3fn; recompute the scales from amax")


@register_check("nonpositive_scale", order=90.1)
def check_nonpositive_scale(view: FileView) -> None:
    if not _values_read(view) or not (sv := value_survey(view)).nonpos:
        return
    view.problem(
        "nonpositive_scale", "error", sv.nonpos,
        f"zero or negative scales ({'; '.join(sv.np_detail[:2])}): a "
        "zero per-tensor scale zeroes the layer (or divides by zero for input_scale), a negative one flips signs.",
        "scales are amax-based and must be > 0: use max(amax, tiny)/(6*448) (NVFP4) or /448 (FP8)")


@register_check("zero_block_scales", order=90.2)
def check_zero_block_scales(view: FileView) -> None:
    if not _values_read(view) or not (sv := value_survey(view)).zero_blocks:
        return
    view.problem(
        "zero_block_scales", "error", sv.zero_blocks,
        "every block scale of these layers is 0, so the weight dequantizes to all zeros.",
        "recompute block scales = block_amax / (6 * weight_scale_2), clamped to 448, in float8_e4m3fn")


@register_check("nonfinite_values", order=90.3)
def check_nonfinite_values(view: FileView) -> None:
    if not _values_read(view) or not (sv := value_survey(view)).bad_base:
        return
    view.problem(
        "nonfinite_values", "error", sv.bad_base,
        "NaN/Inf in unquantized tensors (biases, norms, modulation) - e.g. a bf16/fp32 -> fp16 conversion "
        "that overflowed; the model outputs NaN.",
        "re-export these tensors from the original bf16/fp32 weights")


@register_check("note:values_skipped", order=90.4)
def note_values_skipped(view: FileView) -> None:
    if _values_read(view) and (skipped := value_survey(view).skipped):
        view.notes.append(f"value checks skipped {skipped} tensors (value byte budget "
                          f"{view.value_budget / 2**20:.0f} MiB reached or tensor unreadable)")


# ----------------------------------------------------------------------------------------------------- notes


@register_check("note:header_limits", order=100)
def note_header_limits(view: FileView) -> None:
    """What the header cannot tell (nibble order), blocks missing from the numbering, other conventions seen."""
    if any(li.format == "nvfp4" for li in view.layers):
        view.notes.insert(0, "nibble order: not checkable from the header (both orders have identical shapes and "
                             "per-block code sets); run `ptq verify FILE --model ...`")
    if view.arch.missing_blocks:
        view.notes.append(f"blocks missing from the numbering: {view.arch.missing_blocks[:10]}")
    if view.convention.also_seen:
        view.notes.append(f"evidence of other conventions too: {', '.join(view.convention.also_seen)}")
