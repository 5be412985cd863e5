"""The job's steps across processes (:mod:`ptq.pipeline.distributed`) and runs (checkpoints): sharded denoising,
the calibration session of a run (fingerprint, checkpoint to continue from), sharing the quantized layers.
Every function is the plain single-process step when the run is not distributed."""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ptq.algorithms.qlinear import QuantizedLinearState, QuantLinear
from ptq.algorithms.quantize import set_module
from ptq.algorithms.recipe import QuantRecipe
from ptq.algorithms.strategies import calibration_needs
from ptq.models.base import ModelAdapter
from ptq.pipeline.calib_run import (
    CalibrationSession,
    calibration_fingerprint,
    checkpoint_name,
    find_checkpoint,
)
from ptq.pipeline.distributed import DistContext, broadcast_object, broadcast_tensors, gather_objects
from ptq.pipeline.sampling import PromptSet, sample_prompts

log = logging.getLogger("ptq")


def sample_sharded(ctx: DistContext, adapter: ModelAdapter, ps: PromptSet, **kwargs: Any) -> list[dict[str, Any]]:
    """``sample_prompts`` over this rank's share of the prompts; rank 0 gets every prompt's result in prompt
    order (each prompt is denoised with its own seed, so the results do not depend on the split), the other
    ranks an empty list."""
    if not ctx.active:
        return sample_prompts(adapter, ps, **kwargs)
    mine = ctx.shard(range(len(ps)))
    kwargs["progress"] = kwargs.get("progress", False) and ctx.is_main
    results = sample_prompts(adapter, ps, indices=mine, **kwargs) if mine else []
    gathered = gather_objects(ctx, list(zip(mine, results)))
    if not ctx.is_main:
        return []
    assert gathered is not None
    by_prompt = dict(item for part in gathered for item in part)
    return [by_prompt[i] for i in range(len(ps))]


def calibration_session(ctx: DistContext, adapter: ModelAdapter, recipe: QuantRecipe, ps: PromptSet, calib: Any,
                        out_dir: Path, *, resume: bool | None, settings: dict[str, Any], part: str | None = None
                        ) -> CalibrationSession:
    """The session of this run's calibration (or of its pass ``part``, for models calibrated expert by expert):
    its fingerprint (model, targets, prompts and specs, what the first calibration pass collects for the recipe
    (:func:`~ptq.algorithms.strategies.calibration_needs`, ``calib.samples_per_call`` applied), ``calib`` settings
    and the given ``settings``), the checkpoint in ``out_dir`` and the one to continue from
    (:func:`~ptq.pipeline.calib_run.find_checkpoint`, decided on rank 0)."""
    payload = {"adapter": adapter.name, "model": str(adapter.root.resolve()), "weights": adapter.fingerprint(),
               "targets": sorted(adapter.targets()),
               "prompts": ps.prompts, "specs": [asdict(s) for s in ps.specs],
               "needs": asdict(calibration_needs(recipe, calib.samples_per_call)),
               "format": recipe.format, "layers": asdict(recipe.layers), "seed": calib.seed,
               "negative_prompt": calib.negative_prompt, "images": list(calib.images), **settings}
    fingerprint = calibration_fingerprint(payload)
    resume_from = None
    if ctx.is_main:
        resume_from = find_checkpoint(out_dir, fingerprint, resume, checkpoint_name(part))
    resume_from = broadcast_object(ctx, None if resume_from is None else str(resume_from))
    every = calib.checkpoint_every
    return CalibrationSession(dist=ctx, checkpoint=out_dir / checkpoint_name(part) if every > 0 else None,
                              resume_from=None if resume_from is None else Path(resume_from), fingerprint=fingerprint,
                              every=every, hessian_storage=calib.hessian_storage)


_STATE_TENSORS = ("weight", "weight_scale", "weight_scale_2", "input_scale", "bias", "pre_quant_scale")


def share_quantized(ctx: DistContext, adapter: ModelAdapter) -> None:
    """Rank 0's quantized layers (every ``QuantLinear`` of every target) put in place on the other ranks, bit for
    bit, so that each can evaluate its share of the prompts."""
    if not ctx.active:
        return
    for name, target in adapter.targets().items():
        module = target.module
        device = next(module.parameters()).device
        meta = tensors = None
        if ctx.is_main:
            states = {n: m.state() for n, m in module.named_modules() if isinstance(m, QuantLinear)}
            meta = {n: (st.format, st.in_features, st.out_features, st.dynamic_activations) for n, st in states.items()}
            tensors = {f"{n}|{f}": getattr(st, f) for n, st in states.items() for f in _STATE_TENSORS
                       if getattr(st, f) is not None}
        meta = broadcast_object(ctx, meta)
        received = broadcast_tensors(ctx, tensors, device)
        if ctx.is_main:
            continue
        for layer, (fmt, fin, fout, dynamic) in meta.items():
            parts = {f: received.get(f"{layer}|{f}") for f in _STATE_TENSORS}
            old = module.get_submodule(layer)
            dtype = old.weight.dtype if isinstance(old, torch.nn.Linear) else torch.bfloat16
            state = QuantizedLinearState(fmt, parts["weight"], parts["weight_scale"], parts["weight_scale_2"],
                                         parts["input_scale"], parts["bias"], fin, fout, dynamic,
                                         parts["pre_quant_scale"])
            set_module(module, layer, QuantLinear(state, compute_dtype=dtype))
        log.info("%s: %d quantized layers received from rank 0", name, len(meta))


__all__ = ["calibration_session", "sample_sharded", "share_quantized"]
