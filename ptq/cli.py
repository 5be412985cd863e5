"""Command line entry point: ``python -m ptq {run,inspect,verify,compare} ...``.

``run`` is a Hydra application (``python -m ptq run config=wan_nvfp4 quant.format=fp8``, multirun with ``-m``);
the other subcommands are plain argparse tools. Subcommand modules are imported lazily so ``inspect`` stays fast.
"""

from __future__ import annotations

import os
import sys

USAGE = """usage: python -m ptq <command> [args]

commands:
  run       calibrate, quantize, export and report (Hydra: config=NAME key=value ..., -m for sweeps)
  inspect   read a .safetensors header and diagnose its quantization convention (FILE [OTHER] [--json])
  verify    dequantize an exported checkpoint and check it against the simulated quantized model
  compare   leaderboard of a multirun sweep directory
"""


def main(argv: list[str] | None = None) -> int:
    """Dispatch to a subcommand; returns the process exit code (Ctrl-C: one line, 130)."""
    try:
        return _dispatch(list(sys.argv[1:] if argv is None else argv))
    except KeyboardInterrupt:
        print("\nptq: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (``ptq --help | head``): not an error of ptq's
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _dispatch(argv: list[str]) -> int:
    if not argv or argv[0] in {"-h", "--help", "help"}:
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "run":
        from ptq.run import hydra_main

        return hydra_main(rest)
    if command == "inspect":
        from ptq.tools.inspect_cli import main as inspect_main

        return inspect_main(rest)
    if command == "verify":
        from ptq.tools.verify_cli import main as verify_main

        return verify_main(rest)
    if command == "compare":
        from ptq.eval.compare import main as compare_main

        return compare_main(rest)
    print(f"ptq: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2
