"""Read an exported file back and prove it holds exactly the in-memory quantized model.

The table-driven decoders here (used by each exporter's per-format readers) are a deliberately separate
implementation (no ``ptq.formats`` quantizer code), so a layout bug in the quantizer or exporter cannot cancel
itself out.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open

from ptq.algorithms.qlinear import QuantizedLinearState

if TYPE_CHECKING:  # pragma: no cover
    from ptq.export.base import Exporter, KeyMap

_E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def reference_decode_nvfp4(packed: torch.Tensor, scales_row_major: torch.Tensor, global_scale: torch.Tensor,
                           high_first: bool) -> torch.Tensor:
    """float32 ``[rows, 2*packed.shape[1]]`` = E2M1(code) * (global * block_scale), decoded by table lookup."""
    hi, lo = (packed >> 4).long(), (packed & 0x0F).long()
    first, second = (hi, lo) if high_first else (lo, hi)
    codes = torch.stack([first, second], dim=-1).reshape(packed.shape[0], -1)
    scale = global_scale.float() * scales_row_major.float()
    return _E2M1[codes] * scale.repeat_interleave(16, dim=1)


def reference_untile(tiled: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """cuBLAS 128x4 tiled block scales -> ``[rows, cols]``, by explicit index arithmetic."""
    flat = tiled.reshape(-1)
    r = torch.arange(rows).view(-1, 1)
    c = torch.arange(cols).view(1, -1)
    n_col_tiles = (cols + 3) // 4
    offset = ((r // 128) * n_col_tiles + c // 4) * 512 + (r % 32) * 16 + ((r % 128) // 32) * 4 + c % 4
    return flat[offset]


def verify_export(exporter: Exporter, path: Path, plain: Mapping[str, torch.Tensor],
                  quant: Mapping[str, QuantizedLinearState], key_map: KeyMap) -> tuple[bool, str]:
    """(ok, detail): every quantized layer decodes (with the exporter's reader for its format) bit-exactly to the
    simulated weight, scales match, every unquantized tensor matches, no key is missing or extra, and the
    exporter's own checks pass (ComfyUI: the metadata lists exactly the quantized layers)."""
    problems: list[str] = []
    quant = {n: st.to("cpu") for n, st in quant.items()}
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        meta = f.metadata() or {}
        expected: set[str] = set()
        for name, st in quant.items():
            layer = key_map(name)
            try:
                got, used = exporter.reader(st.format)(f.get_tensor, layer, st)
            except Exception as exc:  # noqa: BLE001 - a missing / unreadable tensor is a verification failure
                problems.append(f"{layer}: cannot be read back ({type(exc).__name__}: {exc})")
                continue
            expected |= used
            ref = st.dequantized_weight()
            if got.shape != ref.shape or not torch.equal(got.view(torch.int32), ref.view(torch.int32)):
                bad = int((got != ref).sum()) if got.shape == ref.shape else got.numel()
                problems.append(f"{layer}: dequantized weight differs in {bad} elements")
            if st.input_scale is not None:
                key = f"{layer}.input_scale"
                expected.add(key)
                if key not in keys or not torch.equal(f.get_tensor(key).float().reshape(()), st.input_scale.float()):
                    problems.append(f"{key}: missing or different")
            if st.pre_quant_scale is not None:
                key = f"{layer}.pre_quant_scale"
                expected.add(key)
                if key not in keys or not torch.equal(f.get_tensor(key).float().reshape(-1),
                                                      st.pre_quant_scale.float().reshape(-1)):
                    problems.append(f"{key}: missing or different")
            if st.bias is not None:
                expected.add(f"{layer}.bias")
                b = f.get_tensor(f"{layer}.bias")
                if not torch.equal(b, st.bias.to(b.dtype)):
                    problems.append(f"{layer}.bias differs")
        used, extra_problems = exporter.extra_checks(keys, f.get_tensor, meta, quant, key_map)
        expected |= used
        problems += extra_problems
        for key, value in plain.items():
            okey = key_map(key)
            expected.add(okey)
            if okey not in keys:
                problems.append(f"{okey}: missing")
                continue
            got = f.get_tensor(okey)
            if got.dtype == torch.float16:
                problems.append(f"{okey}: float16 (WAN needs bf16/fp32 for unquantized tensors)")
            if not torch.equal(got, value.cpu().to(got.dtype)):
                problems.append(f"{okey}: values differ")
        extra = keys - expected
        missing = expected - keys
        if extra:
            problems.append(f"unexpected keys: {sorted(extra)[:5]}")
        if missing:
            problems.append(f"missing keys: {sorted(missing)[:5]}")
    if problems:
        return False, "; ".join(problems[:10]) + (f" (+{len(problems) - 10} more)" if len(problems) > 10 else "")
    return True, f"{len(quant)} quantized layers bit-exact, {len(plain)} other tensors equal, no extra keys"
