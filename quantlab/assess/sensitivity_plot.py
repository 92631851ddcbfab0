"""`quantlab sensitivity --plot`: a PNG bar chart of the KL each tensor class adds, quantized alone, per GB it
saves, most sensitive on top. Drawn with matplotlib's Agg backend, imported only when a plot is asked for.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from quantlab.assess.sensitivity_select import ClassEffect


def render_png(effects: list[ClassEffect], label: str = "") -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 4.5), dpi=110, layout="constrained")
    ax = figure.subplots()
    ax.barh([e.name for e in effects][::-1], [e.kl_per_gb for e in effects][::-1], color="tab:red")
    ax.set_xlabel("KL added per GB saved (nats/token per GB)")
    ax.set_title(f"Sensitivity by tensor class{f' ({label})' if label else ''}: the KL each adds, quantized alone, "
                 "per GB it saves", fontsize=9)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
