"""Read a written file back and prove it holds exactly the in-memory quantized model: every quantized layer decoded
by its target's reader (:mod:`ptq.targets.decoders`), every other tensor compared, no key missing or extra."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open

from ptq.algorithms.qlinear import QuantizedLinearState

if TYPE_CHECKING:  # pragma: no cover
    from ptq.targets.base import FileTarget, KeyMap

@dataclass
class _FileCheck:
    """One file under verification: its reader, open handle, keys, metadata, the keys accounted for, problems."""

    target: FileTarget
    key_map: KeyMap
    handle: Any
    keys: set[str]
    meta: dict[str, str]
    expected: set[str] = field(default_factory=set)
    problems: list[str] = field(default_factory=list)

    def get(self, key: str, device: torch.device) -> torch.Tensor:
        return self.handle.get_tensor(key).to(device)


def _check_layer(fc: _FileCheck, name: str, st: QuantizedLinearState, ref: torch.Tensor) -> None:
    """The quantized layer ``name`` of one file against ``ref`` (the simulated weight) and ``st``'s other tensors."""
    layer = fc.key_map(name)
    dev = ref.device

    def get(key: str) -> torch.Tensor:
        return fc.get(key, dev)

    try:
        got, used = fc.target.reader(st.format)(get, layer, st)
    except Exception as exc:  # noqa: BLE001 - a missing / unreadable tensor is a verification failure
        fc.problems.append(f"{layer}: cannot be read back ({type(exc).__name__}: {exc})")
        return
    fc.expected |= used
    if got.shape != ref.shape or not torch.equal(got.view(torch.int32), ref.view(torch.int32)):
        bad = int((got != ref).sum()) if got.shape == ref.shape else got.numel()
        fc.problems.append(f"{layer}: dequantized weight differs in {bad} elements")
    if st.input_scale is not None:
        key = f"{layer}.input_scale"
        fc.expected.add(key)
        if key not in fc.keys or not torch.equal(get(key).float().reshape(()), st.input_scale.float()):
            fc.problems.append(f"{key}: missing or different")
    if st.pre_quant_scale is not None:
        key = f"{layer}.pre_quant_scale"
        fc.expected.add(key)
        if key not in fc.keys or not torch.equal(get(key).float().reshape(-1), st.pre_quant_scale.float().reshape(-1)):
            fc.problems.append(f"{key}: missing or different")
    if st.bias is not None:
        fc.expected.add(f"{layer}.bias")
        b = get(f"{layer}.bias")
        if not torch.equal(b, st.bias.to(b.dtype)):
            fc.problems.append(f"{layer}.bias differs")


def _check_rest(fc: _FileCheck, plain: Mapping[str, torch.Tensor], quant: Mapping[str, QuantizedLinearState]) -> None:
    """The target's own checks, every unquantized tensor, no key missing or extra."""
    used, extra_problems = fc.target.extra_checks(fc.keys, fc.handle.get_tensor, fc.meta, quant, fc.key_map)
    fc.expected |= used
    fc.problems += extra_problems
    fc.problems += fc.target.check_dtypes({k: fc.handle.get_slice(k).get_dtype() for k in fc.keys})
    for key, value in plain.items():
        okey = fc.key_map(key)
        fc.expected.add(okey)
        if okey not in fc.keys:
            fc.problems.append(f"{okey}: missing")
            continue
        got = fc.get(okey, value.device)
        if got.dtype == torch.float16:
            fc.problems.append(f"{okey}: float16 (WAN needs bf16/fp32 for unquantized tensors)")
        if not torch.equal(got, value.to(got.dtype)):
            fc.problems.append(f"{okey}: values differ")
    extra, missing = fc.keys - fc.expected, fc.expected - fc.keys
    if extra:
        fc.problems.append(f"unexpected keys: {sorted(extra)[:5]}")
    if missing:
        fc.problems.append(f"missing keys: {sorted(missing)[:5]}")


def verify_exports(files: Sequence[tuple[FileTarget, Path, KeyMap]], plain: Mapping[str, torch.Tensor],
                   quant: Mapping[str, QuantizedLinearState], *, device: torch.device | None = None
                   ) -> list[tuple[bool, str]]:
    """(ok, detail) per file (target, path, key map): every quantized layer decodes (with the target's reader
    for its format) bit-exactly to the simulated weight, scales match, every unquantized tensor matches, no key is
    missing or extra, and the target's own checks pass (ComfyUI: the metadata lists exactly the quantized
    layers).

    One pass: each file's tensors are read once and compared where the model's tensors live (decoding runs on the
    GPU for a model on the GPU; ``device``: decode the quantized layers there instead, one at a time, e.g. the GPU
    for a model offloaded to CPU memory), and each layer's simulated weight is computed once for all files."""
    with contextlib.ExitStack() as stack:
        checks = []
        for target, path, key_map in files:
            handle = stack.enter_context(safe_open(str(path), framework="pt"))
            checks.append(_FileCheck(target, key_map, handle, set(handle.keys()), handle.metadata() or {}))
        for name, st in quant.items():
            st = st if device is None else st.to(device)
            ref = st.dequantized_weight()
            for fc in checks:
                _check_layer(fc, name, st, ref)
            del ref, st
        for fc in checks:
            _check_rest(fc, plain, quant)
    out = []
    for fc in checks:
        p = fc.problems
        if p:
            out.append((False, "; ".join(p[:10]) + (f" (+{len(p) - 10} more)" if len(p) > 10 else "")))
        else:
            out.append((True, f"{len(quant)} quantized layers bit-exact, {len(plain)} other tensors equal, "
                              "no extra keys"))
    return out


def verify_export(target: FileTarget, path: Path, plain: Mapping[str, torch.Tensor],
                  quant: Mapping[str, QuantizedLinearState], key_map: KeyMap) -> tuple[bool, str]:
    """(ok, detail) of one file: :func:`verify_exports`."""
    return verify_exports([(target, path, key_map)], plain, quant)[0]
