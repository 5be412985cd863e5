"""``model.offload``: keep a transformer's weights in CPU memory and stream one block at a time to the GPU for each
forward (diffusers' group offloading, ``block_level``, on a CUDA side stream), so a 14B expert runs in a few GB of
GPU memory. Modules replaced in place (quantization) are picked up by :func:`refresh_offload`."""

from __future__ import annotations

import torch


def enable_offload(module: torch.nn.Module, device: torch.device) -> None:
    """Group-offload ``module`` (a diffusers ``ModelMixin``): weights on the CPU, each block onloaded to
    ``device`` for its forward."""
    module.enable_group_offload(onload_device=device, offload_device=torch.device("cpu"),
                                offload_type="block_level", num_blocks_per_group=1,
                                use_stream=device.type == "cuda")


def refresh_offload(module: torch.nn.Module) -> None:
    """Re-apply group offloading after its modules were replaced (e.g. Linears by QuantLinears); no-op when the
    module is not offloaded."""
    from diffusers.hooks.group_offloading import _maybe_remove_and_reapply_group_offloading

    _maybe_remove_and_reapply_group_offloading(module)
