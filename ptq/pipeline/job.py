"""One quantization job end to end: encode prompts -> bf16 baseline (cached) -> calibrate -> quantize -> evaluate ->
export + verify -> report, each stage timed (wall seconds and peak CUDA memory per phase)."""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ptq.eval.report import write_report
from ptq.models import get_adapter
from ptq.models.base import ModelAdapter
from ptq.models.cpu_matmul import Float32LinearOnCPU
from ptq.pipeline import runtime_eval, stages
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
    return get_adapter(cfg.model.adapter)(cfg.model.path, dtype=DTYPES[cfg.model.dtype],
                                          device=pick_device(cfg.model.device), vae_device=cfg.model.vae_device)


def sample_specs(adapter: ModelAdapter, cfg: SamplingConfig, n: int) -> list:
    """One spec per prompt (the model's defaults where ``cfg`` leaves a field null; seeds ``cfg.seed + i``)."""
    return [adapter.sample_spec(height=cfg.height, width=cfg.width, num_frames=cfg.num_frames,
                                num_steps=cfg.num_steps, guidance_scale=cfg.guidance_scale, seed=cfg.seed + i)
            for i in range(n)]


def run_job(cfg: RunConfig, out_dir: Path) -> dict[str, Any]:
    """The whole job; returns the report dict (also written to ``out_dir``)."""
    fast_cpu = pick_device(cfg.model.device).type == "cpu" and cfg.model.cpu_float32_linear
    with Float32LinearOnCPU() if fast_cpu else contextlib.nullcontext():
        return _run(cfg, out_dir)


def _prompt_set(adapter: ModelAdapter, prompts: list[str], embeds: torch.Tensor, negative: torch.Tensor,
                cfg: SamplingConfig) -> PromptSet:
    specs = sample_specs(adapter, cfg, len(prompts))
    images = load_images(list(cfg.images), specs[0].height, specs[0].width) if cfg.images else []
    return PromptSet(prompts, embeds, negative, specs, images)


def _run(cfg: RunConfig, out_dir: Path) -> dict[str, Any]:
    out_dir.mkdir(parents=True, exist_ok=True)
    timer = PhaseTimer()
    device = pick_device(cfg.model.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    adapter = open_adapter(cfg)
    calib_prompts = load_prompts(cfg.calib, "calib")
    eval_prompts = load_prompts(cfg.eval, "eval") if cfg.eval.enabled else []
    log.info("model %s on %s (%s); %d calibration / %d eval prompts", adapter.root, device, cfg.model.dtype,
             len(calib_prompts), len(eval_prompts))

    with timer("encode_prompts"):  # the text encoder encodes everything once and is freed before the denoiser loads
        calib_emb = adapter.encode_prompts(calib_prompts)
        eval_emb = adapter.encode_prompts(eval_prompts) if eval_prompts else None
        neg_calib = adapter.encode_prompts([cfg.calib.negative_prompt])
        neg_eval = adapter.encode_prompts([cfg.eval.negative_prompt])
        adapter.free_text_encoder()
    with timer("load_model"):
        adapter.load(decoder=bool(cfg.eval.decode or cfg.eval.images or cfg.calib.images))
    calib = _prompt_set(adapter, calib_prompts, calib_emb, neg_calib, cfg.calib)
    evals = _prompt_set(adapter, eval_prompts, eval_emb, neg_eval, cfg.eval) if eval_prompts else None

    baseline = cache_file = None
    runtimes = runtime_eval.runtime_list(list(cfg.eval.runtimes)) if evals is not None else []
    references: dict[str, Any] = {}
    if evals is not None:
        payload = stages.baseline_payload(adapter, evals, dtype=cfg.model.dtype, device=device.type,
                                          negative=cfg.eval.negative_prompt, images=list(cfg.eval.images),
                                          cpu_float32_linear=cfg.model.cpu_float32_linear)
        cache_file = stages.baseline_cache_file(cfg.eval.cache_dir, payload)
        with timer("baseline_eval"):
            baseline, cached = stages.bf16_baseline(adapter, evals, cache_file, progress=cfg.progress,
                                                    cuda_graphs=cfg.model.cuda_graphs)
        if cached:
            del timer.seconds["baseline_eval"]
            timer.peak_gib.pop("baseline_eval", None)
        if runtimes:
            with timer("runtime_reference"):
                references = runtime_eval.unquantized_references(
                    adapter, evals, runtimes, model_dtype=cfg.model.dtype, payload=payload,
                    cache_dir=cfg.eval.cache_dir, progress=cfg.progress, cuda_graphs=cfg.model.cuda_graphs)

    recipe = cfg.quant
    with timer("calibrate"):
        cal = stages.calibrate(adapter, recipe, calib, samples_per_call=cfg.calib.samples_per_call,
                               seed=cfg.calib.seed, progress=cfg.progress, cuda_graphs=cfg.model.cuda_graphs)
    if not cal.needs.any:
        del timer.seconds["calibrate"]
        timer.peak_gib.pop("calibrate", None)
    recipes = {name: recipe for name in adapter.targets()}
    analyses: dict[str, Any] = {}
    if recipe.mixed.analyse:
        with timer("sensitivity"):
            recipes, analyses = stages.analyse(adapter, recipe, cal, progress=cfg.progress)
    with timer("quantize"):
        records = stages.quantize(adapter, recipes, cal, progress=cfg.progress)
    cal.hessians.clear()  # up to several GB on the GPU

    quant_results = None
    if evals is not None:
        with timer("quant_eval"):
            quant_results = stages.evaluate(adapter, evals, desc=f"eval ({recipe.format})", progress=cfg.progress,
                                            cuda_graphs=cfg.model.cuda_graphs)
    runtime_report = None
    if runtimes:
        with timer("runtime_eval"):
            runtime_report = runtime_eval.evaluate_runtimes(adapter, evals, runtimes, baseline, references,
                                                            model_dtype=cfg.model.dtype, progress=cfg.progress)
    with timer("export"):
        source = {"ptq_source_model": adapter.display_name,
                  "ptq_source_sha256": adapter.content_hash(Path(cfg.eval.cache_dir))}
        exports = stages.export(adapter, cfg.export, out_dir, metadata=source, progress=cfg.progress)

    target = next(iter(adapter.targets()))
    used = recipes[target]
    peak = timer.peak() if device.type == "cuda" else None
    run_info = {
        "preset": cfg.preset, "model": str(adapter.root), "adapter": adapter.name, "device": str(device),
        "dtype": cfg.model.dtype, "recipe": used.summary(), "recipe_config": asdict(used),
        "calib_prompts": len(calib_prompts), "eval_prompts": len(eval_prompts),
        "calib_spec": asdict(calib.specs[0]), "eval_spec": asdict(evals.specs[0]) if evals is not None else None,
        "baseline_cache": str(cache_file) if cache_file else None, "peak_gpu_gib": peak,
        "peak_gpu_gib_by_phase": dict(timer.peak_gib) if device.type == "cuda" else None,
        "cuda_graphs": cfg.model.cuda_graphs and device.type == "cuda",
    }
    with timer("report"):
        report = write_report(out_dir, run_info=run_info, records=records[target], baseline=baseline,
                              quantized=quant_results, exports=exports, timings=timer.seconds,
                              decode=adapter.decode if cfg.eval.decode and adapter.can_decode else None,
                              eval_prompts=eval_prompts, sensitivity=analyses.get(target), runtimes=runtime_report)
    log.info("wrote %s", out_dir / "report.md")
    return report
