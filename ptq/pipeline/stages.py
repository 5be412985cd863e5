"""The stages of a quantization job, as plain functions over a model adapter: encode prompts, bf16 baseline (cached),
calibrate, quantize, evaluate, export (+ verify) and report. ``ptq run`` chains them (:mod:`ptq.pipeline.job`);
benchmarks call them one by one.

Everything per quantized module is keyed by the adapter's target name (``"transformer"``, or one expert's name).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ptq.algorithms.layers import LayerPlanner
from ptq.algorithms.mixed_precision import analyse_and_plan
from ptq.algorithms.quantize import LayerRecord
from ptq.algorithms.recipe import KEEP, QuantRecipe
from ptq.algorithms.strategies import calibration_needs, strategy_for
from ptq.calibration.needs import CalibrationNeeds
from ptq.calibration.observers import LinearInputObserver, LinearInputStats
from ptq.calibration.recorder import ForwardInputRecorder
from ptq.models.base import ModelAdapter
from ptq.pipeline.calib_run import CalibrationSession, run_session
from ptq.pipeline.checks import JobError
from ptq.pipeline.distributed import DistContext, broadcast_object
from ptq.pipeline.parallel import sample_sharded
from ptq.pipeline.sampling import PromptSet, sample_prompts
from ptq.targets import TARGETS, ExportResult, export_model

log = logging.getLogger("ptq")

# ---------------------------------------------------------------------------------------------------------------
# encode
# ---------------------------------------------------------------------------------------------------------------


def encode(adapter: ModelAdapter, prompts: list[str], negative: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(embeddings of ``prompts``, embedding of the negative prompt) with the adapter's text encoder."""
    return adapter.encode_prompts(prompts), adapter.encode_prompts([negative])


# ---------------------------------------------------------------------------------------------------------------
# bf16 baseline, cached on disk
# ---------------------------------------------------------------------------------------------------------------


def baseline_cache_file(cache_dir: str | os.PathLike[str], payload: dict[str, Any], prefix: str = "baseline") -> Path:
    """The cache file of the bf16 reference outputs identified by ``payload`` (model, settings, prompts, ...);
    ``prefix`` names other cached references (e.g. the unquantized model in another compute dtype)."""
    key = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]
    return Path(cache_dir).expanduser() / f"{prefix}_{key}.pt"


def baseline_payload(adapter: ModelAdapter, ps: PromptSet, **settings: Any) -> dict[str, Any]:
    """What the bf16 reference outputs depend on: the model (path, weights fingerprint), prompts, specs and the
    given settings (dtype, device type, ...)."""
    return {"adapter": adapter.name, "model": str(adapter.root.resolve()), "fingerprint": adapter.fingerprint(),
            "prompts": ps.prompts, "specs": [asdict(s) for s in ps.specs], "version": 2, **settings}


def _load_baseline_cache(cache_file: Path) -> list[dict[str, Any]] | None:
    """The cached reference outputs, or None (with a warning) when the file cannot be read."""
    try:
        return torch.load(cache_file, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - e.g. truncated by something other than ptq: recompute
        log.warning("bf16 baseline cache %s is unreadable (%s): recomputing", cache_file, exc)
        return None


def bf16_baseline(adapter: ModelAdapter, ps: PromptSet, cache_file: Path | None, *, progress: bool,
                  cuda_graphs: bool, dist: DistContext | None = None, desc: str = "baseline (bf16)"
                  ) -> tuple[list[dict[str, Any]], bool]:
    """(reference outputs of the unquantized model, whether they came from the cache). Written atomically (temp
    file + rename), so an interrupted run never leaves a cache entry a later run would trust; an unreadable entry
    is recomputed. ``dist``: prompts shared between processes, rank 0 reads / writes the cache and gets every
    result (the other ranks an empty list). ``desc``: the progress bar's and log's name of the run."""
    ctx = dist or DistContext()
    results = None
    if ctx.is_main and cache_file is not None and cache_file.is_file():
        log.info("%s: cached %s", desc, cache_file)
        results = _load_baseline_cache(cache_file)
    if broadcast_object(ctx, results is not None):
        return results or [], True
    results = sample_sharded(ctx, adapter, ps, desc=desc, progress=progress, keep_steps=True,
                             cuda_graphs=cuda_graphs)
    if cache_file is not None and ctx.is_main:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_name(f".{cache_file.name}.{os.getpid()}.tmp")
        try:
            torch.save(results, tmp)
            os.replace(tmp, cache_file)
        finally:
            if tmp.exists():
                tmp.unlink()
    return results, False


# ---------------------------------------------------------------------------------------------------------------
# calibrate
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Calibration:
    """What calibration collected, per target: ``stats[target][layer]``, ``hessians[target][layer]`` (one-pass
    GPTQ), ``inputs[target]`` (recorded forwards for the sensitivity analysis). ``rerun(target, observer)`` runs
    the calibration forwards again with ``observer`` attached (strategies with ``rerun``: sequential or
    activation-aware GPTQ passes)."""

    needs: CalibrationNeeds
    stats: dict[str, dict[str, LinearInputStats]] = field(default_factory=dict)
    hessians: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    inputs: dict[str, list[tuple[tuple, dict]]] = field(default_factory=dict)
    rerun: Callable[[str, LinearInputObserver], None] | None = None


def rows_per_call(rows: int, ps: PromptSet) -> int:
    """Input rows to keep per Linear call so that about ``rows`` are kept over the calibration forwards of ``ps``
    (one per step and prompt, two with classifier-free guidance); 0 for 0."""
    if rows <= 0:
        return 0
    calls = sum(s.num_steps * (2 if s.guidance_scale > 1.0 else 1) for s in ps.specs)
    return max(1, -(-rows // max(calls, 1)))


def calibrate(adapter: ModelAdapter, recipe: QuantRecipe, ps: PromptSet, *, samples_per_call: int = 0, seed: int,
              progress: bool, cuda_graphs: bool, needs: CalibrationNeeds | None = None,
              session: CalibrationSession | None = None) -> Calibration:
    """Run the calibration prompts through the unquantized model with observers on the Linears the recipe
    quantizes, collecting what the recipe needs (nothing at all for weight-only round-to-nearest); ``needs``
    overrides that (e.g. one calibration serving several recipes); ``samples_per_call`` > 0 the number of |x|
    samples per call. ``session``: prompt by prompt, sharded over processes, checkpointed and resumable
    (``ptq.pipeline.calib_run``); only its rank 0 gets the statistics."""
    needs = (calibration_needs(recipe) if needs is None else needs).with_samples_per_call(samples_per_call)
    cal = Calibration(needs)

    def run(observers: dict[str, LinearInputObserver], recorders: dict[str, ForwardInputRecorder]) -> None:
        # CUDA graphs capture the observers' kernels; host-side sampling, Hessians and recorded inputs run eagerly
        graphs = cuda_graphs and all(o.graph_safe for o in observers.values()) and not recorders

        def step(i: int) -> None:
            for o in observers.values():
                o.step = i

        sample_prompts(adapter, ps, desc="calibrate", progress=progress, keep_steps=False, on_step_start=step,
                       cuda_graphs=graphs)

    cal.rerun = lambda target, observer: run({target: observer}, {})
    if not needs.any:
        return cal
    targets = adapter.targets()
    observers, recorders = {}, {}
    for name, target in targets.items():
        layers = LayerPlanner.for_model(target.module, recipe, adapter.layer_rules).targets(target.module)
        observers[name] = LinearInputObserver(target.module, layers, num_steps=ps.specs[0].num_steps,
                                              samples_per_call=needs.samples, seed=seed,
                                              sample_block=needs.sample_block, hessian=needs.hessians,
                                              hessian_storage=session.hessian_storage if session else "device",
                                              rows_per_call=rows_per_call(needs.rows, ps))
        if needs.inputs:
            recorders[name] = ForwardInputRecorder(target.module, needs.inputs, seed=seed)
    with contextlib.ExitStack() as stack:
        for o in observers.values():
            stack.enter_context(o)
        for r in recorders.values():
            stack.enter_context(r)
        if session is None:
            run(observers, recorders)
        else:
            run_session(session, adapter, ps, observers, recorders, progress=progress, cuda_graphs=cuda_graphs)
    if session is not None and not session.dist.is_main:
        return cal  # rank 0 holds the statistics of every rank
    for name, o in observers.items():
        cal.stats[name] = o.stats()
        if needs.hessians:
            cal.hessians[name] = o.take_hessians()  # the observer's own sums, no second copy
    cal.inputs = {name: r.inputs for name, r in recorders.items()}
    return cal


# ---------------------------------------------------------------------------------------------------------------
# quantize
# ---------------------------------------------------------------------------------------------------------------


def analyse(adapter: ModelAdapter, recipe: QuantRecipe, cal: Calibration, *, progress: bool
            ) -> tuple[dict[str, QuantRecipe], dict[str, dict[str, Any]]]:
    """Sensitivity analysis (and mixed-precision planning) per target: (recipe per target, analysis per target)."""
    recipes, analyses = {}, {}
    first_pass = strategy_for(recipe).calibration_needs(recipe)
    for name, target in adapter.targets().items():
        hessians = cal.hessians.get(name) if first_pass.hessians else None
        recipes[name], analyses[name] = analyse_and_plan(
            target.module, recipe, cal.stats.get(name, {}), cal.inputs.get(name, []), hessians,
            rules=adapter.layer_rules, progress=progress)
    return recipes, analyses


def quantize(adapter: ModelAdapter, recipes: dict[str, QuantRecipe], cal: Calibration, *, progress: bool
             ) -> dict[str, list[LayerRecord]]:
    """Quantize every target in place with its recipe's strategy (``ptq.algorithms.strategies``); returns its layer
    records (model order)."""
    records = {}
    for name, target in adapter.targets().items():
        recipe = recipes[name]
        rerun = None if cal.rerun is None else (lambda obs, _n=name: cal.rerun(_n, obs))
        records[name] = strategy_for(recipe).quantize(
            target.module, recipe, cal.stats.get(name, {}), hessians=cal.hessians.get(name), rerun=rerun,
            rules=adapter.layer_rules, progress=progress, device=adapter.compute_device)
        if records[name] and all(r.format == KEEP for r in records[name]):
            reasons = sorted({r.reason for r in records[name]})
            raise JobError(f"{name}: the recipe quantized no Linear layer (every layer kept: {'; '.join(reasons)}); "
                           "a file without quantized layers is not what quant= asked for")
    return records


# ---------------------------------------------------------------------------------------------------------------
# evaluate, export
# ---------------------------------------------------------------------------------------------------------------


def evaluate(adapter: ModelAdapter, ps: PromptSet, *, desc: str, progress: bool, cuda_graphs: bool,
             dist: DistContext | None = None) -> list[dict[str, Any]]:
    """The (quantized) model's outputs for the evaluation prompts, same seeds as the baseline (``dist``: shared
    between processes, every result on rank 0)."""
    return sample_sharded(dist or DistContext(), adapter, ps, desc=desc, progress=progress, keep_steps=True,
                          cuda_graphs=cuda_graphs)


def export(adapter: ModelAdapter, cfg: Any, out_dir: Path, *, metadata: dict[str, Any], progress: bool
           ) -> list[ExportResult]:
    """Write (and verify, with ``cfg.verify``) every export target for every quantized module. Several targets
    (experts): one file per expert for single-file targets (``cfg.filename`` with ``{expert}`` replaced by the
    expert's stem, or ``<filename>_<stem>``), one folder with a component per expert for folder targets."""
    targets = adapter.targets()
    if len(targets) == 1:
        key_maps = {t: (lambda key, _t=t: adapter.target_key(key, _t)) for t in cfg.targets}
        name, target = next(iter(targets.items()))
        return export_model(target.module, cfg, out_dir, progress=progress, metadata=metadata,
                            stem=cfg.filename.replace("{expert}", adapter.export_stem(name)), key_maps=key_maps,
                            device=adapter.compute_device)
    results = []
    for name, target in targets.items():
        meta = {**metadata, **adapter.export_metadata(name)}
        for t in cfg.targets:
            one = copy.copy(cfg)
            one.targets = [t]
            results += export_model(target.module, one, out_dir, progress=progress, metadata=meta,
                                    stem=expert_stem(cfg.filename, adapter.export_stem(name),
                                                     folder=TARGETS[t].folder),
                                    key_maps={t: lambda key, _t=t: adapter.target_key(key, _t)},
                                    component=adapter.export_component(name), device=adapter.compute_device)
    return results


def expert_stem(filename: str, stem: str, *, folder: bool) -> str:
    """File stem of one expert's export: ``filename`` with ``{expert}`` replaced (``wan2.2_t2v_{expert}_14B`` ->
    ``wan2.2_t2v_high_noise_14B``, ComfyUI's WAN 2.2 naming) or ``<filename>_<stem>``; a folder export holding
    every expert drops the placeholder (``wan2.2_t2v_14B``)."""
    if folder:
        return filename.replace("_{expert}", "").replace("{expert}_", "").replace("{expert}", "")
    return filename.replace("{expert}", stem) if "{expert}" in filename else f"{filename}_{stem}"
