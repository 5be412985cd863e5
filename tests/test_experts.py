"""Two experts (WAN 2.2 A14B layout) on the small two-expert model: each expert is calibrated only on the steps
it serves, the low-noise expert by default on the quantized high-noise expert's trajectory, `ptq run` writes one
ComfyUI file per expert (ComfyUI's WAN 2.2 names) and one diffusers folder with transformer / transformer_2, both
pass `ptq verify`, and the report has a section per expert."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ptq.algorithms.recipe import ActivationMethod, QuantRecipe
from ptq.models.tiny_wan.moe_adapter import TinyWanMoEAdapter
from ptq.pipeline import stages
from ptq.pipeline.experts import ExpertView, calibration_passes
from ptq.pipeline.job import make_prompt_set
from ptq.pipeline.settings import SamplingConfig

REPO = Path(__file__).resolve().parents[1]
STEPS = 6


@pytest.fixture(scope="module")
def adapter(random_tiny_moe_dir: Path) -> TinyWanMoEAdapter:
    a = TinyWanMoEAdapter(random_tiny_moe_dir)
    a._ps = make_prompt_set(a, ["a red circle moving left", "a blue square growing"],
                        a.encode_prompts(["a red circle moving left", "a blue square growing"]),
                        a.encode_prompts([""]), SamplingConfig(num_prompts=2, num_steps=STEPS))
    a.free_text_encoder()
    a.load(decoder=False)
    return a


def test_targets_and_routing(adapter: TinyWanMoEAdapter) -> None:
    targets = adapter.targets()
    assert list(targets) == ["high_noise", "low_noise"]
    assert targets["high_noise"].module is adapter.components.transformer
    assert targets["low_noise"].module is adapter.components.transformer_2
    assert targets["high_noise"].module.config.attention_head_dim == 128  # ComfyUI: num_heads = dim / 128
    spec = adapter._ps.specs[0]
    seen = {"high_noise": [], "low_noise": []}

    def rec(name):
        module = targets[name].module
        return lambda **kw: seen[name].append(float(kw["timestep"].flatten()[0])) or module(**kw)

    adapter.denoise(adapter._ps.embeds[:1], adapter._ps.negative, spec,
                    forward={"high_noise": rec("high_noise"), "low_noise": rec("low_noise")})
    ts = adapter.step_timesteps(spec)
    for name, target in targets.items():
        assert seen[name] == [t for t in ts if target.serves(t) for _ in range(2)]  # cond + uncond, its steps only
    assert seen["high_noise"] and seen["low_noise"] and all(t >= 875 for t in seen["high_noise"])


def _calibrate(adapter, part) -> stages.Calibration:
    return stages.calibrate(part, QuantRecipe(format="nvfp4"), adapter._ps, samples_per_call=0, seed=0,
                            progress=False, cuda_graphs=False)


def test_each_expert_is_calibrated_on_its_own_steps(adapter: TinyWanMoEAdapter) -> None:
    cal = _calibrate(adapter, adapter)  # one pass, both experts (the bf16 trajectory)
    ts = adapter.step_timesteps(adapter._ps.specs[0])
    for name, target in adapter.targets().items():
        step_amax = cal.stats[name]["blocks.0.attn1.to_q"].step_amax
        served = torch.tensor([target.serves(t) for t in ts])
        assert (step_amax[served] > 0).all() and (step_amax[~served] == 0).all()
        assert cal.stats[name]["blocks.0.attn1.to_q"].calls == 2 * 2 * int(served.sum())  # prompts x (cond, uncond)


def test_view_stops_after_its_last_step(adapter: TinyWanMoEAdapter) -> None:
    view = ExpertView(adapter, ["high_noise"])
    steps = []
    view.denoise(adapter._ps.embeds[:1], adapter._ps.negative, adapter._ps.specs[0],
                 on_step_end=lambda i, t, z: steps.append(i))
    ts = adapter.step_timesteps(adapter._ps.specs[0])
    assert steps == [i for i, t in enumerate(ts) if t >= 875]
    assert list(view.targets()) == ["high_noise"]


def test_low_noise_expert_calibrated_on_the_quantized_trajectory(random_tiny_moe_dir: Path) -> None:
    """Sequential passes: the high-noise expert's statistics equal the one-pass ones, the low-noise expert's
    differ (its inputs come from the quantized high-noise expert's latents)."""
    stats = {}
    for trajectory in ("bf16", "quantized"):
        a = TinyWanMoEAdapter(random_tiny_moe_dir)
        ps = make_prompt_set(a, ["a red circle moving left"], a.encode_prompts(["a red circle moving left"]),
                         a.encode_prompts([""]), SamplingConfig(num_prompts=1, num_steps=STEPS))
        a.load(decoder=False)
        passes = calibration_passes(a, trajectory)
        assert len(passes) == (1 if trajectory == "bf16" else 2)
        got = {}
        for part in passes:
            cal = stages.calibrate(part, QuantRecipe(format="nvfp4"), ps, samples_per_call=0, seed=0,
                                   progress=False, cuda_graphs=False)
            got.update(cal.stats)
            stages.quantize(part, {n: QuantRecipe(format="nvfp4") for n in part.targets()}, cal, progress=False)
        stats[trajectory] = got
    layer = "blocks.1.ffn.net.2"
    assert torch.equal(stats["bf16"]["high_noise"][layer].amax, stats["quantized"]["high_noise"][layer].amax)
    assert not torch.equal(stats["bf16"]["low_noise"][layer].channel_amax,
                           stats["quantized"]["low_noise"][layer].channel_amax)


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "ptq", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow
def test_run_exports_one_comfyui_file_per_expert_that_verify_passes(random_tiny_moe_dir: Path,
                                                                     tmp_path: Path) -> None:
    proc = _cli(["run", "config=tiny_moe_nvfp4", f"model.path={random_tiny_moe_dir}", f"hydra.run.dir={tmp_path}",
                 f"eval.cache_dir={tmp_path / 'cache'}", "calib.num_prompts=2", "calib.num_steps=5",
                 "eval.num_prompts=1", "eval.num_steps=5", "progress=false"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    files = sorted(Path(e["path"]).name for e in report["exports"] if e["target"] == "comfyui")
    assert files == ["tiny_wan_moe_high_noise_nvfp4_comfyui.safetensors",
                     "tiny_wan_moe_low_noise_nvfp4_comfyui.safetensors"]
    folder = tmp_path / "tiny_wan_moe_nvfp4_diffusers"
    assert (folder / "transformer" / "config.json").is_file() and (folder / "transformer_2" / "config.json").is_file()
    assert all(e["verified"] for e in report["exports"])
    assert list(report["experts"]) == ["high_noise", "low_noise"]
    assert report["run"]["experts"]["trajectory"] == "quantized"
    hi, lo = (report["experts"][n] for n in ("high_noise", "low_noise"))
    assert hi["quantized_layers"] == lo["quantized_layers"] == 20
    assert sorted(hi["eval_steps"] + lo["eval_steps"]) == list(range(5))
    assert 0 < hi["rel_l2_at_its_last_step"] < lo["rel_l2_at_its_last_step"] < 0.5
    assert "### high_noise" in (tmp_path / "report.md").read_text()
    assert len([r for r in report["layers"] if r["name"].startswith("low_noise/")]) == 26
    from safetensors import safe_open

    from ptq.tools.verify import verify_file

    for name, component in zip(files, ("transformer", "transformer_2")):
        rep = verify_file(tmp_path / name, str(random_tiny_moe_dir))  # `ptq verify FILE --model DIR`
        assert rep.ok and rep.loads_into_diffusers, rep.problems
        assert rep.load_detail.startswith("all 69") and len(rep.layers) == 20
        assert verify_file(tmp_path / name, str(random_tiny_moe_dir), component=component,
                           check_load=False).ok
    # the low-noise file against the high-noise expert: the file says which component it holds (issue 23: not
    # reported as a wrong model); the diffusers file of the second expert against a one-expert folder; the file
    # against the packaged tiny model (the default --model): the message names the model it was made from
    from ptq.models.base import ModelLoadError

    with pytest.raises(ModelLoadError, match="--component transformer: tiny_wan_moe_low_noise_nvfp4_comfyui"
                                             ".safetensors holds transformer_2"):
        verify_file(tmp_path / files[1], str(random_tiny_moe_dir), component="transformer", check_load=False)
    second = folder / "transformer_2" / "diffusion_pytorch_model_bfl.safetensors"
    with pytest.raises(ModelLoadError, match=r"has no transformer_2/config.json, the component "
                                             r"diffusion_pytorch_model_bfl.safetensors holds \(its ptq_component"):
        verify_file(second, None)
    wrong = verify_file(tmp_path / files[0], None, check_load=False)
    assert not wrong.ok and "wrong model" in wrong.problems[0]
    assert wrong.problems[0].endswith(f"(--model {random_tiny_moe_dir.name})")
    with safe_open(str(tmp_path / files[1]), "pt") as f:
        meta = f.metadata()
    assert (meta["ptq_expert"], meta["ptq_component"]) == ("low_noise", "transformer_2")
    from ptq.targets.diffusers.loader import load_diffusers_export

    low = load_diffusers_export(folder, component="transformer_2")
    assert low.config.num_attention_heads == 2


def test_offload_gives_the_same_latents_and_survives_quantization(random_tiny_moe_dir: Path) -> None:
    """model.offload (diffusers' group offloading; onload device = CPU here, CUDA on a GPU): same latents as
    without, and after the Linears are replaced by QuantLinears (re-applied offloading) the same as well."""
    from ptq.algorithms.quantize import quantize_

    runs = []
    for offload in (False, True):
        a = TinyWanMoEAdapter(random_tiny_moe_dir, offload=offload)
        emb, neg = a.encode_prompts(["a red circle moving left"]), a.encode_prompts([""])
        a.load(decoder=False)
        spec = a.sample_spec(num_steps=3)
        before = a.denoise(emb, neg, spec)
        for name, target in a.targets().items():
            recipe = QuantRecipe(format="nvfp4", activation=ActivationMethod(method="none"))  # weight-only
            quantize_(target.module, recipe, {}, rules=a.layer_rules, progress=False)
            a.after_quantize(name)
        runs.append((before, a.denoise(emb, neg, spec)))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert not torch.equal(runs[0][0], runs[0][1])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_offload_on_cuda_quantizes_on_the_gpu_and_keeps_the_weights_in_cpu_memory(random_tiny_moe_dir: Path,
                                                                                   tmp_path: Path) -> None:
    """model.offload on CUDA: weights stay in CPU memory, each layer is quantized on the GPU (the adapter's
    compute_device) and its QuantLinear goes back to the CPU with the same codes and scales, bit for bit, as
    quantizing the model held on the GPU (its GEMM operand rebuilt on the GPU, equal too); the offloaded
    quantized model gives the on-GPU model's latents, and its exports verify with the decoding on the GPU."""
    from types import SimpleNamespace

    from ptq.algorithms.quantize import quantize_, quantized_layers
    from ptq.targets import export_model

    runs = {}
    for offload in (False, True):
        a = TinyWanMoEAdapter(random_tiny_moe_dir, offload=offload, device="cuda")
        emb, neg = a.encode_prompts(["a red circle moving left"]), a.encode_prompts([""])
        a.load(decoder=False)
        spec = a.sample_spec(num_steps=3)
        assert a.compute_device == (torch.device("cuda") if offload else None)
        if offload:  # in page-locked chunks, not one pinned copy per tensor beside the original
            assert all(p.is_pinned() for t in a.targets().values() for p in t.module.parameters())
        for name, target in a.targets().items():
            recipe = QuantRecipe(format="nvfp4", activation=ActivationMethod(method="none"))
            quantize_(target.module, recipe, {}, rules=a.layer_rules, progress=False, device=a.compute_device)
            a.after_quantize(name)
        layers = {f"{t}.{n}": q for t, target in a.targets().items()
                  for n, q in quantized_layers(target.module).items()}
        assert layers and all(q.weight_q.device.type == ("cpu" if offload else "cuda") for q in layers.values())
        # offloaded: codes and scales only in page-locked host memory, the GEMM operand rebuilt on the GPU
        assert not offload or all(q.weight_q.is_pinned() and "weight_values" not in q._buffers
                                  for q in layers.values())
        runs[offload] = (layers, a.denoise(emb, neg, spec))
        if offload:  # the forwards put the codes and scales (buffers) back into CPU memory, like the parameters
            assert all(b.device.type == "cpu" for q in layers.values() for b in q.buffers())
            cfg = SimpleNamespace(targets=["comfyui"], verify=True, filename="high", unquantized_dtype="bfloat16")
            res = export_model(a.targets()["high_noise"].module, cfg, tmp_path, progress=False,
                               device=a.compute_device)
            assert [r.verified for r in res] == [True]
    for key, q in runs[True][0].items():
        ref = runs[False][0][key]
        for buf in ("weight_q", "weight_scale", "weight_scale_2"):
            got, want = (getattr(m, buf).cpu().reshape(-1).view(torch.uint8) for m in (q, ref))
            assert torch.equal(got, want), (key, buf)
        assert torch.equal(q.gemm_operand().cpu(), ref.weight_values.cpu()), key
    torch.testing.assert_close(runs[True][1], runs[False][1], rtol=0, atol=0)


def test_few_step_schedule_is_what_calibration_sees(random_tiny_moe_dir: Path) -> None:
    """4 steps, CFG 1, flow-matching Euler (a distilled LoRA's schedule): one forward per step (no uncond pass),
    each expert on its own steps of that schedule."""
    a = TinyWanMoEAdapter(random_tiny_moe_dir, scheduler="FlowMatchEulerDiscreteScheduler", flow_shift=5.0)
    ps = make_prompt_set(a, ["a red circle moving left"], a.encode_prompts(["a red circle moving left"]),
                     a.encode_prompts([""]), SamplingConfig(num_prompts=1, num_steps=4, guidance_scale=1.0,
                                                            guidance_scale_2=1.0))
    a.load(decoder=False)
    assert type(a.components.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert a.components.scheduler.config.shift == 5.0
    cal = stages.calibrate(a, QuantRecipe(format="nvfp4"), ps, samples_per_call=0, seed=0, progress=False,
                           cuda_graphs=False)
    ts = a.step_timesteps(ps.specs[0])
    assert len(ts) == 4
    for name, target in a.targets().items():
        served = sum(target.serves(t) for t in ts)
        assert served >= 1 and cal.stats[name]["blocks.0.attn1.to_q"].calls == served


def test_pack_into_chunks_moves_every_tensor_into_shared_chunks_keeping_identity_and_values() -> None:
    """The host-memory layout behind model.offload on CUDA (pinned chunks; plain CPU chunks here): each tensor
    keeps its object identity, dtype, shape and values and becomes a view into a chunk; tensors are packed in
    order at aligned offsets, a new chunk starts when one is full, a tensor larger than a chunk gets its own; the
    module computes the same output bit for bit."""
    from torch import nn

    from ptq.models.wan.offload import PIN_ALIGN, _unpinned_cpu_tensors, pack_into_chunks

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.LayerNorm(96), nn.Linear(96, 32, dtype=torch.bfloat16))
    model[1].register_buffer("mask", torch.rand(96) > 0.5)
    x = torch.randn(5, 64)
    ref = model[2](model[1](model[0](x)).bfloat16())
    linear, rest = _unpinned_cpu_tensors(model)
    assert [tuple(t.shape) for t in linear] == [(96, 64), (96,), (32, 96), (32,)]
    assert [tuple(t.shape) for t in rest] == [(96,), (96,), (96,)]
    before = {id(t): t.detach().clone() for t in linear + rest}
    chunks: list[torch.Tensor] = []

    def new_chunk(nbytes: int) -> torch.Tensor:
        chunks.append(torch.zeros(nbytes, dtype=torch.uint8))
        return chunks[-1]

    chunk_bytes = 16384  # the first weight (24,576 bytes) is larger: its own chunk
    made = pack_into_chunks(linear, new_chunk, chunk_bytes) + pack_into_chunks(rest, new_chunk, chunk_bytes)
    assert made == len(chunks) == 3 and [c.numel() for c in chunks] == [24576, chunk_bytes, chunk_bytes]
    for t in linear + rest:
        assert torch.equal(t, before[id(t)]) and t.dtype == before[id(t)].dtype
        base = next(c for c in chunks if c.untyped_storage().data_ptr() == t.untyped_storage().data_ptr())
        assert (t.data_ptr() - base.data_ptr()) % PIN_ALIGN == 0
    assert model[0].bias.untyped_storage().data_ptr() == model[2].weight.untyped_storage().data_ptr()
    assert model[1].weight.untyped_storage().data_ptr() != model[2].weight.untyped_storage().data_ptr()
    assert torch.equal(model[2](model[1](model[0](x)).bfloat16()), ref)
    assert _unpinned_cpu_tensors(nn.Linear(2, 2, device="meta")) == [[], []]


def test_streamed_offload_puts_module_buffers_back_into_their_cpu_copies() -> None:
    """diffusers 0.42's streamed group offloading puts parameters back after a block's forward but not the block's
    buffers (a QuantLinear's codes and scales); restore_buffers_on_offload wraps each streamed group (once) so its
    buffers return to their CPU copies too. A diffusers group with a CPU stream (``record_stream``: a CPU stream
    cannot synchronize) stands in for the CUDA one: the "onloaded" tensors are fresh copies, so a tensor still
    pointing at one after the offload was not put back."""
    from diffusers.hooks.group_offloading import (
        GroupOffloadingConfig,
        ModuleGroup,
        _apply_group_offloading_hook,
    )
    from torch import nn

    from ptq.models.wan.offload import restore_buffers_on_offload

    block = nn.Linear(4, 4)
    block.register_buffer("codes", torch.arange(4, dtype=torch.uint8))
    model = nn.Sequential(block)
    cpu = torch.device("cpu")
    group = ModuleGroup(modules=[block], offload_device=cpu, onload_device=cpu, offload_leader=block,
                        onload_leader=block, stream=torch.Stream(cpu), record_stream=True, low_cpu_mem_usage=True)
    config = GroupOffloadingConfig(onload_device=cpu, offload_device=cpu, offload_type="block_level",
                                   non_blocking=True, record_stream=True, low_cpu_mem_usage=True)
    _apply_group_offloading_hook(block, group, config=config)
    home = {name: t.data_ptr() for name, t in [("weight", block.weight), ("codes", block.codes)]}

    def forward_then_offload() -> dict[str, bool]:
        for t in (block.weight, block.codes):  # what an onload does: the tensors become device copies
            t.data = t.data.clone()
        group.offload_()
        return {name: getattr(block, name).data_ptr() == ptr for name, ptr in home.items()}

    assert forward_then_offload() == {"weight": True, "codes": False}  # the diffusers behaviour worked around
    block.codes.data = group.cpu_param_dict[block.codes]
    assert restore_buffers_on_offload(model) == 1 and restore_buffers_on_offload(model) == 0
    assert forward_then_offload() == {"weight": True, "codes": True}
    assert torch.equal(block.codes, torch.arange(4, dtype=torch.uint8))
