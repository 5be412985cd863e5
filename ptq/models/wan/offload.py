"""``model.offload``: keep a transformer's weights in CPU memory and stream one block at a time to the GPU for each
forward (diffusers' group offloading, ``block_level``, on a CUDA side stream), so a 14B expert runs in a few GB of
GPU memory. Modules replaced in place (quantization) are picked up by :func:`refresh_offload`.

Host memory: diffusers' streamed offloading pins a copy of every tensor (``Tensor.pin_memory()``, whose caching host
allocator rounds each allocation up to a power of two) while the unpinned original stays alive until the group is
first offloaded: several times the weights' size, more than the host of one GPU holds for a 14B model. Before
diffusers sees them, :func:`pin_in_place` therefore moves the tensors into page-locked chunks of
:data:`PIN_CHUNK_BYTES` (views into them; ``pin_memory()`` of a pinned tensor is the tensor itself), one tensor at a
time: the weights' size plus one chunk, and chunks freed after a quantization are reused from the allocator's
cache by the next ones."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

#: Size of one page-locked chunk (a power of two: the caching host allocator wastes nothing on it).
PIN_CHUNK_BYTES = 1 << 30
#: Byte alignment of each tensor inside a chunk.
PIN_ALIGN = 64


def _unpinned_cpu_tensors(module: nn.Module) -> list[list[torch.Tensor]]:
    """The CPU parameters and buffers of ``module`` not yet pinned, in two groups: those of ``nn.Linear`` layers
    (replaced by quantization: their chunks are freed together) and the rest."""
    seen: set[int] = set()
    linear, rest = [], []
    for sub in module.modules():
        for t in [*sub.parameters(recurse=False), *sub.buffers(recurse=False)]:
            if id(t) in seen or t.device.type != "cpu" or t.numel() == 0 or t.is_pinned():
                continue
            seen.add(id(t))
            (linear if isinstance(sub, nn.Linear) else rest).append(t)
    return [linear, rest]


def _aligned(n: int) -> int:
    return (n + PIN_ALIGN - 1) // PIN_ALIGN * PIN_ALIGN


def pack_into_chunks(tensors: Iterable[torch.Tensor], new_chunk: Callable[[int], torch.Tensor],
                     chunk_bytes: int = PIN_CHUNK_BYTES) -> int:
    """Move each tensor's data into chunks from ``new_chunk(nbytes) -> uint8 tensor`` (``chunk_bytes`` each, or
    one of the tensor's own size when it is larger), in order, each tensor a view at a ``PIN_ALIGN``-byte offset;
    the tensors keep their identity (``.data`` is replaced), values, dtype, shape and strides (contiguous ones).
    Returns the number of chunks made."""
    chunk, used, made = None, 0, 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        if nbytes > chunk_bytes:
            place, offset = new_chunk(_aligned(nbytes)), 0
            made += 1
        else:
            if chunk is None or used + nbytes > chunk_bytes:
                chunk, used = new_chunk(chunk_bytes), 0
                made += 1
            place, offset = chunk, used
            used += _aligned(nbytes)
        view = place[offset : offset + nbytes].view(t.dtype).view(t.shape)
        view.copy_(t.data)
        t.data = view
    return made


def pin_in_place(module: nn.Module) -> int:
    """Move the unpinned CPU tensors of ``module`` into page-locked chunks (see the module docstring); returns the
    number of chunks."""
    def new_chunk(nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    return sum(pack_into_chunks(group, new_chunk) for group in _unpinned_cpu_tensors(module))


def _streamed_groups(module: nn.Module) -> list:
    """The distinct diffusers ``ModuleGroup`` s of ``module``'s group-offloading hooks that copy on a CUDA stream."""
    from diffusers.hooks.group_offloading import _GROUP_OFFLOADING

    groups: dict[int, object] = {}
    for sub in module.modules():
        registry = getattr(sub, "_diffusers_hook", None)
        hook = None if registry is None else registry.get_hook(_GROUP_OFFLOADING)
        if hook is not None and hook.group.stream is not None:
            groups.setdefault(id(hook.group), hook.group)
    return list(groups.values())


def restore_buffers_on_offload(module: nn.Module) -> int:
    """Make each streamed group of ``module`` put its modules' buffers (e.g. a QuantLinear's codes and scales) back
    into their page-locked CPU copies when it offloads, as it does for parameters: diffusers' streamed
    ``_offload_to_memory`` (0.42) restores parameters only, so every buffer would stay on the GPU after its first
    forward (huggingface/diffusers#13238). Idempotent; returns the number of groups wrapped."""
    wrapped = 0
    for group in _streamed_groups(module):
        if getattr(group, "_ptq_restores_buffers", False):
            continue
        offload = group.offload_

        def offload_with_buffers(group=group, offload=offload) -> None:
            offload()  # synchronizes the compute stream before swapping tensors back
            for sub in group.modules:
                for buf in sub.buffers():
                    buf.data = group.cpu_param_dict[buf]

        group.offload_ = offload_with_buffers
        group._ptq_restores_buffers = True
        wrapped += 1
    return wrapped


def enable_offload(module: nn.Module, device: torch.device) -> None:
    """Group-offload ``module`` (a diffusers ``ModelMixin``): weights on the CPU (page-locked for a CUDA
    ``device``), each block onloaded to ``device`` for its forward and its parameters and buffers put back after."""
    stream = device.type == "cuda"
    if stream:
        pin_in_place(module)
    module.enable_group_offload(onload_device=device, offload_device=torch.device("cpu"),
                                offload_type="block_level", num_blocks_per_group=1, use_stream=stream)
    if stream:
        restore_buffers_on_offload(module)


def refresh_offload(module: nn.Module) -> None:
    """Re-apply group offloading after its modules were replaced (e.g. Linears by QuantLinears): the old hooks
    (and with them the replaced tensors' pinned copies) go first, then the new tensors are pinned and offloading is
    enabled again with the same onload device; no-op when the module is not offloaded."""
    from diffusers.hooks import HookRegistry
    from diffusers.hooks.group_offloading import (
        _GROUP_OFFLOADING,
        _LAYER_EXECUTION_TRACKER,
        _LAZY_PREFETCH_GROUP_OFFLOADING,
        _get_top_level_group_offload_hook,
    )

    hook = _get_top_level_group_offload_hook(module)
    if hook is None:
        return
    device = torch.device(hook.config.onload_device)
    registry = HookRegistry.check_if_exists_or_initialize(module)
    for name in (_GROUP_OFFLOADING, _LAYER_EXECUTION_TRACKER, _LAZY_PREFETCH_GROUP_OFFLOADING):
        registry.remove_hook(name, recurse=True)
    del hook  # its module group holds the replaced tensors' pinned memory: free it before pinning the new ones
    enable_offload(module, device)
