"""Denoising a set of prompts with a model adapter (one progress bar, optional CUDA-graph replays)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ptq.calibration.cuda_graph import CudaGraphForward
from ptq.models.base import ModelAdapter, SampleSpec

log = logging.getLogger("ptq")


@dataclass
class PromptSet:
    """Encoded prompts with their sampling specs (one per prompt, seeds ``seed + i``) and optional conditioning
    images (``[3, H, W]`` in [0, 1], used in turn)."""

    prompts: list[str]
    embeds: torch.Tensor
    negative: torch.Tensor
    specs: list[SampleSpec]
    images: list[torch.Tensor] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.prompts)


def sample_prompts(adapter: ModelAdapter, ps: PromptSet, *, desc: str, progress: bool, keep_steps: bool,
                   on_step_start: Callable[[int], None] | None = None, cuda_graphs: bool = False,
                   indices: Sequence[int] | None = None, on_prompt_start: Callable[[int], None] | None = None,
                   on_prompt_end: Callable[[int], None] | None = None) -> list[dict[str, Any]]:
    """Denoise every prompt (or the prompts ``indices``, in that order); returns per prompt {"final": latents,
    "steps": [latents per step]} on CPU float32.

    ``cuda_graphs``: replay each target's forward from CUDA graphs (CUDA only; hooks attached now are captured, so
    attach them before and keep them until this returns). ``on_prompt_start(i)`` / ``on_prompt_end(i)`` run around
    prompt ``i``."""
    from tqdm.auto import tqdm

    results = []
    order = range(len(ps)) if indices is None else list(indices)
    bar = tqdm(total=sum(ps.specs[i].num_steps for i in order), desc=desc, disable=not progress, leave=False)
    runners: dict[str, CudaGraphForward] = {}
    if cuda_graphs:
        for name, target in adapter.targets().items():
            if next(target.module.parameters()).is_cuda:
                runners[name] = CudaGraphForward(target.module)
    for i in order:
        if on_prompt_start is not None:
            on_prompt_start(i)
        steps: list[torch.Tensor] = []

        def end(step: int, t: torch.Tensor, z: torch.Tensor, _steps: list = steps) -> None:
            if keep_steps:
                _steps.append(z.detach().float().cpu())
            bar.update(1)

        cond = adapter.encode_condition(ps.images[i % len(ps.images)]) if ps.images else None
        final = adapter.denoise(ps.embeds[i : i + 1], ps.negative, ps.specs[i], condition=cond,
                                forward=runners or None, on_step_start=on_step_start, on_step_end=end)
        results.append({"final": final.float().cpu(), "steps": steps})
        if on_prompt_end is not None:
            on_prompt_end(i)
    bar.close()
    for name, runner in runners.items():
        log.info("%s (%s): %d CUDA-graph replays, %d eager forwards", desc, name, runner.replays, runner.eager_calls)
        runner.release()
    return results
