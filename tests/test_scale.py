"""Scale features end to end (``python -m ptq run`` on the random tiny model, CPU): a 2-process ``torchrun`` run on
gloo and a single-process run killed in the middle of calibration and re-run into the same folder end with the same
calibration statistics, evaluation and export bytes.

The recipe collects everything calibration can (amax, activation samples for a percentile ``input_scale``, input
rows for the smoothing search, Hessians for GPTQ). Every process uses one CPU thread, so the comparison is about the split, not about thread counts."""

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

RECIPE = ["config=tiny_nvfp4", "quant=nvfp4_gptq_4o6_act_mse", "quant/weight=gptq_max", "quant/activation=percentile",
          "quant/smoothing=awq", "export.targets=[comfyui]",
          "calib.samples_per_call=512", "calib.num_prompts=3", "calib.num_steps=2", "eval.num_prompts=2",
          "eval.num_steps=2", "eval.decode=false", "progress=false",
          # a 3-point smoothing search on 512 rows and no runtime evaluations: what is collected stays the same
          "quant.smoothing.alphas=[0.0,0.5,1.0]", "quant.smoothing.rows=512", "eval.runtimes=[]",
          "export.filename=model"]
EXPORTS = ("model_comfyui.safetensors",)  # smoothed NVFP4: ComfyUI only (diffusers does not read pre_quant_scale)


def _run(args: list[str], out: Path, *, launcher: list[str] | None = None, env: dict[str, str] | None = None
         ) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
                **(env or {})}
    cmd = [*(launcher or [sys.executable]), "-m", "ptq", "run", *RECIPE, *args, f"hydra.run.dir={out}"]
    return subprocess.run(cmd, cwd=out.parent, env=full_env, capture_output=True, text=True, timeout=900)


def _digests(out: Path) -> dict[str, str]:
    return {name: hashlib.sha256((out / name).read_bytes()).hexdigest() for name in EXPORTS}


@pytest.fixture(scope="module")
def two_processes(random_tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uninterrupted 2-process run on gloo (its final calibration checkpoint kept for comparison)."""
    out = tmp_path_factory.mktemp("scale") / "two"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    proc = _run([f"model.path={random_tiny_dir}", f"eval.cache_dir={out.parent / 'cache2'}",
                 "calib.keep_checkpoint=true"], out, launcher=launcher)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
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


def test_two_processes_write_from_rank_0_only(two_processes: Path) -> None:
    report = json.loads((two_processes / "report.json").read_text())
    assert [e["verified"] for e in report["exports"]] == [True]
    assert len(report["accuracy"]["prompts"]) == 2  # both evaluation prompts, one from each rank
    hessians = _states(two_processes / CHECKPOINT_NAME)["observer:transformer"]["hessians"]
    assert len(hessians) == 35  # 50 Linears in 5 blocks: q/k/v of self-attention and k/v of cross-attention shared
    parent = two_processes.parent
    assert not list(parent.glob("**/*.tmp")) and not (parent / ".hydra").exists()  # rank 1 wrote nothing


def test_killed_single_process_run_resumes_to_the_two_process_result(two_processes: Path,
                                                                     random_tiny_dir: Path) -> None:
    """One process, killed after prompt 1 of 3 and re-run into the same folder, ends with the statistics, exports,
    evaluation and input scales of the uninterrupted 2-process run: the result depends neither on the number of
    processes nor on the interruption."""
    out = two_processes.parent / "killed"
    args = [f"model.path={random_tiny_dir}", f"eval.cache_dir={out.parent / 'cache1'}", "calib.keep_checkpoint=true"]
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
    assert _digests(out) == _digests(two_processes)
    one, two = (json.loads((d / "report.json").read_text()) for d in (out, two_processes))
    assert one["accuracy"] == two["accuracy"]  # evaluation and bf16 baseline shared between the ranks
    assert [r["input_scale"] for r in one["layers"]] == [r["input_scale"] for r in two["layers"]]
    _assert_equal_nested(_states(out / CHECKPOINT_NAME), _states(two_processes / CHECKPOINT_NAME))

