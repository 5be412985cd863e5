"""The observer's parts (``ptq.calibration``): one hook host with one collector per statistic compose to what
``LinearInputObserver`` collects, and the prompt-by-prompt ``Collector`` protocol lives in the calibration layer."""

from __future__ import annotations

import torch
from torch import nn

from ptq.calibration import collector
from ptq.calibration.amax import AmaxCollector
from ptq.calibration.hessians import HessianCollector
from ptq.calibration.input_hooks import InputHooks
from ptq.calibration.observers import LinearInputObserver
from ptq.calibration.recorder import ForwardInputRecorder
from ptq.calibration.samples import SampleCollector
from ptq.pipeline import calib_run


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))


def test_collector_protocol_is_in_the_calibration_layer() -> None:
    model = _model()
    assert calib_run.Collector is collector.Collector
    assert isinstance(LinearInputObserver(model), collector.Collector)
    assert isinstance(ForwardInputRecorder(model, 1), collector.Collector)


def test_host_with_chosen_collectors_equals_the_observer() -> None:
    model = _model()
    xs = [torch.randn(3, 5, 16) for _ in range(3)]
    hooks = InputHooks(model, None, num_steps=2)
    amax = AmaxCollector(hooks, "torch", 1, fuse_producers=False)
    samples = SampleCollector(hooks, per_call=12, block=16, seed=4)
    hessians = HessianCollector(hooks, ["2"], "device", share=True)
    hooks.use([amax, samples, hessians])
    obs = LinearInputObserver(model, num_steps=2, samples_per_call=12, sample_block=16, seed=4, hessian=["2"],
                              amax_backend="torch")
    assert not hooks.graph_safe and not obs.graph_safe
    for host in (hooks, obs):
        host.attach()
        with torch.no_grad():
            for step, x in enumerate(xs):
                host.step = step
                model(x)
        host.detach()
    got, want = hooks.stats(), obs.stats()
    assert got.keys() == want.keys() == {"0", "2"}
    for name in want:
        for field in ("amax", "channel_amax", "step_amax", "samples", "sample_steps"):
            assert torch.equal(getattr(got[name], field), getattr(want[name], field)), (name, field)
        assert (got[name].calls, got[name].tokens, got[name].rows) == (3, 45, None)
    assert got["0"].sample_block == 16 and got["2"].sample_block == 16
    assert torch.equal(hessians.means(hooks.tokens())["2"], obs.hessians()["2"])
