"""Independent table-driven decoders of the layouts the targets write: E2M1 pairs by table lookup, cuBLAS 128x4
tiles by explicit index arithmetic, int8 codes, the regular Hadamard matrix entry by entry, E8M0 block scales.

A deliberately separate implementation (no ``ptq.formats`` quantizer code), so a layout bug in a quantizer or a
writer cannot cancel itself out in verification; each target's readers decode with these.
"""

from __future__ import annotations

import torch

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


def reference_decode_int4(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 ``[out, 2 * packed.shape[1]]`` = signed int4 code * per-row scale, from bytes whose low nibble holds
    the even column, decoded by a 256-entry table of byte -> (low, high) values."""
    nib = [v - 16 if v >= 8 else v for v in range(16)]
    table = torch.tensor([[nib[b & 15], nib[b >> 4]] for b in range(256)], dtype=torch.float32, device=packed.device)
    vals = table[packed.view(torch.uint8).to(torch.int64)].reshape(packed.shape[0], -1)
    return vals * scale.to(torch.float32).reshape(-1, 1)


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
