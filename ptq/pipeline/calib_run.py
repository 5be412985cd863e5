"""Calibration prompt by prompt: sharded across processes, folded in prompt order, checkpointed after each prompt.

What ``ptq run`` collects does not depend on how the prompts are split: every collector (``LinearInputObserver``,
``ForwardInputRecorder``) observes one prompt at a time and hands over that prompt's contribution (a record), and
rank 0 folds the records in prompt order (amax: max, counts: sums, samples: appended, Hessians: ``total +=
prompt sum``, recorded inputs: bottom-k). With N processes the prompts are dealt in rounds of N (prompt ``r`` of a
round to rank ``r``); after each round the other ranks send their records to rank 0.

Resumable: after every ``every`` folded prompts rank 0 writes the totals and the number of prompts done to
``calibration_checkpoint.pt`` in the run folder (temp file + rename: never half written). A later run with the
same calibration fingerprint (model, prompts, sampler settings, what is collected) continues after the last
folded prompt and ends with the same totals as an uninterrupted run, hence byte-identical exports.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ptq.calibration.collector import Collector
from ptq.calibration.observers import LinearInputObserver, PromptRecord
from ptq.models.base import ModelAdapter
from ptq.pipeline.distributed import (
    DistContext,
    broadcast_object,
    recv_object,
    recv_tensor,
    send_object,
    send_tensor,
)
from ptq.pipeline.sampling import PromptSet, sample_prompts
from ptq.targets.safetensors_io import temp_path

log = logging.getLogger("ptq")

CHECKPOINT_NAME = "calibration_checkpoint.pt"


def checkpoint_name(part: str | None = None) -> str:
    """File name of a calibration checkpoint: :data:`CHECKPOINT_NAME`, or one per calibration pass ``part`` (an
    expert of a model calibrated expert by expert)."""
    return CHECKPOINT_NAME if part is None else f"calibration_checkpoint.{part}.pt"
CHECKPOINT_VERSION = 1
#: Test hook: rank 0 ends the process with ``os._exit(TEST_EXIT_CODE)`` right after writing the checkpoint that
#: holds this prompt (0-based), as if it had been killed there.
EXIT_AFTER_PROMPT_ENV = "PTQ_TEST_EXIT_AFTER_PROMPT"
TEST_EXIT_CODE = 75


def calibration_fingerprint(payload: dict[str, Any]) -> str:
    """sha256 (hex) of what the calibration statistics depend on (JSON of ``payload``)."""
    data = {"version": CHECKPOINT_VERSION, **payload}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def read_checkpoint_header(path: Path) -> dict[str, Any] | None:
    """(fingerprint, prompts_done, num_prompts) of a checkpoint file, or None if it cannot be read."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - an unreadable checkpoint is not trusted
        log.warning("calibration checkpoint %s is unreadable (%s): ignored", path, exc)
        return None
    return {k: state.get(k) for k in ("fingerprint", "prompts_done", "num_prompts")}


def find_checkpoint(out_dir: Path, fingerprint: str, resume: bool | None, name: str = CHECKPOINT_NAME
                    ) -> Path | None:
    """The checkpoint a run in ``out_dir`` continues from. ``resume``: None = the one in ``out_dir`` if it matches
    (re-running into the same run folder), an error if it was written for other settings; True = also the matching
    one with the most prompts done (the newest of those) in a sibling run folder (``outputs/<preset>/<recipe>/*``);
    False = none."""
    if resume is False:
        return None
    own = out_dir / name
    if own.is_file():
        head = read_checkpoint_header(own)
        if head is not None and head["fingerprint"] == fingerprint:
            return own
        if head is not None:
            raise ValueError(f"{own} was written by a calibration with other settings (model, prompts, sampler or "
                             "recipe needs differ); run with resume=false to start over, or use another "
                             "hydra.run.dir")
    if not resume or not out_dir.parent.is_dir():
        return None
    matching = []
    for path in out_dir.parent.glob(f"*/{name}"):
        head = read_checkpoint_header(path)
        if head is not None and head["fingerprint"] == fingerprint:
            matching.append((int(head.get("prompts_done") or 0), path.stat().st_mtime, path))
    if matching:
        return max(matching)[2]
    log.warning("resume=true: no calibration checkpoint with these settings under %s; starting over", out_dir.parent)
    return None


@dataclass
class CalibrationSession:
    """How ``stages.calibrate`` runs its prompts in ``ptq run``: prompt by prompt over the ranks of ``dist``,
    checkpointed to ``checkpoint`` every ``every`` prompts (None / 0: never), continuing from ``resume_from``.
    ``hessian_storage``: where observers keep Hessians ("auto", "device", "host")."""

    dist: DistContext = field(default_factory=DistContext)
    checkpoint: Path | None = None
    resume_from: Path | None = None
    fingerprint: str = ""
    every: int = 1
    hessian_storage: str = "auto"
    prompts_done: int = 0  # after run(): prompts folded (rank 0)

    def run(self, adapter: ModelAdapter, ps: PromptSet, collectors: dict[str, Collector], *, progress: bool,
            cuda_graphs: bool, on_step_start: Callable[[int], None] | None) -> None:
        """Denoise this rank's share of the prompts not yet done with the collectors attached; rank 0 folds
        everything (see the module docstring)."""
        ctx = self.dist
        done = broadcast_object(ctx, self._resume(collectors, len(ps)) if ctx.is_main else None)
        todo = list(range(done, len(ps)))
        rounds = [todo[k : k + ctx.world] for k in range(0, len(todo), ctx.world)]
        round_of = {p: rnd for rnd in rounds for p in rnd}
        mine = [rnd[ctx.rank] for rnd in rounds if ctx.rank < len(rnd)]
        self.prompts_done = done
        exit_after = os.environ.get(EXIT_AFTER_PROMPT_ENV)

        def start(i: int) -> None:
            for c in collectors.values():
                c.begin_prompt(i)

        def end(i: int) -> None:
            records = {k: c.end_prompt() for k, c in collectors.items()}
            if not ctx.is_main:
                self._send(records)
                return
            for r, p in enumerate(round_of[i]):
                got = records if r == 0 else self._recv(r, collectors)
                for k, c in collectors.items():
                    c.fold(got[k])
                self.prompts_done = p + 1
            if self.checkpoint is not None and self.every > 0 and (
                    self.prompts_done % self.every == 0 or self.prompts_done == len(ps)):
                self.save(collectors, len(ps))
            if exit_after is not None and int(exit_after) in round_of[i]:
                log.warning("%s=%s: exiting after prompt %s (test hook)", EXIT_AFTER_PROMPT_ENV, exit_after, i)
                os._exit(TEST_EXIT_CODE)

        if mine:
            sample_prompts(adapter, ps, desc="calibrate", progress=progress and ctx.is_main, keep_steps=False,
                           on_step_start=on_step_start, cuda_graphs=cuda_graphs, indices=mine,
                           on_prompt_start=start, on_prompt_end=end)
        if done:
            log.info("calibration: %d of %d prompts taken from %s", done, len(ps), self.resume_from)

    # -- checkpoints ----------------------------------------------------------------------------------------------
    def _resume(self, collectors: dict[str, Collector], num_prompts: int) -> int:
        if self.resume_from is None:
            return 0
        state = torch.load(self.resume_from, map_location="cpu", weights_only=True)
        if state.get("fingerprint") != self.fingerprint or state.get("num_prompts") != num_prompts:
            raise ValueError(f"{self.resume_from}: calibration checkpoint of other settings")
        missing = set(collectors) - set(state["collectors"])
        if missing:
            raise ValueError(f"{self.resume_from}: no state for {sorted(missing)}")
        for k, c in collectors.items():
            c.load_state_dict(state["collectors"][k])
        log.info("resuming calibration from %s: %d of %d prompts done", self.resume_from, state["prompts_done"],
                 num_prompts)
        return int(state["prompts_done"])

    def save(self, collectors: dict[str, Collector], num_prompts: int) -> None:
        """Write the checkpoint atomically (temp file in the same folder, then rename)."""
        assert self.checkpoint is not None
        state = {"version": CHECKPOINT_VERSION, "fingerprint": self.fingerprint, "prompts_done": self.prompts_done,
                 "num_prompts": num_prompts, "collectors": {k: c.state_dict() for k, c in collectors.items()}}
        self.checkpoint.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_path(self.checkpoint)
        try:
            torch.save(state, tmp)
            os.replace(tmp, self.checkpoint)
        finally:
            if tmp.exists():
                tmp.unlink()

    # -- records between ranks ------------------------------------------------------------------------------------
    def _send(self, records: dict[str, Any]) -> None:
        meta: dict[str, Any] = {}
        tensors: list[torch.Tensor] = []
        for k, rec in records.items():
            if isinstance(rec, PromptRecord):
                keys = sorted(rec.hessians)
                meta[k] = ("observer", rec.index, rec.layers, rec.groups,
                           [(h, tuple(rec.hessians[h].shape)) for h in keys])
                tensors += [rec.hessians[h] for h in keys]
            else:
                meta[k] = ("plain", rec)
        send_object(self.dist, meta, 0)
        for t in tensors:
            send_tensor(self.dist, t, 0)

    def _recv(self, src: int, collectors: dict[str, Collector]) -> dict[str, Any]:
        meta = recv_object(self.dist, src)
        out: dict[str, Any] = {}
        for k, m in meta.items():
            if m[0] == "plain":
                out[k] = m[1]
                continue
            _, index, layers, groups, shapes = m
            rec = PromptRecord(index, layers, {}, groups)
            collector = collectors[k]
            device = collector.hessian_device if isinstance(collector, LinearInputObserver) else torch.device("cpu")
            for h, shape in shapes:
                rec.hessians[h] = recv_tensor(self.dist, torch.empty(shape, dtype=torch.float32, device=device), src)
            out[k] = rec
        return out


def run_session(session: CalibrationSession, adapter: ModelAdapter, ps: PromptSet,
                observers: dict[str, LinearInputObserver], recorders: dict[str, Any], *, progress: bool,
                cuda_graphs: bool) -> None:
    """``stages.calibrate``'s forwards through ``session``: the observers and recorders of every target as
    collectors (CUDA graphs only for amax-only observers, as without a session)."""
    graphs = cuda_graphs and all(o.graph_safe for o in observers.values()) and not recorders

    def step(i: int) -> None:
        for o in observers.values():
            o.step = i

    collectors: dict[str, Collector] = {f"observer:{n}": o for n, o in observers.items()}
    collectors.update({f"recorder:{n}": r for n, r in recorders.items()})
    session.run(adapter, ps, collectors, progress=progress, cuda_graphs=graphs, on_step_start=step)


__all__ = ["CHECKPOINT_NAME", "checkpoint_name", "EXIT_AFTER_PROMPT_ENV", "TEST_EXIT_CODE", "CalibrationSession", "Collector",
           "calibration_fingerprint", "find_checkpoint", "read_checkpoint_header", "run_session"]
