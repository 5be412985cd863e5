"""One quantization job end to end: encode prompts -> bf16 baseline (cached) -> calibrate -> quantize -> evaluate ->
export + verify -> report, each stage timed (wall seconds and peak CUDA memory per phase)."""

from __future__ import annotations

import contextlib
import logging
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ptq.algorithms.recipe import QuantRecipe
from ptq.eval.experts import expert_records, expert_sections
from ptq.eval.report import write_report
from ptq.eval.summary import run_summary
from ptq.models import get_adapter
from ptq.models.base import ModelAdapter
from ptq.models.cpu_matmul import Float32LinearOnCPU, float32_linear_dtypes
from ptq.pipeline import experts, parallel, runtime_eval, stages
from ptq.pipeline.distributed import DistContext, broadcast_object, init_from_env, shutdown
from ptq.pipeline.prompts import load_images, load_prompts
from ptq.pipeline.sampling import PromptSet
from ptq.pipeline.settings import RunConfig, SamplingConfig

log = logging.getLogger("ptq")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def pick_device(name: str) -> torch.device:
    """``"auto"``: cuda if available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass
class PhaseTimer:
    """Wall time (s) and peak CUDA memory (GiB) per phase (synchronising CUDA at phase boundaries only)."""

    seconds: dict[str, float] = field(default_factory=dict)
    peak_gib: dict[str, float] = field(default_factory=dict)

    def __call__(self, name: str) -> PhaseTimer:
        self._name = name
        return self

    def __enter__(self) -> PhaseTimer:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
            self.peak_gib[self._name] = max(self.peak_gib.get(self._name, 0.0), peak / 2**30)
        self.seconds[self._name] = self.seconds.get(self._name, 0.0) + time.perf_counter() - self._t0

    def peak(self) -> float | None:
        """Peak CUDA memory over all phases (GiB), None on CPU."""
        return max(self.peak_gib.values()) if self.peak_gib else None


def open_adapter(cfg: RunConfig) -> ModelAdapter:
    """The model adapter ``cfg.model.adapter`` for ``cfg.model.path`` (nothing heavy loaded yet)."""
    m = cfg.model
    return get_adapter(m.adapter)(m.path, dtype=DTYPES[m.dtype], device=pick_device(m.device),
                                  vae_device=m.vae_device, **model_options(m))


def model_options(m: Any) -> dict[str, Any]:
    """The adapter keywords beyond path/dtype/device: ``model_name`` (``model.name``), and ``loras``,
    ``scheduler``, ``flow_shift``, ``offload`` only when set (an adapter takes the ones it knows and ``**kwargs``)."""
    out: dict[str, Any] = {}
    if m.name:
        out["model_name"] = m.name
    for key in ("loras", "scheduler", "flow_shift", "offload"):
        value = getattr(m, key)
        if value not in (None, False, [], ()):
            out[key] = list(value) if key == "loras" else value
    return out


def sample_specs(adapter: ModelAdapter, cfg: SamplingConfig, n: int) -> list:
    """One spec per prompt (the model's defaults where ``cfg`` leaves a field null; seeds ``cfg.seed + i``)."""
    extra = {} if cfg.guidance_scale_2 is None else {"guidance_scale_2": cfg.guidance_scale_2}
    return [adapter.sample_spec(height=cfg.height, width=cfg.width, num_frames=cfg.num_frames,
                                num_steps=cfg.num_steps, guidance_scale=cfg.guidance_scale, seed=cfg.seed + i,
                                **extra)
            for i in range(n)]


def negative_prompt(adapter: ModelAdapter, cfg: SamplingConfig) -> str:
    """``cfg.negative_prompt``, or the model's own when null."""
    if cfg.negative_prompt is not None:
        return cfg.negative_prompt
    return str(adapter.sample_defaults.get("negative_prompt") or "")


def recipe_slug(recipe: QuantRecipe) -> str:
    """A file-name-safe name of a recipe given by settings rather than a ``quant=`` name (its title:
    ``nvfp4 gptq_four_over_six act=mse`` -> ``nvfp4_gptq_four_over_six_act-mse``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", recipe.title().replace("=", "-").replace("<=", "-")).strip("_")


def export_filename(pattern: str, model: str, recipe: str) -> str:
    """``export.filename`` with ``{model}`` and ``{recipe}`` filled in (``{expert}`` is left to the export)."""
    return pattern.replace("{model}", model).replace("{recipe}", recipe)


def cpu_float32_linear(cfg: RunConfig) -> list[str]:
    """The Linear dtypes computed as float32 GEMMs on this CPU (``model.cpu_float32_linear``; empty when off): part
    of what cached references and calibration checkpoints depend on."""
    return [str(d).removeprefix("torch.") for d in float32_linear_dtypes()] if cfg.model.cpu_float32_linear else []


def run_job(cfg: RunConfig, out_dir: Path, *, recipe_name: str | None = None) -> dict[str, Any]:
    """The whole job; returns the report dict (also written to ``out_dir``). ``recipe_name``: the recipe's preset
    name (``quant=NAME``) when it was used unchanged, for the report's title and reference numbers."""
    fast_cpu = pick_device(cfg.model.device).type == "cpu" and cfg.model.cpu_float32_linear
    with Float32LinearOnCPU.for_this_cpu() if fast_cpu else contextlib.nullcontext():
        return _run(cfg, out_dir, recipe_name)


def make_prompt_set(adapter: ModelAdapter, prompts: list[str], embeds: torch.Tensor, negative: torch.Tensor,
                cfg: SamplingConfig) -> PromptSet:
    specs = sample_specs(adapter, cfg, len(prompts))
    images = load_images(list(cfg.images), specs[0].height, specs[0].width) if cfg.images else []
    return PromptSet(prompts, embeds, negative, specs, images)


def model_run_info(adapter: ModelAdapter, cfg: RunConfig, calib: PromptSet, evals: PromptSet | None
                     ) -> dict[str, Any]:
    """Run-info entries of the model: the merged LoRAs and, with several experts, their steps and trajectory."""
    out: dict[str, Any] = {}
    info = adapter.export_info()
    if info.get("ptq_loras"):
        out["loras"] = info["ptq_loras"]
    exp = experts.expert_run_info(adapter, cfg.calib.expert_trajectory, calib.specs[0],
                                  evals.specs[0] if evals is not None else None)
    if exp is not None:
        out["experts"] = exp
    return out


def _run(cfg: RunConfig, out_dir: Path, recipe_name: str | None) -> dict[str, Any]:
    ctx = init_from_env(pick_device(cfg.model.device).type)  # torchrun / accelerate launch: one rank of N
    # an exception ends this process without waiting for the others (the launcher then stops them)
    report = _run_ranked(cfg, Path(broadcast_object(ctx, str(out_dir))), ctx, recipe_name)
    shutdown(ctx)
    return report


def calibrate_and_quantize(cfg: RunConfig, ctx: DistContext, adapter: ModelAdapter, recipe: Any, calib: PromptSet,
                           out_dir: Path, timer: PhaseTimer, device_type: str
                           ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], list[Any]]:
    """Calibrate, analyse (mixed precision) and quantize every target in place, one pass per expert in schedule
    order (:func:`ptq.pipeline.experts.calibration_passes`), each pass with its own resumable calibration session;
    rank 0 quantizes and shares the result with the other ranks. Returns (recipe per target, sensitivity analyses,
    layer records per target, the calibration sessions)."""
    recipes: dict[str, Any] = {}
    analyses: dict[str, Any] = {}
    records: dict[str, Any] = {}
    calibrated = False
    passes = experts.calibration_passes(adapter, cfg.calib.expert_trajectory)
    sessions = []
    for part in passes:
        session = parallel.calibration_session(
            ctx, part, recipe, calib, cfg.calib, out_dir, resume=cfg.resume,
            settings={"dtype": cfg.model.dtype, "device": device_type,
                      "cpu_float32_linear": cpu_float32_linear(cfg)},
            part="_".join(part.targets()) if len(passes) > 1 else None)
        sessions.append(session)
        with timer("calibrate"):
            cal = stages.calibrate(part, recipe, calib, samples_per_call=cfg.calib.samples_per_call,
                                   seed=cfg.calib.seed, progress=cfg.progress, cuda_graphs=cfg.model.cuda_graphs,
                                   session=session)
        calibrated |= cal.needs.any
        part_recipes = {name: recipe for name in part.targets()}
        if recipe.mixed.analyse and ctx.is_main:
            with timer("sensitivity"):
                part_recipes, part_analyses = stages.analyse(part, recipe, cal, progress=cfg.progress)
            analyses.update(part_analyses)
        with timer("quantize"):
            if ctx.is_main:
                records.update(stages.quantize(part, part_recipes, cal, progress=cfg.progress))
            parallel.share_quantized(ctx, part)
            for name in part.targets():
                adapter.after_quantize(name)
        recipes.update(part_recipes)
        cal.hessians.clear()  # up to several GB on the GPU
    if not calibrated:
        del timer.seconds["calibrate"]
        timer.peak_gib.pop("calibrate", None)
    return recipes, analyses, records, sessions


def _run_ranked(cfg: RunConfig, out_dir: Path, ctx: DistContext, recipe_name: str | None) -> dict[str, Any]:
    """The job on one rank (every rank calibrates and evaluates its share of the prompts; rank 0 quantizes,
    exports and reports, the others return ``{}``)."""
    if not ctx.is_main:
        cfg.progress = False
    out_dir.mkdir(parents=True, exist_ok=True)
    timer = PhaseTimer()
    device = pick_device(cfg.model.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    adapter = open_adapter(cfg)
    # sha256 of the weights the exports record as their source: read in the background (GBs for a real model)
    hasher = ThreadPoolExecutor(1, thread_name_prefix="ptq-hash")
    source_hash = hasher.submit(adapter.content_hash, Path(cfg.eval.cache_dir)) if ctx.is_main else None
    hasher.shutdown(wait=False)
    calib_prompts = load_prompts(cfg.calib, "calib")
    eval_prompts = load_prompts(cfg.eval, "eval") if cfg.eval.enabled else []
    log.info("model %s on %s (%s); %d calibration / %d eval prompts", adapter.root, device, cfg.model.dtype,
             len(calib_prompts), len(eval_prompts))

    with timer("encode_prompts"):  # the text encoder encodes everything once and is freed before the denoiser loads
        calib_emb = adapter.encode_prompts(calib_prompts)
        eval_emb = adapter.encode_prompts(eval_prompts) if eval_prompts else None
        neg_calib = adapter.encode_prompts([negative_prompt(adapter, cfg.calib)])
        neg_eval = adapter.encode_prompts([negative_prompt(adapter, cfg.eval)])
        adapter.free_text_encoder()
    with timer("load_model"):
        adapter.load(decoder=bool(cfg.eval.decode or cfg.eval.images or cfg.calib.images))
    calib = make_prompt_set(adapter, calib_prompts, calib_emb, neg_calib, cfg.calib)
    evals = make_prompt_set(adapter, eval_prompts, eval_emb, neg_eval, cfg.eval) if eval_prompts else None

    baseline = cache_file = None
    # rank 0 evaluates the ComfyUI runtimes (every prompt) after the shared evaluation
    runtimes = [adapter.comfyui_runtime(rt) for rt in runtime_eval.runtime_list(list(cfg.eval.runtimes))] \
        if evals is not None and ctx.is_main else []
    references: dict[str, Any] = {}
    if evals is not None:
        payload = stages.baseline_payload(adapter, evals, dtype=cfg.model.dtype, device=device.type,
                                          negative=negative_prompt(adapter, cfg.eval), images=list(cfg.eval.images),
                                          cpu_float32_linear=cpu_float32_linear(cfg))
        cache_file = stages.baseline_cache_file(cfg.eval.cache_dir, payload)
        with timer("baseline_eval"):
            baseline, cached = stages.bf16_baseline(adapter, evals, cache_file, progress=cfg.progress,
                                                    cuda_graphs=cfg.model.cuda_graphs, dist=ctx,
                                                    desc=f"baseline ({cfg.model.dtype})")
        if cached:
            del timer.seconds["baseline_eval"]
            timer.peak_gib.pop("baseline_eval", None)
        if runtimes:
            with timer("runtime_reference"):
                references = runtime_eval.unquantized_references(
                    adapter, evals, runtimes, model_dtype=cfg.model.dtype, payload=payload,
                    cache_dir=cfg.eval.cache_dir, progress=cfg.progress, cuda_graphs=cfg.model.cuda_graphs)

    recipe = cfg.quant
    recipes, analyses, records, sessions = calibrate_and_quantize(cfg, ctx, adapter, recipe, calib, out_dir,
                                                                   timer, device.type)

    quant_results = None
    if evals is not None:
        with timer("quant_eval"):
            quant_results = stages.evaluate(adapter, evals, desc=f"eval ({recipe.format})", progress=cfg.progress,
                                            cuda_graphs=cfg.model.cuda_graphs, dist=ctx)
    if not ctx.is_main:
        return {}
    runtime_report = None
    if runtimes:
        with timer("runtime_eval"):
            runtime_report = runtime_eval.evaluate_runtimes(adapter, evals, runtimes, baseline, references,
                                                            model_dtype=cfg.model.dtype, progress=cfg.progress)
    with timer("export"):
        source = {"ptq_source_model": adapter.display_name, "ptq_source_sha256": source_hash.result(),
                  **adapter.export_info()}
        named = replace(cfg.export, filename=export_filename(cfg.export.filename, adapter.file_stem,
                                                             recipe_name or recipe_slug(cfg.quant)))
        exports = stages.export(adapter, named, out_dir, metadata=source, progress=cfg.progress)

    target = next(iter(adapter.targets()))
    used = recipes[target]
    peak = timer.peak() if device.type == "cuda" else None
    run_info = {
        "preset": cfg.preset, "model": str(adapter.root), "source_model": adapter.display_name,
        "source_sha256": source["ptq_source_sha256"], "adapter": adapter.name, "device": str(device), "dtype": cfg.model.dtype, "recipe_name": recipe_name,
        "recipe_title": used.title(), "recipe": used.summary(), "recipe_config": asdict(used),
        "calib_prompts": len(calib_prompts), "eval_prompts": len(eval_prompts),
        "calib_spec": asdict(calib.specs[0]), "eval_spec": asdict(evals.specs[0]) if evals is not None else None,
        "baseline_cache": str(cache_file) if cache_file else None, "peak_gpu_gib": peak,
        "peak_gpu_gib_by_phase": dict(timer.peak_gib) if device.type == "cuda" else None,
        "cuda_graphs": cfg.model.cuda_graphs and device.type == "cuda",
        **model_run_info(adapter, cfg, calib, evals),
    }
    multi = len(records) > 1
    with timer("report"):
        report = write_report(out_dir, run_info=run_info,
                              records=expert_records(records) if multi else records[target], baseline=baseline,
                              quantized=quant_results, exports=exports, timings=timer.seconds,
                              decode=adapter.decode if cfg.eval.decode and adapter.can_decode else None,
                              eval_prompts=eval_prompts, sensitivity=None if multi else analyses.get(target),
                              experts=expert_sections(run_info, records, analyses, baseline, quant_results)
                              if multi else None, runtimes=runtime_report)
    log.info("wrote %s", out_dir / "report.md")
    for session in sessions:
        if session.checkpoint is not None and session.checkpoint.is_file() and not cfg.calib.keep_checkpoint:
            session.checkpoint.unlink()  # the run is complete: nothing left to resume
    if cfg.progress or cfg.log_level != "WARNING":
        print(run_summary(report, out_dir), flush=True)
    return report
