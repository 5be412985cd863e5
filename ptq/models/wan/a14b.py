"""WAN 2.2 A14B (T2V and I2V): two expert transformers, ``transformer`` (high-noise expert, timesteps >=
``boundary_ratio * 1000``) and ``transformer_2`` (low-noise expert, the rest), each a quantization target of its
own, named as ComfyUI's WAN 2.2 workflows name their files (``high_noise`` / ``low_noise``)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from ptq.models.base import ModelLoadError
from ptq.models.wan.adapter import WanAdapter


class WanA14BAdapter(WanAdapter):
    """A WAN 2.2 A14B diffusers folder (``transformer/``, ``transformer_2/``, ``boundary_ratio`` in
    ``model_index.json``); everything else as :class:`WanAdapter`."""

    name: ClassVar[str] = "wan22_a14b"
    components_by_target: ClassVar[dict[str, str]] = {"high_noise": "transformer", "low_noise": "transformer_2"}

    def __init__(self, path, **kwargs) -> None:  # noqa: ANN001 - as WanAdapter
        super().__init__(path, **kwargs)
        if self.boundary_ratio is None:
            raise ModelLoadError(f"{self.root}: model_index.json has no boundary_ratio (not a two-expert WAN 2.2 "
                                 "A14B folder; use model.adapter=wan for single-transformer models)")

    @classmethod
    def missing_parts(cls, root: Path) -> list[str]:
        return [*super().missing_parts(root), *([] if (root / "transformer_2" / "config.json").exists()
                                                else ["transformer_2/config.json"])]
