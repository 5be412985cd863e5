"""Read an exported file back and prove it holds exactly the in-memory quantized model.

The table-driven decoders here (used by each exporter's per-format readers) are a deliberately separate
implementation (no ``ptq.formats`` quantizer code), so a layout bug in the quantizer or exporter cannot cancel
itself out.
"""

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
    from ptq.export.base import Exporter, KeyMap

_E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])
_PAIRS: dict[tuple[bool, torch.device], torch.Tensor] = {}


def _pair_table(high_first: bool, device: torch.device) -> torch.Tensor:
    """float32 ``[256, 2]``: the two E2M1 values of each packed byte, in element order."""
    key = (high_first, device)
    t = _PAIRS.get(key)
    if t is None:
        byte = torch.arange(256)
        first, second = (byte >> 4, byte & 0x0F) if high_first else (byte & 0x0F, byte >> 4)
        t = _PAIRS[key] = torch.stack([_E2M1[first], _E2M1[second]], dim=-1).to(device)
    return t


def reference_decode_nvfp4(packed: torch.Tensor, scales_row_major: torch.Tensor, global_scale: torch.Tensor,
                           high_first: bool) -> torch.Tensor:
    """float32 ``[rows, 2*packed.shape[1]]`` = E2M1(code) * (global * block_scale), decoded by table lookup (one
    lookup per packed byte, on ``packed``'s device)."""
    rows = packed.shape[0]
    values = _pair_table(high_first, packed.device)[packed.to(torch.int32)].reshape(rows, -1, 16)
    scale = global_scale.float().to(packed.device) * scales_row_major.float().to(packed.device)
    return (values * scale.unsqueeze(-1)).reshape(rows, -1)


def reference_untile(tiled: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """cuBLAS 128x4 tiled block scales -> ``[rows, cols]``, by explicit index arithmetic (on ``tiled``'s device)."""
    flat = tiled.reshape(-1)
    r = torch.arange(rows, device=tiled.device).view(-1, 1)
    c = torch.arange(cols, device=tiled.device).view(1, -1)
    n_col_tiles = (cols + 3) // 4
    offset = ((r // 128) * n_col_tiles + c // 4) * 512 + (r % 32) * 16 + ((r % 128) // 32) * 4 + c % 4
    return flat[offset]


def reference_decode_int8(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 ``[out, in]`` = int8 code * scale (``[]`` or ``[out, 1]``)."""
    return codes.to(torch.float32) * scale.to(torch.float32)


def reference_hadamard(size: int) -> torch.Tensor:
    """The normalised regular Hadamard matrix of a power-of-4 ``size``, entry by entry: the product over the base-4
    digits of ``(i, j)`` of ``[[1,1,1,-1],[1,1,-1,1],[1,-1,1,1],[-1,1,1,1]]``, over ``sqrt(size)``."""
    h4 = torch.tensor([[1, 1, 1, -1], [1, 1, -1, 1], [1, -1, 1, 1], [-1, 1, 1, 1]], dtype=torch.float64)
    i = torch.arange(size).view(-1, 1)
    j = torch.arange(size).view(1, -1)
    out = torch.ones(size, size, dtype=torch.float64)
    step = 1
    while step < size:
        out *= h4[(i // step) % 4, (j // step) % 4]
        step *= 4
    return (out / size**0.5).to(torch.float32)


def reference_unrotate(w_rot: torch.Tensor, group: int) -> torch.Tensor:
    """ConvRot weights back in the original basis: ``W_g = W_rot_g @ H^T`` per group of ``group`` inputs (float32)."""
    out_f, in_f = w_rot.shape
    return torch.matmul(w_rot.reshape(out_f, in_f // group, group), reference_hadamard(group).T).reshape(out_f, in_f)


def reference_decode_mxfp8(codes: torch.Tensor, e8m0_row_major: torch.Tensor) -> torch.Tensor:
    """float32 ``[rows, cols]`` = fp8 code * 2**(e - 127) per 32-block (E8M0 code 0 decodes to 0, as ComfyUI)."""
    e = e8m0_row_major.view(torch.uint8).to(torch.float64)
    scale = torch.where(e == 0, torch.zeros_like(e), torch.pow(2.0, e - 127.0)).to(torch.float32)
    return codes.to(torch.float32) * scale.repeat_interleave(32, dim=1)


@dataclass
class _FileCheck:
    """One file under verification: its reader, open handle, keys, metadata, the keys accounted for, problems."""

    exporter: Exporter
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
        got, used = fc.exporter.reader(st.format)(get, layer, st)
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
    """The exporter's own checks, every unquantized tensor, no key missing or extra."""
    used, extra_problems = fc.exporter.extra_checks(fc.keys, fc.handle.get_tensor, fc.meta, quant, fc.key_map)
    fc.expected |= used
    fc.problems += extra_problems
    fc.problems += fc.exporter.check_dtypes({k: fc.handle.get_slice(k).get_dtype() for k in fc.keys})
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


def verify_exports(files: Sequence[tuple[Exporter, Path, KeyMap]], plain: Mapping[str, torch.Tensor],
                   quant: Mapping[str, QuantizedLinearState], *, device: torch.device | None = None
                   ) -> list[tuple[bool, str]]:
    """(ok, detail) per file (exporter, path, key map): every quantized layer decodes (with the exporter's reader
    for its format) bit-exactly to the simulated weight, scales match, every unquantized tensor matches, no key is
    missing or extra, and the exporter's own checks pass (ComfyUI: the metadata lists exactly the quantized
    layers).

    One pass: each file's tensors are read once and compared where the model's tensors live (decoding runs on the
    GPU for a model on the GPU; ``device``: decode the quantized layers there instead, one at a time, e.g. the GPU
    for a model offloaded to CPU memory), and each layer's simulated weight is computed once for all files."""
    with contextlib.ExitStack() as stack:
        checks = []
        for exporter, path, key_map in files:
            handle = stack.enter_context(safe_open(str(path), framework="pt"))
            checks.append(_FileCheck(exporter, key_map, handle, set(handle.keys()), handle.metadata() or {}))
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


def verify_export(exporter: Exporter, path: Path, plain: Mapping[str, torch.Tensor],
                  quant: Mapping[str, QuantizedLinearState], key_map: KeyMap) -> tuple[bool, str]:
    """(ok, detail) of one file: :func:`verify_exports`."""
    return verify_exports([(exporter, path, key_map)], plain, quant)[0]
