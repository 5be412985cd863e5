#!/usr/bin/env python
"""Train the tiny WAN model (ptq/models/tiny_wan/) on synthetic videos of moving coloured shapes.

Subcommands:

- ``prompts``: write ``ptq/data/tiny_calib.txt`` and ``tiny_eval.txt`` (deterministic, disjoint).
- ``train``: rectified-flow training of transformer + text encoder (jointly), bf16 autocast on CUDA, a
  wall-clock budget with a cosine LR over that budget, EMA weights saved with :func:`save_tiny_wan`.
  Runs on CPU too (``--device cpu --max-steps 3 --batch 4`` as a smoke test).
- ``report``: loss-curve PNG, trained-vs-untrained held-out loss, sample frame strips (CPU).
- ``train-moe``: the small two-expert model (``ptq/models/tiny_wan/moe.py``): both experts start from the trained
  tiny model (``--init``), the high-noise expert is trained only on noise levels ``s >= boundary`` (timesteps
  >= 875), the low-noise one only below, the text encoder stays the tiny model's (frozen, shared). ``--install``
  copies the result to ``ptq/assets/tiny_wan_moe``. One H200: ``--time-budget 240`` (~4 min). CPU smoke test:
  ``--device cpu --max-steps 3 --batch 4 --eval-every 2``.
- ``random-moe``: write a random-weight two-expert model (same format) for tests before the trained one exists.

Objective (as WAN): ``x_s = (1 - s) x0 + s noise``, the transformer predicts ``noise - x0`` at timestep
``1000 s`` given per token (``expand_timesteps``); ``s`` half uniform, half shifted logit-normal; the prompt is
dropped (empty string) 10% of the time for classifier-free guidance.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ptq.models.tiny_wan import (  # noqa: E402
    TINY_FLOW_SHIFT,
    TINY_MAX_SEQUENCE_LENGTH,
    TINY_VOCAB,
    TinyWanComponents,
    build_random_tiny_wan,
    encode_prompts,
    encode_text,
    expand_timestep,
    flow_matching_loss,
    generate_latents,
    heldout_batch,
    heldout_loss,
    load_tiny_wan,
    parse_prompt,
    read_prompts,
    render_scenes,
    sample_scene,
    save_tiny_wan,
    scene_to_prompt,
    video_to_uint8,
)

REPO = Path(__file__).resolve().parents[1]


def _repo_relative(path: str | Path) -> str:
    """``path`` relative to the repository when inside it (no local absolute paths in shipped files)."""
    p = Path(path).resolve()
    return str(p.relative_to(REPO)) if p.is_relative_to(REPO) else p.name
CALIB_PATH = REPO / "ptq" / "data" / "tiny_calib.txt"
EVAL_PATH = REPO / "ptq" / "data" / "tiny_eval.txt"


# ---------------------------------------------------------------------------------------------------------
# prompts
# ---------------------------------------------------------------------------------------------------------


def make_prompt_files(n_calib: int = 128, n_eval: int = 16) -> None:
    """Write the calibration and held-out evaluation prompt files (all with a named background)."""
    rng = random.Random(20260522)
    eval_prompts: list[str] = []
    while len(eval_prompts) < n_eval:
        scene = sample_scene(rng, two_object_prob=0.35, no_background_prob=0.0)
        p = scene_to_prompt(scene)
        if p not in eval_prompts:
            eval_prompts.append(p)
    calib: list[str] = []
    rng = random.Random(7)
    while len(calib) < n_calib:
        scene = sample_scene(rng, two_object_prob=0.3, no_background_prob=0.05)
        p = scene_to_prompt(scene)
        if p not in calib and p not in eval_prompts:
            calib.append(p)
    vocab = set(TINY_VOCAB)
    for p in calib + eval_prompts:
        assert set(p.split()) <= vocab, p
        assert parse_prompt(p) is not None
    CALIB_PATH.parent.mkdir(parents=True, exist_ok=True)
    CALIB_PATH.write_text("\n".join(calib) + "\n")
    EVAL_PATH.write_text("\n".join(eval_prompts) + "\n")
    print(f"wrote {len(calib)} -> {CALIB_PATH}, {len(eval_prompts)} -> {EVAL_PATH}")


# ---------------------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------------------


def sample_sigmas(n: int, gen: torch.Generator, shift: float = TINY_FLOW_SHIFT) -> torch.Tensor:
    """Half uniform, half logit-normal shifted like the sampler (``shift s / (1 + (shift - 1) s)``)."""
    uni = torch.rand(n, generator=gen)
    ln = torch.sigmoid(torch.randn(n, generator=gen))
    ln = shift * ln / (1 + (shift - 1) * ln)
    pick = torch.rand(n, generator=gen) < 0.5
    return torch.where(pick, uni, ln).clamp(1e-3, 0.999)


def _prepare_run(args: argparse.Namespace, *, cudnn_tf32: bool) -> tuple[Path, torch.device, bool]:
    """The output folder (created), the device and whether to train with bf16 autocast (CUDA, with TF32 matmuls;
    ``cudnn_tf32``: TF32 convolutions too)."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    use_amp = device.type == "cuda"
    if use_amp:
        torch.backends.cuda.matmul.allow_tf32 = True
        if cudnn_tf32:
            torch.backends.cudnn.allow_tf32 = True
    return out, device, use_amp


def train(args: argparse.Namespace) -> None:
    """The ``train`` subcommand."""
    out, device, use_amp = _prepare_run(args, cudnn_tf32=True)
    comps = build_random_tiny_wan(seed=args.seed)
    if args.init:  # continue from a saved model (e.g. a previous, shorter run); weights up-cast to float32
        init = load_tiny_wan(args.init, dtype=torch.float32)
        comps.transformer.load_state_dict(init.transformer.state_dict())
        comps.text_encoder.load_state_dict(init.text_encoder.state_dict())
        del init
    tr, te, tok = comps.transformer.to(device), comps.text_encoder.to(device), comps.tokenizer
    tr.train()
    te.train()
    params = [p for p in tr.parameters()] + [p for p in te.parameters()]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.99),
        fused=use_amp,
    )
    ema_tr, ema_te = copy.deepcopy(tr).eval(), copy.deepcopy(te).eval()
    ema_params = [p for p in ema_tr.parameters()] + [p for p in ema_te.parameters()]
    for p in ema_params:
        p.requires_grad_(False)

    eval_prompts = read_prompts(EVAL_PATH)
    held_out = set(eval_prompts)
    ev_prompts, ev_x0, ev_noise, ev_sig = heldout_batch(eval_prompts, seed=1234, repeats=2)
    ev_x0, ev_noise, ev_sig = ev_x0.to(device), ev_noise.to(device), ev_sig.to(device)

    def eval_loss(transformer, text_encoder) -> float:
        was = transformer.training, text_encoder.training
        transformer.eval()
        text_encoder.eval()
        with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=use_amp):
            emb = encode_text(text_encoder, tok, ev_prompts, TINY_MAX_SEQUENCE_LENGTH)
            loss = float(flow_matching_loss(transformer, ev_x0, emb, ev_sig, ev_noise))
        transformer.train(was[0])
        text_encoder.train(was[1])
        return loss

    log_f = open(out / "loss_log.jsonl", "w")

    def log(rec: dict) -> None:
        log_f.write(json.dumps(rec) + "\n")
        log_f.flush()

    untrained = eval_loss(tr, te)
    log({"step": 0, "time": 0.0, "eval_loss": untrained, "eval_loss_ema": untrained})
    print(f"initial held-out loss {untrained:.4f}", flush=True)

    rng = random.Random(args.seed + 17)
    gen = torch.Generator().manual_seed(args.seed + 23)
    # Noise is drawn on the training device: CPU randn of [128, 48, 9, 16, 16] costs ~0.1 s a step.
    dev_gen = torch.Generator(device=device).manual_seed(args.seed + 29)
    t0 = time.time()
    step, run_loss, run_n = 0, 0.0, 0
    mid_saved = False
    while True:
        elapsed = time.time() - t0
        frac = max(elapsed / args.time_budget, step / args.max_steps if args.max_steps else 0.0)
        if frac >= 1.0:
            break
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        scenes = []
        while len(scenes) < args.batch:
            sc = sample_scene(rng)
            if scene_to_prompt(sc) not in held_out:
                scenes.append(sc)
        prompts = [scene_to_prompt(sc) if rng.random() >= args.cfg_drop else "" for sc in scenes]
        with torch.no_grad():
            video = render_scenes(scenes, gen, device=device)
            x0 = comps.vae.encode(video)
            noise = torch.randn(x0.shape, generator=dev_gen, device=device)
            sig = sample_sigmas(args.batch, gen).to(device)
        with torch.autocast(device.type, torch.bfloat16, enabled=use_amp):
            emb = encode_text(te, tok, prompts, TINY_MAX_SEQUENCE_LENGTH)
            loss = flow_matching_loss(tr, x0, emb, sig, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        decay_e = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - decay_e)
        run_loss += float(loss.detach()) if step % 10 == 0 else 0.0
        run_n += step % 10 == 0
        if step % args.log_every == 0 or step == 1:
            rec = {
                "step": step,
                "time": round(time.time() - t0, 2),
                "lr": lr,
                "train_loss": run_loss / max(run_n, 1) if run_n else float(loss.detach()),
                "grad_norm": float(gnorm),
            }
            run_loss, run_n = 0.0, 0
            if step % args.eval_every == 0:
                rec["eval_loss"] = eval_loss(tr, te)
                rec["eval_loss_ema"] = eval_loss(ema_tr, ema_te)
            log(rec)
            print(json.dumps(rec), flush=True)
        if args.save_mid and not mid_saved and frac >= 0.5:
            mid_saved = True
            _save(ema_tr, ema_te, comps, out / "tiny_wan_mid")
    train_time = time.time() - t0
    final = {
        "step": step,
        "time": round(train_time, 2),
        "eval_loss": eval_loss(tr, te),
        "eval_loss_ema": eval_loss(ema_tr, ema_te),
    }
    log(final)
    log_f.close()
    path = _save(ema_tr, ema_te, comps, out / "tiny_wan")
    summary = {
        "steps": step,
        "train_seconds": round(train_time, 1),
        "batch": args.batch,
        "lr": args.lr,
        "ema": args.ema,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "init": _repo_relative(args.init) if args.init else args.init,
        "initial_eval_loss": untrained,
        "final_eval_loss": final["eval_loss"],
        "final_eval_loss_ema": final["eval_loss_ema"],
        "torch": torch.__version__,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary), flush=True)
    if args.tar:
        subprocess.run(["tar", "-cf", str(out / "tiny_wan.tar"), "-C", str(out), "tiny_wan"], check=True)
        if (out / "tiny_wan_mid").exists():
            subprocess.run(
                ["tar", "-cf", str(out / "tiny_wan_mid.tar"), "-C", str(out), "tiny_wan_mid"], check=True
            )
    print(f"saved {path}", flush=True)


# ---------------------------------------------------------------------------------------------------------
# train-moe: the two-expert model
# ---------------------------------------------------------------------------------------------------------


def expert_sigmas(n: int, gen: torch.Generator, high: bool, boundary: float) -> torch.Tensor:
    """Noise levels of one expert's batch: the high-noise expert uniform in [boundary, 0.999], the low-noise one
    the tiny model's mix (half uniform, half shifted logit-normal) scaled into (0, boundary)."""
    if high:
        return boundary + (0.999 - boundary) * torch.rand(n, generator=gen)
    return (sample_sigmas(n, gen) * boundary).clamp(1e-3, boundary - 1e-4)


def train_moe(args: argparse.Namespace) -> None:
    """The ``train-moe`` subcommand (see the module docstring)."""
    from ptq.models.tiny_wan.moe import TINY_MOE_BOUNDARY_RATIO, TINY_MOE_PATH, init_from_tiny, save_tiny_moe

    out, device, use_amp = _prepare_run(args, cudnn_tf32=False)
    tiny = load_tiny_wan(args.init, dtype=torch.float32)
    moe = init_from_tiny(tiny)
    boundary = TINY_MOE_BOUNDARY_RATIO
    te, tok = moe.base.text_encoder.to(device).eval().requires_grad_(False), moe.base.tokenizer
    experts = {"high_noise": moe.transformer.to(device).train(), "low_noise": moe.transformer_2.to(device).train()}
    opts = {n: torch.optim.AdamW(m.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.01, fused=use_amp)
            for n, m in experts.items()}
    emas = {n: copy.deepcopy(m).eval().requires_grad_(False) for n, m in experts.items()}
    eval_prompts = read_prompts(EVAL_PATH)
    held_out = set(eval_prompts)
    ev_prompts, ev_x0, ev_noise, _ = heldout_batch(eval_prompts, seed=1234, repeats=2)
    ev_gen = torch.Generator().manual_seed(4321)
    ev_sig = {n: expert_sigmas(len(ev_prompts), ev_gen, n == "high_noise", boundary) for n in experts}
    with torch.no_grad():
        ev_emb = encode_text(te, tok, ev_prompts, TINY_MAX_SEQUENCE_LENGTH).to(device)

    def eval_loss(model, name: str) -> float:
        was = model.training
        model.eval()
        with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=use_amp):
            loss = float(flow_matching_loss(model, ev_x0.to(device), ev_emb, ev_sig[name].to(device),
                                            ev_noise.to(device)))
        model.train(was)
        return loss

    log_f = open(out / "loss_log.jsonl", "w")
    start = {n: eval_loss(m, n) for n, m in experts.items()}
    log_f.write(json.dumps({"step": 0, "eval_loss": start}) + "\n")
    print(f"initial held-out loss per expert {start}", flush=True)
    rng, gen = random.Random(args.seed + 17), torch.Generator().manual_seed(args.seed + 23)
    dev_gen = torch.Generator(device=device).manual_seed(args.seed + 29)
    t0, step = time.time(), 0
    while True:
        frac = max((time.time() - t0) / args.time_budget, step / args.max_steps if args.max_steps else 0.0)
        if frac >= 1.0:
            break
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        scenes = []
        while len(scenes) < args.batch:
            sc = sample_scene(rng)
            if scene_to_prompt(sc) not in held_out:
                scenes.append(sc)
        prompts = [scene_to_prompt(sc) if rng.random() >= args.cfg_drop else "" for sc in scenes]
        with torch.no_grad():
            x0 = moe.base.vae.encode(render_scenes(scenes, gen, device=device))
            emb = encode_text(te, tok, prompts, TINY_MAX_SEQUENCE_LENGTH)
        rec = {"step": step + 1, "time": round(time.time() - t0, 2), "lr": lr}
        for name, model in experts.items():
            for g in opts[name].param_groups:
                g["lr"] = lr
            noise = torch.randn(x0.shape, generator=dev_gen, device=device)
            sig = expert_sigmas(args.batch, gen, name == "high_noise", boundary).to(device)
            with torch.autocast(device.type, torch.bfloat16, enabled=use_amp):
                loss = flow_matching_loss(model, x0, emb, sig, noise)
            opts[name].zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opts[name].step()
            decay = min(args.ema, (1 + step) / (10 + step))
            with torch.no_grad():
                torch._foreach_lerp_(list(emas[name].parameters()), list(model.parameters()), 1 - decay)
            rec[f"train_loss_{name}"] = float(loss.detach()) if step % args.log_every == 0 else None
        step += 1
        if step % args.eval_every == 0:
            rec["eval_loss"] = {n: eval_loss(m, n) for n, m in experts.items()}
            rec["eval_loss_ema"] = {n: eval_loss(emas[n], n) for n in experts}
            print(json.dumps(rec), flush=True)
        if step % args.log_every == 0 or "eval_loss" in rec:
            log_f.write(json.dumps(rec) + "\n")
            log_f.flush()
    final = {"steps": step, "train_seconds": round(time.time() - t0, 1), "batch": args.batch, "lr": args.lr,
             "boundary_ratio": boundary, "init": _repo_relative(args.init), "initial_eval_loss": start,
             "final_eval_loss_ema": {n: eval_loss(emas[n], n) for n in experts},
             "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__}
    log_f.write(json.dumps({"step": step, "final": final}) + "\n")
    log_f.close()
    moe.base.transformer, moe.transformer_2 = emas["high_noise"].cpu(), emas["low_noise"].cpu()
    moe.base.text_encoder = te.cpu()
    path = save_tiny_moe(moe, out / "tiny_wan_moe")
    (path / "training_summary.json").write_text(json.dumps(final, indent=2) + "\n")
    shutil.copy(out / "loss_log.jsonl", path / "training_log.jsonl")
    print(json.dumps(final), flush=True)
    if args.install:
        if TINY_MOE_PATH.exists():
            shutil.rmtree(TINY_MOE_PATH)
        shutil.copytree(path, TINY_MOE_PATH)
        print(f"installed {TINY_MOE_PATH}", flush=True)
    print(f"saved {path}", flush=True)


def random_moe(args: argparse.Namespace) -> None:
    """The ``random-moe`` subcommand."""
    from ptq.models.tiny_wan.moe import build_random_tiny_moe, save_tiny_moe

    print(f"saved {save_tiny_moe(build_random_tiny_moe(args.seed), args.out)}")


def _save(tr, te, comps: TinyWanComponents, path: Path) -> Path:
    """Save EMA weights with the other components (bf16 on disk)."""
    tmp = TinyWanComponents(tr, te, comps.tokenizer, comps.scheduler, comps.vae, comps.sample_defaults)
    return save_tiny_wan(tmp, path)


# ---------------------------------------------------------------------------------------------------------
# report (CPU)
# ---------------------------------------------------------------------------------------------------------

REPORT_PROMPTS = [
    "a red circle moving right on a blue background",
    "a yellow square moving down on a black background",
    "a big white triangle moving left on a green background",
    "a green ring growing on a striped purple background",
    "a small pink diamond moving up right on a checkered gray background",
]


@torch.no_grad()
def report(args: argparse.Namespace) -> None:
    """The ``report`` subcommand: PNGs under ``--img-dir`` and numbers as JSON on stdout."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img = Path(args.img_dir)
    img.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    if args.log:
        recs, offset = [], 0
        for k, log_path in enumerate(args.log):  # later logs continue earlier ones (--init runs)
            part = [json.loads(ln) for ln in Path(log_path).read_text().splitlines() if ln.strip()]
            if k:
                part = [r for r in part if r["step"] > 0]
            for r in part:
                r["step"] += offset
            recs += part
            offset = max(r["step"] for r in part)
        tr_recs = [r for r in recs if "train_loss" in r]
        ev_recs = [r for r in recs if "eval_loss" in r]
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(
            [r["step"] for r in tr_recs], [r["train_loss"] for r in tr_recs], lw=0.8, label="train (batch)"
        )
        ax.plot([r["step"] for r in ev_recs], [r["eval_loss"] for r in ev_recs], "o-", ms=3, label="held-out")
        ax.plot(
            [r["step"] for r in ev_recs],
            [r["eval_loss_ema"] for r in ev_recs],
            "s-",
            ms=3,
            label="held-out (EMA)",
        )
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("flow-matching MSE")
        ax.set_title("tiny WAN training loss")
        ax.grid(alpha=0.3, which="both")
        ax.legend()
        fig.tight_layout()
        fig.savefig(img / "tiny_wan_loss.png", dpi=110)
        plt.close(fig)

    eval_prompts = read_prompts(EVAL_PATH)
    trained = load_tiny_wan(args.model)
    untrained = build_random_tiny_wan(seed=0)
    untrained.transformer.to(torch.bfloat16)
    for name, comps in (("trained", trained), ("untrained", untrained)):
        results[f"heldout_loss_{name}"] = heldout_loss(comps, eval_prompts, seed=1234, repeats=2)
    results["heldout_loss_ratio"] = results["heldout_loss_trained"] / results["heldout_loss_untrained"]
    # Per-noise-level loss of the trained model.
    ps, x0, noise, sig = heldout_batch(eval_prompts, seed=99, repeats=1)
    emb = encode_prompts(trained, ps)
    per_sigma = {}
    for s in (0.1, 0.3, 0.5, 0.7, 0.9):
        loss = flow_matching_loss(trained.transformer, x0, emb, torch.full_like(sig, s), noise)
        per_sigma[str(s)] = round(float(loss.detach()), 4)
    results["trained_loss_by_sigma"] = per_sigma

    # One-step denoising of held-out videos: x0_pred = x_s - s * v_pred at s = 0.8.
    ps = eval_prompts[:4]
    _, x0, noise, _ = heldout_batch(ps, seed=7, repeats=1)
    s = 0.8
    xs = (1 - s) * x0 + s * noise
    rows, names = [x0, xs], ["ground truth", f"input x_s, s={s}"]
    for name, comps in (("trained", trained), ("untrained", untrained)):
        emb = encode_prompts(comps, ps)
        tr = comps.transformer
        ts = expand_timestep(torch.full((len(ps),), s * 1000), xs)
        v = tr(
            hidden_states=xs.to(tr.dtype),
            timestep=ts,
            encoder_hidden_states=emb.to(tr.dtype),
            return_dict=False,
        )
        rows.append(xs - s * v[0].float())
        names.append(f"{name}: x_s - s v_pred")
    frames = [video_to_uint8(trained.vae.decode(r)) for r in rows]  # each [B, F, H, W, 3]
    grid = torch.stack([frames[r][b] for b in range(len(ps)) for r in range(len(rows))])
    labels = [
        f"{names[r]} | {ps[b]}" if r == 0 else names[r] for b in range(len(ps)) for r in range(len(rows))
    ]
    _strip(
        plt,
        grid[:, ::2],
        labels,
        img / "tiny_wan_denoise.png",
        "one-step denoising of held-out videos (s=0.8)",
    )

    prompts = args.prompts or (REPORT_PROMPTS + eval_prompts[:3])
    cfg = args.guidance if args.guidance is not None else trained.sample_defaults["guidance_scale"]
    steps = trained.sample_defaults["num_inference_steps"]
    t0 = time.time()
    lat = generate_latents(trained, prompts, seed=args.seed, guidance_scale=cfg)
    results["sample_seconds"] = round(time.time() - t0, 1)
    video = video_to_uint8(trained.vae.decode(lat))
    ref = video_to_uint8(render_scenes([parse_prompt(p) for p in prompts], 0))
    title = (
        f"tiny WAN samples (UniPC {steps} steps, CFG {cfg}, seed {args.seed}); last 3 prompts are held out"
    )
    _strip(plt, video, prompts, img / "tiny_wan_samples.png", title)
    _strip(plt, ref, prompts, img / "tiny_wan_reference.png", "the renderer's videos for the same prompts")
    lat_u = generate_latents(untrained, prompts[:2], seed=args.seed, guidance_scale=cfg)
    _strip(
        plt,
        video_to_uint8(untrained.vae.decode(lat_u)),
        prompts[:2],
        img / "tiny_wan_untrained.png",
        "untrained",
    )
    print(json.dumps(results, indent=2))


def _strip(plt, video: torch.Tensor, prompts: list[str], path: Path, title: str) -> None:
    """Frame strip: one row per prompt, one column per frame. video: uint8 [B, F, H, W, 3]."""
    b, f = video.shape[:2]
    fig, axes = plt.subplots(b, f, figsize=(f * 0.9, b * 1.15), squeeze=False)
    for i in range(b):
        for j in range(f):
            axes[i][j].imshow(video[i, j].numpy(), interpolation="nearest")
            axes[i][j].set_xticks([])
            axes[i][j].set_yticks([])
        axes[i][0].set_title(prompts[i], fontsize=7, loc="left")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> None:
    """CLI entry point."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("prompts")
    t = sub.add_parser("train")
    t.add_argument("--out", default="outputs/tiny_wan_train")
    t.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    t.add_argument("--batch", type=int, default=64)
    t.add_argument("--lr", type=float, default=3e-4)
    t.add_argument("--warmup", type=int, default=200)
    t.add_argument("--ema", type=float, default=0.999)
    t.add_argument("--cfg-drop", type=float, default=0.1)
    t.add_argument("--time-budget", type=float, default=420.0, help="seconds of training (cosine LR over it)")
    t.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0 = time only)")
    t.add_argument("--log-every", type=int, default=50)
    t.add_argument("--eval-every", type=int, default=250)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--init", default=None, help="start from this saved model folder instead of random init")
    t.add_argument("--tar", action="store_true", help="also pack the model folder(s) into .tar files")
    t.add_argument("--save-mid", action="store_true", help="save an EMA snapshot at half the budget")
    m = sub.add_parser("train-moe")
    m.add_argument("--out", default="outputs/tiny_moe_train")
    m.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    m.add_argument("--init", default=str(REPO / "ptq" / "assets" / "tiny_wan"), help="the trained tiny model")
    m.add_argument("--batch", type=int, default=64)
    m.add_argument("--lr", type=float, default=2e-4)
    m.add_argument("--warmup", type=int, default=100)
    m.add_argument("--ema", type=float, default=0.999)
    m.add_argument("--cfg-drop", type=float, default=0.1)
    m.add_argument("--time-budget", type=float, default=240.0, help="seconds of training (cosine LR over it)")
    m.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0 = time only)")
    m.add_argument("--log-every", type=int, default=50)
    m.add_argument("--eval-every", type=int, default=250)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--install", action="store_true", help="copy the model to ptq/assets/tiny_wan_moe")
    rm = sub.add_parser("random-moe")
    rm.add_argument("--out", required=True)
    rm.add_argument("--seed", type=int, default=0)
    r = sub.add_parser("report")
    r.add_argument("--model", default=str(REPO / "ptq" / "assets" / "tiny_wan"))
    r.add_argument("--log", nargs="*", default=None, help="loss_log.jsonl files, in training order")
    r.add_argument("--img-dir", default=str(REPO / "docs" / "img"))
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--guidance", type=float, default=None, help="default: the model's guidance_scale")
    r.add_argument("--prompts", nargs="*", default=None)
    args = ap.parse_args()
    if args.cmd == "prompts":
        make_prompt_files()
    elif args.cmd == "train":
        train(args)
    elif args.cmd == "train-moe":
        train_moe(args)
    elif args.cmd == "random-moe":
        random_moe(args)
    else:
        report(args)


if __name__ == "__main__":
    main()
