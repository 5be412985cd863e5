"""``python -m ptq run``: load -> encode prompts -> bf16 baseline (cached) -> calibrate -> quantize -> evaluate ->
export -> verify -> report. One Hydra job; ``-m`` sweeps reuse the cached baseline."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ptq.config import RunConfig, SamplingConfig, register_configs, validate_config

log = logging.getLogger("ptq")
REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "configs"
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class PromptError(ValueError):
    """Prompt file or dataset missing or empty."""


def resolve_path(p: str | os.PathLike[str]) -> Path:
    """Relative paths are taken from the current directory, then from the repository root."""
    path = Path(os.path.expanduser(str(p)))
    if path.is_absolute() or path.exists():
        return path
    return REPO_ROOT / path


def load_prompts(cfg: SamplingConfig, what: str) -> list[str]:
    """``cfg.num_prompts`` prompts from ``cfg.dataset`` (if named) or ``cfg.prompts_file`` (one per line, # comments)."""
    if cfg.dataset.name:
        import datasets

        try:
            kwargs = {"data_files": str(resolve_path(cfg.dataset.data_files))} if cfg.dataset.data_files else {}
            ds = datasets.load_dataset(cfg.dataset.name, cfg.dataset.config_name, split=cfg.dataset.split, **kwargs)
        except Exception as exc:  # noqa: BLE001
            raise PromptError(f"{what}.dataset: cannot load {cfg.dataset.name!r} split {cfg.dataset.split!r}: {exc}") from exc
        if cfg.dataset.column not in ds.column_names:
            raise PromptError(f"{what}.dataset.column={cfg.dataset.column!r} not in {ds.column_names}")
        prompts = [str(x).strip() for x in ds[cfg.dataset.column] if str(x).strip()]
        source = f"dataset {cfg.dataset.name}"
    else:
        path = resolve_path(cfg.prompts_file)
        if not path.is_file():
            raise PromptError(f"{what}.prompts_file={cfg.prompts_file!r}: no such file ({path})")
        prompts = [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
        source = str(path)
    if not prompts:
        raise PromptError(f"{what}: no prompts in {source}")
    if len(prompts) < cfg.num_prompts:
        log.warning("%s: %d prompts requested, %s has %d; using all", what, cfg.num_prompts, source, len(prompts))
    return prompts[: cfg.num_prompts]


def pick_device(name: str) -> torch.device:
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


def _sample_spec(cfg: SamplingConfig, defaults: dict[str, Any], index: int):
    from ptq.models.wan import SampleSpec

    return SampleSpec(
        height=int(cfg.height or defaults["height"]),
        width=int(cfg.width or defaults["width"]),
        num_frames=int(cfg.num_frames or defaults["num_frames"]),
        num_steps=int(cfg.num_steps or defaults["num_inference_steps"]),
        guidance_scale=float(cfg.guidance_scale if cfg.guidance_scale is not None else defaults["guidance_scale"]),
        seed=int(cfg.seed) + index,
    )


def _model_fingerprint(root: Path) -> str:
    """Identity of the transformer weights: file names, sizes and mtimes (cheap; no hashing of GBs)."""
    h = hashlib.sha256()
    for f in sorted((root / "transformer").glob("*")):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{int(st.st_mtime)}".encode())
    return h.hexdigest()[:16]


def baseline_cache_key(root: Path, cfg: RunConfig, prompts: list[str], defaults: dict[str, Any]) -> str:
    """Key of the bf16 reference outputs: model + dtype + every eval setting + prompts + device type."""
    specs = [asdict(_sample_spec(cfg.eval, defaults, i)) for i in range(len(prompts))]
    payload = {
        "model": str(root.resolve()), "fingerprint": _model_fingerprint(root), "dtype": cfg.model.dtype,
        "device": pick_device(cfg.model.device).type, "prompts": prompts, "negative": cfg.eval.negative_prompt,
        "specs": specs, "images": list(cfg.eval.images), "version": 1,
        "cpu_float32_linear": cfg.model.cpu_float32_linear,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def _load_images(paths: list[str], height: int, width: int) -> list[torch.Tensor]:
    from PIL import Image

    out = []
    for p in paths:
        path = resolve_path(p)
        if not path.is_file():
            raise FileNotFoundError(f"conditioning image {p!r} not found ({path})")
        img = Image.open(path).convert("RGB").resize((width, height))
        import numpy as np

        out.append(torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1) / 255)
    return out


def sample_all(comps, embeds: torch.Tensor, neg: torch.Tensor, cfg: SamplingConfig, *, desc: str,
               progress: bool, keep_steps: bool, on_step_start=None, cuda_graphs: bool = False
               ) -> list[dict[str, Any]]:
    """Denoise every prompt; returns per prompt {"final": latents, "steps": [latents per step]} on CPU float32.

    ``cuda_graphs``: replay the transformer forward from CUDA graphs (CUDA only; hooks attached now are captured,
    so attach them before and keep them until this returns)."""
    from tqdm.auto import tqdm

    from ptq.calibration.cuda_graph import CudaGraphForward
    from ptq.models.wan import denoise, encode_image

    results = []
    defaults = comps.defaults
    spec0 = _sample_spec(cfg, defaults, 0)
    images = _load_images(list(cfg.images), spec0.height, spec0.width) if cfg.images else []
    bar = tqdm(total=len(embeds) * spec0.num_steps, desc=desc, disable=not progress, leave=False)
    on_cuda = next(comps.transformer.parameters()).is_cuda
    runner = CudaGraphForward(comps.transformer) if cuda_graphs and on_cuda else None
    for i in range(len(embeds)):
        spec = _sample_spec(cfg, defaults, i)
        steps: list[torch.Tensor] = []

        def end(step: int, t: torch.Tensor, z: torch.Tensor, _steps: list = steps) -> None:
            if keep_steps:
                _steps.append(z.detach().float().cpu())
            bar.update(1)

        cond = encode_image(comps, images[i % len(images)]) if images else None
        final = denoise(comps, embeds[i : i + 1], neg, spec, condition_latents=cond,
                        on_step_start=on_step_start, on_step_end=end, forward=runner)
        results.append({"final": final.float().cpu(), "steps": steps})
    bar.close()
    if runner is not None:
        log.info("%s: %d CUDA-graph replays, %d eager forwards", desc, runner.replays, runner.eager_calls)
        runner.release()
    return results


def run_pipeline(cfg: RunConfig, out_dir: Path) -> dict[str, Any]:
    """The whole job; returns the report dict (also written to ``out_dir``)."""
    from ptq.models.cpu_matmul import Float32LinearOnCPU

    validate_config(cfg)
    fast_cpu = pick_device(cfg.model.device).type == "cpu" and cfg.model.cpu_float32_linear
    with Float32LinearOnCPU() if fast_cpu else contextlib.nullcontext():
        return _run_pipeline(cfg, out_dir)


def _run_pipeline(cfg: RunConfig, out_dir: Path) -> dict[str, Any]:
    from ptq.algorithms.gptq import gptq_sequential_
    from ptq.algorithms.mixed_precision import analyse_and_plan
    from ptq.algorithms.quantize import num_blocks, plan_layer_format, quantize_
    from ptq.algorithms.sensitivity import ForwardInputRecorder
    from ptq.calibration.observers import LinearInputObserver
    from ptq.eval.report import write_report
    from ptq.export import export_model
    from ptq.models import wan

    out_dir.mkdir(parents=True, exist_ok=True)
    timer = PhaseTimer()
    device = pick_device(cfg.model.device)
    dtype = _DTYPES[cfg.model.dtype]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    root = wan.resolve_model_path(cfg.model.path)
    calib_prompts = load_prompts(cfg.calib, "calib")
    eval_prompts = load_prompts(cfg.eval, "eval") if cfg.eval.enabled else []
    defaults = wan.read_sample_defaults(root)
    log.info("model %s on %s (%s); %d calibration / %d eval prompts", root, device, cfg.model.dtype,
             len(calib_prompts), len(eval_prompts))

    # 1. text encoder: encode everything once, then free it before the transformer is loaded
    with timer("encode_prompts"):
        te, tok = wan.load_text_encoder(root, dtype=dtype, device=device)
        enc = wan.WanComponents(transformer=None, scheduler=None, vae=None, text_encoder=te, tokenizer=tok,
                                defaults=defaults)
        calib_emb = wan.encode_prompts(enc, calib_prompts)
        eval_emb = wan.encode_prompts(enc, eval_prompts) if eval_prompts else None
        neg_calib = wan.encode_prompts(enc, [cfg.calib.negative_prompt])
        neg_eval = wan.encode_prompts(enc, [cfg.eval.negative_prompt])
        del te
        enc.free_text_encoder()
        del enc

    with timer("load_model"):
        comps = wan.WanComponents(
            transformer=wan.load_transformer(root, dtype=dtype, device=device),
            scheduler=wan.load_scheduler(root),
            vae=wan.load_vae(root, device=cfg.model.vae_device) if (cfg.eval.decode or cfg.eval.images
                                                                      or cfg.calib.images) else None,
            text_encoder=None, tokenizer=None, defaults=defaults, path=str(root))
    model = comps.transformer

    # 2. bf16 reference outputs (cached on disk, shared by every run of a sweep)
    baseline = None
    cache_file = None
    if eval_prompts:
        key = baseline_cache_key(root, cfg, eval_prompts, defaults)
        cache_file = Path(cfg.eval.cache_dir).expanduser() / f"baseline_{key}.pt"
        if cache_file.is_file():
            baseline = torch.load(cache_file, map_location="cpu", weights_only=True)
            log.info("bf16 baseline: cached %s", cache_file)
        else:
            with timer("baseline_eval"):
                baseline = sample_all(comps, eval_emb, neg_eval, cfg.eval, desc="baseline (bf16)",
                                      progress=cfg.progress, keep_steps=True, cuda_graphs=cfg.model.cuda_graphs)
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_suffix(f".tmp{os.getpid()}")
            torch.save(baseline, tmp)
            os.replace(tmp, cache_file)

    # 3. calibration: hooks on every Linear that will be quantized, whole schedule, cond + uncond
    recipe = cfg.quant
    nb = num_blocks(model)
    targets = [n for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and plan_layer_format(n, m, recipe, nb)[0] != "bf16"]
    stats = {}
    calib_spec = _sample_spec(cfg.calib, defaults, 0)
    # GPTQ needs input Hessians (all in this pass, or per pass of quant.gptq_blocks_per_pass blocks later);
    # sensitivity / mixed precision record a few transformer inputs for their measurements
    gptq = recipe.weight.startswith("gptq")
    hessian_now = gptq and recipe.gptq_blocks_per_pass == 0
    analyse = recipe.mixed_precision or recipe.sensitivity
    hessians = analysis = None
    recorder = ForwardInputRecorder(model, recipe.sensitivity_inputs, seed=cfg.calib.seed) if analyse else None

    def calibrate(obs) -> None:
        # CUDA graphs capture the observer's kernels; host-side sampling, Hessians and recorded inputs need eager runs
        graphs = cfg.model.cuda_graphs and obs.graph_safe and recorder is None
        sample_all(comps, calib_emb, neg_calib, cfg.calib, desc="calibrate", progress=cfg.progress,
                   keep_steps=False, on_step_start=lambda i: setattr(obs, "step", i), cuda_graphs=graphs)

    if not recipe.weight_only or gptq or analyse:
        observer = LinearInputObserver(model, targets, num_steps=calib_spec.num_steps,
                                       samples_per_call=cfg.calib.samples_per_call, seed=cfg.calib.seed,
                                       sample_block=16, hessian=hessian_now)
        with timer("calibrate"), observer, recorder or contextlib.nullcontext():
            calibrate(observer)
        stats = observer.stats()
        hessians = observer.hessians() if hessian_now else None
        del observer

    if analyse:
        with timer("sensitivity"):
            recipe, analysis = analyse_and_plan(model, recipe, stats, recorder.inputs, hessians,
                                                progress=cfg.progress)

    # 4. quantize in place
    with timer("quantize"):
        if gptq and recipe.gptq_blocks_per_pass > 0:
            records = gptq_sequential_(model, recipe, stats, calibrate, progress=cfg.progress)
        else:
            records = quantize_(model, recipe, stats, hessians=hessians, progress=cfg.progress)
        hessians = None

    # 5. quantized evaluation, same prompts and seeds
    quant_results = None
    if eval_prompts:
        with timer("quant_eval"):
            quant_results = sample_all(comps, eval_emb, neg_eval, cfg.eval, desc=f"eval ({recipe.format})",
                                       progress=cfg.progress, keep_steps=True, cuda_graphs=cfg.model.cuda_graphs)

    # 6. export (+ verify)
    with timer("export"):
        source = {"ptq_source_model": wan.model_display_name(cfg.model.path, root),
                  "ptq_source_sha256": wan.transformer_content_hash(root, Path(cfg.eval.cache_dir))}
        exports = export_model(model, cfg.export, out_dir, progress=cfg.progress, metadata=source)

    peak = timer.peak() if device.type == "cuda" else None
    run_info = {
        "preset": cfg.preset, "model": str(root), "device": str(device), "dtype": cfg.model.dtype,
        "recipe": asdict(recipe), "calib_prompts": len(calib_prompts), "eval_prompts": len(eval_prompts),
        "calib_spec": asdict(calib_spec), "eval_spec": asdict(_sample_spec(cfg.eval, defaults, 0)) if eval_prompts
        else None, "baseline_cache": str(cache_file) if cache_file else None, "peak_gpu_gib": peak,
        "peak_gpu_gib_by_phase": dict(timer.peak_gib) if device.type == "cuda" else None,
        "cuda_graphs": cfg.model.cuda_graphs and device.type == "cuda",
    }
    with timer("report"):
        report = write_report(out_dir, run_info=run_info, records=records, stats=stats, baseline=baseline,
                              quantized=quant_results, exports=exports, timings=timer.seconds,
                              comps=comps if cfg.eval.decode else None, eval_prompts=eval_prompts,
                              sensitivity=analysis)
    log.info("wrote %s", out_dir / "report.md")
    return report


def _task(dcfg: Any) -> None:
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    cfg: RunConfig = OmegaConf.to_object(dcfg)
    logging.getLogger("ptq").setLevel(cfg.log_level)
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    run_pipeline(cfg, out_dir)


def hydra_main(argv: list[str]) -> int:
    """Run the Hydra app with ``argv`` as its command line (``config=NAME``, overrides, ``-m``)."""
    import hydra

    register_configs()
    old = sys.argv
    sys.argv = ["ptq run", *argv]
    try:
        hydra.main(config_path=str(CONFIG_DIR), config_name="ptq", version_base=None)(_task)()
    finally:
        sys.argv = old
    return 0
