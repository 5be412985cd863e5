"""matplotlib for the report's plots, headless (Agg) and quiet (its font-cache messages stay out of ptq's log)."""

from __future__ import annotations

import logging
from typing import Any


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend, with matplotlib's own logging at WARNING (the "generated new
    fontManager" line of a first run is INFO)."""
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


__all__ = ["pyplot"]
