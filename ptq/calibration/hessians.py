"""Hessians of observed Linears for GPTQ: ``H = sum X^T X`` (float32 ``[in, in]``) of each layer's input
``X [tokens, in]``, read as the mean over the calibration tokens.

Layers whose input was the same tensor at their first call (attention q/k/v) share one ``X^T X`` product per call
and, with ``share`` (default), one sum: a group named by its first layer. Sums live on the layers' device or in
host memory (:mod:`ptq.calibration.hessian_store`). Memory: ``4 * in_features**2`` bytes per sum (37.7 MB for
in=3072, 822 MB for in=14336; twice that in prompt mode: the totals and the open prompt's sums).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from ptq.calibration.collector import HookHost, InputCollector
from ptq.calibration.hessian_store import HessianSum, StreamedHostAdder, resolve_storage
from ptq.calibration.input_hooks import SameInput
from ptq.calibration.records import PromptRecord
from ptq.formats.fp8 import divide_exact


@dataclass
class HessianGroup:
    """Layers whose input was the same tensor at their first call (q/k/v) and share one ``X^T X`` sum: ``current``
    receives the products (the open prompt's sum in prompt mode, else the whole sum)."""

    members: list[str]
    current: HessianSum
    dirty: bool = False


class HessianCollector(InputCollector):
    """``sum X^T X`` of the layers ``hessian`` (True: every observed layer; or a collection of names), stored per
    ``storage`` ("device", "host" or "auto": :func:`~ptq.calibration.hessian_store.resolve_storage`), shared
    between sibling layers with ``share`` (module docstring)."""

    def __init__(self, hooks: HookHost, hessian: bool | Iterable[str], storage: str, share: bool) -> None:
        super().__init__(hooks)
        self.names = set(hooks.names) if hessian is True else set(hessian or ())
        unknown = self.names - set(hooks.names)
        if unknown:
            raise KeyError(f"hessian requested for layers that are not observed: {sorted(unknown)}")
        self.active = bool(self.names)
        self.graph_safe = not self.names  # Hessians are left to eager runs
        self.share = share
        modules = hooks.modules
        self.storage = resolve_storage(storage, next(iter(modules[n].weight.device for n in hooks.names),
                                                     torch.device("cpu")),
                                       sum(4 * modules[n].in_features ** 2 for n in self.names))
        self._adder: StreamedHostAdder | None = None
        self._last = SameInput()  # X^T X of the input seen last
        self._last_leader: str | None = None  # the group that received the product computed last
        self.groups: dict[str, HessianGroup] = {}  # by the group's first layer
        self._group_of: dict[str, str] = {}
        self.totals: dict[str, HessianSum] = {}  # prompt mode: the folded prompts' sums, by group
        self.members: dict[str, list[str]] = {}  # members of each group of the totals

    @property
    def device(self) -> torch.device:
        """Where the sums live: CPU for host storage, else the observed layers' device."""
        if self.storage == "host" or not self.names:
            return torch.device("cpu")
        return self.hooks.layer_device(sorted(self.names)[0])

    # -- hooks ----------------------------------------------------------------------------------------------
    def observe(self, name: str, x: torch.Tensor, capturing: bool) -> None:
        if name in self.names:
            self._add(name, x)

    def detach(self) -> None:
        self._last.clear()

    def _xtx(self, x: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """(``X^T X`` float32 ``[in, in]`` of ``x``, whether it was computed now): computed once for consecutive
        layers reading the same tensor."""
        xtx = self._last.get(x)
        if xtx is not None:
            return xtx, False
        flat = x.reshape(-1, x.shape[-1]).float()
        xtx = flat.t() @ flat
        self._last.put(x, xtx)
        return xtx, True

    def _host_adder(self, device: torch.device) -> StreamedHostAdder | None:
        """The side-stream adder of host-stored sums of CUDA products (None otherwise)."""
        if self.storage == "host" and device.type == "cuda" and self._adder is None:
            self._adder = StreamedHostAdder(device)
        return self._adder

    def _add(self, name: str, x: torch.Tensor) -> None:
        """Add ``X^T X`` of ``x`` to ``name``'s group (created at the layer's first call: the group of the layer
        that computed the same product just before, with ``share``)."""
        xtx, fresh = self._xtx(x)
        leader = self._group_of.get(name)
        if leader is None:
            share = self.share and not fresh and self._last_leader is not None
            leader = self._group_of[name] = self._last_leader if share else name
            if leader == name:
                self.groups[name] = HessianGroup([name], HessianSum(xtx.shape, xtx.device, self.storage,
                                                                    self._host_adder(xtx.device)))
            else:
                self.groups[leader].members.append(name)
        group = self.groups[leader]
        if not self.share or (fresh and leader == name):
            group.current.add(xtx)
            group.dirty = True
            self._last_leader = leader
        elif fresh or self._last_leader != leader:
            raise RuntimeError(f"LinearInputObserver: {name!r} shares its Hessian with {leader!r} (the same input "
                               "tensor at its first call) but was now called with another input; use "
                               "share_hessians=False for this model")

    # -- prompts --------------------------------------------------------------------------------------------
    def begin_prompt(self, index: int) -> None:
        for group in self.groups.values():
            if group.dirty:
                group.current.zero_()
                group.dirty = False

    def end_prompt(self, rec: PromptRecord, called: list[str]) -> None:
        for key, group in self.groups.items():
            if group.dirty:
                rec.hessians[key] = group.current.result()
                rec.groups[key] = list(group.members)

    def fold(self, rec: PromptRecord) -> None:
        for key, value in rec.hessians.items():
            total = self.totals.get(key)
            if total is None:
                dev = self.hooks.layer_device(key)
                total = self.totals[key] = HessianSum(value.shape, dev, self.storage)  # added to on the host
                self.members[key] = list(rec.groups[key])
                total.set_(value)
            else:
                total.add(value)

    def save(self, state: dict[str, Any]) -> None:
        state["hessians"] = {k: {"members": self.members[k], "sum": h.result()} for k, h in self.totals.items()}

    def empty(self) -> bool:
        return not self.totals

    # -- reading --------------------------------------------------------------------------------------------
    def _sums(self) -> tuple[dict[str, HessianSum], dict[str, list[str]]]:
        """(sum by group, members by group) of the whole sums (the totals in prompt mode)."""
        if self.hooks.prompt_mode:
            return self.totals, self.members
        return {k: g.current for k, g in self.groups.items()}, {k: g.members for k, g in self.groups.items()}

    def means(self, tokens: dict[str, int], *, mean: bool = True) -> dict[str, torch.Tensor]:
        """``name -> H`` for the layers in ``tokens`` (tokens seen per layer) that have one: ``sum / tokens``
        (correctly rounded wherever the sum lives; ``mean=False``: a copy of the sum); layers sharing a sum and
        a token count get one tensor object."""
        sums, members = self._sums()
        group_of = {n: k for k, ms in members.items() for n in ms}
        shared: dict[tuple[str, int], torch.Tensor] = {}
        out = {}
        for name in tokens:
            if name not in group_of:
                continue
            value = sums[group_of[name]].result()
            if not mean:
                out[name] = value.clone()
                continue
            key = (group_of[name], tokens[name])
            if key not in shared:
                shared[key] = divide_exact(value, max(tokens[name], 1))
            out[name] = shared[key]
        return out

    def take(self, tokens: dict[str, int]) -> dict[str, torch.Tensor]:
        """:meth:`means`, computed in place of the sums, which are given up (no second copy of every Hessian)."""
        sums, members = self._sums()
        out = {}
        for key, names in members.items():
            called = [n for n in names if n in tokens]
            if not called:
                continue
            counts = {tokens[n] for n in called}
            value = sums[key].result()
            if len(counts) > 1:  # members seen a different number of times (not siblings after all)
                for n in called:
                    out[n] = divide_exact(value, max(tokens[n], 1))
                continue
            value.div_(value.new_tensor(float(max(counts.pop(), 1))))  # divide_exact, in place
            for n in called:
                out[n] = value
        self.totals, self.members, self.groups, self._group_of = {}, {}, {}, {}
        self.close()
        return {n: out[n] for n in tokens if n in out}

    def close(self) -> None:
        """Finish queued host additions and free the side stream's buffers."""
        if self._adder is not None:
            self._adder.close()
            self._adder = None


__all__ = ["HessianCollector", "HessianGroup"]
