"""Calibration prompt by prompt (what makes multi-process and resumed runs equal to a plain run): observer and
recorder statistics do not depend on how the prompts are split or interrupted, host-memory Hessians equal device
ones bit for bit, sibling layers share one Hessian, checkpoints and the bf16 baseline cache are never trusted half
written."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from torch import nn

from ptq.calibration.observers import LinearInputObserver
from ptq.calibration.recorder import ForwardInputRecorder
from ptq.pipeline import stages
from ptq.pipeline.calib_run import CHECKPOINT_NAME, CalibrationSession, find_checkpoint
from ptq.pipeline.sampling import PromptSet


class Attn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.o(self.q(x) + self.k(x) * self.v(x))


PROMPTS, CALLS = 5, 2


def _inputs() -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [[torch.randn(2, 7, 32, generator=g) * (1 + p) for _ in range(CALLS)] for p in range(PROMPTS)]


def _observer(model: nn.Module, **kw: object) -> LinearInputObserver:
    return LinearInputObserver(model, hessian=True, samples_per_call=24, sample_block=16, num_steps=CALLS, seed=3,
                               **kw)


def _observe(model: nn.Module, obs: LinearInputObserver, prompt: int, xs: list[list[torch.Tensor]]):
    with obs, torch.no_grad():
        obs.begin_prompt(prompt)
        for step, x in enumerate(xs[prompt]):
            obs.step = step
            model(x)
        return obs.end_prompt()


def _assert_same(a: LinearInputObserver, b: LinearInputObserver) -> None:
    sa, sb = a.stats(), b.stats()
    assert sa.keys() == sb.keys()
    for n in sa:
        for f in ("amax", "channel_amax", "step_amax", "samples", "sample_steps"):
            assert torch.equal(getattr(sa[n], f), getattr(sb[n], f)), (n, f)
        assert (sa[n].calls, sa[n].tokens, sa[n].sample_block) == (sb[n].calls, sb[n].tokens, sb[n].sample_block)
    ha, hb = a.hessians(), b.hessians()
    assert ha.keys() == hb.keys() and all(torch.equal(ha[n], hb[n]) for n in ha)


def _reference(model: nn.Module, xs: list[list[torch.Tensor]]) -> LinearInputObserver:
    ref = _observer(model)
    for p in range(PROMPTS):
        ref.fold(_observe(model, ref, p, xs))
    return ref


def test_prompt_records_fold_the_same_however_prompts_are_split() -> None:
    torch.manual_seed(0)
    model, xs = Attn(), _inputs()
    ref = _reference(model, xs)
    # "two processes": prompts dealt round-robin to two observers, the records folded in prompt order by a third
    ranks = [_observer(model), _observer(model)]
    main = _observer(model)
    for p in range(PROMPTS):
        main.fold(_observe(model, ranks[p % 2], p, xs))
    _assert_same(ref, main)
    # host storage (on CPU the same place as the device; see the GPU test for the streamed sums)
    host = _observer(model, hessian_storage="host")
    for p in range(PROMPTS):
        host.fold(_observe(model, host, p, xs))
    assert host.hessian_device == torch.device("cpu")
    _assert_same(ref, host)
    # the statistics of a prompt depend on the prompt only: its samples come from a (seed, prompt) generator
    stats = ref.stats()["q"]
    assert stats.calls == PROMPTS * CALLS and stats.samples.numel() == PROMPTS * CALLS * 16
    hs = ref.hessians()
    assert hs["q"] is hs["k"] is hs["v"] and hs["o"] is not hs["q"]
    flat = torch.cat([x.reshape(-1, 32) for p in xs for x in p])
    assert torch.allclose(hs["q"], flat.t() @ flat / flat.shape[0], rtol=1e-5, atol=1e-5)


def test_state_dict_resumes_to_the_same_totals() -> None:
    torch.manual_seed(0)
    model, xs = Attn(), _inputs()
    ref = _reference(model, xs)
    first = _observer(model)
    for p in range(2):
        first.fold(_observe(model, first, p, xs))
    state = first.state_dict()
    resumed = _observer(model)
    resumed.load_state_dict(state)
    assert resumed.folded == [0, 1]
    for p in range(2, PROMPTS):
        resumed.fold(_observe(model, resumed, p, xs))
    _assert_same(ref, resumed)
    with pytest.raises(RuntimeError, match="already holds statistics"):
        resumed.load_state_dict(state)


def test_take_hessians_gives_the_means_without_a_copy() -> None:
    torch.manual_seed(0)
    model, xs = Attn(), _inputs()
    ref = _reference(model, xs)
    means = ref.hessians()
    taken = ref.take_hessians()
    assert all(torch.equal(means[n], taken[n]) for n in means) and taken["q"] is taken["v"]
    assert ref.hessians() == {}


def test_sibling_that_changes_input_is_an_error() -> None:
    class Drift(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.calls = nn.Linear(8, 8), nn.Linear(8, 8), 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            return self.a(x) + self.b(x if self.calls == 1 else x + 1)

    model = Drift()
    with LinearInputObserver(model, hessian=True) as obs, torch.no_grad():
        model(torch.randn(3, 8))
        with pytest.raises(RuntimeError, match="'b' shares its Hessian with 'a'"):
            model(torch.randn(3, 8))
    model.calls = 0
    with LinearInputObserver(model, hessian=True, share_hessians=False) as obs, torch.no_grad():
        model(torch.randn(3, 8))
        model(torch.randn(3, 8))
    assert obs.hessians()["a"] is not obs.hessians()["b"]


def test_recorder_bottom_k_does_not_depend_on_the_split() -> None:
    model = nn.Linear(4, 4)
    xs = [torch.full((1, 4), float(i)) for i in range(PROMPTS * 3)]

    def record(recorder: ForwardInputRecorder, p: int) -> list:
        with recorder, torch.no_grad():
            recorder.begin_prompt(p)
            for c in range(3):
                model(xs[3 * p + c])
            return recorder.end_prompt()

    one = ForwardInputRecorder(model, 4, seed=1)
    for p in range(PROMPTS):
        one.fold(record(one, p))
    two = [ForwardInputRecorder(model, 4, seed=1) for _ in range(2)]
    main = ForwardInputRecorder(model, 4, seed=1)
    records = [record(two[p % 2], p) for p in range(PROMPTS)]
    random.Random(0).shuffle(records)  # any fold order
    for rec in records:
        main.fold(rec)
    values = [float(args[0][0, 0]) for args, _ in one.inputs]
    assert len(values) == 4 and values == sorted(values)  # (prompt, call) order
    assert values == [float(args[0][0, 0]) for args, _ in main.inputs]
    keys = sorted((random.Random(f"1:{p}:{c}").random(), 3 * p + c) for p in range(PROMPTS) for c in range(3))
    assert values == sorted(float(i) for _, i in keys[:4])  # the 4 smallest keys


def test_checkpoint_is_atomic_and_matched_by_fingerprint(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, xs = Attn(), _inputs()
    obs = _observer(model)
    obs.fold(_observe(model, obs, 0, xs))
    session = CalibrationSession(checkpoint=tmp_path / "run" / CHECKPOINT_NAME, fingerprint="abc", prompts_done=1)
    session.save({"observer:t": obs}, PROMPTS)
    assert [p.name for p in (tmp_path / "run").iterdir()] == [CHECKPOINT_NAME]  # no temp file left
    assert find_checkpoint(tmp_path / "run", "abc", None) == session.checkpoint
    assert find_checkpoint(tmp_path / "run", "abc", False) is None
    assert find_checkpoint(tmp_path / "other", "abc", None) is None
    assert find_checkpoint(tmp_path / "other", "abc", True) == session.checkpoint  # newest matching sibling
    with pytest.raises(ValueError, match="written by a calibration with other settings"):
        find_checkpoint(tmp_path / "run", "xyz", None)
    session.checkpoint.write_bytes(session.checkpoint.read_bytes()[:100])  # truncated by something else
    assert find_checkpoint(tmp_path / "run", "abc", None) is None


class _CountingAdapter:
    """Just enough of a model adapter for ``sample_prompts``: a deterministic 'denoiser' that counts its runs."""

    name = "counting"

    def __init__(self) -> None:
        self.runs = 0

    def targets(self) -> dict:
        return {}

    def denoise(self, embeds, negative, spec, *, condition=None, forward=None, on_step_start=None,
                on_step_end=None) -> torch.Tensor:
        self.runs += 1
        z = embeds.float().sum() * torch.ones(2, 2)
        for i in range(spec.num_steps):
            on_step_end(i, torch.tensor(0.0), z + i)
        return z


def test_interrupted_baseline_cache_write_is_never_trusted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ptq.models.base import SampleSpec

    adapter = _CountingAdapter()
    ps = PromptSet(["a", "b"], torch.ones(2, 3), torch.zeros(1, 3), [SampleSpec(8, 8, 1, 2, 1.0, s) for s in (0, 1)])
    cache = tmp_path / "cache" / "baseline_x.pt"
    real_save = torch.save

    def killed(obj: object, f: Path) -> None:  # the process dies half way through writing
        Path(f).write_bytes(b"PK\x03\x04 half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        stages.bf16_baseline(adapter, ps, cache, progress=False, cuda_graphs=False)
    monkeypatch.setattr(torch, "save", real_save)
    assert not cache.exists() and list(cache.parent.iterdir()) == []  # neither the entry nor its temp file
    results, cached = stages.bf16_baseline(adapter, ps, cache, progress=False, cuda_graphs=False)
    assert not cached and cache.is_file() and adapter.runs == 4
    again, cached = stages.bf16_baseline(adapter, ps, cache, progress=False, cuda_graphs=False)
    assert cached and adapter.runs == 4 and torch.equal(again[1]["final"], results[1]["final"])
    cache.write_bytes(cache.read_bytes()[:50])  # damaged by something other than ptq: recomputed, not trusted
    again, cached = stages.bf16_baseline(adapter, ps, cache, progress=False, cuda_graphs=False)
    assert not cached and adapter.runs == 6 and torch.equal(again[1]["final"], results[1]["final"])


@pytest.mark.gpu
def test_gpu_host_streamed_hessians_equal_device_hessians() -> None:
    """Host-stored sums streamed through the GPU (side stream, pinned memory) hold the same bits as sums kept on
    the GPU, in legacy and prompt mode."""
    torch.manual_seed(0)
    model = Attn().cuda()
    xs = [[x.cuda() for x in p] for p in _inputs()]
    ref = _reference(model, xs)
    host = _observer(model, hessian_storage="host")
    for p in range(PROMPTS):
        host.fold(_observe(model, host, p, xs))
    assert host.hessian_device == torch.device("cpu")
    ha, hb = ref.hessians(), host.hessians()
    assert all(torch.equal(ha[n], hb[n].to(ha[n].device)) for n in ha)
    with LinearInputObserver(model, hessian=True) as dev_obs, LinearInputObserver(
            model, hessian=True, hessian_storage="host") as host_obs, torch.no_grad():
        for p in xs:
            for x in p:
                model(x)
    hd, hh = dev_obs.hessians(), host_obs.hessians()
    assert all(hh[n].device.type == "cpu" and torch.equal(hd[n].cpu(), hh[n]) for n in hd)
