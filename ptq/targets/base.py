"""What every file target shares: the :class:`FileTarget` interface (per-format layer writers and readers, the
dtypes its loader reads, its own verification checks), splitting a quantized model's state, and casting
unquantized tensors."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ptq.algorithms.qlinear import QuantizedLinearState, QuantLinear

UNQUANTIZED_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}

#: diffusers state-dict key (or module name) -> the key name the target file uses.
KeyMap = Callable[[str], str]
#: One quantized Linear -> its tensors in the target file: ``(layer key, state, unquantized dtype) -> tensors``.
LayerWriter = Callable[[str, QuantizedLinearState, torch.dtype], dict[str, torch.Tensor]]
#: Reads one quantized Linear back: ``(get tensor by key, layer key, expected state) -> (dequantized float32
#: weight [out, in], keys it read)``; a decoder independent of the quantizer code.
LayerReader = Callable[[Callable[[str], torch.Tensor], str, QuantizedLinearState], tuple[torch.Tensor, set[str]]]


class UnsupportedExport(ValueError):
    """The target cannot represent this model's quantization (the export is skipped with this reason)."""


@dataclass
class ExportResult:
    """One written artefact. ``verified`` is None when verification was not run."""

    target: str
    path: str
    bytes: int = 0
    quantized_layers: int = 0
    tensors: int = 0
    verified: bool | None = None
    verify_detail: str = ""
    skipped: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


class FileTarget(ABC):
    """One file target: where it writes, how each number format is laid out (``writers`` / ``readers`` by format
    name) and which target-specific checks verification adds."""

    name: ClassVar[str]
    #: True when the target is a folder with one component per module (all experts of a model in one folder)
    folder: ClassVar[bool] = False
    writers: ClassVar[dict[str, LayerWriter]]
    readers: ClassVar[dict[str, LayerReader]]
    #: safetensors dtype strings every reader path of the target's loader reads (None: any)
    readable_dtypes: ClassVar[frozenset[str] | None] = None
    #: The NVFP4 packing its loader reads, ``"<nibble order>/<block-scale layout>"`` (``ptq verify`` names a file
    #: whose closest packing is another one)
    nvfp4_packing: ClassVar[str] = ""

    def register_format(self, fmt: str, writer: LayerWriter, reader: LayerReader, *, decoder: Any = None,
                        **layout: Any) -> None:
        """Let this target write format ``fmt`` (a new number format's seam): its layer ``writer``, the independent
        ``reader`` round-trip verification decodes with, and ``decoder`` (a
        :data:`ptq.targets.file_decoders.FileDecoder`) for ``ptq verify`` of files ptq did not write; ``layout``:
        the target's own facts about the format (ComfyUI: ``comfy_name``, ``extra``)."""
        from ptq.targets.file_decoders import FILE_DECODERS

        if layout:
            raise TypeError(f"target {self.name!r} takes no layout facts ({', '.join(layout)})")
        self.writers[fmt], self.readers[fmt] = writer, reader
        if decoder is not None:
            FILE_DECODERS[fmt] = decoder

    def unregister_format(self, fmt: str) -> None:
        """Undo :meth:`register_format`."""
        from ptq.targets.file_decoders import FILE_DECODERS

        self.writers.pop(fmt, None)
        self.readers.pop(fmt, None)
        FILE_DECODERS.pop(fmt, None)

    def writer(self, fmt: str) -> LayerWriter:
        try:
            return self.writers[fmt]
        except KeyError:
            raise UnsupportedExport(f"export target {self.name!r} cannot write format {fmt!r} "
                                    f"(it writes {', '.join(sorted(self.writers))})") from None

    def reader(self, fmt: str) -> LayerReader:
        try:
            return self.readers[fmt]
        except KeyError:
            raise UnsupportedExport(f"export target {self.name!r} cannot read format {fmt!r} back") from None

    @abstractmethod
    def write(self, plain: Mapping[str, torch.Tensor], quant: Mapping[str, QuantizedLinearState], out_dir: Path,
              stem: str, *, dtype: torch.dtype, key_map: KeyMap, metadata: dict[str, Any],
              module_config: dict[str, Any], component: str = "transformer") -> ExportResult:
        """Write the file(s); ``ExportResult.path`` is the safetensors file verification reads. ``component``: the
        module's component name in a folder export (``transformer``, ``transformer_2``)."""

    def layer_tensors(self, quant: Mapping[str, QuantizedLinearState], dtype: torch.dtype,
                      key_map: KeyMap) -> dict[str, torch.Tensor]:
        """The tensors of every quantized layer under the target's names."""
        out: dict[str, torch.Tensor] = {}
        for name, state in quant.items():
            out.update(self.writer(state.format)(key_map(name), state, dtype))
        return out

    # -- reading files ptq may not have written (``ptq verify``) --------------------------------------------------
    def claims(self, metadata: Mapping[str, str], keys: Iterable[str], convention: str) -> bool:
        """Whether a file (header ``metadata``, tensor ``keys``, detected ``convention`` name) is meant for this
        target's loader; :func:`ptq.targets.registry.target_of_file` asks the targets in registry order."""
        return False

    def layer_declaration(self, tensors: Mapping[str, torch.Tensor], layer: str,
                          metadata: Mapping[str, str]) -> dict[str, Any]:
        """What the file declares about ``layer`` for this loader (ComfyUI: its per-layer JSON), or {}."""
        return {}

    def weight_only_declared(self, tensors: Mapping[str, torch.Tensor], layer: str) -> bool:
        """Whether the file marks ``layer`` weight-only for this loader."""
        return False

    def file_layer_format(self, g: Mapping[str, torch.Tensor], conf: Mapping[str, Any]) -> str | None:
        """The ptq format of a file layer (``g``: suffix -> tensor, ``conf``: its declaration), or None."""
        from ptq.targets.file_decoders import guess_format

        return guess_format(g)

    def check_dtypes(self, dtypes: Mapping[str, str]) -> list[str]:
        """Problems of the file's tensors (key -> safetensors dtype string) whose dtype the target's loader cannot
        read (:attr:`readable_dtypes`)."""
        if self.readable_dtypes is None:
            return []
        return [f"{k}: dtype {d} is not one the {self.name} loader reads" for k, d in sorted(dtypes.items())
                if d not in self.readable_dtypes]

    def extra_checks(self, keys: set[str], get: Callable[[str], torch.Tensor], metadata: dict[str, str],
                     quant: Mapping[str, QuantizedLinearState], key_map: KeyMap) -> tuple[set[str], list[str]]:
        """Target-specific verification: (keys it accounts for, problems)."""
        return set(), []


def split_model_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, QuantizedLinearState]]:
    """(unquantized tensors by diffusers key, quantized layers by module name). QuantLinear buffers are excluded
    from the first dict; their bias travels in the QuantizedLinearState."""
    quant = {n: m.state() for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    plain = {}
    for key, value in model.state_dict().items():
        module = key.rsplit(".", 1)[0]
        if module in quant:
            continue
        plain[key] = value
    return plain, quant


def cast_unquantized(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Float tensors -> ``dtype``; float32 tensors stay float32 (diffusers keeps time_embedder, scale_shift_table
    and norm2 in fp32 on purpose). Never float16: WAN's unquantized tensors must be bf16 or fp32."""
    if not t.is_floating_point() or t.dtype == torch.float32:
        return t
    return t.to(dtype)


def plain_tensors(plain: Mapping[str, torch.Tensor], dtype: torch.dtype, key_map: KeyMap) -> dict[str, torch.Tensor]:
    """The unquantized tensors under the target's names, cast by :func:`cast_unquantized`."""
    return {key_map(k): cast_unquantized(v, dtype) for k, v in plain.items()}


def header_metadata(extra: dict[str, Any]) -> dict[str, str]:
    """safetensors header metadata: str -> str (JSON-encode non-strings)."""
    return {k: v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in extra.items()}
