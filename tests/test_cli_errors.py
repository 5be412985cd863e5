"""User mistakes on the ``ptq run`` command line: one line naming the key and what was expected, exit code 2, no
traceback, caught before a run directory is created or a model is loaded."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ptq import cli
from ptq.algorithms.recipe import ACTIVATION_METHODS
from ptq.run import CONFIG_DIR, hydra_main

#: every preset, as the error lists them (the WAN family's presets included)
PRESETS = ", ".join(sorted(p.stem for p in (CONFIG_DIR / "config").glob("*.yaml")))


@pytest.mark.parametrize("args,expected", [
    (["calib.num_prompts=0"], "calib.num_prompts=0: expected >= 1"),
    (["quant/activation=maxx"], "quant/activation=maxx: no such option; choose one of "
                                + ", ".join(sorted(ACTIVATION_METHODS))),
    (["quant.activation=maxx"], "quant.activation=maxx: choose the method with quant/activation=NAME"),
    (["eval.height=17"], "eval.height=17: expected a positive multiple of 8"),
    (["+quant.activaton=max"], "quant.activaton: no such key"),
    (["calib.num_promts=3"], "calib.num_promts: no such key (did you mean calib.num_prompts?)"),
    (["calib.num_prompts=many"], "calib.num_prompts=many: Value 'many'"),
    (["config=nope"], f"config=nope: no such option; choose one of {PRESETS}"),
    (["quant=nope"], "quant=nope: no such option; choose one of convrot_w4a4,"),
    (["model.path=/nonexistent/wan"], "model.path='/nonexistent/wan' does not exist"),
    (["quant/activation=mse", "calib.samples_per_call=-1"], "needs calib.samples_per_call > 0"),
    (["-m", "quant=fp8,nvfp4", "eval.num_steps=2,-1"], "eval.num_steps=-1: expected >= 1"),
])
def test_mistake_is_one_line_exit_2_and_nothing_created(args: list[str], expected: str, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    rc = hydra_main([*args, f"hydra.run.dir={out}", f"hydra.sweep.dir={out}"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert expected in err and err.startswith("ptq run: ")
    assert "\n" not in err and "Traceback" not in err
    assert not out.exists()


def test_incomplete_model_folder_names_every_missing_part(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "m" / "transformer").mkdir(parents=True)
    (tmp_path / "m" / "transformer" / "config.json").write_text("{}")
    rc = hydra_main([f"model.path={tmp_path / 'm'}", f"hydra.run.dir={tmp_path / 'out'}"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "missing scheduler/scheduler_config.json, text_encoder, tokenizer" in err


def test_empty_prompt_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "p.txt"
    empty.write_text("# nothing\n\n")
    rc = hydra_main([f"eval.prompts_file={empty}", f"hydra.run.dir={tmp_path / 'out'}"])
    assert rc == 2 and f"eval: no prompts in {empty}" in capsys.readouterr().err


def test_help_lists_presets_recipes_and_main_keys(capsys: pytest.CaptureFixture[str]) -> None:
    assert hydra_main(["--help"]) == 0
    out = capsys.readouterr().out
    for word in ("tiny_nvfp4", "nvfp4_gptq_4o6_act_mse", "quant/weight=", "model.path", "calib.num_prompts",
                 "export.targets"):
        assert word in out
    from ptq.formats import FORMATS

    assert f"quant.format={'|'.join(FORMATS)}" in out  # every registered format, not two
    from ptq.eval.runtimes import RUNTIMES

    assert f"eval.runtimes=[{','.join(RUNTIMES)}]" in out  # every runtime


def test_ctrl_c_is_one_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def interrupted(argv: list[str]) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_dispatch", interrupted)
    assert cli.main(["run"]) == 130
    assert capsys.readouterr().err.strip() == "ptq: interrupted"


@pytest.mark.parametrize("damage", ["deleted", "truncated"])
def test_broken_weights_are_one_line_naming_the_file(damage: str, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """Transformer weights deleted or cut short (an interrupted download): one line naming the file and what is
    wrong, exit 2, no run folder (the weights' headers are read before anything is created)."""
    import shutil

    from ptq.models.tiny_wan import TINY_WAN_PATH

    model = tmp_path / "model"
    shutil.copytree(TINY_WAN_PATH, model)
    weights = model / "transformer" / "diffusion_pytorch_model.safetensors"
    if damage == "deleted":
        weights.unlink()
    else:
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 3])
    out = tmp_path / "out"
    rc = hydra_main(["config=tiny_nvfp4", f"model.path={model}", f"hydra.run.dir={out}"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and not out.exists() and len(err.splitlines()) == 1, err
    want = ("transformer/ has no weight files" if damage == "deleted"
            else "transformer/diffusion_pytorch_model.safetensors is cut short")
    assert want in err and str(model) in err


def _fake_checkpoint(path: Path, fingerprint: str, done: int, total: int = 8) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"fingerprint": fingerprint, "prompts_done": done, "num_prompts": total}, path)


def test_resume_true_takes_the_checkpoint_with_most_prompts_done(tmp_path: Path) -> None:
    import os

    from ptq.pipeline.calib_run import CHECKPOINT_NAME, find_checkpoint

    runs = tmp_path / "outputs" / "tiny_nvfp4" / "nvfp4"
    _fake_checkpoint(runs / "a" / CHECKPOINT_NAME, "f", 2)
    _fake_checkpoint(runs / "b" / CHECKPOINT_NAME, "f", 1)  # newer, less progress
    _fake_checkpoint(runs / "c" / CHECKPOINT_NAME, "other", 7)  # other settings
    os.utime(runs / "a" / CHECKPOINT_NAME, (1, 1))
    assert find_checkpoint(runs / "new", "f", True) == runs / "a" / CHECKPOINT_NAME
    assert find_checkpoint(runs / "new", "f", None) is None


def test_ctrl_c_during_a_run_prints_the_command_that_continues_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    import ptq.run
    from ptq.pipeline.calib_run import CHECKPOINT_NAME

    out = tmp_path / "run"

    def interrupted(cfg: object, out_dir: Path, **_: object) -> None:
        _fake_checkpoint(out_dir / CHECKPOINT_NAME, "f", 3)
        raise KeyboardInterrupt

    monkeypatch.setattr(ptq.run, "run_pipeline", interrupted)
    with pytest.raises(SystemExit) as exc:
        hydra_main(["config=tiny_nvfp4", "eval.runtimes=[]", f"hydra.run.dir={out}"])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 130 and "Traceback" not in err
    assert "interrupted after 3 of 8 calibration prompts" in err
    assert f"continue with: python -m ptq run config=tiny_nvfp4 'eval.runtimes=[]' hydra.run.dir={out}" in err


def test_a_model_folder_without_its_vae_is_an_error_not_another_problem(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """A copy of the tiny model without vae/: its scale factors (4 pixels, 1 frame per latent) cannot be known, and
    the 5B's (16, 4) must not silently take their place: one line, exit 2, no run folder."""
    import shutil

    from ptq.models.tiny_wan import TINY_WAN_PATH

    model = tmp_path / "model"
    shutil.copytree(TINY_WAN_PATH, model)
    shutil.rmtree(model / "vae")
    out = tmp_path / "out"
    rc = hydra_main(["config=tiny_nvfp4", "eval.runtimes=[]", f"model.path={model}", f"hydra.run.dir={out}"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and not out.exists() and len(err.splitlines()) == 1, err
    assert "no vae/config.json" in err and "scale factors" in err


def test_a_misspelt_added_key_gets_a_did_you_mean(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = hydra_main(["config=tiny_nvfp4", "+quant.activaton=max", f"hydra.run.dir={tmp_path / 'out'}"])
    err = capsys.readouterr().err
    assert rc == 2 and "quant.activaton: no such key (did you mean quant.activation?)" in err


@pytest.mark.parametrize("command", [["--help"], ["run", "--help"]])
def test_help_into_a_closed_pipe_is_quiet(command: list[str]) -> None:
    """``ptq --help | head -1``: the reader closes the pipe early; no BrokenPipeError traceback."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "ptq", *command], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.read(10)
    proc.stdout.close()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and b"Traceback" not in err and b"BrokenPipe" not in err, err.decode()[-500:]
