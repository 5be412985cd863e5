"""How a model family recognises its own checkpoints from key names and shapes alone (``ptq inspect``, ``ptq verify``).

A :class:`FileFamily` (one per model family, :attr:`ModelAdapter.file_family`) knows the family's key namings
(e.g. WAN's diffusers vs original names), the key prefixes checkpoints carry, how to read the architecture from
parameter shapes, which layers are usually kept in high precision, and what a loader's own model detection would
build from the file (:meth:`FileFamily.check_build`). It sees logical shapes only: the file targets unpack quantized
storage before asking.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

KNOWN_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.", "transformer.", "module.")
"""Prefixes seen in front of diffusion-model keys (ComfyUI full checkpoints use ``model.diffusion_model.``)."""

#: ``problem(code, severity, layers, message, fix)``: how a family reports a problem of a file.
ProblemFn = Callable[[str, str, Iterable[str], str, str], None]


@dataclass
class Naming:
    """Key naming of a checkpoint: the family's naming ``style`` ("mixed" when two namings appear, "unknown" when
    none), the common ``prefix`` and key counts, with ``labels`` (style -> one-line description) from the family
    (not part of reports: ``metadata={"report": False}``)."""

    style: str
    prefix: str  # common prefix such as "model.diffusion_model." ("" when none)
    prefixed_keys: int
    unprefixed_keys: int
    diffusers_keys: int
    original_keys: int
    examples: dict[str, list[str]] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict, repr=False, compare=False, metadata={"report": False})

    @property
    def label(self) -> str:
        """One-line description."""
        names = self.labels.get(self.style, "no model-specific names found")
        if self.prefix:
            extra = f", {self.unprefixed_keys} keys without it" if self.unprefixed_keys else ""
            return f"{names}; prefix {self.prefix!r} on {self.prefixed_keys} keys{extra}"
        return f"{names}; no prefix"


@dataclass
class Architecture:
    """Model architecture derived from shapes (``family`` "unknown" when no family recognised the file)."""

    family: str
    description: str
    dim: int | None = None
    in_dim: int | None = None
    out_dim: int | None = None
    ffn_dim: int | None = None
    num_layers: int | None = None
    num_heads: int | None = None
    text_dim: int | None = None
    freq_dim: int | None = None
    patch_size: list[int] | None = None
    params: int = 0
    known_model: str | None = None
    missing_blocks: list[int] = field(default_factory=list)


def strip_prefix(key: str, prefix: str) -> str:
    """``key`` without ``prefix`` (unchanged when it does not start with it)."""
    return key[len(prefix) :] if prefix and key.startswith(prefix) else key


def detect_prefix(keys: list[str], anchors: Iterable[re.Pattern[str]]) -> str:
    """The most common prefix in front of a family's anchor names (``anchors``: patterns with a ``prefix`` group),
    else a :data:`KNOWN_PREFIXES` entry more than half of the keys carry, else ""."""
    counts: Counter[str] = Counter()
    patterns = list(anchors)
    for key in keys:
        for pattern in patterns:
            m = pattern.match(key)
            if m:
                counts[m.group("prefix")] += 1
                break
    if counts:
        return counts.most_common(1)[0][0]
    for prefix in KNOWN_PREFIXES:
        if keys and sum(k.startswith(prefix) for k in keys) > len(keys) // 2:
            return prefix
    return ""


class FileFamily:
    """A model family's view of checkpoints (see the module docstring). The base class knows no names: every file
    is "unknown" to it."""

    name: str = "unknown"
    #: Patterns locating the family's names in a key (group ``prefix``: what precedes them).
    anchors: tuple[re.Pattern[str], ...] = ()

    def naming(self, keys: Iterable[str]) -> Naming:
        """The naming of ``keys`` (style "unknown" when the family's names are not among them)."""
        keys = list(keys)
        prefix = detect_prefix(keys, self.anchors)
        prefixed = sum(k.startswith(prefix) for k in keys) if prefix else len(keys)
        return Naming("unknown", prefix, prefixed, len(keys) - prefixed if prefix else 0, 0, 0,
                      {"diffusers": [], "original": []})

    def canonical_name(self, key: str, naming: Naming) -> str:
        """``key`` without the prefix, in the family's canonical naming (what its loaders' files use)."""
        return strip_prefix(key, naming.prefix)

    def architecture(self, layers: Mapping[str, Mapping[str, list[int]]], params: int,
                     metadata: Mapping[str, str] | None = None) -> Architecture:
        """The architecture of a file whose model parameters are ``layers`` (canonical layer name -> suffix ->
        logical shape; root-level keys under ""), ``params`` logical parameters in all, ``metadata`` its header
        (sizes a loader reads from it rather than from shapes)."""
        return Architecture("unknown", "unknown architecture", params=params)

    def sensitive_layer_kind(self, canonical: str, arch: Architecture) -> str | None:
        """Why a layer (canonical name) is usually kept in high precision, or None."""
        return None

    def check_build(self, target: str, arch: Architecture, metadata: Mapping[str, str],
                    problem: ProblemFn) -> dict[str, Any]:
        """Problems where ``target``'s loader would build another model than the file holds (its own model
        detection); returns the header override in effect ({} for none)."""
        return {}

    def features(self, target: str, metadata: Mapping[str, str]) -> dict[str, dict[str, Any]]:
        """Loader features the family's own header entries in ``metadata`` use, by key: ``{"what", "version",
        "date", "commit", "silent"}`` (the first ``target`` release that reads it; ``silent``: older ones ignore it
        without error)."""
        return {}


UNKNOWN_FAMILY = FileFamily()

__all__ = ["KNOWN_PREFIXES", "UNKNOWN_FAMILY", "Architecture", "FileFamily", "Naming", "ProblemFn", "detect_prefix",
           "strip_prefix"]
