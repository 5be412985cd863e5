"""CUDA-graph replay of the transformer forward (``ptq.calibration.cuda_graph``): replays give the eager outputs
bit for bit, observer statistics and call counts equal eager calibration, quantized models replay exactly, and
everything that cannot be graphed runs eagerly. GPU tests are marked ``gpu``."""

from __future__ import annotations

import pytest
import torch

from ptq.calibration import cuda_graph
from ptq.calibration.cuda_graph import CudaGraphForward
from ptq.calibration.observers import LinearInputObserver


def _tiny(device: str) -> torch.nn.Module:
    from ptq.models.tiny_wan import build_transformer

    return build_transformer(seed=0).to(device=device, dtype=torch.bfloat16)


def _inputs(n: int, device: str) -> list[dict]:
    from ptq.models.tiny_wan import TINY_TRANSFORMER_CONFIG, expand_timestep

    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        x = torch.randn(1, 48, 3, 16, 16, generator=g)
        emb = torch.randn(1, 32, TINY_TRANSFORMER_CONFIG["text_dim"], generator=g)
        out.append({"hidden_states": x.to(device, torch.bfloat16),
                    "timestep": expand_timestep(torch.tensor([100.0 + 200 * i]), x).to(device),
                    "encoder_hidden_states": emb.to(device, torch.bfloat16), "return_dict": False})
    return out


def test_cpu_inputs_run_eagerly() -> None:
    model = _tiny("cpu")
    runner = CudaGraphForward(model)
    with torch.no_grad():
        for inp in _inputs(2, "cpu"):
            assert torch.equal(runner(**inp)[0], model(**inp)[0])
    assert (runner.captured, runner.replays, runner.eager_calls) == (0, 0, 2)
    assert not cuda_graph.capturing()
    with pytest.raises(RuntimeError, match="outside a CudaGraphForward capture"):
        cuda_graph.on_replay(lambda: None)


def test_observer_step_outside_schedule_keeps_step_amax() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    obs = LinearInputObserver(model, num_steps=2, amax_backend="torch")
    with obs, torch.no_grad():
        for step, scale in ((0, 1.0), (7, 100.0), (1, 2.0), (-1, 50.0)):
            obs.step = step
            model(torch.full((3, 8), scale))
    st = obs.stats()["0"]
    assert st.step_amax.tolist() == [1.0, 2.0]  # steps 7 and -1 only reach the overall maxima
    assert float(st.amax) == 100.0 and st.calls == 4
    assert obs.graph_safe and not LinearInputObserver(model, samples_per_call=8).graph_safe


@pytest.mark.gpu
def test_replay_equals_eager_bitwise() -> None:
    model = _tiny("cuda")
    runner = CudaGraphForward(model)
    with torch.no_grad():
        for inp in _inputs(4, "cuda"):
            got = runner(**inp)[0]
            assert torch.equal(got, model(**inp)[0])
    assert (runner.captured, runner.replays, runner.eager_calls) == (1, 3, 1)
    with torch.no_grad():  # a new shape is a new graph
        inp = _inputs(1, "cuda")[0]
        inp["hidden_states"] = inp["hidden_states"][..., :8, :]
        inp["timestep"] = inp["timestep"][:, :3 * 4 * 8]
        runner(**inp)
        assert torch.equal(runner(**inp)[0], model(**inp)[0])
    assert runner.captured == 2


@pytest.mark.gpu
@pytest.mark.parametrize("backend,batch", [("triton", 4), ("triton", 1), ("torch", 4)])
def test_graphed_calibration_equals_eager(backend: str, batch: int) -> None:
    if backend == "triton":
        pytest.importorskip("triton")
    model = _tiny("cuda")
    inputs = _inputs(3, "cuda")
    stats = {}
    for graphed in (False, True):
        obs = LinearInputObserver(model, num_steps=3, amax_backend=backend, amax_batch=batch)
        runner = CudaGraphForward(model, enabled=graphed)
        with obs, torch.no_grad():
            for step in range(3):
                obs.step = step
                for inp in inputs[step:]:  # cond / uncond-like repeats: 3 + 2 + 1 forwards
                    runner(**inp)
        stats[graphed] = obs.stats()
        if graphed:
            assert runner.replays == 5
    assert set(stats[False]) == set(stats[True]) == set(obs.names)
    for name, a in stats[False].items():
        b = stats[True][name]
        assert torch.equal(a.channel_amax, b.channel_amax), name
        assert torch.equal(a.step_amax, b.step_amax), name
        assert (a.calls, a.tokens) == (b.calls, b.tokens) == (6, a.tokens), name
    assert all(float(s.step_amax.min()) > 0 for s in stats[True].values())


@pytest.mark.gpu
def test_uncapturable_observer_falls_back_to_eager() -> None:
    model = _tiny("cuda")
    obs = LinearInputObserver(model, samples_per_call=64)
    runner = CudaGraphForward(model)
    with obs, torch.no_grad():
        for inp in _inputs(3, "cuda"):
            runner(**inp)
    assert (runner.captured, runner.replays, runner.eager_calls) == (0, 0, 3)
    st = next(iter(obs.stats().values()))
    assert st.calls == 3 and st.samples.numel() == 3 * 64


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["nvfp4", "fp8"])
def test_quantized_model_replays_exactly(fmt: str) -> None:
    from ptq.algorithms.quantize import quantize_
    from ptq.algorithms.recipe import QuantRecipe

    model = _tiny("cuda")
    inputs = _inputs(3, "cuda")
    with LinearInputObserver(model) as obs, torch.no_grad():
        model(**inputs[0])
    quantize_(model, QuantRecipe(format=fmt), obs.stats(), progress=False)
    runner = CudaGraphForward(model)
    with torch.no_grad():
        for inp in inputs:
            assert torch.equal(runner(**inp)[0], model(**inp)[0])
    assert runner.replays == 2


@pytest.mark.gpu
def test_fused_observer_equals_torch_and_keeps_outputs() -> None:
    """Batched launches and the GELU tap (ffn.net.2's statistics folded into the GELU kernel) give the torch
    path's statistics exactly, and the observed forward's output is the unobserved one, bit for bit."""
    pytest.importorskip("triton")
    from ptq.formats import triton_quant

    assert triton_quant.gelu_tanh_exact("cuda"), "Triton GELU(tanh) differs from torch's on this GPU"
    model = _tiny("cuda")
    inputs = _inputs(3, "cuda")
    with torch.no_grad():
        ref_out = [model(**inp)[0] for inp in inputs]
    stats = {}
    for backend in ("torch", "triton"):
        obs = LinearInputObserver(model, num_steps=2, amax_backend=backend, fuse_producers=True)
        with obs, torch.no_grad():
            for i, inp in enumerate(inputs):
                obs.step = i % 2
                assert torch.equal(model(**inp)[0], ref_out[i])
            if backend == "triton":
                assert len(obs._patched) == len(model.blocks)  # every block's FeedForward GELU is tapped
        stats[backend] = obs.stats()
    assert not any("gelu" in vars(b.ffn.net[0]) for b in model.blocks)  # detach restored the modules
    for name, a in stats["torch"].items():
        b = stats["triton"][name]
        assert torch.equal(a.channel_amax, b.channel_amax) and torch.equal(a.step_amax, b.step_amax), name
        assert (a.calls, a.tokens) == (b.calls, b.tokens), name


def test_sibling_layers_share_one_reduction(monkeypatch: pytest.MonkeyPatch) -> None:
    """to_q/to_k/to_v read one tensor object: the observer reduces it once (not once per layer)."""

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.to_q, self.to_k, self.to_v = (torch.nn.Linear(16, 16) for _ in range(3))
            self.out = torch.nn.Linear(16, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(self.to_q(x) * self.to_k(x) + self.to_v(x))

    from ptq.calibration import amax

    calls = []
    put = amax.SameInput.put
    monkeypatch.setattr(amax.SameInput, "put", lambda self, *a: calls.append(1) or put(self, *a))  # one per reduction
    model = Block()
    x = torch.randn(5, 16)
    with LinearInputObserver(model, amax_backend="torch") as obs, torch.no_grad():
        model(x)
    assert len(calls) == 2  # x once for the three siblings, then out's input
    st = obs.stats()
    ref = x.abs().amax(0)
    assert all(torch.equal(st[n].channel_amax, ref) for n in ("to_q", "to_k", "to_v"))
