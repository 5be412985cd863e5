"""Multi-process runs on ``torch.distributed``: ``torchrun --nproc-per-node N -m ptq run ...`` or ``accelerate
launch -m ptq run ...`` (both set ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``).

Every process loads the model (on its own GPU when there are enough, ``cuda:LOCAL_RANK``) and denoises a share of
the prompts: calibration and evaluation prompts are dealt round-robin (prompt ``i`` of a round of N to rank ``i``).
Rank 0 folds the calibration statistics in prompt order (:mod:`ptq.pipeline.calib_run`), quantizes, broadcasts
the quantized layers to the other ranks for their share of the evaluation, gathers the outputs and writes the
exports and the report. Results do not depend on N.

Backend: NCCL when every rank has its own GPU, else gloo (``PTQ_DIST_BACKEND`` overrides); objects and CPU tensors
always travel over a gloo group.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger("ptq")

#: Collective timeout: a rank may wait for rank 0 through a whole quantization or sensitivity analysis.
TIMEOUT = datetime.timedelta(hours=6)


@dataclass
class DistContext:
    """This process's place in the run: ``rank`` of ``world`` processes (``world == 1``: not distributed)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str = ""
    cpu_group: Any = None

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, indices: Sequence[int]) -> list[int]:
        """This rank's share of ``indices``: every ``world``-th one starting at ``rank`` (round-robin)."""
        return list(indices)[self.rank :: self.world]


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_from_env(device_type: str) -> DistContext:
    """The context of this process: initialises the default process group from the launcher's environment when
    ``WORLD_SIZE > 1`` (and selects this rank's GPU); a plain ``DistContext()`` otherwise."""
    world = env_world_size()
    if world <= 1:
        return DistContext()
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    gpus = torch.cuda.device_count() if device_type == "cuda" else 0
    if gpus:
        torch.cuda.set_device(local_rank % gpus)
    if not dist.is_initialized():
        backend = os.environ.get("PTQ_DIST_BACKEND") or ("nccl" if gpus >= local_world else "gloo")
        dist.init_process_group(backend, timeout=TIMEOUT)
    backend = dist.get_backend()
    cpu_group = dist.new_group(backend="gloo", timeout=TIMEOUT) if backend != "gloo" else dist.group.WORLD
    log.info("distributed: rank %d of %d (%s)%s", rank, world, backend,
             f", cuda:{local_rank % gpus}" if gpus else "")
    return DistContext(rank, world, local_rank, backend, cpu_group)


# ---------------------------------------------------------------------------------------------------------------
# objects and tensors
# ---------------------------------------------------------------------------------------------------------------


def broadcast_object(ctx: DistContext, obj: Any = None) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not ctx.active:
        return obj
    box = [obj if ctx.is_main else None]
    dist.broadcast_object_list(box, src=0, group=ctx.cpu_group)
    return box[0]


def gather_objects(ctx: DistContext, obj: Any) -> list[Any] | None:
    """Every rank's ``obj`` (rank order) on rank 0; None elsewhere."""
    if not ctx.active:
        return [obj]
    out = [None] * ctx.world if ctx.is_main else None
    dist.gather_object(obj, out, dst=0, group=ctx.cpu_group)
    return out


def send_object(ctx: DistContext, obj: Any, dst: int) -> None:
    dist.send_object_list([obj], dst=dst, group=ctx.cpu_group)


def recv_object(ctx: DistContext, src: int) -> Any:
    box = [None]
    dist.recv_object_list(box, src=src, group=ctx.cpu_group)
    return box[0]


def _on_wire(ctx: DistContext, t: torch.Tensor) -> bool:
    """Whether ``t`` travels on the default (NCCL) group as is; else as a CPU tensor on the gloo group."""
    return ctx.backend == "nccl" and t.is_cuda


def send_tensor(ctx: DistContext, t: torch.Tensor, dst: int) -> None:
    """Send a tensor of known shape and dtype (the receiver allocates it)."""
    t = t.contiguous()
    if _on_wire(ctx, t):
        dist.send(t, dst=dst)
    else:
        dist.send(t.cpu(), dst=dst, group=ctx.cpu_group)


def recv_tensor(ctx: DistContext, buf: torch.Tensor, src: int) -> torch.Tensor:
    """Receive into ``buf`` (its shape, dtype and device); returns it."""
    if _on_wire(ctx, buf):
        dist.recv(buf, src=src)
        return buf
    host = buf if buf.device.type == "cpu" else torch.empty_like(buf, device="cpu")
    dist.recv(host, src=src, group=ctx.cpu_group)
    if host is not buf:
        buf.copy_(host)
    return buf


def broadcast_tensors(ctx: DistContext, tensors: dict[str, torch.Tensor] | None, device: torch.device
                      ) -> dict[str, torch.Tensor]:
    """Rank 0's named tensors on every rank (on ``device``), bit for bit (sent as bytes)."""
    meta = broadcast_object(ctx, None if tensors is None else
                            {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()})
    if not ctx.active:
        return dict(tensors or {})
    out = {}
    for name, (shape, dtype) in meta.items():
        if ctx.is_main:
            assert tensors is not None
            t = tensors[name].to(device).contiguous()
        else:
            t = torch.empty(shape, dtype=dtype, device=device)
        raw = t.reshape(-1).view(torch.uint8)
        if ctx.backend == "nccl" and raw.is_cuda:
            dist.broadcast(raw, src=0)
        else:
            host = raw.cpu()
            dist.broadcast(host, src=0, group=ctx.cpu_group)
            if not ctx.is_main:
                raw.copy_(host)
        out[name] = t
    return out


def barrier(ctx: DistContext) -> None:
    if ctx.active:
        dist.barrier(group=ctx.cpu_group)


def shutdown(ctx: DistContext) -> None:
    """Leave the process group (all ranks together)."""
    if ctx.active and dist.is_initialized():
        barrier(ctx)
        dist.destroy_process_group()


__all__ = ["DistContext", "barrier", "broadcast_object", "broadcast_tensors", "env_world_size", "gather_objects",
           "init_from_env", "recv_object", "recv_tensor", "send_object", "send_tensor", "shutdown"]
