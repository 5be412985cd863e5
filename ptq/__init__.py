"""ptq: calibration-driven post-training quantization (FP8 / NVFP4) for diffusion transformers."""

import os as _os

# OpenMP worker threads that spin-wait for a descheduled sibling make a shared or loaded CPU pathologically slow
# (docs/benchmarks.md, "CPU threads"): spin briefly, then sleep. Only defaults (an explicit setting wins), and only
# effective when ptq is imported before torch starts its OpenMP runtime (``python -m ptq ...`` always is).
_os.environ.setdefault("GOMP_SPINCOUNT", "1000")  # libgomp: PyTorch's CPU builds
_os.environ.setdefault("KMP_BLOCKTIME", "1")  # Intel OpenMP (milliseconds)

__version__ = "0.1.0"
