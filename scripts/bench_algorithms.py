"""Calibration algorithms on the trained tiny WAN model, every recipe against max-calibrated round-to-nearest.

Same calibration prompts, same eval prompts and seeds for every recipe; the model is calibrated once (activation
statistics with block samples, input Hessians, recorded transformer inputs for the sensitivity analysis) and each
recipe then quantizes a freshly loaded model and runs the held-out evaluation with the stages ``ptq run`` uses
(``ptq.pipeline.stages``; ``python -m ptq run config=tiny_nvfp4 quant=NAME`` gives the same numbers one run at a
time). Prints a markdown table (recipe, bits per weight, final-latent rel. L2 / cosine / PSNR, ratio to max RTN,
time) and writes JSON.

    python scripts/bench_algorithms.py --recipes nvfp4 nvfp4_mse nvfp4_gptq nvfp4_mixed fp8 fp8_gptq
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from dataclasses import asdict

import torch

DEFAULT_RECIPES = ["nvfp4", "nvfp4_act_mse", "nvfp4_mse", "nvfp4_four_over_six", "nvfp4_gptq", "nvfp4_mixed",
                   "fp8", "fp8_mse", "fp8_gptq"]


#: Recipe prefix of a diagnostic: the recipe's activation quantization with the exact (unquantized) weights, i.e.
#: the part of the error that no weight method can remove.
ACT_ONLY = "act_only/"


def exact_weights(model: torch.nn.Module, original: torch.nn.Module) -> None:
    """Give every QuantLinear of ``model`` its original weight (float32 operand of the simulated GEMM, scaled so the
    epilogue's ``input_scale * weight_scale(_2)`` gives back W): activations stay quantized, weights become exact."""
    from ptq.algorithms.qlinear import QuantLinear

    mods = dict(original.named_modules())
    for n, m in model.named_modules():
        if isinstance(m, QuantLinear) and not m.weight_only:
            w = mods[n].weight.detach().float()
            alpha = m.weight_alpha().float()
            m.weight_values = w / (alpha.reshape(-1, 1) if alpha.dim() else alpha)


def teacher_forced_run(adapter, ps, reference: list[tuple[list, list]] | None = None) -> list[tuple[list, list]]:
    """Per prompt (step inputs, CFG predictions) of the adapter's current transformer. With ``reference`` (the
    bf16 model's run): each step gets the reference's input latents (teacher forcing), so a step's prediction
    error is the model's own, free of the trajectory's divergence."""
    from ptq.models.wan.sampling import denoise

    out = []
    for i in range(len(ps)):
        inputs: list = []
        preds: list = []
        model = adapter.targets()["transformer"].module

        def forward(_m=model, _inputs=inputs, **kw):
            _inputs.append(kw["hidden_states"].detach().float().cpu())
            return _m(**kw)

        forced = None if reference is None else reference[i][0]
        denoise(adapter.components, ps.embeds[i : i + 1], ps.negative, ps.specs[i], forward=forward,
                latents_at=None if forced is None else forced.__getitem__,
                on_prediction=lambda _s, p, _p=preds: _p.append(p.detach().float().cpu()))
        out.append((inputs[:: 2 if ps.specs[i].guidance_scale > 1.0 else 1], preds))
    return out


def teacher_forced_error(run: list[tuple[list, list]], reference: list[tuple[list, list]]) -> float:
    """Mean over prompts and steps of the rel. L2 of each step's CFG prediction vs the reference's."""
    from ptq.eval.metrics import rel_l2

    errs = [rel_l2(r, q) for (_, qp), (_, rp) in zip(run, reference) for q, r in zip(qp, rp)]
    return sum(errs) / len(errs)


def print_table(rows: list[dict]) -> None:
    """The markdown table of the results, ratios against max-calibrated RTN of the same format (activations
    quantized with the static max or, for formats that scale them at run time, dynamically)."""
    refs = [r for r in rows if r["activation"] in ("max", "dynamic") and r["weight"] == "max"
            and r.get("smoothing") == "none"
            and not r["plan"] and not r["weight_only"] and not r["recipe"].startswith(ACT_ONLY)]
    ref = {r["format"]: r for r in refs}
    print("\n| recipe | bits/weight (quantized layers) | bits/weight (all Linears) | final rel. L2 | vs max RTN "
          "| cosine | PSNR dB | teacher-forced | vs max RTN | quantize s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        base = ref.get(r["format"], {})
        ratio = r["rel_l2"] / base["rel_l2"] if base else float("nan")
        tf, tf_base = r.get("teacher_forced"), base.get("teacher_forced")
        tf_s = "-" if tf is None else f"{tf:.4f}"
        tf_r = "-" if tf is None or not tf_base else f"{tf / tf_base:.3f}x"
        print(f"| {r['recipe']} | {r['bits_quantized']:.3f} | {r['bits_all']:.3f} | {r['rel_l2']:.4f} | "
              f"{ratio:.3f}x | {r['cosine']:.5f} | {r['psnr']:.2f} | {tf_s} | {tf_r} | {r['seconds']:.1f} |")
    names = list(next((r["runtimes"] for r in rows if r.get("runtimes")), {}) or {})
    if names:  # final-latent rel. L2 as ComfyUI computes each file per GPU (ratio to the bf16 max RTN row)
        print("\n| recipe | " + " | ".join(names) + " |\n|---" * 1 + "|---" * len(names) + "|")
        for r in rows:
            base = ref.get(r["format"], {}).get("rel_l2")
            cells = [f"{v['rel_l2']:.4f}" + (f" ({v['rel_l2'] / base:.3f}x)" if base else "")
                     for v in (r.get("runtimes") or {}).values()]
            print(f"| {r['recipe']} | " + " | ".join(cells) + " |")


def compose_cfg(overrides: list[str]):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from ptq.config import register_configs
    from ptq.run import CONFIG_DIR

    register_configs()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return OmegaConf.to_object(compose("ptq", overrides=overrides))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", nargs="+", default=DEFAULT_RECIPES,
                    help="quant presets (ptq/configs/quant/*.yaml), optionally with overrides: "
                    "'nvfp4_gptq:quant.weight.damp=0.1'; prefix act_only/ for the activation-only diagnostic")
    ap.add_argument("--preset", default="tiny_nvfp4")
    ap.add_argument("--calib-prompts", type=int, default=8)
    ap.add_argument("--eval-prompts", type=int, default=4)
    ap.add_argument("--samples-per-call", type=int, default=4096)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", type=str, default=None, help="write the results here")
    ap.add_argument("--teacher-forced", action="store_true",
                    help="also measure the teacher-forced per-step prediction error (one more pass per recipe)")
    ap.add_argument("--runtimes", nargs="*", default=[],
                    help="also evaluate each recipe as ComfyUI computes it on these runtimes (ptq.eval.runtimes; "
                    "runtimes with identical numerics share one pass), e.g. blackwell hopper ampere")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides, e.g. calib.num_steps=20")
    args = ap.parse_args()

    from ptq.calibration.needs import CalibrationNeeds
    from ptq.eval.metrics import latent_metrics
    from ptq.eval.report import bits_per_weight
    from ptq.models.cpu_matmul import Float32LinearOnCPU
    from ptq.pipeline import stages
    from ptq.pipeline.job import make_prompt_set, open_adapter, pick_device
    from ptq.pipeline.prompts import load_prompts

    base = [f"config={args.preset}", f"calib.num_prompts={args.calib_prompts}",
            f"eval.num_prompts={args.eval_prompts}", f"model.device={args.device}", "progress=false",
            *args.overrides]
    cfg = compose_cfg(base)
    recipes = {}
    for spec in args.recipes:  # "preset" or "preset:quant.key=value,quant.key=value"
        name, _, extra = spec.partition(":")
        name = name.removeprefix(ACT_ONLY)
        recipes[spec] = compose_cfg([*base, f"quant={name}", *[o for o in extra.split(",") if o]]).quant
    device = pick_device(cfg.model.device)
    mode = Float32LinearOnCPU.for_this_cpu() if device.type == "cpu" and cfg.model.cpu_float32_linear \
        else contextlib.nullcontext()
    torch.manual_seed(0)
    with mode:
        adapter = open_adapter(cfg)
        calib_prompts, eval_prompts = load_prompts(cfg.calib, "calib"), load_prompts(cfg.eval, "eval")
        calib_emb, neg_c = stages.encode(adapter, calib_prompts, cfg.calib.negative_prompt)
        eval_emb, neg_e = stages.encode(adapter, eval_prompts, cfg.eval.negative_prompt)
        adapter.free_text_encoder()
        adapter.load(decoder=False)
        calib = make_prompt_set(adapter, calib_prompts, calib_emb, neg_c, cfg.calib)
        evals = make_prompt_set(adapter, eval_prompts, eval_emb, neg_e, cfg.eval)
        t0 = time.perf_counter()
        baseline, _ = stages.bf16_baseline(adapter, evals, None, progress=False, cuda_graphs=False)
        t_base = time.perf_counter() - t0
        needs = CalibrationNeeds(amax=True, samples=args.samples_per_call, hessians=True,
                                 inputs=max(r.mixed.sensitivity_inputs for r in recipes.values()))
        for r in recipes.values():
            needs = needs | r.needs()
        tf_ref = teacher_forced_run(adapter, evals) if args.teacher_forced else None
        union = next(iter(recipes.values()))
        t0 = time.perf_counter()
        cal = stages.calibrate(adapter, union, calib, samples_per_call=args.samples_per_call, seed=cfg.calib.seed,
                               progress=False, cuda_graphs=False, needs=needs)
        t_calib = time.perf_counter() - t0
        print(f"baseline {t_base:.1f} s, calibration {t_calib:.1f} s ({args.calib_prompts} prompts x "
              f"{calib.specs[0].num_steps} steps, CFG), device {device}", flush=True)

        rows = []
        for name, recipe in recipes.items():
            adapter.load(decoder=False)
            t0 = time.perf_counter()
            plan = None
            per_target = {k: recipe for k in adapter.targets()}
            if recipe.mixed.analyse:
                trimmed = stages.Calibration(cal.needs, cal.stats, cal.hessians,
                                             {k: v[: recipe.mixed.sensitivity_inputs] for k, v in cal.inputs.items()},
                                             cal.rerun)
                per_target, analyses = stages.analyse(adapter, recipe, trimmed, progress=False)
                plan = analyses["transformer"]["plan"]
            records = stages.quantize(adapter, per_target, cal, progress=False)["transformer"]
            model = adapter.targets()["transformer"].module
            if name.startswith(ACT_ONLY):
                from ptq.models.wan.loading import load_transformer

                exact_weights(model, load_transformer(adapter.root, dtype=adapter.dtype, device=adapter.device))
            t_quant = time.perf_counter() - t0
            out = stages.evaluate(adapter, evals, desc=name, progress=False, cuda_graphs=False)
            ms = [latent_metrics(b["final"], q["final"]) for b, q in zip(baseline, out)]
            mean = {k: sum(m[k] for m in ms) / len(ms) for k in ms[0]}
            if tf_ref is not None:
                mean["teacher_forced"] = teacher_forced_error(teacher_forced_run(adapter, evals, tf_ref), tf_ref)
            per_runtime = None
            if args.runtimes:
                from ptq.pipeline.runtime_eval import evaluate_runtimes, runtime_list

                res = evaluate_runtimes(adapter, evals, runtime_list(args.runtimes), baseline, {},
                                        model_dtype=cfg.model.dtype, progress=False)
                per_runtime = {k: {"rel_l2": v["mean_final"]["rel_l2"], "same_as": v["same_as"],
                                   "layers": v["layers"]} for k, v in res.items()}
            q = [r for r in records if r.format != "bf16"]
            bpw_q = (sum(r.bits_per_weight * r.in_features * r.out_features for r in q)
                     / max(sum(r.in_features * r.out_features for r in q), 1))
            summary = recipe.summary()
            rows.append({"recipe": name, **{k: summary[k] for k in ("format", "weight_only", "activation", "weight",
                                                                    "smoothing")},
                         "bits_all": bits_per_weight(records), "bits_quantized": bpw_q,
                         "counts": {f: sum(r.format == f for r in records)
                                    for f in sorted({r.format for r in records})},
                         **mean, "per_prompt_rel_l2": [m["rel_l2"] for m in ms], "seconds": t_quant,
                         "plan": plan and {k: plan[k] for k in ("bits_per_weight", "counts", "predicted_error")},
                         "runtimes": per_runtime,
                         "smoothing_layers": {r.name: [r.smoothing, r.smoothing_gain] for r in records
                                              if r.smoothing is not None}})
            tf = f" teacher-forced {mean['teacher_forced']:.4f}" if "teacher_forced" in mean else ""
            if per_runtime:
                tf += " | " + " ".join(f"{k} {v['rel_l2']:.4f}" for k, v in per_runtime.items())
            print(f"{name}: rel_l2 {mean['rel_l2']:.4f} cos {mean['cosine']:.5f} psnr {mean['psnr']:.2f}{tf} "
                  f"bits {bpw_q:.3f} ({t_quant:.1f} s)", flush=True)

    print_table(rows)
    if args.json:
        with open(args.json, "w") as fh:
            fh.write(json.dumps({"config": asdict(cfg), "calib_seconds": t_calib, "rows": rows}, indent=1,
                                default=str) + "\n")


if __name__ == "__main__":
    main()
