"""What a user sees from ``ptq inspect`` / ``ptq verify`` on ptq's own files: no false alarms on the default
export, complete JSON, one line for the wrong ``--model``, the transformer folder accepted as ``--model``."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ptq.algorithms.quantize import quantize_
from ptq.algorithms.recipe import QuantRecipe
from ptq.calibration.observers import LinearInputObserver
from ptq.models.wan import loading
from ptq.targets import export_model
from ptq.tools import inspect_cli, verify_cli
from ptq.tools.inspect import inspect_file
from ptq.tools.verify import verify_file


@pytest.fixture(scope="module")
def default_export(random_tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ptq's default recipe (first and last blocks quantized), with the source model recorded as ``ptq run`` does."""
    model = loading.load_transformer(random_tiny_dir)
    torch.manual_seed(0)
    with LinearInputObserver(model) as obs, torch.no_grad():
        model(torch.randn(1, 48, 3, 16, 16).to(torch.bfloat16), torch.full((1, 192), 700.0),
              torch.randn(1, 32, model.config.text_dim).to(torch.bfloat16))
    quantize_(model, QuantRecipe(format="nvfp4"), obs.stats(), progress=False)
    out = tmp_path_factory.mktemp("export")
    meta = {"ptq_source_model": random_tiny_dir.name,
            "ptq_source_sha256": loading.transformer_content_hash(random_tiny_dir)}
    cfg = SimpleNamespace(targets=["comfyui"], unquantized_dtype="bfloat16", filename="m", verify=True)
    return Path(export_model(model, cfg, out, progress=False, metadata=meta)[0].path)


def test_inspect_does_not_warn_about_the_default_export(default_export: Path) -> None:
    report = inspect_file(str(default_export))
    assert not report.errors and "sensitive_layer_quantized" not in {p.code for p in report.problems}


def test_inspect_json_lists_every_affected_layer(default_export: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(default_export), "pt") as f:
        meta, sd = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    bad = {k: v for k, v in sd.items() if not k.endswith(".input_scale")}  # 50 layers lose their input_scale
    path = tmp_path / "bad.safetensors"
    save_file(bad, str(path), metadata=meta)
    inspect_cli.main([str(path), "--json"])
    problems = json.loads(capsys.readouterr().out)["problems"]
    missing = [p for p in problems if len(p["layers"]) > 5]
    assert missing and all(len(p["layers"]) == p["count"] for p in problems)
    inspect_cli.main([str(path)])
    text = capsys.readouterr().out
    assert "--json lists all" in text and "MB" not in text.replace("MiB", "")


def test_verify_against_the_wrong_model_is_one_line(default_export: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = verify_file(default_export, None, check_load=False)  # the packaged tiny model, not the source
    assert not report.ok and not report.layers and len(report.problems) == 1
    assert report.problems[0].startswith("wrong model: the file was made from")
    assert verify_cli.main([str(default_export)]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == "RESULT: FAILED" and len(out) == 3


def test_verify_accepts_the_transformer_folder(default_export: Path, random_tiny_dir: Path) -> None:
    report = verify_file(default_export, str(random_tiny_dir / "transformer"), check_load=False)
    assert report.ok, report.problems + [p for c in report.layers for p in c.problems]
    assert len(report.layers) == 50


def test_verify_errors_name_the_flag(capsys: pytest.CaptureFixture[str], default_export: Path) -> None:
    assert verify_cli.main([str(default_export), "--model", "/nonexistent/wan"]) == 2
    assert "--model='/nonexistent/wan' does not exist" in capsys.readouterr().err
