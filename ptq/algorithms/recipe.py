"""A quantization recipe, composed of parts (torchao style: one config object per method).

``QuantRecipe`` = number format (a name in :data:`ptq.formats.FORMATS`) + weight method + activation method +
smoothing + layer selection + mixed precision. Each part is a dataclass; the alternatives of a part are subclasses with their
own fields (``GPTQWeight`` adds ``damp``, ...), which is also how Hydra sees them: one config group per part
(``quant/weight``, ``quant/activation``, ``quant/smoothing``), each option its own structured schema, so a typo is an error. The named
options of each group are :data:`WEIGHT_METHODS` and :data:`ACTIVATION_METHODS`; the code that runs a method is
looked up by the part's type in :mod:`ptq.algorithms.methods`.

Each part states the calibration statistics it needs (:meth:`QuantRecipe.needs`), and calibration collects those.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

from ptq.calibration.needs import CalibrationNeeds
from ptq.formats import FORMATS

#: The format name of a Linear that is kept unquantized (in the model's own dtype).
KEEP = "bf16"
SCALE_METHODS = ("max", "mse", "four_over_six")
BITS_SCOPES = ("all", "quantized")
STEP_WEIGHTINGS = ("none", "relative")


def _check_format(key: str, name: str, *, keep_ok: bool) -> None:
    if name in FORMATS or (keep_ok and name == KEEP):
        return
    known = sorted(FORMATS) + ([KEEP] if keep_ok else [])
    raise ValueError(f"{key}={name!r}: expected one of {', '.join(known)}")


# ---------------------------------------------------------------------------------------------------------------
# weight methods
# ---------------------------------------------------------------------------------------------------------------


class _NamedPart:
    """A recipe part that compares equal to another with the same fields, or to its name
    (``recipe.weight == "gptq"``, ``recipe.activation == "mse"``)."""

    @property
    def label(self) -> str:
        raise NotImplementedError

    def __eq__(self, other: object) -> bool:
        if isinstance(other, str):
            return self.label == other
        return type(self) is type(other) and vars(self) == vars(other)

    __hash__ = None  # type: ignore[assignment]


@dataclass(eq=False)
class WeightMethod(_NamedPart):
    """Round-to-nearest (``method="rtn"``), the base of every weight method.

    scales: how the weight scales are chosen: "max" (absolute maximum), "mse" (NVFP4: per-block float8 scale and
        global scale search minimising the weight error; FP8: MSE-clipped scale), "four_over_six" (NVFP4: block max
        code 6 or 4, whichever is closer; FP8 layers use "mse"). See ``ptq.algorithms.weight_search``.
    fp8_per_channel: FP8 weight scale per output channel ``[out, 1]`` instead of per tensor ``[]``.
    """

    method_name: ClassVar[str] = "rtn"
    method: str = "rtn"
    scales: str = "max"
    fp8_per_channel: bool = False

    @property
    def label(self) -> str:
        """Short name: the scale method ("max", "mse", "four_over_six")."""
        return self.scales

    def needs(self) -> CalibrationNeeds:
        return CalibrationNeeds()

    def validate(self) -> None:
        if self.method != self.method_name:
            raise ValueError(f"quant.weight.method={self.method!r} does not match the selected schema "
                             f"{type(self).__name__} ({self.method_name!r}); choose the method with "
                             f"quant/weight=NAME (one of {', '.join(WEIGHT_METHODS)})")
        if self.scales not in SCALE_METHODS:
            raise ValueError(f"quant.weight.scales={self.scales!r}: expected one of {', '.join(SCALE_METHODS)}")


@dataclass(eq=False)
class GPTQWeight(WeightMethod):
    """GPTQ: error-compensating rounding with the layer's input Hessian (Frantar et al. 2022) on ``scales``.

    damp: dampening, a fraction of mean(diag(H)) added to the Hessian diagonal (0 < damp < 1).
    block_size: columns per lazy-batch update. blocks_per_pass: 0 = one calibration pass collects every Linear's
        Hessian (4*in^2 bytes each); N > 0 = quantize N transformer blocks at a time, each pass re-running
        calibration on the partially quantized model (memory-bounded, sequential GPTQ).
    batched: sweep the layers of one shape together (``ptq.algorithms.gptq_batched``: the same codes and scales
        as layer by layer, far fewer kernel launches); False = one layer at a time (``ptq.algorithms.gptq``).
    batch_gib: working memory of one batch in GiB (0 = auto: 40% of the free GPU memory, at most 16 GiB; 2 GiB on
        CPU); results do not depend on it.
    act_aware: W+A recipes: fit the weight to the runtime-quantized input ``q(x)`` instead of ``x`` (least-squares
        target ``W H_xq H_qq^-1`` for the layer's input quantizer, then GPTQ with ``H_qq``; ``ptq.algorithms.
        act_aware``); the statistics of ``q(x)`` come from a second calibration pass after the input scales are
        chosen (``blocks_per_pass`` bounds its memory the same way, 8*in^2 bytes per layer).
    act_aware_variant: formats that quantize their activations at run time (``convrot_w4a4``): the runtime kernel
        whose quantized input the weights are fitted to (``NumberFormat.runtime_variant``: "int4" for SM 7.5-8.9,
        "int8" for Hopper / Blackwell; "" = the format's nominal one).
    """

    method_name: ClassVar[str] = "gptq"
    method: str = "gptq"
    scales: str = "mse"
    damp: float = 0.01
    block_size: int = 128
    blocks_per_pass: int = 0
    batched: bool = True
    batch_gib: float = 0.0
    act_aware: bool = False
    act_aware_variant: str = ""

    @property
    def label(self) -> str:
        base = "gptq" if self.scales == "mse" else f"gptq_{self.scales}"
        if not self.act_aware:
            return base
        return f"{base}_act_aware" + (f"_{self.act_aware_variant}" if self.act_aware_variant else "")

    def needs(self) -> CalibrationNeeds:
        """The layers' input Hessians (which calibration pass collects them: ``ptq.algorithms.strategies``)."""
        return CalibrationNeeds(hessians=True)

    def validate(self) -> None:
        super().validate()
        if not 0.0 < self.damp < 1.0:
            raise ValueError(f"quant.weight.damp={self.damp}: expected 0 < damp < 1")
        if self.block_size < 1:
            raise ValueError(f"quant.weight.block_size={self.block_size}: expected >= 1")
        if self.blocks_per_pass < 0:
            raise ValueError(f"quant.weight.blocks_per_pass={self.blocks_per_pass}: expected >= 0")
        if not self.batch_gib >= 0.0:
            raise ValueError(f"quant.weight.batch_gib={self.batch_gib}: expected >= 0 (0 = auto)")


#: Named weight methods (the options of the Hydra group ``quant/weight``; also accepted as strings in Python).
WEIGHT_METHODS: dict[str, WeightMethod] = {
    "max": WeightMethod(scales="max"),
    "mse": WeightMethod(scales="mse"),
    "four_over_six": WeightMethod(scales="four_over_six"),
    "gptq": GPTQWeight(scales="mse"),
    "gptq_max": GPTQWeight(scales="max"),
    "gptq_four_over_six": GPTQWeight(scales="four_over_six"),
    "gptq_act_aware": GPTQWeight(scales="mse", act_aware=True),
    "gptq_four_over_six_act_aware": GPTQWeight(scales="four_over_six", act_aware=True),
}


# ---------------------------------------------------------------------------------------------------------------
# activation methods
# ---------------------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class ActivationMethod(_NamedPart):
    """How the static ``input_scale`` is chosen: ``method="max"`` (observed max |x|) or ``"none"`` (weight-only:
    activations stay in high precision, no ``input_scale``); ``"dynamic"``: no static scale, for formats that scale
    activations at run time (int8, mxfp8; no calibration). Layers of such formats quantize their activations at run
    time under every method but "none". Subclasses add clipping methods."""

    method_names: ClassVar[tuple[str, ...]] = ("max", "none", "dynamic")
    method: str = "max"

    @property
    def label(self) -> str:
        return self.method

    def needs(self) -> CalibrationNeeds:
        return CalibrationNeeds() if self.method in ("none", "dynamic") else CalibrationNeeds(amax=True)

    def validate(self) -> None:
        if self.method not in self.method_names:
            raise ValueError(f"quant.activation.method={self.method!r} does not match the selected schema "
                             f"{type(self).__name__}; choose the method with quant/activation=NAME (one of "
                             f"{', '.join(ACTIVATION_METHODS)})")


@dataclass(eq=False)
class SampledActivation(ActivationMethod):
    """A clipping method that searches sampled |x| values: calibration keeps ``samples_per_call`` of them per Linear
    call (``calib.samples_per_call`` > 0 overrides the number)."""

    samples_per_call: ClassVar[int] = 4096

    def needs(self) -> CalibrationNeeds:
        return CalibrationNeeds(amax=True, samples=self.samples_per_call)


@dataclass(eq=False)
class PercentileActivation(SampledActivation):
    """Clip at the ``percentile`` (0-100) of the sampled |x| (never above the max)."""

    method_names: ClassVar[tuple[str, ...]] = ("percentile",)
    method: str = "percentile"
    percentile: float = 99.99

    def validate(self) -> None:
        super().validate()
        if not 0.0 < self.percentile <= 100.0:
            raise ValueError(f"quant.activation.percentile={self.percentile}: expected 0 < p <= 100")


@dataclass(eq=False)
class MSEActivation(SampledActivation):
    """Clip minimising the runtime quantization error of the sampled activation blocks (see
    ``ptq.algorithms.activation_scale``). step_weighting: "none" (plain sum over the samples) or "relative" (every
    denoising step weighted equally, label "mse_steps"). grid / lo: ``grid`` log-spaced clip ratios in [lo, 1]."""

    method_names: ClassVar[tuple[str, ...]] = ("mse",)
    method: str = "mse"
    step_weighting: str = "none"
    grid: int = 48
    lo: float = 0.3

    @property
    def label(self) -> str:
        return "mse_steps" if self.step_weighting == "relative" else "mse"

    def validate(self) -> None:
        super().validate()
        if self.step_weighting not in STEP_WEIGHTINGS:
            raise ValueError(f"quant.activation.step_weighting={self.step_weighting!r}: expected one of "
                             f"{', '.join(STEP_WEIGHTINGS)}")
        if self.grid < 1 or not 0.0 < self.lo <= 1.0:
            raise ValueError(f"quant.activation grid={self.grid}, lo={self.lo}: expected grid >= 1, 0 < lo <= 1")


#: Named activation methods (the options of the Hydra group ``quant/activation``; strings in Python).
ACTIVATION_METHODS: dict[str, ActivationMethod] = {
    "none": ActivationMethod(method="none"),
    "max": ActivationMethod(method="max"),
    "dynamic": ActivationMethod(method="dynamic"),
    "percentile": PercentileActivation(),
    "mse": MSEActivation(),
    "mse_steps": MSEActivation(step_weighting="relative"),
}


# ---------------------------------------------------------------------------------------------------------------
# smoothing
# ---------------------------------------------------------------------------------------------------------------

SMOOTHING_STATISTICS = ("max", "mean")


@dataclass
class Smoothing:
    """Per-input-channel smoothing that ComfyUI runs (``pre_quant_scale``; ``ptq.algorithms.smoothing``): the layer
    computes ``linear(x * p, W / p)``, ``p`` chosen per layer by a grid search minimising the layer's quantized
    output error on calibration input rows. ``method="none"`` (off) or ``"search"``.

    statistics: candidate families searched: "max" = SmoothQuant ``1/p_j = amax_j^a / wmax_j^(1-a)`` (per-channel
        max |x| and max |W| of input column j), "mean" = AWQ ``1/p_j = mean|x_j|^a``. alphas: the migration
        strengths ``a`` tried (no smoothing, p = 1, is always a candidate). rows: calibration input rows per layer
        the search measures on. formats: the formats whose layers are smoothed (ComfyUI reads ``pre_quant_scale``
        for nvfp4 layers only).
    """

    method: str = "none"
    statistics: list[str] = field(default_factory=lambda: ["max"])
    alphas: list[float] = field(default_factory=lambda: [round(0.1 * k, 1) for k in range(11)])
    rows: int = 4096
    formats: list[str] = field(default_factory=lambda: ["nvfp4"])

    @property
    def enabled(self) -> bool:
        return self.method != "none"

    @property
    def label(self) -> str:
        """"none", "smoothquant" (max), "awq" (mean) or "smoothquant+awq"."""
        if not self.enabled:
            return "none"
        names = {"max": "smoothquant", "mean": "awq"}
        return "+".join(names[s] for s in self.statistics)

    def applies_to(self, fmt: str) -> bool:
        return self.enabled and fmt in self.formats

    def needs(self) -> CalibrationNeeds:
        return CalibrationNeeds(amax=True, rows=self.rows) if self.enabled else CalibrationNeeds()

    def validate(self) -> None:
        if self.method not in ("none", "search"):
            raise ValueError(f"quant.smoothing.method={self.method!r}: expected 'none' or 'search' (choose with "
                             f"quant/smoothing=NAME, one of {', '.join(SMOOTHING_METHODS)})")
        if not self.enabled:
            return
        bad = [s for s in self.statistics if s not in SMOOTHING_STATISTICS]
        if bad or not self.statistics:
            raise ValueError(f"quant.smoothing.statistics={list(self.statistics)}: expected a non-empty list of "
                             f"{', '.join(SMOOTHING_STATISTICS)}")
        if not self.alphas or any(not 0.0 <= a <= 1.0 for a in self.alphas):
            raise ValueError(f"quant.smoothing.alphas={list(self.alphas)}: expected values in [0, 1]")
        if self.rows < 16:
            raise ValueError(f"quant.smoothing.rows={self.rows}: expected >= 16")
        for f in self.formats:
            _check_format("quant.smoothing.formats", f, keep_ok=False)


#: Named smoothing options (the Hydra group ``quant/smoothing``).
SMOOTHING_METHODS: dict[str, Smoothing] = {
    "none": Smoothing(),
    "smoothquant": Smoothing(method="search", statistics=["max"]),
    "awq": Smoothing(method="search", statistics=["mean"]),
    "smoothquant_awq": Smoothing(method="search", statistics=["max", "mean"]),
}


# ---------------------------------------------------------------------------------------------------------------
# layer selection and mixed precision
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class LayerSelection:
    """Which Linears get ``QuantRecipe.format`` (module names as the model names them).

    include / exclude: fnmatch patterns; exclude wins. ``exclude=None`` takes the model's default high-precision
    layers (its adapter's layer rules); ``[]`` excludes nothing.
    keep_first_blocks / keep_last_blocks: keep that many transformer blocks (the model's block numbering).
    formats: per-layer map in the spirit of torchao's ``FqnToConfig``: module name or fnmatch pattern -> format name
        (``"bf16"`` keeps the layer); an exact name wins over patterns, patterns are tried in order.
    fallback: what a layer that cannot take its format (e.g. in_features not a multiple of 16 for NVFP4) becomes.
    """

    include: list[str] = field(default_factory=lambda: ["*"])
    exclude: list[str] | None = None
    keep_first_blocks: int = 0
    keep_last_blocks: int = 0
    formats: dict[str, str] = field(default_factory=dict)
    fallback: str = KEEP

    def validate(self) -> None:
        if self.keep_first_blocks < 0 or self.keep_last_blocks < 0:
            raise ValueError("quant.layers.keep_first_blocks / keep_last_blocks must be >= 0")
        _check_format("quant.layers.fallback", self.fallback, keep_ok=True)
        for name, fmt in self.formats.items():
            _check_format(f"quant.layers.formats[{name!r}]", fmt, keep_ok=True)


@dataclass
class MixedPrecision:
    """Automatic mixed precision (``ptq.algorithms.mixed_precision``).

    enabled: choose each layer's format among ``formats`` from a measured sensitivity analysis to meet
        ``bits_budget`` (average storage bits per Linear weight, scales counted: NVFP4 4.5, FP8 8, bf16 16) with the
        least model-output error. Layers forced to high precision by the layer selection are fixed, not candidates.
    bits_scope: which weights the budget averages over: "all" = every Linear, fixed layers included; "quantized" =
        only the candidate layers.
    sensitivity: run the per-layer / per-block sensitivity analysis (and report it) even without mixing.
    sensitivity_inputs: transformer forwards (recorded calibration inputs) used to measure it.
    """

    enabled: bool = False
    bits_budget: float = 5.0
    bits_scope: str = "all"
    formats: list[str] = field(default_factory=lambda: ["nvfp4", "fp8", KEEP])
    sensitivity: bool = False
    sensitivity_inputs: int = 8

    @property
    def analyse(self) -> bool:
        """Whether the sensitivity analysis runs."""
        return self.enabled or self.sensitivity

    def needs(self) -> CalibrationNeeds:
        return CalibrationNeeds(amax=True, inputs=self.sensitivity_inputs) if self.analyse else CalibrationNeeds()

    def validate(self) -> None:
        if not self.formats or len(set(self.formats)) != len(self.formats):
            raise ValueError(f"quant.mixed.formats={list(self.formats)}: expected distinct format names")
        for f in self.formats:
            _check_format("quant.mixed.formats", f, keep_ok=True)
        if not (self.bits_budget > 0.0 and self.bits_budget == self.bits_budget):
            raise ValueError(f"quant.mixed.bits_budget={self.bits_budget}: expected > 0 (average bits per Linear "
                             "weight)")
        if self.bits_scope not in BITS_SCOPES:
            raise ValueError(f"quant.mixed.bits_scope={self.bits_scope!r}: expected one of {', '.join(BITS_SCOPES)}")
        if self.sensitivity_inputs < 1:
            raise ValueError(f"quant.mixed.sensitivity_inputs={self.sensitivity_inputs}: expected >= 1")
        if self.enabled:
            smallest = min(_format_bits(f) for f in self.formats)
            if smallest > self.bits_budget:
                raise ValueError(f"quant.mixed.bits_budget={self.bits_budget} is below the smallest format in "
                                 f"quant.mixed.formats={list(self.formats)} ({smallest} bits per weight)")


def _format_bits(name: str) -> float:
    return 16.0 if name == KEEP else FORMATS[name].weight_bits


# ---------------------------------------------------------------------------------------------------------------
# the recipe
# ---------------------------------------------------------------------------------------------------------------


def _named(value: Any, table: dict[str, Any], what: str) -> Any:
    if not isinstance(value, str):
        return value
    try:
        return replace(table[value])
    except KeyError:
        raise ValueError(f"quant.{what}={value!r}: expected one of {', '.join(table)}") from None


@dataclass
class QuantRecipe:
    """How to quantize the Linears of a model: ``format`` (a registered number format) + its parts.

    ``weight``, ``activation`` and ``smoothing`` also accept the names of :data:`WEIGHT_METHODS` /
    :data:`ACTIVATION_METHODS` / :data:`SMOOTHING_METHODS` in Python (``QuantRecipe(format="nvfp4",
    weight="gptq")``).
    """

    format: str = "nvfp4"
    weight: WeightMethod = field(default_factory=WeightMethod)
    activation: ActivationMethod = field(default_factory=ActivationMethod)
    layers: LayerSelection = field(default_factory=LayerSelection)
    mixed: MixedPrecision = field(default_factory=MixedPrecision)
    smoothing: Smoothing = field(default_factory=Smoothing)

    def __post_init__(self) -> None:
        self.weight = _named(self.weight, WEIGHT_METHODS, "weight")
        self.activation = _named(self.activation, ACTIVATION_METHODS, "activation")
        self.smoothing = _named(self.smoothing, SMOOTHING_METHODS, "smoothing")

    @property
    def weight_only(self) -> bool:
        """True when activations are not quantized (no ``input_scale``)."""
        return self.activation.method == "none"

    def formats_used(self) -> set[str]:
        """Every number format a layer of this recipe may get (the format, the per-layer map, the fallback and the
        mixed-precision candidates), ``"bf16"`` excluded."""
        names = {self.format, self.layers.fallback, *self.layers.formats.values()}
        if self.mixed.analyse:
            names |= set(self.mixed.formats)
        return {f for f in names if f != KEEP}

    def static_formats(self) -> list[str]:
        """The formats (sorted) some layer may take that have a static (calibrated) ``input_scale``."""
        return sorted(f for f in self.formats_used() if f in FORMATS and not FORMATS[f].dynamic_activations)

    def static_activations(self) -> bool:
        """Whether some layer may take a format with a static (calibrated) ``input_scale``."""
        return bool(self.static_formats())

    def needs(self) -> CalibrationNeeds:
        """What calibration must collect for this recipe (union of its parts' needs; no activation statistics when
        every format scales its activations at run time). Activation samples come in aligned runs that suit every
        static format (the lcm of their ``activation_sample_block``)."""
        static = self.static_formats()
        act = self.activation.needs() if static else CalibrationNeeds()
        if act.samples:
            act = replace(act, sample_block=math.lcm(*(FORMATS[f].activation_sample_block for f in static)))
        return self.weight.needs() | act | self.mixed.needs() | self.smoothing.needs()

    def validate(self) -> None:
        """Raise ValueError naming the key for any out-of-range or inconsistent value of the parts (the limits of the
        strategy that runs the weight method: ``ptq.algorithms.strategies.validate_recipe``)."""
        _check_format("quant.format", self.format, keep_ok=False)
        self.weight.validate()
        self.activation.validate()
        self.layers.validate()
        self.mixed.validate()
        static = self.static_formats()
        if self.activation.method == "dynamic" and static:
            raise ValueError(f"quant.activation=dynamic: formats {static} need a calibrated input_scale (choose "
                             "quant/activation=max or another clipping method; dynamic applies to "
                             f"{', '.join(sorted(n for n, f in FORMATS.items() if f.dynamic_activations))})")
        self.smoothing.validate()
        rtn_four_over_six = self.weight.scales == "four_over_six" and type(self.weight) is WeightMethod
        if rtn_four_over_six and not FORMATS[self.format].four_over_six:
            have = sorted(n for n, f in FORMATS.items() if f.four_over_six)
            raise ValueError(f"quant.weight.scales='four_over_six' applies to {', '.join(have)} only")

    def with_layer_formats(self, formats: dict[str, str]) -> QuantRecipe:
        """A copy whose per-layer map also holds ``formats`` (exact names)."""
        return replace(self, layers=replace(self.layers, formats={**self.layers.formats, **formats}))

    @property
    def activation_label(self) -> str:
        """The activation method's label; "dynamic" when no layer has a static input_scale (int8, mxfp8: every
        method but "none" means the run-time max of each row / block)."""
        if self.weight_only or self.static_activations():
            return self.activation.label
        return "dynamic"

    def summary(self) -> dict[str, Any]:
        """The recipe in a few labels (report, leaderboard): format, weight_only, activation, weight, mixed."""
        return {"format": self.format, "weight_only": self.weight_only, "activation": self.activation_label,
                "weight": self.weight.label, "mixed_precision": self.mixed.enabled,
                "fp8_per_channel": self.weight.fp8_per_channel, "smoothing": self.smoothing.label}

    def title(self) -> str:
        """One-line name of the recipe, e.g. ``nvfp4 gptq_four_over_six act=mse``."""
        act = "weight-only" if self.weight_only else f"act={self.activation_label}"
        mixed = f" mixed<={self.mixed.bits_budget:g}b" if self.mixed.enabled else ""
        smooth = f" smooth={self.smoothing.label}" if self.smoothing.enabled else ""
        return f"{self.format} {self.weight.label} {act}{smooth}{mixed}"
