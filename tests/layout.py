"""Is a figure readable (a test helper): no two pieces of text drawn over each other, none cut off by the canvas.

Measured after drawing, from matplotlib's renderer (`Text.get_window_extent`), for every visible
Text artist with text (titles, labels, tick labels, legend entries, annotations).
"""

from __future__ import annotations

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.text import Text
from matplotlib.transforms import Bbox

SLACK = 0.5  # pixels two boxes may share (antialiasing at the edge of touching glyphs)


def text_boxes(fig: Figure) -> list[tuple[str, Bbox]]:
    """(text, window extent) of every visible, non-empty Text the drawn figure shows."""
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    hidden = _undrawn_tick_labels(fig)
    return [(t.get_text(), t.get_window_extent(renderer)) for t in fig.findobj(Text)
            if t.get_visible() and t.get_text().strip() and id(t) not in hidden]


def _undrawn_tick_labels(fig: Figure) -> set[int]:
    """Tick labels matplotlib keeps but does not draw: their tick lies outside the axis' view."""
    out = set()
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            low, high = sorted(axis.get_view_interval())
            eps = 1e-9 * max(abs(high - low), 1e-300)
            for tick in axis.get_major_ticks() + axis.get_minor_ticks():
                loc = tick.get_loc()
                if loc is None or not low - eps <= loc <= high + eps:
                    out |= {id(tick.label1), id(tick.label2)}
    return out


def problems(fig: Figure) -> list[str]:
    """One line per text box that leaves the canvas and per pair of boxes that overlap."""
    boxes = text_boxes(fig)
    canvas = fig.bbox
    out = [f"{text!r} leaves the canvas" for text, box in boxes
           if box.x0 < canvas.x0 - SLACK or box.y0 < canvas.y0 - SLACK or box.x1 > canvas.x1 + SLACK or box.y1 > canvas.y1 + SLACK]
    for i, (a, box_a) in enumerate(boxes):
        for b, box_b in boxes[i + 1:]:
            width = min(box_a.x1, box_b.x1) - max(box_a.x0, box_b.x0)
            height = min(box_a.y1, box_b.y1) - max(box_a.y0, box_b.y0)
            if width > SLACK and height > SLACK:
                out.append(f"{a!r} overlaps {b!r}")
    return out
