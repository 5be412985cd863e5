"""``python -m ptq inspect FILE [OTHER] [--json] [--max-layers N] [--target comfyui|modelopt] [--header-only]``.

Exit codes: 0 no errors, 1 at least one problem of severity "error" (in either file), 2 unreadable file or bad
arguments (the reason goes to stderr).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence

from ptq.targets.safetensors_header import HeaderError, read_header
from ptq.tools.inspect import TARGETS, DiffReport, InspectReport, diff_headers, inspect_header, to_dict

__all__ = ["build_parser", "format_diff", "format_report", "main"]


#: Affected layers named per problem in the text output (``--json`` lists all).
PROBLEM_LAYERS_SHOWN = 5


def _human(n: float) -> str:
    """Bytes in binary units (KiB, MiB, GiB: one unit system everywhere in ptq's file tools)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def _params(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"


def _table(rows: list[list[str]], indent: str = "  ") -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [indent + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def _shape(shape: Sequence[int]) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


def _format_by_pattern(report: InspectReport) -> list[list[str]]:
    """Rows ``pattern | format counts (exceptions by block)`` for the per-layer formats."""
    by_pat: dict[str, dict[str, list[str]]] = {}
    for li in report.layers:
        m = re.match(r"^blocks\.(\d+)\.(.*)$", li.canonical)
        pat, idx = (f"blocks.*.{m.group(2)}", m.group(1)) if m else (li.canonical, "")
        by_pat.setdefault(pat, {}).setdefault(li.format, []).append(idx)
    if len(by_pat) == len(report.layers):
        return []
    rows = [["pattern", "formats"]]
    for pat, fmts in by_pat.items():
        parts = []
        for fmt, idxs in sorted(fmts.items(), key=lambda kv: -len(kv[1])):
            where = ""
            if len(fmts) > 1 and len(idxs) <= 4 and all(idxs):
                where = f" (blocks {', '.join(idxs)})"
            parts.append(f"{fmt} x{len(idxs)}{where}")
        rows.append([pat, ", ".join(parts)])
    return rows


def format_report(report: InspectReport, max_layers: int = 20) -> str:
    """Human-readable text for one :class:`InspectReport`."""
    arch = report.architecture
    lines = [
        f"file         : {report.path}",
        f"size         : {_human(report.file_size)} ({report.n_tensors} tensors, header {_human(report.header_size)}, "
        f"metadata keys: {', '.join(report.metadata) or 'none'})",
        f"convention   : {report.convention.label}",
        f"evidence     : {'; '.join(report.convention.evidence) or '-'}",
        f"naming       : {report.naming.label}",
        f"architecture : {arch.description}",
    ]
    if arch.family == "wan":
        extra = [f"params {_params(arch.params)} (logical, NVFP4 unpacked)"]
        if arch.text_dim:
            extra.append(f"text_dim {arch.text_dim}")
        if arch.freq_dim:
            extra.append(f"freq_dim {arch.freq_dim}")
        if arch.out_dim:
            extra.append(f"out_dim {arch.out_dim}")
        if arch.patch_size:
            extra.append(f"patch {tuple(arch.patch_size)}")
        lines.append(f"               {', '.join(extra)}")
    if report.format_counts:
        fmts = ", ".join(f"{k} x{v}" for k, v in report.format_counts.items())
        lines.append(f"layer formats: {fmts}")
    lines += ["", "dtypes:"]
    rows = [["dtype", "tensors", "bytes"]] + [
        [d.dtype, str(d.tensors), _human(d.bytes)] for d in report.dtypes
    ]
    lines += _table(rows)

    summary = _format_by_pattern(report)
    if summary:
        lines += ["", "formats by layer pattern (block indices collapsed):"]
        lines += _table(summary)
    lines += ["", f"layers ({len(report.layers)} weight-bearing):"]
    if report.layers:
        shown = report.layers if max_layers < 0 else report.layers[:max_layers]
        rows = [["layer", "format", "weight", "scales"]]
        for li in shown:
            w = f"{li.weight.dtype} {_shape(li.weight.shape)}" if li.weight else "-"
            if li.weight and li.logical_shape and li.logical_shape != li.weight.shape:
                w += f" (logical {_shape(li.logical_shape)})"
            sc = "; ".join(f"{s.name} {s.dtype} {_shape(s.shape)}" for s in li.scales) or "-"
            fmt = li.format + ("" if li.metadata_format or not li.quantized else " (no metadata)")
            rows.append([li.name, fmt, w, sc])
        lines += _table(rows)
        if len(report.layers) > len(shown):
            lines.append(f"  ... {len(report.layers) - len(shown)} more (--max-layers N, -1 for all)")

    if report.comfyui_min_version:
        lines += ["", f"ComfyUI >= {report.comfyui_min_version} needed (first release with each feature used):"]
        lines += _table([["feature", "ComfyUI", "since"]] + [[f["what"], f["min_version"], f["date"]]
                                                              for f in report.comfyui_features])
    errors, warnings = report.errors, report.warnings
    lines += ["", f"problems: {len(errors)} error(s), {len(warnings)} warning(s)"]
    for p in report.problems:
        lines.append(f"  [{p.severity}] {p.code}")
        lines.append(f"      {p.message}")
        if p.count:
            first = (p.all_layers or p.layers)[:PROBLEM_LAYERS_SHOWN]
            more = f" ... (+{p.count - len(first)} more; --json lists all)" if p.count > len(first) else ""
            lines.append(f"      affects {p.count}: {', '.join(first)}{more}")
        lines.append(f"      fix: {p.fix}")
    if not report.problems:
        lines.append("  none")
    lines += ["", "notes:"]
    lines += [f"  - {n}" for n in report.notes]
    if report.values_checked:
        lines.append(
            f"  - value checks read {report.values_checked} tensors ({_human(report.value_bytes_read)})"
        )
    return "\n".join(lines)


def _list(
    title: str, items: Sequence[str], groups: dict[str, int], suffixes: dict[str, int], limit: int
) -> list[str]:
    if not items:
        return [f"{title}: 0"]
    out = [f"{title}: {len(items)}"]
    if len(suffixes) < len(groups):
        groups = suffixes
    if len(groups) < len(items):
        out += [f"    {n:5d} x {pat}" for pat, n in list(groups.items())[:limit]]
        if len(groups) > limit:
            out.append(f"    ... {len(groups) - limit} more patterns")
    else:
        out += [f"    {k}" for k in items[:limit]]
        if len(items) > limit:
            out.append(f"    ... {len(items) - limit} more")
    return out


def format_diff(diff: DiffReport, a: InspectReport, b: InspectReport, limit: int = 20) -> str:
    """Side-by-side summary of two reports followed by the structural diff."""
    rows = [
        ["", "A", "B"],
        ["file", a.path, b.path],
        ["size", _human(a.file_size), _human(b.file_size)],
        ["tensors", str(a.n_tensors), str(b.n_tensors)],
        ["convention", a.convention.name, b.convention.name],
        ["naming", a.naming.style, b.naming.style],
        ["prefix", repr(a.naming.prefix), repr(b.naming.prefix)],
        ["architecture", a.architecture.known_model or a.architecture.family, b.architecture.known_model or b.architecture.family],
        ["params", _params(a.architecture.params), _params(b.architecture.params)],
        ["formats", ", ".join(f"{k} x{v}" for k, v in a.format_counts.items()) or "-",
         ", ".join(f"{k} x{v}" for k, v in b.format_counts.items()) or "-"],
        ["errors/warnings", f"{len(a.errors)}/{len(a.warnings)}", f"{len(b.errors)}/{len(b.warnings)}"],
    ]  # fmt: skip
    lines = _table(rows, indent="")
    lines.append("")
    how = []
    if diff.a_prefix != diff.b_prefix:
        how.append(f"prefixes differ ({diff.a_prefix!r} vs {diff.b_prefix!r}); compared without them")
    if diff.normalized_names:
        how.append(
            f"naming differs ({diff.a_naming} vs {diff.b_naming}); keys normalised to original Wan names"
        )
    lines += [f"note: {h}" for h in how]
    lines.append(
        f"structural diff: {diff.common} keys in both" + ("; identical structure" if diff.identical else "")
    )
    lines += _list("  only in A", diff.only_in_a, diff.only_in_a_groups, diff.only_in_a_suffixes, limit)
    lines += _list("  only in B", diff.only_in_b, diff.only_in_b_groups, diff.only_in_b_suffixes, limit)
    trans = ", ".join(f"{t} x{n}" for t, n in diff.dtype_transitions.items())
    lines.append(f"  dtype differences: {len(diff.dtype_diffs)}" + (f" ({trans})" if trans else ""))
    for pat, n in list(diff.dtype_change_groups.items())[:limit]:
        lines.append(f"    {n:5d} x {pat}")
    lines.append(f"  shape differences: {len(diff.shape_diffs)}")
    for d in diff.shape_diffs[:limit]:
        lines.append(f"    {d.key}: {d.a_dtype} {_shape(d.a_shape)} -> {d.b_dtype} {_shape(d.b_shape)}")
    if len(diff.shape_diffs) > limit:
        lines.append(f"    ... {len(diff.shape_diffs) - limit} more")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``ptq inspect``."""
    p = argparse.ArgumentParser(
        prog="python -m ptq inspect",
        description="Read a .safetensors header (and small scale tensors) and diagnose its quantization "
        "convention; with OTHER, also diff the two files structurally.",
    )
    p.add_argument("file", help=".safetensors file")
    p.add_argument("other", nargs="?", help="second file to compare against")
    p.add_argument("--json", action="store_true", help="print the report(s) as JSON")
    p.add_argument("--max-layers", type=int, default=20, help="rows of the per-layer table (-1: all)")
    p.add_argument(
        "--target",
        choices=sorted(TARGETS),
        default="comfyui",
        help="loader to judge the file against (default comfyui; modelopt/diffusers: ModelOpt-style names, "
        "row-major block scales, no ComfyUI metadata)",
    )
    p.add_argument(
        "--header-only", action="store_true", help="read no tensor data (skips NaN/Inf/zero checks of scales)"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (0 ok, 1 errors found, 2 unreadable file / usage error)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code) if isinstance(e.code, int) else 2
    paths = [args.file] + ([args.other] if args.other else [])
    reports: list[InspectReport] = []
    headers = []
    try:
        for path in paths:
            header = read_header(path)
            headers.append(header)
            reports.append(inspect_header(header, read_values=not args.header_only, target=args.target))
    except HeaderError as e:
        print(f"ptq inspect: error: {e}", file=sys.stderr)
        return 2
    code = max(r.exit_code for r in reports)
    diff = diff_headers(headers[0], headers[1]) if len(headers) == 2 else None
    if args.json:
        if diff is None:
            payload: object = to_dict(reports[0])
        else:
            payload = {"a": to_dict(reports[0]), "b": to_dict(reports[1]), "diff": to_dict(diff)}
        print(json.dumps(payload, indent=2))
        return code
    if diff is None:
        print(format_report(reports[0], args.max_layers))
    else:
        for tag, r in zip("AB", reports):
            print(f"===== {tag} =====")
            print(format_report(r, args.max_layers))
            print()
        print("===== A vs B =====")
        print(format_diff(diff, reports[0], reports[1], limit=max(args.max_layers, 1)))
    return code
