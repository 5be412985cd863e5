"""Checks of a job before anything is created or loaded: the model folder, the sampling settings for this model,
the prompts and images. Each problem is one line naming the key and what was expected."""

from __future__ import annotations

from ptq.models import get_adapter
from ptq.models.base import ModelLoadError
from ptq.pipeline.prompts import PromptError, load_prompts, resolve_data_path
from ptq.pipeline.settings import RunConfig, SamplingConfig


class JobError(ValueError):
    """A user mistake in a job's settings (reported as one line, exit code 2)."""


def _check_sampling(adapter: object, cfg: SamplingConfig, prefix: str) -> None:
    spec = adapter.sample_spec(height=cfg.height, width=cfg.width, num_frames=cfg.num_frames,
                               num_steps=cfg.num_steps, guidance_scale=cfg.guidance_scale, seed=cfg.seed)
    problems = adapter.check_spec(spec)
    if problems:
        raise JobError("; ".join(f"{prefix}.{key}={msg}" for key, msg in problems.items()))
    for image in cfg.images:
        if not resolve_data_path(image).is_file():
            raise JobError(f"{prefix}.images: {image!r} is not a file")


def check_job(cfg: RunConfig) -> None:
    """Raise :class:`JobError` for the first problem of ``cfg`` that would make the job fail later: a model folder
    that is missing or incomplete (every missing part named), sizes the model cannot take, missing or empty prompt
    files, missing conditioning images. Reads only small files (configs, prompts)."""
    try:
        cls = get_adapter(cfg.model.adapter)
        root = cls.resolve(cfg.model.path)
    except (ModelLoadError, ValueError) as exc:
        raise JobError(str(exc)) from None
    missing = cls.missing_parts(root)
    if missing:
        raise JobError(f"model.path={cfg.model.path!r} ({root}) is not a complete {cls.name} model folder: missing "
                       + ", ".join(missing))
    broken = cls.weight_problems(root)
    if broken:
        more = f" (and {len(broken) - 1} more)" if len(broken) > 1 else ""
        raise JobError(f"model.path={cfg.model.path!r} ({root}): {broken[0]}{more}")
    try:
        adapter = cls(cfg.model.path)
    except (ModelLoadError, OSError, ValueError) as exc:
        raise JobError(f"model.path={cfg.model.path!r}: {exc}") from None
    try:
        _check_sampling(adapter, cfg.calib, "calib")
        if cfg.eval.enabled:
            _check_sampling(adapter, cfg.eval, "eval")
    except ModelLoadError as exc:
        raise JobError(f"model.path={cfg.model.path!r}: {exc}") from None
    try:
        load_prompts(cfg.calib, "calib")
        if cfg.eval.enabled:
            load_prompts(cfg.eval, "eval")
    except PromptError as exc:
        raise JobError(str(exc)) from None
