"""``python -m ptq run``: the Hydra application around :func:`ptq.pipeline.job.run_job`.

Before Hydra creates a run directory, every job of the command line (each combination of a ``-m`` sweep) is
composed and checked: unknown or mistyped keys, out-of-range values, an incomplete model folder, sizes the model
cannot take, empty prompt files. Each mistake is one line naming the key, exit code 2, no traceback. The config
tree ships inside the package (``pkg://ptq.configs``), so a non-editable install runs from any directory.
"""

from __future__ import annotations

import difflib
import itertools
import logging
import re
import sys
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

from ptq.config import RunConfig, register_configs, validate_config
from ptq.pipeline.prompts import PromptError, load_prompts

__all__ = ["CONFIG_DIR", "PromptError", "hydra_main", "load_prompts", "run_pipeline"]

log = logging.getLogger("ptq")
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
CONFIG_PATH = "pkg://ptq.configs"
#: Most combinations of a sweep checked before the first job starts.
MAX_CHECKED_JOBS = 256

RUN_HELP = """usage: python -m ptq run [config=PRESET] [quant=RECIPE] [key=value ...] [-m]

Calibrate, quantize, export (ComfyUI + diffusers) and report. Every key is checked: a typo is an error.

presets (config=):   {presets}
recipes (quant=):    {recipes}
weight methods:      quant/weight={weights}
activation methods:  quant/activation={activations}

main keys (see README.md for all):
  model.path=DIR|HUB_ID      diffusers folder or hub id in the HF cache (tiny presets: the packaged model)
  model.device=auto|cpu|cuda, model.dtype=bfloat16
  quant.format={formats}
  quant.layers.exclude=[...]  quant.layers.keep_first_blocks=N
  quant.weight.damp=0.01     quant.weight.blocks_per_pass=N (GPTQ)   quant.mixed.enabled=true
  calib.num_prompts=N  calib.num_steps=N  calib.height/width/num_frames  calib.prompts_file=FILE
  calib.samples_per_call=N (|x| samples per call for quant/activation=mse, percentile; 0 = as they ask)
  eval.num_prompts=N  eval.enabled=false  eval.decode=false  eval.cache_dir=DIR
  eval.runtimes=[{runtimes}]  (ComfyUI per GPU in the report; NAME+eager: kitchen's
                             eager arithmetic; [] = none)
  export.targets=[comfyui,diffusers]  export.unquantized_dtype=bfloat16|float32
  hydra.run.dir=DIR (output folder; default outputs/PRESET/RECIPE/DATE)   -m: sweep comma-separated values

examples:
  python -m ptq run config=tiny_nvfp4
  python -m ptq run config=wan_nvfp4 model.path=/path/to/Wan2.2-TI2V-5B-Diffusers quant=nvfp4_gptq_4o6_act_mse
  python -m ptq run -m config=tiny_nvfp4 quant=fp8,nvfp4 calib.num_prompts=8,32
"""


class UserError(ValueError):
    """A mistake on the command line or in the settings: printed as one line, exit code 2."""


def run_pipeline(cfg: RunConfig, out_dir: Path, *, recipe_name: str | None = None) -> dict[str, Any]:
    """Validate ``cfg`` and run the whole job; returns the report dict (also written to ``out_dir``)."""
    from ptq.pipeline.job import run_job

    validate_config(cfg)
    return run_job(cfg, out_dir, recipe_name=recipe_name)


def _recipe_name(choices: dict[str, Any], overrides: list[str]) -> str | None:
    """The ``quant=`` preset's name when no override changed the recipe, else None."""
    changed = any(o.lstrip("+~").startswith(("quant.", "quant/")) for o in overrides)
    return None if changed else choices.get("quant")


# ---------------------------------------------------------------------------------------------------------------
# checking a command line before Hydra runs it
# ---------------------------------------------------------------------------------------------------------------


def _options(group: str) -> list[str]:
    """Names of the options of a config group: its YAML files and its registered schemas (not ``*_schema``)."""
    from hydra.core.config_store import ConfigStore

    names = {p.stem for p in (CONFIG_DIR / group).glob("*.yaml")}
    node: Any = ConfigStore.instance().repo
    for part in group.split("/"):
        node = node.get(part, {}) if isinstance(node, dict) else {}
    names |= {k.removesuffix(".yaml") for k in node if isinstance(k, str) and k.endswith(".yaml")}
    return sorted(n for n in names if not n.endswith("_schema"))


def _schema_keys(node: Any) -> list[str]:
    t = node if isinstance(node, type) else type(node)
    return [f.name for f in fields(t)] if is_dataclass(t) else []


def _explain(exc: BaseException, overrides: list[str]) -> str:
    """One line for a Hydra / OmegaConf composition error."""
    from hydra.errors import MissingConfigException

    msg = str(exc)
    if isinstance(exc, MissingConfigException):
        m = re.search(r"Could not find '([^']+)/([^'/]+)'", msg)
        if m:
            group, name = m.group(1), m.group(2)
            return f"{group}={name}: no such option; choose one of {', '.join(_options(group))}"
    cause = exc.__cause__
    m = re.search(r"Could not override '([^']+)'", msg)
    if m:
        key = m.group(1)
        parent, _, leaf = key.rpartition(".")
        known = _known_keys(parent)
        hint = difflib.get_close_matches(leaf, known, n=1)
        return (f"{key}: no such key" + (f" (did you mean {parent + '.' if parent else ''}{hint[0]}?)" if hint else "")
                + (f"; {parent or 'the config'} has {', '.join(known)}" if known else ""))
    m = re.search(r"Error merging override (\S+?)=(.*)", msg)
    if m:
        key, value = m.group(1), m.group(2)
        group = key.replace(".", "/")
        if group in ("quant/weight", "quant/activation"):
            return f"{key}={value}: choose the method with {group}=NAME, one of {', '.join(_options(group))}"
        detail = str(cause).splitlines()[0] if cause else msg
        return f"{key}={value}: {detail}"
    first = next((ln.strip() for ln in msg.splitlines() if ln.strip()), type(exc).__name__)
    return first


def _known_keys(dotted: str) -> list[str]:
    node: Any = RunConfig
    for part in [p for p in dotted.split(".") if p]:
        match = next((f for f in fields(node) if f.name == part), None) if is_dataclass(node) else None
        if match is None:
            return []
        node = match.type if isinstance(match.type, type) else None
        if node is None:
            default = match.default_factory() if callable(match.default_factory) else match.default
            node = type(default)
    return _schema_keys(node)


def _did_you_mean(dotted: str, cfg: Any) -> str:
    """`` (did you mean <the closest declared key>?)`` for a key added with ``+`` (empty when none is close)."""
    import difflib

    from omegaconf import OmegaConf

    parent, _, leaf = dotted.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    schema = OmegaConf.get_type(node) if node is not None else None
    known = _schema_keys(schema) if schema is not None and is_dataclass(schema) else []
    hint = difflib.get_close_matches(leaf, known, n=1)
    return f" (did you mean {parent + '.' if parent else ''}{hint[0]}?)" if hint else ""


def _unknown_keys(cfg: Any, prefix: str = "") -> list[str]:
    """Keys of the composed config that its structured schema does not declare (added with ``+key=...``)."""
    from omegaconf import DictConfig, OmegaConf

    out: list[str] = []
    if not isinstance(cfg, DictConfig):
        return out
    schema = OmegaConf.get_type(cfg)
    declared = set(_schema_keys(schema)) if schema is not None and is_dataclass(schema) else None
    for key in cfg.keys():
        full = f"{prefix}{key}"
        if declared is not None and key not in declared and key != "hydra":
            out.append(full)
            continue
        child = cfg._get_node(key)
        if isinstance(child, DictConfig):
            out += _unknown_keys(child, full + ".")
    return out


def _jobs(overrides: list[str], multirun: bool) -> list[list[str]]:
    """The override lists of every job of the command line (the sweep's combinations with ``-m``)."""
    if not multirun:
        return [overrides]
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    choices = []
    for o in parsed:
        if o.is_sweep_override():
            key = o.get_key_element()
            choices.append([f"{key}={v}" for v in o.sweep_string_iterator()])
        else:
            choices.append([o.input_line])
    return [list(c) for c in itertools.islice(itertools.product(*choices), MAX_CHECKED_JOBS)]


def check_command_line(argv: list[str]) -> None:
    """Compose and check every job of ``argv`` (see the module docstring); raise :class:`UserError`."""
    from hydra import compose, initialize_config_module
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from ptq.pipeline.checks import JobError, check_job

    multirun = any(a in ("-m", "--multirun") for a in argv)
    overrides = [a for a in argv if not a.startswith("-") and not a.startswith(("hydra.", "hydra/", "+hydra"))]
    seen_models: set[tuple] = set()
    for job in _jobs(overrides, multirun):
        try:
            with initialize_config_module("ptq.configs", version_base=None):
                dcfg = compose("ptq", overrides=job)
        except (HydraException, OmegaConfBaseException) as exc:
            raise UserError(_explain(exc, job)) from None
        extra = _unknown_keys(dcfg)
        if extra:
            raise UserError(f"{extra[0]}: no such key{_did_you_mean(extra[0], dcfg)} (a '+' does not add keys "
                            "to ptq's settings)" + (f"; also {', '.join(extra[1:])}" if extra[1:] else ""))
        try:
            cfg: RunConfig = OmegaConf.to_object(dcfg)
            validate_config(cfg)
            key = (cfg.model.adapter, cfg.model.path, str(cfg.calib), str(cfg.eval))
            if key not in seen_models:
                seen_models.add(key)
                check_job(cfg)
        except (JobError, ValueError) as exc:
            raise UserError(str(exc)) from None


# ---------------------------------------------------------------------------------------------------------------
# the Hydra application
# ---------------------------------------------------------------------------------------------------------------


def _task(dcfg: Any) -> None:
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from ptq.models.base import ModelLoadError
    from ptq.pipeline.checks import JobError

    cfg: RunConfig = OmegaConf.to_object(dcfg)
    logging.getLogger("ptq").setLevel(cfg.log_level)
    hc = HydraConfig.get()
    out_dir = Path(hc.runtime.output_dir)
    try:
        run_pipeline(cfg, out_dir, recipe_name=_recipe_name(dict(hc.runtime.choices), list(hc.overrides.task)))
    except (JobError, PromptError, ModelLoadError) as exc:
        print(f"ptq run: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print(f"\nptq run: {interrupted_message(out_dir, list(hc.overrides.task))}", file=sys.stderr)
        raise SystemExit(130) from None


def interrupted_message(out_dir: Path, overrides: list[str]) -> str:
    """What an interrupted run left and the command that continues it (the same overrides into the same run folder:
    calibration resumes after its last checkpointed prompt)."""
    import shlex

    from ptq.pipeline.calib_run import CHECKPOINT_NAME, read_checkpoint_header

    ckpt = out_dir / CHECKPOINT_NAME
    head = read_checkpoint_header(ckpt) if ckpt.is_file() else None
    keep = [o for o in overrides if not o.startswith(("hydra.run.dir=", "resume="))]
    command = shlex.join(["python", "-m", "ptq", "run", *keep, f"hydra.run.dir={out_dir}"])
    if head is None:
        return f"interrupted before any calibration prompt was checkpointed; {out_dir} holds no finished export"
    return (f"interrupted after {head['prompts_done']} of {head['num_prompts']} calibration prompts "
            f"({ckpt}); continue with: {command}")


def _help() -> str:
    from ptq.algorithms.recipe import ACTIVATION_METHODS, WEIGHT_METHODS
    from ptq.formats import FORMATS
    from ptq.targets.comfyui.runtime import RUNTIMES

    return RUN_HELP.format(presets=", ".join(_options("config")), recipes=", ".join(_options("quant")),
                           weights="|".join(WEIGHT_METHODS), activations="|".join(ACTIVATION_METHODS),
                           formats="|".join(FORMATS), runtimes=",".join(RUNTIMES))


#: Overrides for ranks > 0 of a multi-process run (torchrun / accelerate): rank 0 owns the run folder (its path
#: is sent to the others), the other ranks write no Hydra files and log warnings only.
NON_MAIN_RANK_OVERRIDES = ["hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=stdout",
                           "log_level=WARNING"]


def hydra_main(argv: list[str]) -> int:
    """Run the Hydra app with ``argv`` as its command line (``config=NAME``, overrides, ``-m``)."""
    import os

    import hydra

    register_configs()
    if any(a in ("-h", "--help") for a in argv):
        print(_help())
        return 0
    if not any(a.startswith(("--cfg", "-c", "--info", "--hydra-help", "--shell-completion")) for a in argv):
        try:
            check_command_line(argv)
        except UserError as exc:
            print(f"ptq run: {exc}", file=sys.stderr)
            return 2
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and int(os.environ.get("RANK", "0")) > 0:
        argv = [*argv, *NON_MAIN_RANK_OVERRIDES]
    old = sys.argv
    sys.argv = ["ptq run", *argv]
    try:
        hydra.main(config_path=CONFIG_PATH, config_name="ptq", version_base=None)(_task)()
    finally:
        sys.argv = old
    return 0
