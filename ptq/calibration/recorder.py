"""Recording whole forward inputs of a module during calibration (for measurements that replay them later, such as
the sensitivity analysis)."""

from __future__ import annotations

import copy
import random
from typing import Any

import torch
from torch import nn


def to_cpu(obj: Any) -> Any:
    """CPU copies of every tensor in a nest of tuples / lists / dicts."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(o) for o in obj)
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    return copy.copy(obj)


def to_device(obj: Any, device: torch.device) -> Any:
    """Every tensor of a nest of tuples / lists / dicts moved to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


class ForwardInputRecorder:
    """Keep CPU copies of ``k`` forward inputs ``(args, kwargs)`` of ``module``, a uniform random subset of all calls
    (reservoir sampling, fixed ``seed``: deterministic). Use as a context manager around calibration forwards."""

    def __init__(self, module: nn.Module, k: int, seed: int = 0) -> None:
        if k < 1:
            raise ValueError(f"ForwardInputRecorder: k={k}, expected >= 1")
        self.module, self.k = module, k
        self._rng = random.Random(seed)
        self.inputs: list[tuple[tuple, dict]] = []
        self.calls = 0
        self._handle: torch.utils.hooks.RemovableHandle | None = None

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        n = self.calls
        self.calls += 1
        if n < self.k:
            self.inputs.append((to_cpu(args), to_cpu(kwargs)))
            return
        j = self._rng.randrange(n + 1)
        if j < self.k:
            self.inputs[j] = (to_cpu(args), to_cpu(kwargs))

    def __enter__(self) -> ForwardInputRecorder:
        self._handle = self.module.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
