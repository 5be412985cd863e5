"""What the report and the run summary say: the per-GPU line, reference accuracies found by the model's weights
(not its folder name), sampling specs and verification in words, and a log error axis that holds every run."""

from __future__ import annotations

import shutil
from pathlib import Path

from ptq.eval.anchors import meaning_markdown, run_reference
from ptq.eval.compare import error_ticks
from ptq.eval.report import spec_text, verified_text
from ptq.eval.summary import per_gpu_errors, run_summary
from ptq.models.wan.loading import transformer_content_hash

TINY = Path(__file__).resolve().parents[1] / "ptq" / "assets" / "tiny_wan"


def _runtime(err: float, how: str, same_as: str | None = None) -> dict:
    return {"mean_final": {"rel_l2": err}, "layers": {"nvfp4": how}, "same_as": same_as}


RUNTIMES = {"blackwell": _runtime(0.3661, "native"), "hopper": _runtime(0.2947, "dequantized"),
            "ada": _runtime(0.2947, "dequantized", "hopper"), "ampere": _runtime(0.2947, "dequantized", "hopper"),
            "cpu": _runtime(0.2948, "dequantized")}


def test_per_gpu_line_groups_runtimes_that_compute_the_same() -> None:
    assert per_gpu_errors(RUNTIMES) == ("blackwell 0.3661 (native), hopper = ada = ampere 0.2947 (dequantized), "
                                        "cpu 0.2948 (dequantized)")


def test_a_copy_of_the_tiny_model_gets_its_reference_accuracies(tmp_path: Path) -> None:
    copy = tmp_path / "my_model"
    shutil.copytree(TINY / "transformer", copy / "transformer")
    sha = transformer_content_hash(copy)
    ref = run_reference({"source_model": "my_model", "source_sha256": sha})
    assert ref is not None and ref["final_rel_l2"]["int8_gptq"] > 0
    text = "\n".join(meaning_markdown({"source_sha256": sha}, "int8_gptq", 0.06))
    assert "| **int8_gptq** |" in text and "random weights" not in text
    # merged LoRAs make another model; a folder named tiny_wan with other weights is another model
    assert run_reference({"source_sha256": sha, "loras": [{"path": "x"}]}) is None
    assert run_reference({"source_model": "tiny_wan", "source_sha256": "0" * 64}) is None
    other = "\n".join(meaning_markdown({"source_sha256": "0" * 64}, "nvfp4", 0.3))
    assert "No reference accuracies are recorded for this model" in other


def test_summary_names_the_headline_and_prints_the_per_gpu_line() -> None:
    report = {"run": {"preset": "p", "recipe_name": "nvfp4", "recipe_title": "t", "eval_prompts": 2,
                      "dtype": "bfloat16"},
              "accuracy": {"mean_final": {"rel_l2": 0.35, "cosine": 0.94, "psnr": 27.8}}, "runtimes": RUNTIMES,
              "layers": [{"format": "nvfp4"}], "bits_per_weight": 4.5, "bits_per_quantized_weight": 4.5,
              "exports": [{"target": "comfyui", "skipped": None, "verified": True, "path": "m.safetensors",
                           "bytes": 3 * 2**20}]}
    lines = run_summary(report, Path("out")).splitlines()
    assert "computed in bf16" in lines[1]
    assert lines[2] == "  per GPU in stock ComfyUI (simulated, final rel. L2): " + per_gpu_errors(RUNTIMES)
    assert "(3.0 MiB, verified bit-exact)" in lines[-2]


def test_spec_and_verification_in_words() -> None:
    spec = {"height": 64, "width": 96, "num_frames": 9, "num_steps": 10, "guidance_scale": 3.0, "seed": 0,
            "guidance_scale_2": None}
    assert spec_text(spec) == "64x96, 9 frames, 10 steps, CFG 3.0, seed 0"
    assert spec_text({**spec, "guidance_scale_2": 4.0}).endswith("CFG 3.0 / 4.0 (second expert), seed 0")
    assert verified_text({"verified": True, "verify_detail": "50 quantized layers bit-exact"}) == \
        "yes: 50 quantized layers bit-exact"
    assert verified_text({"verified": False, "verify_detail": "x differs"}) == "**NO**: x differs"
    assert verified_text({"verified": None}).startswith("not run")


def test_error_axis_holds_every_run() -> None:
    for values in ([0.0468, 0.0594], [0.05, 0.1, 0.35, 0.9], [0.3]):
        (lo, hi), ticks = error_ticks(values)
        assert lo < min(values) and max(values) < hi
        assert len(ticks) >= 4 and all(lo <= t <= hi for t in ticks)
