"""``build_random_transformer`` / ``cast_parameters`` keep diffusers' fp32 modules in float32, as
``from_pretrained(torch_dtype=...)`` does."""

from __future__ import annotations

import torch

from ptq.models.tiny_wan import TINY_TRANSFORMER_CONFIG
from ptq.models.wan import build_random_transformer, cast_parameters, fp32_module_names


def test_random_transformer_keeps_the_fp32_modules() -> None:
    model = build_random_transformer(TINY_TRANSFORMER_CONFIG, dtype=torch.bfloat16, device="cpu")
    keep = fp32_module_names(model)
    assert {"time_embedder", "scale_shift_table", "norm2"} <= keep
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    kept = {n for n in dtypes if set(n.split(".")) & keep}
    assert kept and all(dtypes[n] == torch.float32 for n in kept)
    assert all(dt == torch.bfloat16 for n, dt in dtypes.items() if n not in kept)
    assert not any(p.requires_grad for p in model.parameters()) and not model.training


def test_cast_parameters_back_and_forth() -> None:
    model = build_random_transformer(TINY_TRANSFORMER_CONFIG, dtype=torch.float32, device="cpu")
    assert all(p.dtype == torch.float32 for p in model.parameters())
    before = {n: p.dtype for n, p in cast_parameters(model, torch.float16).named_parameters()}
    again = build_random_transformer(TINY_TRANSFORMER_CONFIG, dtype=torch.float16, device="cpu")
    assert before == {n: p.dtype for n, p in again.named_parameters()}
