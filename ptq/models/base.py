"""The model-adapter seam: everything ptq needs to know about a model family, behind one interface.

An adapter loads its components one at a time (text encoder first, freed before the denoiser loads), encodes
prompts, runs the family's denoising loop with a replaceable transformer forward and step callbacks, names the
modules to quantize (:class:`QuantTarget`: one for a single transformer, one per expert for a model that switches
experts along the schedule), states its layer rules (block numbering, default high-precision layers) and owns the
map from its module names to the key names of each export target.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ptq.algorithms.layers import LayerRules
from ptq.models.files import UNKNOWN_FAMILY, FileFamily


class ModelLoadError(RuntimeError):
    """The model path is missing, incomplete or not a folder of the adapter's family."""


@dataclass(frozen=True)
class SampleSpec:
    """One video to denoise (pixels, frames, steps, classifier-free guidance scale, noise seed; a model with two
    experts may run its second expert with ``guidance_scale_2``, None = the same scale)."""

    height: int
    width: int
    num_frames: int
    num_steps: int
    guidance_scale: float
    seed: int
    guidance_scale_2: float | None = None


@dataclass
class LoraSpec:
    """A LoRA to merge into the weights before calibration (``model.loras``): a ``.safetensors`` file in any of the
    layouts people share (diffusers/PEFT, ComfyUI ``diffusion_model.*``, kohya/musubi ``lora_unet_*``), its
    strength, and the quantization target it applies to (None: every target; for WAN 2.2 A14B ``high_noise`` or
    ``low_noise``, as the paired LoRA files are published)."""

    path: str = ""
    scale: float = 1.0
    expert: str | None = None


@dataclass
class QuantTarget:
    """A module to quantize: ``name`` (``"transformer"``, or one expert's name), the module, and the timesteps it
    serves (``[low, high)`` on the scheduler's 0-1000 scale; None = every step)."""

    name: str
    module: nn.Module
    timesteps: tuple[float, float] | None = None

    def serves(self, t: float) -> bool:
        return self.timesteps is None or self.timesteps[0] <= float(t) < self.timesteps[1]


#: ``on_step_end(i, t, latents)`` after denoising step ``i`` (latents float32, the model's device).
StepCallback = Callable[[int, torch.Tensor, torch.Tensor], None]
#: A replacement for a target's forward (same arguments as the module's ``forward``), e.g. a CUDA-graph runner.
Forward = Callable[..., Any]


class ReferenceCheckpoint(ABC):
    """The unquantized module a quantized file was made from, as ``ptq verify`` reads it (one model folder and
    component; :meth:`ModelAdapter.reference` finds it)."""

    #: How reports name the module class the file's tensors must load into (e.g. "diffusers WanTransformer3DModel").
    label: str = "module"

    @abstractmethod
    def content_hash(self, cache_dir: Path | None = None) -> str:
        """sha256 of the module's weight files (what exports record as ``ptq_source_sha256``)."""

    @abstractmethod
    def load(self, device: str) -> nn.Module:
        """The module in bf16 on ``device``, in eval mode, without gradients."""

    def empty(self, module: nn.Module) -> nn.Module:
        """A module of the same class and config on the ``meta`` device (strict state-dict load checks)."""
        with torch.device("meta"):
            config = getattr(module, "config", None)
            if config is not None and hasattr(type(module), "from_config"):
                return type(module).from_config(config)
            return type(module)()

    @abstractmethod
    def example_inputs(self, module: nn.Module) -> tuple[tuple, dict[str, Any]]:
        """(args, kwargs) of one forward of ``module`` on seeded random inputs (its Linears' inputs get captured)."""

    def unquantized_problems(self, state: Mapping[str, torch.Tensor]) -> list[str]:
        """Problems of the file's unquantized tensors for this family (``state``: module names -> tensors)."""
        return []


class ModelAdapter(ABC):
    """One model family (see the module docstring). Construct with the model folder (or hub id) and the settings
    the loading needs; nothing heavy is loaded until :meth:`encode_prompts` / :meth:`load`.

    Class attributes: ``name`` (the ``model.adapter`` key), ``layer_rules``, ``module_classes`` (class names of the
    modules it quantizes: how exporters and tools find the adapter of a bare module), ``file_family`` (how the
    family's checkpoints look: namings, architecture from shapes, loader build rules; ``ptq inspect``).
    """

    name: ClassVar[str]
    layer_rules: ClassVar[LayerRules]
    module_classes: ClassVar[tuple[str, ...]] = ()
    file_family: ClassVar[FileFamily] = UNKNOWN_FAMILY

    root: Path

    @classmethod
    def resolve(cls, path: Any) -> Path:
        """The model folder for ``path`` (raise :class:`ModelLoadError` when there is none)."""
        if path is None:
            raise ModelLoadError("model.path is not set")
        return Path(path)

    @classmethod
    def missing_parts(cls, root: Path) -> list[str]:
        """Parts (sub-folders, files) a usable model folder needs that ``root`` lacks."""
        return []

    @classmethod
    def weight_problems(cls, root: Path) -> list[str]:
        """Weight files of ``root`` that are missing, cut short or unreadable, one line each naming the file
        (read from headers only)."""
        return []

    # -- identity -------------------------------------------------------------------------------------------
    @property
    @abstractmethod
    def display_name(self) -> str:
        """What files record as their source model: a hub id or a folder name, never an absolute path."""

    @property
    def file_stem(self) -> str:
        """The model's part of export file names (``export.filename``'s ``{model}``): its display name, made a
        file name."""
        return re.sub(r"[^A-Za-z0-9._-]+", "_", self.display_name.rstrip("/").split("/")[-1]).strip("_") or "model"

    @abstractmethod
    def content_hash(self, cache_dir: Path | None = None) -> str:
        """sha256 of the quantized modules' weight files (cached by path, size and modification time)."""

    @abstractmethod
    def fingerprint(self) -> str:
        """A cheap identity of the weights (names, sizes, modification times) for cache keys."""

    # -- sampling -------------------------------------------------------------------------------------------
    @property
    @abstractmethod
    def sample_defaults(self) -> dict[str, Any]:
        """The model's own sampling defaults (``height``, ``width``, ``num_frames``, ``num_inference_steps``,
        ``guidance_scale``, ...)."""

    @abstractmethod
    def sample_spec(self, *, height: int | None = None, width: int | None = None, num_frames: int | None = None,
                    num_steps: int | None = None, guidance_scale: float | None = None, seed: int = 0) -> SampleSpec:
        """A spec with the model's defaults for what is None."""

    @abstractmethod
    def check_spec(self, spec: SampleSpec) -> dict[str, str]:
        """Problems of ``spec`` for this model, by field name (``{"height": "must be a multiple of 32"}``)."""

    # -- components -----------------------------------------------------------------------------------------
    @abstractmethod
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Text embeddings ``[N, L, D]`` on the CPU (loads the text encoder on first use)."""

    @abstractmethod
    def free_text_encoder(self) -> None:
        """Drop the text encoder once every prompt is encoded."""

    @abstractmethod
    def load(self, *, decoder: bool = True) -> None:
        """Load the denoiser(s) and scheduler (and the decoder / image encoder when ``decoder``)."""

    @abstractmethod
    def targets(self) -> dict[str, QuantTarget]:
        """The modules to quantize, by target name (after :meth:`load`)."""

    @abstractmethod
    def denoise(self, prompt_embeds: torch.Tensor, negative_embeds: torch.Tensor | None, spec: SampleSpec, *,
                condition: Any = None, forward: Mapping[str, Forward] | None = None,
                on_step_start: Callable[[int], None] | None = None, on_step_end: StepCallback | None = None,
                ) -> torch.Tensor:
        """Sample one video; returns its final latents (float32). ``forward``: replacements of target forwards by
        target name; ``condition``: from :meth:`encode_condition` (image-to-video)."""

    def encode_condition(self, image: torch.Tensor) -> Any:
        """Conditioning of an image ``[3, H, W]`` in [0, 1] for :meth:`denoise`."""
        raise NotImplementedError(f"model adapter {self.name!r} has no image conditioning")

    @property
    def can_decode(self) -> bool:
        return False

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Video frames ``[F, H, W, 3]`` float32 in [0, 1]."""
        raise NotImplementedError(f"model adapter {self.name!r} cannot decode latents")

    # -- files ----------------------------------------------------------------------------------------------
    @classmethod
    def reference(cls, model_path: Any, *, file_name: str, metadata: Mapping[str, str],
                  component: str | None = None) -> ReferenceCheckpoint:
        """The unquantized module a quantized file of this family was made from (``--model``; ``component``: which
        of the folder's modules, default from the file's name and metadata); raise :class:`ModelLoadError` when the
        path holds none."""
        raise ModelLoadError(f"model family {cls.name!r} cannot verify files")

    # -- export ---------------------------------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def target_key(cls, key: str, target: str) -> str:
        """The name export ``target`` (``"comfyui"``, ``"diffusers"``) gives the state-dict key ``key``."""

    @classmethod
    @abstractmethod
    def module_key(cls, key: str, target: str) -> str | None:
        """Inverse of :meth:`target_key` (None for a key of another family)."""

    @classmethod
    def target_header(cls, target: str, module_config: Mapping[str, Any]) -> dict[str, str]:
        """Extra header entries export ``target`` should write for a module with this config (e.g. ComfyUI's
        ``config`` override where its shape detection would build the model wrong); default none."""
        return {}

    def export_stem(self, target_name: str) -> str:
        """File name stem of the exports of ``target_name`` (``model`` for a single transformer)."""
        return "model"

    def after_quantize(self, target_name: str) -> None:
        """Called once the target's Linears were replaced in place (e.g. to re-apply weight offloading)."""
        return None

    @property
    def compute_device(self) -> torch.device | None:
        """The GPU that per-layer work (quantization, export verification) runs on while the targets' weights live
        in CPU memory (offloading), one layer at a time; None = where the weights are."""
        return None

    def step_timesteps(self, spec: SampleSpec) -> list[float] | None:
        """The scheduler's timestep of each denoising step of ``spec`` (None when the family has no such scale)."""
        return None

    def export_component(self, target_name: str) -> str:
        """The component (sub-folder) a folder export writes ``target_name`` to (diffusers: ``transformer``, and
        ``transformer_2`` for a second expert)."""
        return "transformer"

    def export_info(self) -> dict[str, Any]:
        """Extra header metadata of every export (e.g. the merged LoRAs); str -> JSON-able."""
        return {}

    def export_metadata(self, target_name: str) -> dict[str, Any]:
        """Header metadata of the exports of one target (several targets: which one it is)."""
        return {}

    def comfyui_runtime(self, runtime: Any) -> Any:
        """A ComfyUI runtime (:class:`ptq.targets.comfyui.runtime.Runtime`) as it computes this family's files: with
        the compute dtype ComfyUI picks for the family there (its ``supported_inference_dtypes``). The runtimes'
        own compute dtypes are ComfyUI's choice for WAN (float16 on NVIDIA GPUs, float32 on the CPU), which this
        default keeps."""
        return runtime
