"""Where calibration Hessians (sums of ``X^T X``, float32 ``[in, in]``) are accumulated: on the model's device or in
host memory.

``"device"``: the sum lives next to the inputs and each product is added in place (no host sync).
``"host"``: the sum lives in (CPU) host memory; each product computed on the device is copied into a pinned staging
buffer asynchronously and added to the host sum by one worker thread, in submission order, so the values are the
same as on the device (IEEE float32 additions in the same order; ``tests/test_scale.py``). At most
``STAGING_PER_SHAPE`` copies per shape are in flight (a full pool makes the hook wait), which bounds the extra
device memory to the products themselves. This is what lets one calibration pass collect the Hessians of every
Linear of a large model (the 5B's 300 block Linears: 31.5 GB) without holding them on the GPU.

``"auto"``: host when the inputs are on CUDA and the Hessians would take more than ``AUTO_HOST_FRACTION`` of the
GPU's memory, else device.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable

import torch

HESSIAN_STORAGES = ("auto", "device", "host")
#: "auto" keeps the Hessians on the GPU while they take at most this fraction of its total memory.
AUTO_HOST_FRACTION = 0.25
#: Pinned staging buffers per product shape (copies in flight to the host).
STAGING_PER_SHAPE = 2


def resolve_storage(storage: str, device: torch.device, hessian_bytes: int) -> str:
    """``"device"`` or ``"host"`` for ``storage`` (one of :data:`HESSIAN_STORAGES`) given the Hessians' total size."""
    if storage not in HESSIAN_STORAGES:
        raise ValueError(f"hessian storage {storage!r}: expected one of {', '.join(HESSIAN_STORAGES)}")
    if storage != "auto":
        return storage
    if device.type != "cuda":
        return "device"
    total = torch.cuda.get_device_properties(device).total_memory
    return "host" if hessian_bytes > AUTO_HOST_FRACTION * total else "device"


class HostAdder:
    """One worker thread adding device products into host tensors in submission order (see the module docstring)."""

    def __init__(self) -> None:
        self._jobs: queue.Queue = queue.Queue()
        self._pools: dict[tuple[tuple[int, ...], torch.device], queue.Queue] = {}
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="ptq-hessian-host-adder", daemon=True)
        self._thread.start()

    def _staging(self, like: torch.Tensor) -> torch.Tensor:
        key = (tuple(like.shape), like.device)
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = queue.Queue()
            pin = like.is_cuda
            for _ in range(STAGING_PER_SHAPE):
                pool.put(torch.empty(like.shape, dtype=torch.float32, pin_memory=pin))
        return pool.get()  # waits while every buffer of this shape is in flight

    def add(self, target: torch.Tensor, product: torch.Tensor) -> None:
        """Queue ``target += product`` (``target`` a host float32 tensor, ``product`` on any device)."""
        if self._error is not None:
            raise RuntimeError("Hessian host accumulation failed") from self._error
        staging = self._staging(product)
        staging.copy_(product, non_blocking=product.is_cuda)
        event = None
        if product.is_cuda:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(product.device))
        self._jobs.put((target, staging, event, (tuple(product.shape), product.device)))

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                self._jobs.task_done()
                return
            target, staging, event, key = job
            try:
                if event is not None:
                    event.synchronize()
                target.add_(staging)
            except BaseException as exc:  # noqa: BLE001 - reported to the submitting thread
                self._error = exc
            finally:
                self._pools[key].put(staging)
                self._jobs.task_done()

    def wait(self) -> None:
        """Block until every queued addition is done."""
        self._jobs.join()
        if self._error is not None:
            raise RuntimeError("Hessian host accumulation failed") from self._error

    def close(self) -> None:
        self.wait()
        self._jobs.put(None)
        self._thread.join()


class HessianSum:
    """One running sum of ``X^T X`` products (float32 ``[in, in]``) on ``device`` or in host memory."""

    def __init__(self, shape: Iterable[int], device: torch.device, storage: str, adder: HostAdder | None) -> None:
        self.storage = storage
        self.adder = adder
        if storage == "host":
            if adder is None:
                raise ValueError("host Hessian storage needs a HostAdder")
            self.value = torch.zeros(tuple(shape), dtype=torch.float32)
        else:
            self.value = torch.zeros(tuple(shape), dtype=torch.float32, device=device)

    def add(self, product: torch.Tensor) -> None:
        if self.storage == "host":
            assert self.adder is not None
            self.adder.add(self.value, product)
        else:
            self.value.add_(product)

    def set_(self, value: torch.Tensor) -> None:
        """Replace the sum by a copy of ``value`` (bit for bit, also ``-0.0``; a first addition to zeros would
        turn ``-0.0`` into ``+0.0``)."""
        if self.adder is not None:
            self.adder.wait()
        self.value.copy_(value)

    def result(self) -> torch.Tensor:
        """The sum so far (waits for queued host additions)."""
        if self.adder is not None:
            self.adder.wait()
        return self.value

    def zero_(self) -> None:
        if self.adder is not None:
            self.adder.wait()
        self.value.zero_()


__all__ = ["AUTO_HOST_FRACTION", "HESSIAN_STORAGES", "HessianSum", "HostAdder", "resolve_storage"]
