"""Activation statistics of ``nn.Linear`` inputs, collected by forward pre-hooks.

:class:`LinearInputObserver` is one hook host (:class:`~ptq.calibration.input_hooks.InputHooks`: the hooks, the
denoising step, calls and tokens, prompts, checkpoint state) with one collector per statistic
(:mod:`ptq.calibration.collector`): input amax, scalar / per channel / per step (:mod:`~ptq.calibration.amax`,
with the fused Triton path and the GELU tap of :mod:`~ptq.calibration.gelu_tap`), random |x| samples
(:mod:`~ptq.calibration.samples`), whole input rows (:mod:`~ptq.calibration.rows`) and Hessians
(:mod:`~ptq.calibration.hessians`). Sibling layers that read the same input tensor (e.g. attention q/k/v) reuse
one reduction, one row copy and one ``X^T X`` product. The amax path can be captured in a CUDA graph
(:mod:`ptq.calibration.cuda_graph`) and replayed for every step.

Prompts (``begin_prompt(i)`` / ``end_prompt()`` / ``fold(record)``): a calibration run that announces its prompts
gets statistics that do not depend on how the prompts were split between processes or runs. Each prompt is
observed on its own (random samples drawn from a generator seeded by ``(seed, prompt)``; Hessians summed per
prompt) and ``end_prompt`` returns its contribution (:class:`PromptRecord`); ``fold`` adds records to the totals
in prompt order (amax: max; calls, tokens: sums; samples: appended; Hessians: ``total += prompt sum``).
``state_dict`` / ``load_state_dict`` save and restore the totals (resumable calibration).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ptq.calibration.amax import AMAX_BATCH_BYTES, AmaxCollector, check_backend
from ptq.calibration.hessians import HessianCollector
from ptq.calibration.input_hooks import InputHooks, select_linears
from ptq.calibration.records import LinearInputStats, PromptRecord
from ptq.calibration.rows import RowCollector
from ptq.calibration.samples import SampleCollector
from ptq.formats import triton_quant


class LinearInputObserver:
    """Collect per-layer input amax (scalar, per channel, per step) for the named Linears of ``model``.

    Use as a context manager around the calibration forwards; set ``observer.step`` before each denoising step
    when ``num_steps`` is given. ``samples_per_call > 0`` also keeps that many random |x| values per call.
    ``amax_backend``: "auto" (default: the fused Triton kernel for CUDA inputs when triton is importable, else
    torch), "torch" or "triton" (one fused kernel per call); all give identical statistics.
    ``sample_block``: the samples come in aligned runs of this many consecutive elements along in_features
    (16 = NVFP4's runtime blocks; layers whose in_features is not a multiple of it sample single elements).

    ``amax_batch``: the fused path reads up to this many consecutive input tensors (up to
    ``AMAX_BATCH_BYTES`` in all) in one launch; 1 = one launch per tensor.
    ``fuse_producers``: on the fused path, a diffusers ``FeedForward``'s GELU (tanh) is computed by a Triton kernel
    that also folds the statistics of the Linear reading its output (:mod:`ptq.calibration.gelu_tap`). Off by
    default: the kernel is slower than torch's GELU by more than the read it saves (docs/benchmarks.md).

    ``hessian``: True (every observed layer) or a collection of layer names: also accumulate ``H = sum X^T X``
    (float32 ``[in, in]``) for GPTQ; read with :meth:`hessians`. Layers that read the same input tensor (e.g.
    attention q/k/v) share one ``X^T X`` product per call and, with ``share_hessians`` (default), one sum (the
    tensors :meth:`hessians` returns for them are one object). ``hessian_storage``: "device" (the model's device,
    updated in place, no host sync), "host" (pinned host memory streamed through the GPU per product;
    :mod:`ptq.calibration.hessian_store`) or "auto". Memory: :mod:`ptq.calibration.hessians`.

    ``rows_per_call > 0``: also keep that many whole input rows (tokens) per call, evenly strided with a random
    offset, as CPU copies in the input dtype (``LinearInputStats.rows``; smoothing searches). Layers reading the
    same input tensor share one copy.
    """

    def __init__(
        self,
        model: nn.Module,
        names: Iterable[str] | None = None,
        *,
        num_steps: int | None = None,
        samples_per_call: int = 0,
        seed: int = 0,
        amax_backend: str = "auto",
        sample_block: int = 1,
        hessian: bool | Iterable[str] = False,
        amax_batch: int = triton_quant.AMAX_BATCH_ITEMS,
        fuse_producers: bool = False,
        hessian_storage: str = "device",
        share_hessians: bool = True,
        rows_per_call: int = 0,
    ) -> None:
        check_backend(amax_backend)
        self._hooks = hooks = InputHooks(model, names, num_steps)
        rows = RowCollector(hooks, rows_per_call, seed)
        samples = SampleCollector(hooks, samples_per_call, sample_block, seed)
        self._hessians = HessianCollector(hooks, hessian, hessian_storage, share_hessians)
        self._amax = AmaxCollector(hooks, amax_backend, amax_batch, fuse_producers)
        hooks.use([self._amax, samples, rows, self._hessians])  # the order each input is observed in
        self.model, self.names, self.num_steps, self.seed = model, hooks.names, num_steps, seed
        self.samples_per_call, self.sample_block, self.rows_per_call = samples_per_call, sample_block, rows_per_call
        self.amax_backend, self.amax_batch, self.fuse_producers = amax_backend, amax_batch, fuse_producers
        self.share_hessians = share_hessians

    # -- denoising step, hooks ------------------------------------------------------------------------------
    @property
    def step(self) -> int:
        """The denoising step the next forwards belong to (``step_amax`` slot); outside ``[0, num_steps)`` only the
        per-channel and overall maxima are updated."""
        return self._hooks.step

    @step.setter
    def step(self, value: int) -> None:
        self._hooks.step = value

    @property
    def graph_safe(self) -> bool:
        """Whether forwards observed by this observer may be replayed from a CUDA graph: amax statistics only (random
        samples are drawn on the host per call; Hessians are left to eager runs)."""
        return self._hooks.graph_safe

    @property
    def _patched(self) -> list[nn.Module]:
        """The GELU modules tapped while attached (``fuse_producers``)."""
        return self._amax.taps.patched

    def attach(self) -> LinearInputObserver:
        self._hooks.attach()
        return self

    def detach(self) -> None:
        self._hooks.detach()

    def __enter__(self) -> LinearInputObserver:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()

    # -- reading --------------------------------------------------------------------------------------------
    def stats(self) -> dict[str, LinearInputStats]:
        """Statistics per observed layer name (layers never called are absent); in prompt mode over the folded
        prompts."""
        return self._hooks.stats()

    def hessians(self, *, mean: bool = True) -> dict[str, torch.Tensor]:
        """``name -> H`` float32 ``[in, in]`` for the layers observed with ``hessian``: ``X^T X / tokens`` (mean
        over the calibration tokens, a correctly rounded division wherever the sum lives; ``mean=False``: the raw
        sum). Only layers that were called are present; layers sharing a sum (and token count) get one tensor
        object."""
        return self._hessians.means(self._hooks.tokens(), mean=mean)

    def take_hessians(self) -> dict[str, torch.Tensor]:
        """:meth:`hessians` (means) computed in place of the observer's sums, which it gives up (no second copy of
        every Hessian): the observer holds no Hessians afterwards."""
        return self._hessians.take(self._hooks.tokens())

    def close(self) -> None:
        """Finish queued host additions and free the side stream's buffers."""
        self._hessians.close()

    @property
    def hessian_device(self) -> torch.device:
        """Where this observer's Hessian sums live: CPU for host storage, else the observed layers' device."""
        return self._hessians.device

    # -- prompts --------------------------------------------------------------------------------------------
    @property
    def folded(self) -> list[int]:
        """Prompts folded into the totals, in order."""
        return self._hooks.folded

    @folded.setter
    def folded(self, value: list[int]) -> None:
        self._hooks.folded = value

    def begin_prompt(self, index: int) -> None:
        """Start observing calibration prompt ``index`` (its own sample generator, empty per-prompt sums)."""
        self._hooks.begin_prompt(index)

    def end_prompt(self) -> PromptRecord:
        """Close the open prompt and return its contribution (per-layer state reset; Hessian sums stay valid until
        the next :meth:`begin_prompt`). Pass it to :meth:`fold` (here or in the process that owns the totals)."""
        return self._hooks.end_prompt()

    def fold(self, rec: PromptRecord) -> None:
        """Add one prompt's contribution to the totals (call in prompt order: sums are order-sensitive)."""
        self._hooks.fold(rec)

    def state_dict(self) -> dict[str, Any]:
        """The totals (prompt mode, no prompt open) as plain tensors and numbers (CPU), for a checkpoint."""
        return self._hooks.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the totals of :meth:`state_dict` (before any forward of this observer)."""
        self._hooks.load_state_dict(state)


__all__ = ["AMAX_BATCH_BYTES", "LinearInputObserver", "LinearInputStats", "PromptRecord", "select_linears"]
