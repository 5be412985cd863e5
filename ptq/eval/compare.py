"""``python -m ptq compare DIR``: leaderboard of every run (``report.json``) under a (multirun) directory.

Writes ``leaderboard.md``, ``leaderboard.csv`` and ``size_vs_error.png`` into DIR (or ``--out``). Runs evaluated
per ComfyUI runtime (``eval.runtimes``) add one column per runtime: ``rel_l2@<runtime>``.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any

from ptq.eval.plotting import pyplot

COLUMNS = ["run", "format", "weight_only", "activation", "weight", "bits_quantized", "bits_all_linears", "size_mib",
           "rel_l2", "cosine", "psnr_db", "frame_psnr_db", "time_s"]


def _overrides(run_dir: Path) -> list[str]:
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    items = [ln.strip()[2:] for ln in path.read_text().splitlines() if ln.strip().startswith("- ")]
    return [i for i in items if not i.startswith(("hydra.", "eval.cache_dir", "progress"))]


def collect_runs(root: Path) -> list[dict[str, Any]]:
    """One row per ``report.json`` found under ``root`` (sorted by final-latent rel. L2, best first)."""
    rows = []
    for rep in sorted(root.rglob("report.json")):
        r = json.loads(rep.read_text())
        recipe = r["run"].get("recipe", {})
        acc = (r.get("accuracy") or {}).get("mean_final", {})
        comfy = next((e for e in r.get("exports", []) if e.get("target") == "comfyui" and e.get("bytes")), None)
        any_export = comfy or next((e for e in r.get("exports", []) if e.get("bytes")), None)
        rows.append({
            "run": "",
            "format": recipe.get("format"),
            "weight_only": recipe.get("weight_only"),
            "activation": recipe.get("activation"),
            "weight": recipe.get("weight"),
            "bits_quantized": round(r.get("bits_per_quantized_weight", 0.0), 3),
            "bits_all_linears": round(r.get("bits_per_weight", 0.0), 3),
            "size_mib": round(any_export["bytes"] / 2**20, 3) if any_export else None,
            "rel_l2": acc.get("rel_l2"),
            "cosine": acc.get("cosine"),
            "psnr_db": acc.get("psnr"),
            "frame_psnr_db": (r.get("frames_mean") or {}).get("psnr"),
            "time_s": round(sum(r.get("timings_s", {}).values()), 2),
            "path": str(rep.parent),
            **runtime_errors(r),
        })
    # label each run by the overrides that differ between runs (the swept values)
    overrides = [_overrides(Path(r["path"])) for r in rows]
    common = set.intersection(*(set(o) for o in overrides)) if overrides and len(rows) > 1 else set()
    for r, o in zip(rows, overrides):
        swept = [i for i in o if i not in common]
        r["run"] = " ".join(swept) or Path(r["path"]).name
    rows.sort(key=lambda x: (x["rel_l2"] is None, x["rel_l2"] if x["rel_l2"] is not None else 0.0))
    return rows


RUNTIME_PREFIX = "rel_l2@"


def runtime_errors(report: dict[str, Any]) -> dict[str, float | None]:
    """``rel_l2@<runtime>``: the final-latent rel. L2 of each ComfyUI runtime the run was evaluated on."""
    return {f"{RUNTIME_PREFIX}{name}": (r.get("mean_final") or {}).get("rel_l2")
            for name, r in (report.get("runtimes") or {}).items()}


def columns(rows: list[dict[str, Any]]) -> list[str]:
    """COLUMNS plus the runtime columns any row has (in order of first appearance)."""
    extra: list[str] = []
    for r in rows:
        extra += [k for k in r if k.startswith(RUNTIME_PREFIX) and k not in extra]
    return [*COLUMNS, *extra]


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.2f}"
    return str(v)


def write_leaderboard(rows: list[dict[str, Any]], out: Path) -> None:
    """leaderboard.md / .csv and the size-vs-error scatter plot."""
    out.mkdir(parents=True, exist_ok=True)
    cols = columns(rows)
    with (out / "leaderboard.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=[*cols, "path"], restval="")
        w.writeheader()
        w.writerows(rows)
    lines = ["# ptq leaderboard", "", "Sorted by final-latent relative L2 error vs the bf16 baseline (lower is "
             "better). `bits_quantized`: storage bits per weight over the quantized layers (codes + scales); "
             "`bits_all_linears`: over every Linear layer, kept layers at their dtype's width. `size_mib`: the "
             "ComfyUI export (MiB)." + (" `rel_l2@<runtime>`: the same error as stock ComfyUI "
             "computes it on that GPU (`eval.runtimes`)." if len(cols) > len(COLUMNS) else ""), "",
             "| rank | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 1)]
    for i, r in enumerate(rows, 1):
        lines.append(f"| {i} | " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
    lines += ["", "![size vs error](size_vs_error.png)", ""]
    (out / "leaderboard.md").write_text("\n".join(lines))
    plt = pyplot()

    pts = [r for r in rows if r["rel_l2"] is not None]
    fig, ax = plt.subplots(figsize=(8, 5))
    markers = {"nvfp4": "o", "fp8": "s"}
    for fmt in sorted({str(r["format"]) for r in pts}):
        sel = [r for r in pts if str(r["format"]) == fmt]
        ax.scatter([r["bits_all_linears"] for r in sel], [r["rel_l2"] for r in sel], s=45,
                   marker=markers.get(fmt, "^"), label=fmt, zorder=3)
    for r in pts:
        ax.annotate(r["run"][:48], (r["bits_all_linears"], r["rel_l2"]), fontsize=8, xytext=(4, 4),
                    textcoords="offset points")
    ax.set_xlabel("bits per weight over all Linear layers (quantized: codes + scales; kept: their dtype)", fontsize=10)
    ax.set_ylabel("final-latent rel. L2 vs bf16 (lower is better)", fontsize=10)
    _log_error_axis(ax, [r["rel_l2"] for r in pts])
    ax.tick_params(labelsize=9)
    ax.grid(alpha=0.3)
    if pts:
        ax.legend(title="format", fontsize=9)
    ax.set_title(f"size vs error ({len(pts)} runs)", fontsize=11)
    fig.tight_layout()
    fig.savefig(out / "size_vs_error.png", dpi=150)
    plt.close(fig)


def error_ticks(values: list[float], n: int = 6) -> tuple[tuple[float, float], list[float]]:
    """(y limits, tick values) of a log axis that holds every positive value of ``values`` with a margin: ``n``
    geometrically spaced ticks rounded to 2 significant digits, all inside the limits."""
    pos = [v for v in values if v > 0] or [1.0]
    lo, hi = min(pos) / 1.2, max(pos) * 1.2
    ticks = sorted({float(f"{lo * (hi / lo) ** (i / (n - 1)):.2g}") for i in range(n)})
    return (lo, hi), [t for t in ticks if lo <= t <= hi]


def _log_error_axis(ax: Any, values: list[float]) -> None:
    from matplotlib.ticker import FormatStrFormatter, NullLocator

    (lo, hi), ticks = error_ticks(values)
    ax.set_yscale("log")
    ax.set_ylim(lo, hi)
    ax.set_yticks(ticks)
    ax.yaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_major_formatter(FormatStrFormatter("%.3g"))


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="ptq compare", description="Leaderboard of the runs under a directory.")
    ap.add_argument("dir", help="a multirun directory (or any folder containing run folders with report.json)")
    ap.add_argument("--out", default=None, help="where to write leaderboard.{md,csv} (default: DIR)")
    args = ap.parse_args(argv)
    root = Path(args.dir)
    if not root.is_dir():
        print(f"ptq compare: {root} is not a directory", file=sys.stderr)
        return 2
    rows = collect_runs(root)
    if not rows:
        print(f"ptq compare: no report.json under {root}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else root
    write_leaderboard(rows, out)
    print((out / "leaderboard.md").read_text())
    return 0
