"""Deterministic, atomic safetensors writing: the same tensors and metadata always give the same bytes.

``safetensors.torch.save_file`` keeps the header metadata in a hash map whose order changes from process to process,
so two identical exports differ in their sha256. This writer produces a standard safetensors file (read by
safetensors, ComfyUI and diffusers alike) with a canonical header:

* 8-byte little-endian header length, then the header JSON (compact, ``__metadata__`` first with its keys sorted,
  then the tensors in data order), padded with spaces to a multiple of 8 bytes;
* tensor data in the order (element size descending, name ascending), so every tensor starts at an offset that is
  a multiple of its element size.

Files are written to a hidden temp file in the target folder (``.<name>.<pid>.tmp``) and renamed into place;
:func:`remove_stale_temp_files` deletes such files left by a killed process.
"""

from __future__ import annotations

import json
import os
import re
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from pathlib import Path

import torch

#: torch dtype -> safetensors dtype name.
SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
if hasattr(torch, "float8_e8m0fnu"):
    SAFETENSORS_DTYPES[torch.float8_e8m0fnu] = "F8_E8M0"

_TMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.tmp$")


def temp_path(path: Path) -> Path:
    """The hidden temp file a write of ``path`` goes through: ``.<name>.<pid>.tmp`` in the same folder."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temp_files(folder: Path) -> list[Path]:
    """Delete ptq's temp files (``.<name>.<pid>.tmp``, files or folders) in ``folder`` and its subfolders whose
    writing process no longer runs (left by a killed run); returns what was removed."""
    import shutil

    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for p in sorted(folder.rglob(".*.tmp")):
        m = _TMP_RE.match(p.name)
        if m is None or _pid_alive(int(m.group("pid"))):
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def _tensor_order(tensors: dict[str, torch.Tensor]) -> list[str]:
    return sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))


def safetensors_header(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> tuple[bytes, list[str]]:
    """(8-byte length + padded header JSON, tensor names in data order) of the file :func:`save_safetensors`
    writes."""
    order = _tensor_order(tensors)
    header: dict[str, object] = {}
    if metadata:
        bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            raise TypeError(f"safetensors metadata must map str to str; offending keys: {bad[:5]}")
        header["__metadata__"] = {k: metadata[k] for k in sorted(metadata)}
    offset = 0
    for name in order:
        t = tensors[name]
        if t.dtype not in SAFETENSORS_DTYPES:
            raise TypeError(f"{name}: dtype {t.dtype} cannot be stored in safetensors")
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text, order


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    flat = t.detach().reshape(-1)
    if flat.device.type != "cpu":
        flat = flat.cpu()
    flat = flat.contiguous()
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy())


#: Device tensors copied to the host ahead of the one being written (the copies overlap the writes).
PREFETCH_TENSORS = 2


def _host_bytes(tensors: dict[str, torch.Tensor], order: list[str]) -> Iterator[memoryview]:
    """The bytes of each tensor in ``order``; device-to-host copies run on a worker thread up to
    ``PREFETCH_TENSORS`` tensors ahead of the caller (plain iteration when everything is on the CPU)."""
    if all(tensors[n].device.type == "cpu" for n in order):
        for name in order:
            yield _tensor_bytes(tensors[name])
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ptq-d2h") as pool:
        pending: deque = deque()
        names = iter(order)
        for name in islice(names, PREFETCH_TENSORS):
            pending.append(pool.submit(_tensor_bytes, tensors[name]))
        while pending:
            data = pending.popleft().result()
            nxt = next(names, None)
            if nxt is not None:
                pending.append(pool.submit(_tensor_bytes, tensors[nxt]))
            yield data


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> int:
    """Write ``tensors`` (any device) to ``path`` atomically (temp file + rename, mode 0644 minus umask);
    returns the file size in bytes. Device tensors are copied to the host while earlier ones are written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    head, order = safetensors_header(tensors, metadata)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as fh:
            fh.write(head)
            for data in _host_bytes(tensors, order):
                fh.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path.stat().st_size


def write_text_atomic(path: Path, text: str) -> None:
    """Write a small text file atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
