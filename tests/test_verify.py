"""`ptq verify`: a correct export passes; a file with the four root causes of the known-bad WAN NVFP4 conversion
(no input_scale, `scale_weight` naming, float16 base tensors, swapped nibble order) has each one named."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ptq.algorithms.quantize import quantize_
from ptq.algorithms.recipe import QuantRecipe
from ptq.calibration.observers import LinearInputObserver
from ptq.models import wan
from ptq.targets import export_model
from ptq.tools.verify import verify_file

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def good_file(random_tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = wan.load_transformer(random_tiny_dir)
    torch.manual_seed(0)
    with LinearInputObserver(model) as obs, torch.no_grad():
        model(torch.randn(1, 48, 3, 16, 16).to(torch.bfloat16), torch.full((1, 192), 700.0),
              torch.randn(1, 32, model.config.text_dim).to(torch.bfloat16))
    quantize_(model, QuantRecipe(format="nvfp4"), obs.stats(), progress=False)
    out = tmp_path_factory.mktemp("verify")
    cfg = SimpleNamespace(targets=["comfyui"], unquantized_dtype="bfloat16", filename="good", verify=True)
    return Path(export_model(model, cfg, out, progress=False)[0].path)


@pytest.fixture(scope="module")
def broken_file(good_file: Path) -> Path:
    """The known-bad conversion: nibbles swapped, fp16 base tensors, no input_scale, `scale_weight` naming."""
    sd = load_file(str(good_file))
    with safe_open(str(good_file), "pt") as f:
        meta = f.metadata()
    bad: dict[str, torch.Tensor] = {}
    for k, t in sd.items():
        if k.endswith(".input_scale"):
            continue  # root cause 1: no activation scales
        if k.endswith(".weight") and t.dtype == torch.uint8:
            t = (t << 4) | (t >> 4)  # root cause 4: low-nibble-first packing
        elif t.dtype in (torch.bfloat16, torch.float32) and not k.endswith(("weight_scale_2",)):
            t = t.to(torch.float16)  # root cause 3: float16 base tensors
        if k == "blocks.0.self_attn.q.weight_scale":
            k = "blocks.0.self_attn.q.scale_weight"  # root cause 2: a scale name the loader does not read
        bad[k] = t
    path = good_file.with_name("broken.safetensors")
    save_file(bad, str(path), metadata=meta)
    return path


def test_good_export_verifies(good_file: Path, random_tiny_dir: Path) -> None:
    r = verify_file(good_file, str(random_tiny_dir))
    assert r.ok, [c.problems for c in r.layers if c.problems] + r.problems
    assert len(r.layers) == 50 and r.loads_into_diffusers
    for c in r.layers:
        assert c.packing == "high_first/tiled"
        assert c.weight_err_file == pytest.approx(c.weight_err_ptq, rel=1e-6)
        assert c.output_err_file <= 1.5 * c.output_err_ptq + 1e-3


def test_broken_file_names_each_root_cause(broken_file: Path, random_tiny_dir: Path) -> None:
    r = verify_file(broken_file, str(random_tiny_dir))
    assert not r.ok
    msgs = [p for c in r.layers for p in c.problems] + r.problems
    text = "\n".join(msgs)
    assert "nibble order is low_first but the loader reads high_first" in text
    assert "no input_scale" in text
    assert "`scale_weight`" in text
    assert "float16" in text
    swapped = [c for c in r.layers if c.packing == "low_first/tiled"]
    assert len(swapped) == 50


def test_verify_cli_exit_codes(good_file: Path, broken_file: Path, random_tiny_dir: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "ptq", "verify", *args], capture_output=True, text=True,
                              env=env, timeout=300)

    ok = run(str(good_file), "--model", str(random_tiny_dir))
    assert ok.returncode == 0 and "RESULT: OK" in ok.stdout
    bad = run(str(broken_file), "--model", str(random_tiny_dir), "--json")
    assert bad.returncode == 1 and json.loads(bad.stdout)["ok"] is False
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\xff" * 4)
    err = run(str(junk), "--model", str(random_tiny_dir))
    assert err.returncode == 2 and "junk.safetensors" in err.stderr and "Traceback" not in err.stderr
