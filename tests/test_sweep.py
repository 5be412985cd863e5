"""Hydra multirun sweeps share one cached bf16 baseline; `ptq compare` ranks the runs."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_multirun_sweep_and_leaderboard(random_tiny_dir: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "ptq", "run", "-m", "config=tiny_nvfp4", f"model.path={random_tiny_dir}",
           "quant=fp8,nvfp4", "calib.num_prompts=1", "calib.num_steps=3", "eval.num_prompts=1", "eval.num_steps=3",
           "eval.decode=false", "progress=false", f"hydra.sweep.dir={sweep}", f"eval.cache_dir={tmp_path / 'cache'}"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = sorted(sweep.glob("*/report.json"))
    assert len(reports) == 2
    timings = [json.loads(r.read_text())["timings_s"] for r in reports]
    assert sum("baseline_eval" in t for t in timings) == 1  # computed once, reused by the other run
    assert len(list((tmp_path / "cache").glob("baseline_*.pt"))) == 1

    out = subprocess.run([sys.executable, "-m", "ptq", "compare", str(sweep)], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    rows = list(csv.DictReader((sweep / "leaderboard.csv").open()))
    assert {r["run"] for r in rows} == {"quant=fp8", "quant=nvfp4"}
    by = {r["format"]: r for r in rows}
    assert abs(float(by["nvfp4"]["bits_quantized"]) - 4.5) < 0.01 and abs(float(by["fp8"]["bits_quantized"]) - 8) < 0.01
    assert float(by["nvfp4"]["bits_all_linears"]) < float(by["fp8"]["bits_all_linears"])
    assert float(by["fp8"]["rel_l2"]) < float(by["nvfp4"]["rel_l2"])  # 8 bits beat 4 bits
    assert rows[0]["format"] == "fp8"  # sorted best first
    assert (sweep / "size_vs_error.png").is_file() and "| 1 | quant=fp8" in (sweep / "leaderboard.md").read_text()
