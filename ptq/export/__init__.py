"""Exporters, one file per target format, and ``export_model`` which runs the configured ones.

Registry: ``EXPORTERS[name] = fn(plain, quant, out_dir, cfg, model) -> ExportResult``. A new target is one new
module plus one entry here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from ptq.export.base import ExportResult, split_model_state
from ptq.export.comfyui import export_comfyui
from ptq.export.diffusers_bfl import export_diffusers

log = logging.getLogger(__name__)


def _comfyui(plain, quant, out_dir: Path, cfg: Any, model: nn.Module, meta: dict) -> ExportResult:
    return export_comfyui(plain, quant, out_dir / f"{cfg.filename}_comfyui.safetensors", cfg.unquantized_dtype, meta)


def _diffusers(plain, quant, out_dir: Path, cfg: Any, model: nn.Module, meta: dict) -> ExportResult:
    return export_diffusers(plain, quant, out_dir / f"{cfg.filename}_diffusers", cfg.unquantized_dtype,
                            dict(model.config), meta)


EXPORTERS: dict[str, Callable[..., ExportResult]] = {"comfyui": _comfyui, "diffusers": _diffusers}


def export_model(model: nn.Module, cfg: Any, out_dir: Path, *, progress: bool = True,
                 metadata: dict | None = None) -> list[ExportResult]:
    """Run every exporter in ``cfg.targets``; verify each file against the in-memory model when ``cfg.verify``.

    An exporter that cannot represent the recipe (e.g. weight-only NVFP4 for diffusers) is skipped with the reason.
    """
    from tqdm.auto import tqdm

    from ptq.export.roundtrip import verify_export

    unknown = [t for t in cfg.targets if t not in EXPORTERS]
    if unknown:
        raise ValueError(f"export.targets: unknown {unknown}; known: {sorted(EXPORTERS)}")
    from ptq.export.safetensors_io import remove_stale_temp_files

    for stale in remove_stale_temp_files(out_dir):
        log.warning("removed %s, a temp file left by an interrupted export", stale)
    plain, quant = split_model_state(model)
    meta = {"ptq_version": "0.1.0", **(metadata or {})}
    results = []
    for target in tqdm(list(cfg.targets), desc="export", disable=not progress, leave=False):
        try:
            res = EXPORTERS[target](plain, quant, out_dir, cfg, model, meta)
        except ValueError as exc:
            log.warning("export %s skipped: %s", target, exc)
            results.append(ExportResult(target, "", skipped=str(exc)))
            continue
        if cfg.verify:
            ok, detail = verify_export(target, Path(res.path), plain, quant)
            res.verified, res.verify_detail = ok, detail
            if not ok:
                raise RuntimeError(f"export {target} failed verification: {detail}")
        log.info("export %s: %s (%.1f MB, %d quantized layers)", target, res.path, res.bytes / 1e6,
                 res.quantized_layers)
        results.append(res)
    return results
