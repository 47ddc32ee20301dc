"""Greedy placement of point labels on a matplotlib axes, away from other labels, markers and bars."""

from __future__ import annotations

import numpy as np
from matplotlib.transforms import Bbox

DIRECTIONS = [(1, 1), (-1, 1), (1, -1), (-1, -1), (0, 1), (0, -1), (1, 0), (-1, 0)]
RADII_PT = (6, 12, 20, 30, 42, 56, 72)
ARROW_PT = 12  # labels this far from their point get a leader line
ALIGN = {1: (0.0, "left", "bottom"), 0: (0.5, "center", "center"), -1: (1.0, "right", "top")}


def place_labels(ax, xy: np.ndarray, labels: list[str], colors: list[str], markers: list[Bbox],
                 bars: list[Bbox], dry: bool = False) -> list[int]:
    """Label the points at data coordinates `xy`: try offsets at growing distance in 8 directions
    and take the first free spot, else the cheapest one (leaving the axes, then covering a label,
    then a marker, then an error bar costs most to least). Returns the indices of the labels that
    found no free spot; `dry`: only find them, draw nothing."""
    renderer = ax.figure.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    px_per_pt = ax.figure.dpi / 72
    placed: list[Bbox] = []
    crowded: list[int] = []
    style = {"fontsize": 8, "bbox": {"boxstyle": "round,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.8}}
    for i, ((x, y), (px, py), text, color) in enumerate(zip(xy, ax.transData.transform(xy), labels, colors)):
        probe = ax.text(0, 0, text, **style)
        w, h = probe.get_window_extent(renderer).padded(2).size
        probe.remove()
        best = None
        for radius in RADII_PT:
            for dx, dy in DIRECTIONS:
                x0 = px + dx * radius * px_per_pt - ALIGN[dx][0] * w
                y0 = py + dy * radius * px_per_pt - ALIGN[dy][0] * h
                box = Bbox.from_bounds(x0, y0, w, h)
                if radius >= ARROW_PT:  # a leader line is drawn: the label and its line reach back to the point
                    box = Bbox.union([box, Bbox.from_bounds(px, py, 0, 0)])
                inside = frame.contains(box.x0, box.y0) and frame.contains(box.x1, box.y1)
                cost = (100 * (not inside) + 10 * sum(box.overlaps(b) for b in placed)
                        + 3 * sum(box.overlaps(b) for b in markers) + sum(box.overlaps(b) for b in bars))
                if best is None or cost < best[0]:
                    best = (cost, radius, dx, dy, box)
            if best[0] == 0:
                break
        cost, radius, dx, dy, box = best
        placed.append(box)
        if cost:
            crowded.append(i)
        if dry:
            continue
        ann = ax.annotate(text, (x, y), xytext=(dx * radius, dy * radius), textcoords="offset points", color=color,
                          ha=ALIGN[dx][1], va=ALIGN[dy][2], **style,
                          arrowprops=None if radius < ARROW_PT else {"arrowstyle": "-", "color": color, "lw": 0.7})
        ann.set_in_layout(False)
    return crowded
