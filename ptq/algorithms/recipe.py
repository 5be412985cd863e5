"""One dataclass per quantization recipe (torchao style): what to quantize, to which format, how to pick scales.

The same dataclass is the ``quant`` node of the Hydra config (``ptq/config.py``), so a recipe written in YAML,
on the command line or in Python is the same object.
"""

from __future__ import annotations

from dataclasses import dataclass, field

FORMAT_NAMES = ("fp8", "nvfp4")
ACTIVATION_METHODS = ("max", "percentile", "mse", "mse_steps")
WEIGHT_METHODS = ("max", "mse", "four_over_six", "gptq", "gptq_max", "gptq_four_over_six")
MIXED_FORMATS = ("nvfp4", "fp8", "bf16")
BITS_SCOPES = ("all", "quantized")
FALLBACKS = ("bf16", "fp8")
#: Storage bits per weight element of each format, scales included (NVFP4: 4-bit code + one 8-bit scale per 16).
_FORMAT_BITS = {"nvfp4": 4.5, "fp8": 8.0, "bf16": 16.0}


@dataclass
class QuantRecipe:
    """How to quantize the Linears of a model.

    format: "fp8" (float8_e4m3fn W8A8) or "nvfp4" (E2M1 blocks of 16, W4A4).
    weight_only: keep activations in high precision (no ``input_scale`` in the export).
    fp8_per_channel: FP8 weight scale per output channel ``[out, 1]`` instead of per tensor ``[]``.
    activation: how ``input_scale`` is chosen from calibration statistics ("max", "percentile", "mse" = clip
        minimising the runtime quantization error of sampled activations, "mse_steps" = the same with every
        denoising step weighted equally); see ``ptq.algorithms.activation_scale``.
    percentile: for activation="percentile", the percentile of |x| (0-100) used as the clipping value.
    weight: how weight scales/codes are chosen ("max" round-to-nearest, "mse" block/global-scale search (FP8:
        MSE-clipped scale), "four_over_six", "gptq" = GPTQ on "mse" scales, "gptq_max" = GPTQ on amax scales,
        "gptq_four_over_six" = GPTQ on Four-over-Six scales);
        see ``ptq.algorithms.weight_search`` / ``ptq.algorithms.gptq``.
    gptq_damp: GPTQ dampening, a fraction of mean(diag(H)) added to the Hessian diagonal (0 < d < 1).
    gptq_blocks_per_pass: 0 = one calibration pass collects every Linear's Hessian (4*in^2 bytes each); N > 0 =
        quantize N transformer blocks at a time, each pass re-running calibration on the partially quantized
        model (memory-bounded, sequential GPTQ).
    mixed_precision: choose each layer's format among ``mixed_formats`` from a measured sensitivity analysis to
        meet ``bits_budget`` (average storage bits per Linear weight, scales counted: NVFP4 4.5, FP8 8, bf16 16)
        with the least model-output error; the result is written to ``layer_formats``. Layers forced to high
        precision by include/exclude/keep_*_blocks (or named in layer_formats) are fixed, not candidates.
    bits_scope: which weights ``bits_budget`` averages over: "all" = every nn.Linear of the model, fixed layers
        included (the report's "bits per weight"); "quantized" = only the candidate layers (the ones the recipe
        would quantize; a pure NVFP4 recipe is 4.5 whatever the excluded layers weigh).
    sensitivity: run the per-layer / per-block sensitivity analysis (and put it in the report) even without
        mixed precision. sensitivity_inputs: transformer forwards (calibration inputs, spread over steps and
        prompts) used to measure it.
    include / exclude: fnmatch patterns over module names (diffusers names); exclude wins.
    keep_first_blocks / keep_last_blocks: keep that many transformer blocks (``blocks.N.``) in high precision.
    fallback: what a layer that cannot take ``format`` (e.g. in_features not a multiple of 16 for NVFP4) becomes.
    """

    format: str = "nvfp4"
    weight_only: bool = False
    fp8_per_channel: bool = False
    activation: str = "max"
    percentile: float = 99.99
    weight: str = "max"
    gptq_damp: float = 0.01
    gptq_blocks_per_pass: int = 0
    include: list[str] = field(default_factory=lambda: ["*"])
    exclude: list[str] = field(default_factory=lambda: ["patch_embedding", "condition_embedder.*", "proj_out"])
    keep_first_blocks: int = 0
    keep_last_blocks: int = 0
    fallback: str = "bf16"
    # per-layer overrides, e.g. {"blocks.0.ffn.net.2": "fp8"}; "bf16" keeps a layer unquantized
    layer_formats: dict[str, str] = field(default_factory=dict)
    mixed_precision: bool = False
    bits_budget: float = 5.0
    bits_scope: str = "all"
    mixed_formats: list[str] = field(default_factory=lambda: ["nvfp4", "fp8", "bf16"])
    sensitivity: bool = False
    sensitivity_inputs: int = 8

    def validate(self) -> None:
        """Raise ValueError naming the field for any out-of-range value."""
        if self.format not in FORMAT_NAMES:
            raise ValueError(f"quant.format={self.format!r}: expected one of {FORMAT_NAMES}")
        if self.activation not in ACTIVATION_METHODS:
            raise ValueError(f"quant.activation={self.activation!r}: expected one of {ACTIVATION_METHODS}")
        if self.weight not in WEIGHT_METHODS:
            raise ValueError(f"quant.weight={self.weight!r}: expected one of {WEIGHT_METHODS}")
        if self.fallback not in FALLBACKS:
            raise ValueError(f"quant.fallback={self.fallback!r}: expected one of {FALLBACKS}")
        if not 0.0 < self.percentile <= 100.0:
            raise ValueError(f"quant.percentile={self.percentile}: expected 0 < p <= 100")
        if self.keep_first_blocks < 0 or self.keep_last_blocks < 0:
            raise ValueError("quant.keep_first_blocks / keep_last_blocks must be >= 0")
        if self.weight in ("four_over_six",) and self.format != "nvfp4":
            raise ValueError(f"quant.weight={self.weight!r} applies to nvfp4 only")
        for name, fmt in self.layer_formats.items():
            if fmt not in (*FORMAT_NAMES, "bf16"):
                raise ValueError(f"quant.layer_formats[{name!r}]={fmt!r}: expected fp8, nvfp4 or bf16")
        if not 0.0 < self.gptq_damp < 1.0:
            raise ValueError(f"quant.gptq_damp={self.gptq_damp}: expected 0 < damp < 1")
        if self.gptq_blocks_per_pass < 0:
            raise ValueError(f"quant.gptq_blocks_per_pass={self.gptq_blocks_per_pass}: expected >= 0")
        if not self.mixed_formats or any(f not in MIXED_FORMATS for f in self.mixed_formats) \
                or len(set(self.mixed_formats)) != len(self.mixed_formats):
            raise ValueError(f"quant.mixed_formats={list(self.mixed_formats)}: expected distinct values from "
                             f"{MIXED_FORMATS}")
        if not (self.bits_budget > 0.0 and self.bits_budget == self.bits_budget):
            raise ValueError(f"quant.bits_budget={self.bits_budget}: expected > 0 (average bits per Linear weight)")
        if self.mixed_precision and min(_FORMAT_BITS[f] for f in self.mixed_formats) > self.bits_budget:
            raise ValueError(f"quant.bits_budget={self.bits_budget} is below the smallest format in "
                             f"quant.mixed_formats={list(self.mixed_formats)} "
                             f"({min(_FORMAT_BITS[f] for f in self.mixed_formats)} bits per weight)")
        if self.bits_scope not in BITS_SCOPES:
            raise ValueError(f"quant.bits_scope={self.bits_scope!r}: expected one of {BITS_SCOPES}")
        if self.sensitivity_inputs < 1:
            raise ValueError(f"quant.sensitivity_inputs={self.sensitivity_inputs}: expected >= 1")
        if self.weight.startswith("gptq") and self.mixed_precision and self.gptq_blocks_per_pass:
            raise ValueError("quant.mixed_precision with GPTQ needs quant.gptq_blocks_per_pass=0 (the sensitivity "
                             "analysis quantizes each layer with its Hessian from the one calibration pass)")
