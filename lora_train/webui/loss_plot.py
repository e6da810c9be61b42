"""The loss curve as a small inline SVG: each step's loss as a faint point, a smoothed line through them.

Per-step diffusion losses jump with the random timestep, so the raw values alone read as noise; the line is the
debiased exponential moving average TensorBoard draws. Colours come from the theme (style.css), so the plot
reads in light and dark themes, and it is the same in every gradio version (no plotting component).
"""

from __future__ import annotations

import html
import math
from typing import List, Optional, Sequence

WIDTH, HEIGHT = 480, 220
LEFT, RIGHT, TOP, BOTTOM = 52, 12, 12, 28  # room for the axis labels
SMOOTHING = 0.9
MAX_POINTS = 1000  # more raw points than this are thinned out evenly (the line still uses every value)


def smoothed(values: Sequence[Optional[float]], weight: float = SMOOTHING) -> List[float]:
    """The debiased exponential moving average of the finite values (None and non-finite ones are skipped)."""
    average, result, count = 0.0, [], 0
    for value in values:
        if value is not None and math.isfinite(value):
            count += 1
            average = weight * average + (1 - weight) * value
        result.append(average / (1 - weight ** count) if count else float("nan"))
    return result


def svg(losses: Sequence[Optional[float]]) -> str:
    """The plot of losses[i] at step i + 1; a short note while there is nothing to draw."""
    points = [(step, loss) for step, loss in enumerate(losses, start=1) if loss is not None and math.isfinite(loss)]
    if not points:
        return '<div class="lora-train-loss-empty">The loss curve appears after the first step.</div>'
    low, high = min(loss for _, loss in points), max(loss for _, loss in points)
    high = high if high > low else low + 1e-6
    last = max(len(losses), 2)

    def x(step: float) -> float:
        return LEFT + (step - 1) / (last - 1) * (WIDTH - LEFT - RIGHT)

    def y(loss: float) -> float:
        return TOP + (high - loss) / (high - low) * (HEIGHT - TOP - BOTTOM)

    every = max(1, math.ceil(len(points) / MAX_POINTS))
    dots = "".join(f'<circle cx="{x(s):.1f}" cy="{y(v):.1f}" r="1.6"/>' for s, v in points[::every])
    line = " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in enumerate(smoothed(losses), start=1) if math.isfinite(v))
    labels = (f'<text x="{LEFT - 6}" y="{TOP + 4}" text-anchor="end">{high:.3g}</text>'
              f'<text x="{LEFT - 6}" y="{HEIGHT - BOTTOM}" text-anchor="end">{low:.3g}</text>'
              f'<text x="{LEFT}" y="{HEIGHT - 8}">step 1</text>'
              f'<text x="{WIDTH - RIGHT}" y="{HEIGHT - 8}" text-anchor="end">step {len(losses)}</text>')
    frame = (f'<line class="axis" x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{HEIGHT - BOTTOM}"/>'
             f'<line class="axis" x1="{LEFT}" y1="{HEIGHT - BOTTOM}" x2="{WIDTH - RIGHT}" y2="{HEIGHT - BOTTOM}"/>')
    title = html.escape(f"loss, last {points[-1][1]:.4f}, smoothed {smoothed(losses)[-1]:.4f}")
    return (f'<svg class="lora-train-loss" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{title}">'
            f'<title>{title}</title>{frame}<g class="raw">{dots}</g>'
            f'<polyline class="smooth" points="{line}"/>{labels}</svg>')
