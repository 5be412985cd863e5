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
    (reservoir sampling, fixed ``seed``: deterministic). Use as a context manager around calibration forwards.

    Prompt mode (``begin_prompt(i)`` / ``end_prompt()`` / ``fold(record)``: a
    :class:`~ptq.calibration.collector.Collector`, as ``LinearInputObserver``): call ``c`` of prompt ``i`` gets the
    random key ``Random(f"{seed}:{i}:{c}")`` and the ``k`` calls with the smallest keys are kept (bottom-k sampling:
    the same subset however the prompts are split between processes or runs), ordered by (prompt, call)."""

    def __init__(self, module: nn.Module, k: int, seed: int = 0) -> None:
        if k < 1:
            raise ValueError(f"ForwardInputRecorder: k={k}, expected >= 1")
        self.module, self.k, self.seed = module, k, seed
        self._rng = random.Random(seed)
        self.inputs: list[tuple[tuple, dict]] = []
        self.calls = 0
        self._handle: torch.utils.hooks.RemovableHandle | None = None
        self._prompt: int | None = None
        self._prompt_calls = 0
        self._open: list[tuple[float, int, int, tuple]] = []  # the open prompt's candidates (key, prompt, call, x)
        self._best: list[tuple[float, int, int, tuple]] = []  # folded: the k smallest keys

    def _keep(self, cands: list, item: tuple) -> None:
        cands.append(item)
        cands.sort(key=lambda c: (c[0], c[1], c[2]))
        del cands[self.k:]

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        n = self.calls
        self.calls += 1
        if self._prompt is not None:
            call = self._prompt_calls
            self._prompt_calls += 1
            key = random.Random(f"{self.seed}:{self._prompt}:{call}").random()
            full = [c for c in (self._open, self._best) if len(c) >= self.k]
            if all((key, self._prompt, call) < c[-1][:3] for c in full):
                self._keep(self._open, (key, self._prompt, call, (to_cpu(args), to_cpu(kwargs))))
            return
        if n < self.k:
            self.inputs.append((to_cpu(args), to_cpu(kwargs)))
            return
        j = self._rng.randrange(n + 1)
        if j < self.k:
            self.inputs[j] = (to_cpu(args), to_cpu(kwargs))

    # -- prompts ----------------------------------------------------------------------------------------------
    def begin_prompt(self, index: int) -> None:
        if self._prompt is not None:
            raise RuntimeError(f"ForwardInputRecorder.begin_prompt: prompt {self._prompt} is still open")
        self._prompt, self._prompt_calls, self._open = int(index), 0, []

    def end_prompt(self) -> list[tuple[float, int, int, tuple]]:
        """The open prompt's candidates ``(key, prompt, call, (args, kwargs))`` (at most k)."""
        if self._prompt is None:
            raise RuntimeError("ForwardInputRecorder.end_prompt: no prompt is open")
        rec, self._open, self._prompt = self._open, [], None
        return rec

    def fold(self, record: list[tuple[float, int, int, tuple]]) -> None:
        """Merge one prompt's candidates into the kept inputs (any order gives the same result)."""
        for item in record:
            self._keep(self._best, item)
        self.inputs = [c[3] for c in sorted(self._best, key=lambda c: (c[1], c[2]))]

    def state_dict(self) -> dict:
        return {"best": list(self._best), "calls": self.calls}

    def load_state_dict(self, state: dict) -> None:
        self._best = []
        self.fold(state["best"])
        self.calls = state["calls"]

    def __enter__(self) -> ForwardInputRecorder:
        self._handle = self.module.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
