"""`python -m ptq run` end to end on a small model, offline, on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ptq.pipeline.calib_run import CHECKPOINT_NAME

REPO = Path(__file__).resolve().parents[1]


def _run(args: list[str], cwd: Path, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "ptq", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


FAST = ["calib.num_prompts=2", "calib.num_steps=4", "eval.num_prompts=1", "eval.num_steps=4", "progress=false"]


@pytest.fixture(scope="module")
def run_dir(random_tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run")
    proc = _run(["run", "config=tiny_nvfp4", f"model.path={random_tiny_dir}", f"hydra.run.dir={out}",
                 f"eval.cache_dir={out / 'cache'}", *FAST], cwd=out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_run_writes_checkpoint_and_report(run_dir: Path) -> None:
    report = json.loads((run_dir / "report.json").read_text())
    assert (run_dir / "report.md").is_file() and (run_dir / "error_over_steps.png").is_file()
    assert (run_dir / "frames_prompt0.png").is_file()
    exports = {e["target"]: e for e in report["exports"]}
    assert exports["comfyui"]["verified"] is True and Path(exports["comfyui"]["path"]).is_file()
    assert exports["diffusers"]["verified"] is True
    assert report["num_quantized_layers"] == 50
    # calibration was checkpointed after every prompt; a finished run deletes the checkpoint (nothing to resume)
    assert not (run_dir / CHECKPOINT_NAME).exists() and not list(run_dir.glob("calibration_checkpoint*"))
    acc = report["accuracy"]["mean_final"]
    assert 0.0 < acc["rel_l2"] < 0.5 and acc["cosine"] > 0.85
    assert len(report["accuracy"]["prompts"][0]["steps_rel_l2"]) == 4
    layer = next(r for r in report["layers"] if r["name"] == "blocks.0.attn1.to_q")
    assert layer["format"] == "nvfp4" and layer["input_scale"] > 0 and 0 < layer["weight_rel_error"] < 0.2
    assert not list(run_dir.glob("**/*.tmp"))  # nothing half-written


def test_rerun_is_deterministic_and_reuses_baseline(run_dir: Path, random_tiny_dir: Path, tmp_path: Path) -> None:
    proc = _run(["run", "config=tiny_nvfp4", f"model.path={random_tiny_dir}", f"hydra.run.dir={tmp_path}",
                 f"eval.cache_dir={run_dir / 'cache'}", *FAST], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = json.loads((run_dir / "report.json").read_text())
    b = json.loads((tmp_path / "report.json").read_text())
    assert "baseline_eval" in a["timings_s"] and "baseline_eval" not in b["timings_s"]  # cached
    assert a["accuracy"] == b["accuracy"]
    assert [r["input_scale"] for r in a["layers"]] == [r["input_scale"] for r in b["layers"]]
    fa = Path(a["exports"][0]["path"]).read_bytes()
    fb = Path(b["exports"][0]["path"]).read_bytes()
    na, nb = (int.from_bytes(f[:8], "little") for f in (fa, fb))
    assert json.loads(fa[8 : 8 + na]) == json.loads(fb[8 : 8 + nb])  # safetensors orders metadata keys freely
    assert fa[8 + na :] == fb[8 + nb :]  # identical tensor bytes


def test_missing_model_path_is_a_clear_error(tmp_path: Path) -> None:
    proc = _run(["run", "model.path=/nonexistent/wan", f"hydra.run.dir={tmp_path}", *FAST], cwd=tmp_path)
    assert proc.returncode != 0
    assert "model.path='/nonexistent/wan' does not exist" in proc.stderr


def test_hub_id_not_in_cache_is_a_clear_error(tmp_path: Path) -> None:
    proc = _run(["run", "config=wan_nvfp4", f"hydra.run.dir={tmp_path}", *FAST], cwd=tmp_path,
                env_extra={"HF_HOME": str(tmp_path / "hf")})
    assert proc.returncode != 0
    assert "not found in the Hugging Face cache" in proc.stderr


def test_typo_fails_before_any_work(tmp_path: Path) -> None:
    proc = _run(["run", "calib.num_promts=3", f"hydra.run.dir={tmp_path}"], cwd=tmp_path)
    assert proc.returncode != 0 and "num_promts" in proc.stderr


def test_image_to_video_pins_the_first_frame(random_tiny_dir: Path, tmp_path: Path) -> None:
    """With a conditioning image, the first latent frame equals the VAE encoding of the image (TI2V)."""
    import torch
    from PIL import Image

    from ptq.config import SamplingConfig
    from ptq.models.tiny_wan.adapter import TinyWanAdapter
    from ptq.pipeline.job import make_prompt_set
    from ptq.pipeline.prompts import load_images
    from ptq.pipeline.sampling import sample_prompts

    img = tmp_path / "cond.png"
    Image.fromarray((torch.rand(64, 64, 3) * 255).to(torch.uint8).numpy()).save(img)
    adapter = TinyWanAdapter(random_tiny_dir)
    emb, neg = adapter.encode_prompts(["a red circle moving left"]), adapter.encode_prompts([""])
    adapter.load()
    cfg = SamplingConfig(num_prompts=1, num_steps=3, images=[str(img)])
    out = sample_prompts(adapter, make_prompt_set(adapter, ["a red circle moving left"], emb, neg, cfg), desc="i2v",
                         progress=False, keep_steps=True)

    cond = adapter.encode_condition(load_images([str(img)], 64, 64)[0])
    assert torch.equal(out[0]["final"][:, :, :1], cond)
    assert not torch.equal(out[0]["final"][:, :, 1:2], cond)
    assert len(out[0]["steps"]) == 3


def test_mixed_precision_run_reports_sensitivity_and_exports_mixed(random_tiny_dir: Path, tmp_path: Path) -> None:
    """`quant=nvfp4_mixed` through `ptq run`: the sensitivity analysis picks per-layer formats within the budget,
    the report has the sensitivity section, the ComfyUI file carries both formats and verifies."""
    proc = _run(["run", "config=tiny_nvfp4", "quant=nvfp4_mixed", "quant.mixed.sensitivity_inputs=2",
                 "quant.layers.include=['blocks.0.*','blocks.1.*']",
                 "quant/weight=mse", f"model.path={random_tiny_dir}", f"hydra.run.dir={tmp_path}",
                 f"eval.cache_dir={tmp_path / 'cache'}", "eval.decode=false", *FAST], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    plan = report["sensitivity"]["plan"]
    assert plan["bits_per_weight"] <= 5.0 and plan["scope"] == "quantized" and len(plan["formats"]) == 20
    formats = {r["name"]: r["format"] for r in report["layers"]}
    assert {formats[n] for n in plan["formats"]} == set(plan["counts"]) and len(plan["counts"]) >= 2
    q = [r for r in report["layers"] if r["format"] != "bf16" or r["name"] in plan["formats"]]
    bits = sum(r["bits_per_weight"] * r["in_features"] * r["out_features"] for r in q)
    assert bits / sum(r["in_features"] * r["out_features"] for r in q) == pytest.approx(plan["bits_per_weight"])
    md = (tmp_path / "report.md").read_text()
    assert "## Sensitivity" in md and "**Mixed precision**" in md
    assert all(e["verified"] for e in report["exports"] if not e["skipped"])


def test_sequential_gptq_run(random_tiny_dir: Path, tmp_path: Path) -> None:
    """`quant=nvfp4_gptq quant.gptq_blocks_per_pass=2`: Hessians collected in 3 passes, every block layer quantized,
    exports verified."""
    proc = _run(["run", "config=tiny_nvfp4", "quant=nvfp4_gptq", "quant/weight=gptq_max",
                 "quant.weight.blocks_per_pass=2", f"model.path={random_tiny_dir}", f"hydra.run.dir={tmp_path}",
                 f"eval.cache_dir={tmp_path / 'cache'}", "eval.decode=false", "eval.runtimes=[]", *FAST],
                cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["num_quantized_layers"] == 50 and report["run"]["recipe"]["weight"] == "gptq_max"
    assert all(e["verified"] for e in report["exports"] if not e["skipped"])
    assert report["accuracy"]["mean_final"]["rel_l2"] < 0.5


def test_same_seed_same_bytes_and_no_local_paths(run_dir: Path, random_tiny_dir: Path, tmp_path: Path) -> None:
    """A second same-seed run writes byte-identical files (sha256), and no file records an absolute local path:
    the source model is its folder name plus a content hash of its transformer weights."""
    import hashlib

    from safetensors import safe_open

    proc = _run(["run", "config=tiny_nvfp4", f"model.path={random_tiny_dir}", f"hydra.run.dir={tmp_path}",
                 f"eval.cache_dir={run_dir / 'cache'}", *FAST], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stem = f"{random_tiny_dir.name}_nvfp4"  # export.filename: {model}_{recipe}
    files = [f"{stem}_comfyui.safetensors", f"{stem}_diffusers/transformer/diffusion_pytorch_model_bfl.safetensors"]
    for name in files:
        a, b = (hashlib.sha256((d / name).read_bytes()).hexdigest() for d in (run_dir, tmp_path))
        assert a == b, name
        with safe_open(str(tmp_path / name), "pt") as f:
            meta = f.metadata()
        assert meta["ptq_source_model"] == random_tiny_dir.name and len(meta["ptq_source_sha256"]) == 64
        assert not any(str(Path.home()) in v or "/tmp" in v or str(random_tiny_dir) in v for v in meta.values())
    assert "ptq run finished" in proc.stdout and "verified bit-exact" in proc.stdout


def test_run_reports_each_comfyui_runtime(run_dir: Path) -> None:
    """tiny_nvfp4 evaluates the file as ComfyUI computes it per GPU (eval.runtimes): NVFP4 W4A4 natively on
    Blackwell only, W4A16 (dequantized, fp16) on Hopper / Ada / Ampere (one shared evaluation), float32 on the CPU."""
    report = json.loads((run_dir / "report.json").read_text())
    runs = report["runtimes"]
    assert list(runs) == ["blackwell", "hopper", "ada", "ampere", "cpu"]
    assert runs["blackwell"]["layers"] == {"nvfp4": "native"} and runs["hopper"]["layers"] == {"nvfp4": "dequantized"}
    assert runs["ada"]["same_as"] == runs["ampere"]["same_as"] == "hopper" and runs["hopper"]["same_as"] is None
    assert runs["ada"]["mean_final"] == runs["hopper"]["mean_final"]
    assert runs["hopper"]["mean_final"]["rel_l2"] != runs["blackwell"]["mean_final"]["rel_l2"]
    assert runs["cpu"]["compute_dtype"] == "float32" and runs["blackwell"]["compute_dtype"] == "float16"
    for r in runs.values():
        assert 0.0 < r["mean_final"]["rel_l2"] < 1.0 and 0.0 < r["unquantized"]["mean_final"]["rel_l2"] < 0.2
    fp16 = runs["blackwell"]["activation_range"]
    assert fp16["overflow"] is False and fp16["max_abs"] > 0 and runs["cpu"]["activation_range"] is None
    assert "## ComfyUI per target GPU" in (run_dir / "report.md").read_text()
    assert "runtime_eval" in report["timings_s"] and "runtime_reference" in report["timings_s"]
