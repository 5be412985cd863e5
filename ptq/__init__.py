"""ptq: calibration-driven post-training quantization (FP8, NVFP4) for diffusion transformers."""

__version__ = "0.1.0"
