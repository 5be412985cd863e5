"""Part ``tiny``: final-latent rel. L2 vs bf16 of Model Optimizer's and ptq's NVFP4 results on the tiny WAN model
(``ptq/assets/tiny_wan`` if present, else a random tiny model: reported as such); 16 calibration prompts x 8 steps
with CFG, ``n_eval`` eval prompts."""

from __future__ import annotations

import copy
import random
import statistics
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench_wan5b.common import REPO, RESULTS, RUN, block_targets, free, log, median, rel_l2, save, timed
from bench_wan5b.vs_modelopt import count_modelopt_quantized, modelopt_cfg
from ptq.algorithms.qlinear import kernel_options
from ptq.algorithms.quantize import quantize_
from ptq.algorithms.recipe import QuantRecipe
from ptq.calibration.observers import LinearInputObserver


def tiny_prompts(n: int, seed: int, file: Path) -> list[str]:
    """The first ``n`` prompts of ``file``, or ``n`` sampled scenes' prompts when it has fewer."""
    from ptq.models import tiny_wan

    if file.is_file():
        lines = [ln.strip() for ln in file.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
        if len(lines) >= n:
            return lines[:n]
    rng = random.Random(seed)
    return [tiny_wan.scene_to_prompt(tiny_wan.sample_scene(rng)) for _ in range(n)]


def tiny_sample(comps: Any, model: nn.Module, emb: torch.Tensor, neg: torch.Tensor, steps: int, seed: int,
                forced: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, list, list]:
    """WAN's denoising loop with ``model`` as the transformer of ``comps``; returns (final latents, per-step
    inputs, per-step CFG predictions). ``forced``: feed these per-step latents instead of the model's own
    (teacher forcing)."""
    from ptq.models.base import SampleSpec
    from ptq.models.wan.loading import WanComponents
    from ptq.models.wan.sampling import denoise

    d = comps.sample_defaults
    comps_m = WanComponents(model, comps.scheduler, comps.vae, None, None,
                            defaults={**d, "vae_scale_factor_spatial": comps.vae.config.spatial_factor,
                                      "vae_scale_factor_temporal": 1})
    spec = SampleSpec(d["height"], d["width"], d["num_frames"], steps, float(d["guidance_scale"]), seed)
    inputs: list[torch.Tensor] = []
    preds: list[torch.Tensor] = []

    def forward(**kw: Any) -> Any:  # records each step's input (cond forward, then uncond)
        inputs.append(kw["hidden_states"])
        return model(**kw)

    latents = denoise(comps_m, emb, neg, spec, forward=forward,
                      latents_at=None if forced is None else forced.__getitem__,
                      on_prediction=lambda i, p: preds.append(p))
    return latents, inputs[::2], preds


class TinyEval:
    """The bf16 model's trajectories on the eval prompts (seed 123), and a quantized model's errors against them."""

    def __init__(self, comps: Any, base: nn.Module, emb: torch.Tensor, neg: torch.Tensor, steps: int) -> None:
        self.comps, self.emb, self.neg, self.steps = comps, emb, neg, steps
        self.ref, self.ref_xs, self.ref_preds = tiny_sample(comps, base, emb, neg, steps, 123)

    def errors(self, model: nn.Module) -> dict[str, float]:
        """Final-latent error (one seed per prompt; chaotic for a strongly perturbed model) and teacher-forced
        per-step error (each step's CFG prediction on the bf16 trajectory's latents)."""
        lat, _, _ = tiny_sample(self.comps, model, self.emb, self.neg, self.steps, 123)
        _, _, preds = tiny_sample(self.comps, model, self.emb, self.neg, self.steps, 123, forced=self.ref_xs)
        per = [rel_l2(lat[i], self.ref[i]) for i in range(lat.shape[0])]
        return {"final_rel_l2": rel_l2(lat, self.ref), "final_rel_l2_mean_per_prompt": statistics.mean(per),
                "final_rel_l2_median_per_prompt": median(per),
                "teacher_forced_pred_rel_l2": statistics.mean(rel_l2(p, r) for p, r in zip(preds, self.ref_preds))}


def _tiny_model() -> tuple[Any, nn.Module, bool]:
    """(components, bf16 transformer on ``RUN.device``, whether it is the trained model)."""
    from ptq.models import tiny_wan
    from ptq.models.wan import cast_parameters

    trained = (tiny_wan.TINY_WAN_PATH / "model_index.json").is_file()
    if trained:
        comps = tiny_wan.load_tiny_wan(tiny_wan.TINY_WAN_PATH, dtype=torch.bfloat16, device="cpu")
    else:
        comps = tiny_wan.build_random_tiny_wan(seed=0)
        comps.transformer = cast_parameters(comps.transformer, torch.bfloat16)
    return comps, comps.transformer.to(RUN.device).eval().requires_grad_(False), trained


def part_tiny(calib_steps: int, n_eval: int = 16) -> None:
    """ptq vs Model Optimizer NVFP4 on the tiny WAN (:meth:`TinyEval.errors`)."""
    import modelopt.torch.quantization as mtq

    from ptq.models import tiny_wan

    comps, base, trained = _tiny_model()
    calib = tiny_prompts(16, 1, REPO / "ptq" / "data" / "tiny_calib.txt")
    evalp = tiny_prompts(n_eval, 2, REPO / "ptq" / "data" / "tiny_eval.txt")
    emb_c, emb_e = tiny_wan.encode_prompts(comps, calib), tiny_wan.encode_prompts(comps, evalp)
    neg_c = tiny_wan.encode_prompts(comps, [""] * len(calib))
    neg_e = tiny_wan.encode_prompts(comps, [""] * len(evalp))
    d = comps.sample_defaults
    steps = int(d["num_inference_steps"])
    ev = TinyEval(comps, base, emb_e, neg_e, steps)

    def calibrate(m: nn.Module) -> None:
        tiny_sample(comps, m, emb_c, neg_c, calib_steps, 7)

    res: dict[str, Any] = {"model": "ptq/assets/tiny_wan (trained)" if trained else "random tiny WAN (untrained)",
                           "calibration": f"16 prompts x {calib_steps} steps, CFG",
                           "eval": f"{len(evalp)} prompts x {steps} steps, CFG {d['guidance_scale']}"}
    res.update(_tiny_ptq(base, calibrate, calib_steps, ev))
    mm = copy.deepcopy(base)
    t_mo = timed(lambda: mtq.quantize(mm, modelopt_cfg(), forward_loop=calibrate))
    res["modelopt"] = {**ev.errors(mm), "calibrate_quantize_s": t_mo, "quantized_linears": count_modelopt_quantized(mm)}
    RESULTS["tiny"] = res
    save()
    log(f"tiny ({res['model']}): " + "; ".join(
        f"{k}: final {v['final_rel_l2']:.4f} (per-prompt median {v['final_rel_l2_median_per_prompt']:.4f}), "
        f"teacher-forced {v['teacher_forced_pred_rel_l2']:.4f}"
        for k, v in res.items() if isinstance(v, dict)))
    comps.transformer = base
    mm = None
    free()


def _tiny_ptq(base: nn.Module, calibrate: Any, calib_steps: int, ev: TinyEval) -> dict[str, Any]:
    """ptq's NVFP4 copy of ``base`` (observer over ``calibrate``, ``quantize_``): its errors on the fast path and on
    the reference path."""
    qm = copy.deepcopy(base)
    recipe = QuantRecipe(format="nvfp4")
    names = block_targets(qm, recipe)
    obs = LinearInputObserver(qm, names, num_steps=calib_steps, amax_backend="auto")

    def ptq_calib() -> None:
        with obs:
            calibrate(qm)
        quantize_(qm, recipe, obs.stats(), progress=False)

    t_ptq = timed(ptq_calib)
    with kernel_options(fast_path=True):
        out: dict[str, Any] = {"ptq": {**ev.errors(qm), "calibrate_quantize_s": t_ptq, "quantized_linears": len(names)}}
    with kernel_options(fast_path=False):
        out["ptq_torch_cuda_reference_path"] = ev.errors(qm)
    return out
