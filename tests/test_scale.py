"""Scale features end to end (``python -m ptq run`` on the random tiny model, CPU): a 2-process ``torchrun`` run on
gloo gives the same calibration statistics, evaluation and export bytes as a single process, and a run killed in
the middle of calibration and re-run into the same folder produces byte-identical exports.

The recipe collects everything calibration can (amax, activation samples for the MSE ``input_scale``, Hessians
for GPTQ). Every process uses one CPU thread, so the comparison is about the split, not about thread counts."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ptq.pipeline.calib_run import CHECKPOINT_NAME, EXIT_AFTER_PROMPT_ENV, TEST_EXIT_CODE

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

RECIPE = ["config=tiny_nvfp4", "quant=nvfp4_gptq_4o6_act_mse", "quant/weight=gptq_max", "calib.samples_per_call=512",
          "quant.activation.grid=12", "calib.num_prompts=3", "calib.num_steps=2", "eval.num_prompts=2", "eval.num_steps=2", "eval.decode=false",
          "progress=false"]
EXPORTS = ("model_comfyui.safetensors", "model_diffusers/transformer/diffusion_pytorch_model_bfl.safetensors")


def _run(args: list[str], out: Path, *, launcher: list[str] | None = None, env: dict[str, str] | None = None
         ) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
                **(env or {})}
    cmd = [*(launcher or [sys.executable]), "-m", "ptq", "run", *RECIPE, *args, f"hydra.run.dir={out}"]
    return subprocess.run(cmd, cwd=out.parent, env=full_env, capture_output=True, text=True, timeout=900)


def _digests(out: Path) -> dict[str, str]:
    return {name: hashlib.sha256((out / name).read_bytes()).hexdigest() for name in EXPORTS}


@pytest.fixture(scope="module")
def reference(random_tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uninterrupted single-process run (its final calibration checkpoint kept for comparison)."""
    out = tmp_path_factory.mktemp("scale") / "single"
    proc = _run([f"model.path={random_tiny_dir}", f"eval.cache_dir={out.parent / 'cache1'}",
                 "calib.keep_checkpoint=true"], out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _states(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["collectors"]


def _assert_equal_nested(a: object, b: object, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            _assert_equal_nested(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_equal_nested(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_two_processes_equal_one(reference: Path, random_tiny_dir: Path) -> None:
    out = reference.parent / "two"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    proc = _run([f"model.path={random_tiny_dir}", f"eval.cache_dir={out.parent / 'cache2'}",
                 "calib.keep_checkpoint=true"], out, launcher=launcher)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert _digests(out) == _digests(reference)
    one, two = (json.loads((d / "report.json").read_text()) for d in (reference, out))
    assert one["accuracy"] == two["accuracy"]  # evaluation and bf16 baseline shared between the ranks
    assert [r["input_scale"] for r in one["layers"]] == [r["input_scale"] for r in two["layers"]]
    states = _states(out / CHECKPOINT_NAME)  # the folded statistics: amax, samples, counts, Hessians
    hessians = states["observer:transformer"]["hessians"]
    assert len(hessians) == 35  # 50 Linears in 5 blocks: q/k/v of self-attention and k/v of cross-attention shared
    _assert_equal_nested(_states(reference / CHECKPOINT_NAME), states)
    assert not list(out.parent.glob("*.tmp")) and not (out.parent / ".hydra").exists()  # rank 1 wrote nothing


def test_killed_run_resumes_to_identical_exports(reference: Path, random_tiny_dir: Path) -> None:
    out = reference.parent / "killed"
    args = [f"model.path={random_tiny_dir}", "eval.enabled=false"]
    proc = _run(args, out, env={EXIT_AFTER_PROMPT_ENV: "1"})
    assert proc.returncode == TEST_EXIT_CODE, proc.stderr[-3000:]
    ckpt = out / CHECKPOINT_NAME
    assert ckpt.is_file() and not any(out.glob(".*.tmp"))
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["prompts_done"] == 2
    assert not (out / EXPORTS[0]).exists()
    proc = _run(args, out)  # re-run into the same run folder: continues after prompt 1
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert "resuming calibration" in log and "2 of 3 prompts done" in log
    assert _digests(out) == _digests(reference)
    assert not ckpt.exists()  # a finished run leaves nothing to resume
