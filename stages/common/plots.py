"""Figures as PNG bytes: every plot of the stages, the report and the benchmark goes through here."""

import io


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display needed), imported when a plot is made."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure_png(fig, dpi: int = 100, tight: bool = True) -> bytes:
    """The figure as PNG bytes; the figure is closed."""
    if tight:
        fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    pyplot().close(fig)
    return buffer.getvalue()
