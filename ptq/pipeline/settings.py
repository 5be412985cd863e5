"""The job's settings as dataclasses: the schema of ``ptq run`` (registered with Hydra by :mod:`ptq.config`) and
the input of :func:`ptq.pipeline.job.run_job`.

Prompt files are looked up in the current directory first, then among the files shipped in ``ptq/data``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ptq.algorithms.recipe import QuantRecipe
from ptq.models.base import LoraSpec


@dataclass
class ModelConfig:
    """Which model to load. path: local diffusers folder, hub id (read from the HF cache offline) or null for the
    packaged tiny WAN model. device: "auto" = cuda if available."""

    name: str = "tiny_wan"
    adapter: str = "tiny_wan"  # ptq.models.ADAPTERS key
    path: str | None = None
    dtype: str = "bfloat16"
    device: str = "auto"
    vae_device: str = "cpu"
    # on CPU, run fp16 Linears, and bf16 ones where the CPU has no native bf16 GEMM (no AVX512-BF16 / AMX), as
    # float32 GEMMs rounded once (ptq.models.cpu_matmul; 2-5x faster); no effect on GPUs
    cpu_float32_linear: bool = True
    # on CUDA, replay the transformer forward from CUDA graphs (ptq.calibration.cuda_graph) during the bf16
    # baseline, max-calibration and the quantized evaluation: no host cost per kernel or per observer hook
    cuda_graphs: bool = True
    # LoRAs merged into the weights before calibration: [{path: ..., scale: 1.0, expert: null}] (expert: the
    # target it applies to, e.g. high_noise / low_noise for WAN 2.2 A14B; null = every target)
    loras: list[LoraSpec] = field(default_factory=list)
    # another diffusers scheduler class than the folder's (e.g. FlowMatchEulerDiscreteScheduler for few-step
    # distilled LoRAs) and another flow shift; null = the folder's
    scheduler: str | None = None
    flow_shift: float | None = None
    # keep the weights in CPU memory and stream blocks to the GPU (diffusers' group offloading); quantization then
    # runs on the CPU
    offload: bool = False


@dataclass
class DatasetConfig:
    """Prompts from a `datasets` dataset instead of a text file (name/split/column); empty name = unused.
    name: a hub dataset (read from the HF cache offline) or a builder such as "csv"/"json" with ``data_files``."""

    name: str = ""
    split: str = "train"
    column: str = "text"
    config_name: str | None = None
    data_files: str | None = None


@dataclass
class SamplingConfig:
    """Prompts and sampler settings shared by calibration and evaluation. null fields take the model's defaults."""

    prompts_file: str = "tiny_calib.txt"
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    num_prompts: int = 16
    height: int | None = None
    width: int | None = None
    num_frames: int | None = None
    num_steps: int | None = None
    guidance_scale: float | None = None
    guidance_scale_2: float | None = None  # two-expert models: the low-noise expert's guidance (null: the model's)
    negative_prompt: str | None = ""  # null: the model's own negative prompt
    seed: int = 0
    images: list[str] = field(default_factory=list)  # optional conditioning images (image-to-video)


@dataclass
class CalibConfig(SamplingConfig):
    """Calibration run: hooks on every Linear over the whole denoising schedule, cond + uncond (CFG)."""

    # |x| samples kept per Linear call for activation=percentile/mse: 0 = what the method asks for
    # (SampledActivation.samples_per_call, 4096); > 0 overrides it
    samples_per_call: int = 0
    # two-expert models: "quantized" = calibrate each expert after the earlier ones are quantized (on the trajectory
    # the quantized model produces), "bf16" = all experts in one pass on the bf16 trajectory
    expert_trajectory: str = "quantized"
    # resumable runs: the statistics are checkpointed to <run dir>/calibration_checkpoint.pt after every N prompts
    # (0 = never); the checkpoint is deleted when the run succeeds unless keep_checkpoint
    checkpoint_every: int = 1
    keep_checkpoint: bool = False
    # where GPTQ Hessians accumulate: "device", "host" (pinned CPU memory streamed through the GPU) or "auto" (host
    # when they would take more than half of the GPU's memory)
    hessian_storage: str = "auto"


@dataclass
class EvalConfig(SamplingConfig):
    """Held-out evaluation: bf16 baseline vs quantized model, identical seeds."""

    prompts_file: str = "tiny_eval.txt"
    num_prompts: int = 4
    seed: int = 1000
    decode: bool = True
    cache_dir: str = "${oc.env:PTQ_CACHE_DIR,.ptq_cache}"  # bf16 reference outputs, shared by sweeps
    enabled: bool = True
    # ComfyUI targets to simulate and report side by side (ptq.eval.runtimes.RUNTIMES: blackwell, hopper, ada,
    # ampere, turing, cpu; NAME+eager for comfy-kitchen's eager arithmetic); [] = only the bf16 simulation above
    runtimes: list[str] = field(default_factory=list)


@dataclass
class ExportConfig:
    """targets: file target names (see ptq.targets.TARGETS). unquantized_dtype: bfloat16 or float32. filename:
    the stem of every export, then ``_<target>`` (``_comfyui.safetensors``, ``_diffusers/``): ``{model}`` = the
    model's file stem (``ModelAdapter.file_stem``), ``{recipe}`` = the recipe (its ``quant=`` name, else a slug of
    its settings), ``{expert}`` = the expert of a two-expert model (``high_noise``, ``low_noise``)."""

    targets: list[str] = field(default_factory=lambda: ["comfyui", "diffusers"])
    unquantized_dtype: str = "bfloat16"
    filename: str = "{model}_{recipe}"
    verify: bool = True


@dataclass
class RunConfig:
    """The whole job: ``python -m ptq run config=NAME key=value ...``."""

    model: ModelConfig = field(default_factory=ModelConfig)
    quant: QuantRecipe = field(default_factory=QuantRecipe)
    calib: CalibConfig = field(default_factory=CalibConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    preset: str = "custom"
    progress: bool = True
    log_level: str = "INFO"
    # continue a killed run's calibration: null = from the checkpoint in hydra.run.dir if there is one (re-running
    # into the same folder); true = also from the newest matching one in a sibling run folder; false = start over
    resume: bool | None = None
