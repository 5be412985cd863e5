"""``python -m ptq verify FILE --model PATH [--json] [--tolerance X]``."""

from __future__ import annotations

import argparse
import json
import sys

from ptq.targets.safetensors_header import HeaderError
from ptq.tools.verify import VerifyReport, verify_file


def format_report(r: VerifyReport, max_layers: int = 20) -> str:
    if r.problems and not r.layers:  # nothing was compared: say why in one line
        return "\n".join([f"file: {r.path}", *(f"PROBLEM: {p}" for p in r.problems), "RESULT: FAILED"])
    lines = [
        f"file: {r.path}",
        f"convention: {r.convention} (loader reads nvfp4 as {r.expected_packing})",
        f"tolerance: layer output error <= {r.tolerance} x ptq's own simulation + 1e-3",
        "",
    ]
    lines.append(
        f"{'layer':44} {'fmt':6} {'packing':22} {'w err':>7} {'w ptq':>7} {'out err':>8} {'out ptq':>8}  ok"
    )

    def f(v: float | None) -> str:
        return "-" if v is None else f"{v:.4f}"

    for c in r.layers[:max_layers]:
        lines.append(
            f"{c.name:44} {c.format:6} {c.packing:22} {f(c.weight_err_file):>7} {f(c.weight_err_ptq):>7} "
            f"{f(c.output_err_file):>8} {f(c.output_err_ptq):>8}  {'yes' if c.ok else 'NO'}"
        )
    if len(r.layers) > max_layers:
        lines.append(
            f"... {len(r.layers) - max_layers} more layers ({sum(not c.ok for c in r.layers)} failing)"
        )
    lines.append("")
    lines.append(f"loads into {r.module_label}: {r.loads_into_diffusers} {r.load_detail}")
    problems = list(r.problems)
    by_msg: dict[str, list[str]] = {}
    for c in r.layers:
        for p in c.problems:
            key = p.split(" (weight error")[0]
            by_msg.setdefault(key, []).append(c.name)
    for msg, layers in by_msg.items():
        problems.append(f"{msg} — {len(layers)} layers (e.g. {', '.join(layers[:3])})")
    if problems:
        lines.append("PROBLEMS:")
        lines += [f"  - {p}" for p in problems]
    lines.append(f"RESULT: {'OK' if r.ok else 'FAILED'}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(
        prog="ptq verify",
        description="Decode a quantized checkpoint independently and "
        "check it against the bf16 model (layer outputs, packing, diffusers load).",
    )
    ap.add_argument("file", help="the quantized .safetensors file (ComfyUI or diffusers/ModelOpt layout)")
    ap.add_argument(
        "--model",
        default=None,
        help="the bf16 model the file was made from: its diffusers folder, its transformer folder, or a hub id in "
        "the HF cache; default: the packaged tiny WAN model (tiny_wan_moe: the packaged two-expert one)",
    )
    ap.add_argument(
        "--component",
        default=None,
        help="the folder's transformer the file holds (transformer / transformer_2); default: the file's "
        "ptq_component metadata, else transformer_2 for *low_noise* files of two-expert folders",
    )
    ap.add_argument("--tolerance", type=float, default=1.5,
                    help="a layer fails when its output error exceeds this many times ptq's own simulation (+1e-3)")
    ap.add_argument("--device", default="cpu", help="where the bf16 model and the layer checks run (cpu, cuda)")
    ap.add_argument("--json", action="store_true", help="print the whole report as JSON")
    ap.add_argument("--max-layers", type=int, default=20, help="rows of the per-layer table")
    args = ap.parse_args(argv)
    try:
        report = verify_file(args.file, args.model, tolerance=args.tolerance, device=args.device,
                             component=args.component)
    except (HeaderError, FileNotFoundError) as exc:
        print(f"ptq verify: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # model loading errors etc.: one clear line, not a traceback
        from ptq.models.base import ModelLoadError

        if isinstance(exc, ModelLoadError):
            print(f"ptq verify: {exc}", file=sys.stderr)
            return 2
        raise
    print(json.dumps(report.to_dict(), indent=2) if args.json else format_report(report, args.max_layers))
    return 0 if report.ok else 1
