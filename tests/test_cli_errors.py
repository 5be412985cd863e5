"""User mistakes on the ``ptq run`` command line: one line naming the key and what was expected, exit code 2, no
traceback, caught before a run directory is created or a model is loaded."""

from __future__ import annotations

from pathlib import Path

import pytest

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
    (["quant=nope"], "quant=nope: no such option; choose one of fp8,"),
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


def test_ctrl_c_is_one_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def interrupted(argv: list[str]) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_dispatch", interrupted)
    assert cli.main(["run"]) == 130
    assert capsys.readouterr().err.strip() == "ptq: interrupted"
