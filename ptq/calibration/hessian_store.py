"""Where calibration Hessians (sums of ``X^T X``, float32 ``[in, in]``) are accumulated: on the model's device or in
host memory.

``"device"``: the sum lives next to the inputs and each product is added in place (no host sync).
``"host"``: the sum lives in pinned host memory and is streamed through the GPU for each product: on a side stream
it is copied in, the product is added on the GPU and the sum is copied back (:class:`StreamedHostAdder`), so the
values are those of device accumulation (the same float32 additions in the same order) while the GPU holds only
the sums in flight (at most ``MAX_INFLIGHT_BYTES`` of products are queued; the hook waits beyond that). This is
what lets one calibration pass collect the Hessians of every Linear of a large model (the 5B's 300 block Linears:
31.5 GB per set of sums) on a small GPU. For products computed on the CPU, host and device are the same place.

``"auto"``: host when the inputs are on CUDA and the Hessians (twice: the totals and the open prompt's sums) would
take more than ``AUTO_HOST_FRACTION`` of the GPU's memory, else device.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

import torch

HESSIAN_STORAGES = ("auto", "device", "host")
#: "auto" keeps the Hessians on the GPU while both sets of sums take at most this fraction of its total memory.
AUTO_HOST_FRACTION = 0.5
#: Bytes of products queued on the side stream before the hook waits for the oldest.
MAX_INFLIGHT_BYTES = 2 * 2**30


def resolve_storage(storage: str, device: torch.device, hessian_bytes: int) -> str:
    """``"device"`` or ``"host"`` for ``storage`` (one of :data:`HESSIAN_STORAGES`) given the bytes of one set of
    Hessian sums."""
    if storage not in HESSIAN_STORAGES:
        raise ValueError(f"hessian storage {storage!r}: expected one of {', '.join(HESSIAN_STORAGES)}")
    if storage != "auto":
        return storage
    if device.type != "cuda":
        return "device"
    total = torch.cuda.get_device_properties(device).total_memory
    return "host" if 2 * hessian_bytes > AUTO_HOST_FRACTION * total else "device"


class StreamedHostAdder:
    """``target += product`` for pinned host ``target`` and CUDA ``product``, computed on the GPU on a side stream
    (copy in, add, copy out; one reusable GPU buffer per shape), in submission order."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self._buffers: dict[tuple[int, ...], torch.Tensor] = {}
        self._pending: deque[tuple[torch.cuda.Event, int]] = deque()
        self._inflight = 0

    def add(self, target: torch.Tensor, product: torch.Tensor) -> None:
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(ready)
            buf = self._buffers.get(tuple(product.shape))
            if buf is None:
                buf = self._buffers[tuple(product.shape)] = torch.empty_like(product, dtype=torch.float32)
            buf.copy_(target, non_blocking=True)
            buf.add_(product)
            target.copy_(buf, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        product.record_stream(self.stream)  # its memory is not reused before the side stream has read it
        nbytes = product.numel() * product.element_size()
        self._pending.append((done, nbytes))
        self._inflight += nbytes
        while self._inflight > MAX_INFLIGHT_BYTES and self._pending:
            event, n = self._pending.popleft()
            event.synchronize()
            self._inflight -= n

    def wait(self) -> None:
        """Block until every queued addition is done (the host sums are then up to date)."""
        self.stream.synchronize()
        self._pending.clear()
        self._inflight = 0

    def close(self) -> None:
        self.wait()
        self._buffers.clear()


class HessianSum:
    """One running sum of ``X^T X`` products (float32 ``[in, in]``) on ``device`` (``storage="device"``) or in host
    memory (``"host"``: pinned and streamed through the GPU by ``adder`` for CUDA products)."""

    def __init__(self, shape: Iterable[int], device: torch.device, storage: str,
                 adder: StreamedHostAdder | None = None) -> None:
        self.storage = storage
        self.adder = adder if storage == "host" and device.type == "cuda" else None
        if storage == "host":
            self.value = torch.zeros(tuple(shape), dtype=torch.float32, pin_memory=self.adder is not None)
        else:
            self.value = torch.zeros(tuple(shape), dtype=torch.float32, device=device)

    def add(self, product: torch.Tensor) -> None:
        if self.adder is not None and product.is_cuda:
            self.adder.add(self.value, product)
        else:
            self.value.add_(product.to(self.value.device))

    def set_(self, value: torch.Tensor) -> None:
        """Replace the sum by a copy of ``value`` (bit for bit, also ``-0.0``; a first addition to zeros would
        turn ``-0.0`` into ``+0.0``)."""
        self._sync()
        self.value.copy_(value)

    def _sync(self) -> None:
        if self.adder is not None:
            self.adder.wait()

    def result(self) -> torch.Tensor:
        """The sum so far (waits for queued additions)."""
        self._sync()
        return self.value

    def zero_(self) -> None:
        self._sync()
        self.value.zero_()


__all__ = ["AUTO_HOST_FRACTION", "HESSIAN_STORAGES", "HessianSum", "StreamedHostAdder", "resolve_storage"]
