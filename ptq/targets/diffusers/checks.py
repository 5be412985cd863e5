"""``ptq inspect --target modelopt`` (or ``diffusers``): the checks of what ModelOpt-style loaders read (diffusers'
BFL quantizer, TensorRT Model Optimizer): row-major NVFP4 block scales, no ComfyUI metadata needed."""

from __future__ import annotations

from ptq.targets.comfyui.checks import scale_survey
from ptq.targets.inspection import FileView, register_check


@register_check("block_scale_layout", order=43, loaders=("modelopt",))
def check_block_scale_layout(view: FileView) -> None:
    tiled = scale_survey(view).tiled
    if tiled:
        view.problem(
            "block_scale_layout", "error", tiled,
            f"block scales have the padded cuBLAS tiled shape, but {view.convention.label} loaders read row-major "
            "[out, in/16] block scales.",
            "convert with comfy-kitchen's from_blocked(scales, rows, cols) to row-major before saving")


@register_check("note:judged_loader", order=100.5, loaders=("modelopt",))
def note_judged_loader(view: FileView) -> None:
    view.notes.append("problems are judged against ModelOpt-style loaders (diffusers' BFL quantizer, "
                      "TensorRT Model Optimizer): row-major block scales, no ComfyUI metadata needed")
