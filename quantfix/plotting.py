"""The matplotlib set-up every plot shares: the Agg backend (no display), a figure drawn in a
``with`` block, laid out, saved and closed (also when drawing fails: figures would pile up)."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path


@contextmanager
def figure(path: Path, *grid, dpi: int = 110, **subplots):
    """``with figure(path, figsize=(7, 4.5)) as (fig, ax):`` draw; on leaving the block the figure
    is laid out and written to ``path``. ``grid`` and ``subplots`` go to ``plt.subplots``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(*grid, **subplots)
    try:
        yield fig, ax
        fig.tight_layout()
        fig.savefig(path, dpi=dpi)
    finally:
        plt.close(fig)
