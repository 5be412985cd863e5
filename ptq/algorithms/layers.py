"""Which format each Linear of a model gets: a model's layer rules plus the recipe's layer selection.

:class:`LayerRules` are facts about a model family (stated by its adapter in ``ptq.models``): how module names
encode the transformer block index, and which layers stay in high precision by default. Algorithms receive them
as data, so no model's names appear in this layer. :func:`rules_for` finds the rules registered for a model's
class; a model without registered rules has no blocks and no default exclusions.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from functools import cached_property

from torch import nn

from ptq.algorithms.recipe import KEEP, QuantRecipe
from ptq.formats import get_format


@dataclass(frozen=True)
class LayerRules:
    """block_pattern: regex whose first group is the block index of a module name (matched against ``name + "."``;
    None = the model has no numbered blocks). high_precision: fnmatch patterns of the layers a recipe keeps in
    high precision unless its ``layers.exclude`` says otherwise."""

    block_pattern: str | None = None
    high_precision: tuple[str, ...] = ()

    @cached_property
    def _block_re(self) -> re.Pattern[str] | None:
        return re.compile(self.block_pattern) if self.block_pattern else None

    def block_of(self, name: str) -> int | None:
        """Block index of module ``name`` (None outside the blocks)."""
        if self._block_re is None:
            return None
        m = self._block_re.match(name + ".")
        return int(m.group(1)) if m else None

    def block_name(self, name: str) -> str | None:
        """The block's module prefix of ``name`` (e.g. the text before the block's sub-modules), None outside."""
        if self._block_re is None:
            return None
        m = self._block_re.match(name + ".")
        return m.group(0).rstrip(".") if m else None

    def num_blocks(self, model: nn.Module) -> int:
        idx = {b for n, _ in model.named_modules() if (b := self.block_of(n)) is not None}
        return max(idx) + 1 if idx else 0


_RULES: dict[str, LayerRules] = {}
NO_RULES = LayerRules()


def register_layer_rules(class_name: str, rules: LayerRules) -> None:
    """Declare the layer rules of models whose class (or a base class) is called ``class_name``."""
    _RULES[class_name] = rules


def rules_for(model: nn.Module) -> LayerRules:
    """The registered rules of ``model``'s class (first match along its MRO), else :data:`NO_RULES`."""
    for cls in type(model).__mro__:
        if cls.__name__ in _RULES:
            return _RULES[cls.__name__]
    return NO_RULES


@dataclass
class LayerPlanner:
    """Plans the format of each Linear of one model for one recipe (before calibration data is considered)."""

    recipe: QuantRecipe
    rules: LayerRules
    num_blocks: int
    exclude: list[str] = field(init=False)

    def __post_init__(self) -> None:
        ex = self.recipe.layers.exclude
        self.exclude = list(self.rules.high_precision) if ex is None else list(ex)

    @classmethod
    def for_model(cls, model: nn.Module, recipe: QuantRecipe, rules: LayerRules | None = None) -> LayerPlanner:
        rules = rules_for(model) if rules is None else rules
        return cls(recipe, rules, rules.num_blocks(model))

    def _mapped(self, name: str) -> str | None:
        fmts = self.recipe.layers.formats
        if name in fmts:
            return fmts[name]
        for pattern, fmt in fmts.items():
            if fnmatch.fnmatchcase(name, pattern):
                return fmt
        return None

    def plan(self, name: str, module: nn.Linear) -> tuple[str, str]:
        """(format, reason) for one Linear; ``KEEP`` ("bf16") means kept in high precision."""
        sel = self.recipe.layers
        mapped = self._mapped(name)
        if mapped is not None:
            return mapped, "" if mapped != KEEP else "kept by quant.layers.formats"
        if not any(fnmatch.fnmatchcase(name, p) for p in sel.include):
            return KEEP, "not matched by quant.layers.include"
        if any(fnmatch.fnmatchcase(name, p) for p in self.exclude):
            return KEEP, "matched by quant.layers.exclude"
        b = self.rules.block_of(name)
        if b is not None:
            if b < sel.keep_first_blocks:
                return KEEP, f"block {b} < quant.layers.keep_first_blocks={sel.keep_first_blocks}"
            if b >= self.num_blocks - sel.keep_last_blocks:
                return KEEP, f"block {b} in the last quant.layers.keep_last_blocks={sel.keep_last_blocks}"
        return self.recipe.format, ""

    def plan_with_fallback(self, name: str, module: nn.Linear) -> tuple[str, str]:
        """:meth:`plan`, then the recipe's fallback for a shape the format cannot take."""
        fmt, reason = self.plan(name, module)
        if fmt == KEEP:
            return fmt, reason
        why = get_format(fmt).unsupported(module.in_features, module.out_features)
        if why is not None:
            return self.recipe.layers.fallback, f"fallback: {why}"
        return fmt, reason

    def targets(self, model: nn.Module) -> list[str]:
        """Names of the Linears the recipe quantizes (model order)."""
        return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and self.plan(n, m)[0] != KEEP]
