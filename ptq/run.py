"""``python -m ptq run``: the Hydra application around :func:`ptq.pipeline.job.run_job`.

One Hydra job per run; ``-m`` sweeps reuse the cached bf16 baseline. The config tree ships inside the package
(``pkg://ptq.configs``), so a non-editable install runs from any directory.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from ptq.config import RunConfig, register_configs, validate_config
from ptq.pipeline.prompts import PromptError, load_prompts

__all__ = ["CONFIG_DIR", "PromptError", "hydra_main", "load_prompts", "run_pipeline"]

log = logging.getLogger("ptq")
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
CONFIG_PATH = "pkg://ptq.configs"


def run_pipeline(cfg: RunConfig, out_dir: Path) -> dict[str, Any]:
    """Validate ``cfg`` and run the whole job; returns the report dict (also written to ``out_dir``)."""
    from ptq.pipeline.job import run_job

    validate_config(cfg)
    return run_job(cfg, out_dir)


def _task(dcfg: Any) -> None:
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    cfg: RunConfig = OmegaConf.to_object(dcfg)
    logging.getLogger("ptq").setLevel(cfg.log_level)
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    run_pipeline(cfg, out_dir)


#: Overrides for ranks > 0 of a multi-process run (torchrun / accelerate): rank 0 owns the run folder (its path
#: is sent to the others), the other ranks write no Hydra files and log warnings only.
NON_MAIN_RANK_OVERRIDES = ["hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=stdout",
                           "log_level=WARNING"]


def hydra_main(argv: list[str]) -> int:
    """Run the Hydra app with ``argv`` as its command line (``config=NAME``, overrides, ``-m``)."""
    import os

    import hydra

    register_configs()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and int(os.environ.get("RANK", "0")) > 0:
        argv = [*argv, *NON_MAIN_RANK_OVERRIDES]
    old = sys.argv
    sys.argv = ["ptq run", *argv]
    try:
        hydra.main(config_path=CONFIG_PATH, config_name="ptq", version_base=None)(_task)()
    finally:
        sys.argv = old
    return 0
