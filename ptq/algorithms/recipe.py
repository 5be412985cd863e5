"""One dataclass per quantization recipe (torchao style): what to quantize, to which format, how to pick scales.

The same dataclass is the ``quant`` node of the Hydra config (``ptq/config.py``), so a recipe written in YAML,
on the command line or in Python is the same object.
"""

from __future__ import annotations

from dataclasses import dataclass, field

FORMAT_NAMES = ("fp8", "nvfp4")
ACTIVATION_METHODS = ("max", "percentile", "mse")
WEIGHT_METHODS = ("max", "mse", "four_over_six", "gptq")
FALLBACKS = ("bf16", "fp8")


@dataclass
class QuantRecipe:
    """How to quantize the Linears of a model.

    format: "fp8" (float8_e4m3fn W8A8) or "nvfp4" (E2M1 blocks of 16, W4A4).
    weight_only: keep activations in high precision (no ``input_scale`` in the export).
    fp8_per_channel: FP8 weight scale per output channel ``[out, 1]`` instead of per tensor ``[]``.
    activation: how ``input_scale`` is chosen from calibration statistics ("max", "percentile", "mse").
    percentile: for activation="percentile", the percentile of |x| (0-100) used as the clipping value.
    weight: how weight scales are chosen ("max" round-to-nearest, "mse" block-scale search, "four_over_six",
        "gptq" error-compensating rounding).
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
    include: list[str] = field(default_factory=lambda: ["*"])
    exclude: list[str] = field(default_factory=lambda: ["patch_embedding", "condition_embedder.*", "proj_out"])
    keep_first_blocks: int = 0
    keep_last_blocks: int = 0
    fallback: str = "bf16"
    # per-layer overrides, e.g. {"blocks.0.ffn.net.2": "fp8"}; "bf16" keeps a layer unquantized
    layer_formats: dict[str, str] = field(default_factory=dict)

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
