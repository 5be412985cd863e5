"""``export_model``: write every configured file target of a quantized module and verify each file bit for bit."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ptq.targets.base import (
    UNQUANTIZED_DTYPES,
    ExportResult,
    FileTarget,
    KeyMap,
    UnsupportedExport,
    split_model_state,
)
from ptq.targets.registry import TARGETS
from ptq.targets.safetensors_io import temp_path

log = logging.getLogger(__name__)

def _adapter_of(model: nn.Module) -> Any:
    """The model adapter class that knows ``model``'s class (None for a bare module)."""
    from ptq.models import adapter_for_module

    return adapter_for_module(model)


def _default_key_map(model: nn.Module, target: str) -> KeyMap:
    adapter = _adapter_of(model)
    if adapter is None:
        raise ValueError(f"no model adapter knows {type(model).__name__} (ptq.models.ADAPTERS); pass key_map= to "
                         "export_model")
    return lambda key: adapter.target_key(key, target)


def _publish(path: Path, staging: Path, out_dir: Path, *, folder: bool) -> Path:
    """Move a written artefact from ``staging`` to its final place in ``out_dir`` (a file, or a folder target's
    component folder: ``<stem>_diffusers/<component>``), replacing what was there; its final path."""
    rel = path.relative_to(staging)
    unit = Path(*rel.parts[:2]) if folder else Path(rel.parts[0])
    dest = out_dir / unit
    if dest.is_dir():
        shutil.rmtree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staging / unit, dest)
    return out_dir / rel


def export_model(model: nn.Module, cfg: Any, out_dir: Path, *, progress: bool = True,
                 metadata: dict | None = None, stem: str | None = None,
                 key_maps: dict[str, KeyMap] | None = None, component: str = "transformer",
                 device: torch.device | None = None) -> list[ExportResult]:
    """Write every file target in ``cfg.targets`` (``cfg``: targets, unquantized_dtype, filename, verify); verify each
    file against the in-memory model when ``cfg.verify``. ``stem``: file name stem (default ``cfg.filename``);
    ``key_maps``: per target, diffusers key -> file key (default: the model's adapter's name map); ``component``:
    the module's component in folder exports (``transformer_2`` for a second expert); ``device``: where the
    verification decodes the quantized layers (default: where they are; the GPU for a model offloaded to the CPU).

    A target that cannot represent the recipe (e.g. weight-only NVFP4 for diffusers) is skipped with the reason.
    Every file is written first into a hidden staging folder of ``out_dir`` (``.unverified.<pid>.tmp``), then all
    are verified in one pass (each layer's simulated weight computed once), and only verified files are moved to
    their final names: a run killed or failing before that leaves no file that looks finished (a later export
    into the folder removes the staging folder of a dead process).
    The model's adapter may add header entries per target (``ModelAdapter.target_header``: ComfyUI's ``config``
    override for models its shape detection would build wrong).
    """
    from tqdm.auto import tqdm

    from ptq.targets.roundtrip import verify_exports
    from ptq.targets.safetensors_io import remove_stale_temp_files

    unknown = [t for t in cfg.targets if t not in TARGETS]
    if unknown:
        raise ValueError(f"export.targets: unknown {unknown}; known: {sorted(TARGETS)}")
    for stale in remove_stale_temp_files(out_dir):
        log.warning("removed %s, a temp file left by an interrupted export", stale)
    plain, quant = split_model_state(model)
    meta = {"ptq_version": "0.1.0", **(metadata or {})}
    module_config = dict(getattr(model, "config", {}))
    adapter = _adapter_of(model)
    dtype = UNQUANTIZED_DTYPES[cfg.unquantized_dtype]
    results = []
    written: list[tuple[ExportResult, FileTarget, KeyMap]] = []
    staging = temp_path(out_dir / "unverified")
    staging.mkdir(parents=True, exist_ok=True)
    for target in tqdm(list(cfg.targets), desc="export", disable=not progress, leave=False):
        file_target = TARGETS[target]
        key_map = (key_maps or {}).get(target) or _default_key_map(model, target)
        target_meta = {**meta, **(adapter.target_header(target, module_config) if adapter else {})}
        try:
            res = file_target.write(plain, quant, staging, stem or cfg.filename, dtype=dtype, key_map=key_map,
                                 metadata=target_meta, module_config=module_config, component=component)
        except UnsupportedExport as exc:
            log.warning("export %s skipped: %s", target, exc)
            results.append(ExportResult(target, "", skipped=str(exc)))
            continue
        written.append((res, file_target, key_map))
        results.append(res)
    if cfg.verify and written:
        checks = verify_exports([(e, Path(r.path), k) for r, e, k in written], plain, quant,
                                device=device)
        for (res, _, _), (ok, detail) in zip(written, checks):
            res.verified, res.verify_detail = ok, detail
            if not ok:
                raise RuntimeError(f"export {res.target} failed verification: {detail} (the files stay "
                                   f"unpublished in {staging})")
    for res, file_target, _ in written:
        res.path = str(_publish(Path(res.path), staging, out_dir, folder=file_target.folder))
    shutil.rmtree(staging, ignore_errors=True)
    for res, _, _ in written:
        log.info("export %s: %s (%.1f MiB, %d quantized layers)", res.target, res.path, res.bytes / 2**20,
                 res.quantized_layers)
    return results
