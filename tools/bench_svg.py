"""Hand-made SVG charts for docs/benchmarks.md (no plotting library: the project adds no dependency)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from xml.sax.saxutils import escape

FONT = "font-family='DejaVu Sans, Arial, sans-serif'"
BLUE, ORANGE, GREEN, GREY, RED, PURPLE = "#4c78a8", "#f58518", "#54a24b", "#9d9d9d", "#e45756", "#b279a2"


@dataclass(frozen=True)
class Bar:
    """One horizontal bar."""

    label: str
    value: float
    color: str = BLUE
    note: str = ""


@dataclass(frozen=True)
class RefLine:
    """A vertical reference line across a bar chart (a target, a limit)."""

    value: float
    label: str
    color: str = RED


@dataclass(frozen=True)
class Series:
    """One line of a line chart."""

    name: str
    points: Sequence[tuple[float, float]]
    color: str = BLUE


def _text(
    x: float, y: float, text: str, *, size: int = 12, anchor: str = "start", weight: str = "normal", fill: str = "#222"
) -> str:
    return (
        f"<text x='{x:.1f}' y='{y:.1f}' {FONT} font-size='{size}' text-anchor='{anchor}' "
        f"font-weight='{weight}' fill='{fill}'>{escape(text)}</text>"
    )


def _svg(width: int, height: int, body: list[str]) -> str:
    return (
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' viewBox='0 0 {width} {height}'>\n"
        f"<rect width='{width}' height='{height}' fill='white'/>\n" + "\n".join(body) + "\n</svg>\n"
    )


def _nice_max(value: float) -> float:
    """Round up to 1, 2 or 5 times a power of ten."""
    if value <= 0:
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 5, 10):
        if value <= step * power:
            return float(step * power)
    return float(10 * power)


def bar_chart(title: str, subtitle: str, bars: Sequence[Bar], unit: str, refs: Sequence[RefLine] = ()) -> str:
    """Return an SVG horizontal bar chart with optional vertical reference lines."""
    left, right, top, row = 250, 110, 88, 38
    width = 820
    plot_w = width - left - right
    height = top + row * len(bars) + 60
    top_value = _nice_max(max([b.value for b in bars] + [r.value for r in refs] + [1e-9]) * 1.05)
    scale = plot_w / top_value
    body = [
        _text(20, 28, title, size=16, weight="bold"),
        _text(20, 48, subtitle, size=12, fill="#555"),
    ]
    for i in range(6):  # grid and axis labels
        value = top_value * i / 5
        x = left + value * scale
        body.append(f"<line x1='{x:.1f}' y1='{top - 6}' x2='{x:.1f}' y2='{top + row * len(bars)}' stroke='#e6e6e6'/>")
        body.append(_text(x, top + row * len(bars) + 18, f"{value:g}", size=11, anchor="middle", fill="#555"))
    body.append(_text(left + plot_w / 2, top + row * len(bars) + 38, unit, size=12, anchor="middle", fill="#555"))
    for i, bar in enumerate(bars):
        y = top + i * row
        w = max(bar.value * scale, 1.0)
        body.append(_text(left - 10, y + row / 2 + 4, bar.label, size=12, anchor="end"))
        body.append(f"<rect x='{left}' y='{y + 7}' width='{w:.1f}' height='{row - 14}' fill='{bar.color}'/>")
        body.append(_text(left + w + 6, y + row / 2 + 4, bar.note or f"{bar.value:.3g}", size=12))
    for ref in refs:
        x = left + ref.value * scale
        body.append(
            f"<line x1='{x:.1f}' y1='{top - 10}' x2='{x:.1f}' y2='{top + row * len(bars)}' "
            f"stroke='{ref.color}' stroke-width='2' stroke-dasharray='6,4'/>"
        )
        body.append(_text(x, top - 14, ref.label, size=11, anchor="middle", fill=ref.color))
    return _svg(width, height, body)


def _fmt_seconds(value: float) -> str:
    return f"{value * 1000:.3g} ms" if value < 1 else f"{value:.3g} s"


def line_chart(title: str, subtitle: str, series: Sequence[Series], x_label: str, y_label: str) -> str:
    """Return an SVG line chart with log10 x and y axes (seconds), a legend row under the title.

    Point labels go above the point for even-numbered series and below for odd ones, so two series
    that nearly coincide stay readable when listed next to each other.
    """
    left, right, top, bottom = 80, 90, 100, 60
    width, height = 820, 440
    plot_w, plot_h = width - left - right, height - top - bottom
    xs = [x for s in series for x, _ in s.points if x > 0]
    ys = [y for s in series for _, y in s.points if y > 0]
    x_lo = 10 ** math.floor(math.log10(min(xs))) if xs else 1.0
    x_hi = max(10 ** math.ceil(math.log10(max(xs))) if xs else 10.0, x_lo * 10)
    y_lo = 10 ** math.floor(math.log10(min(ys))) if ys else 0.001
    y_hi = max(10 ** math.ceil(math.log10(max(ys))) if ys else 1.0, y_lo * 10)

    def px(x: float) -> float:
        return left + (math.log10(x) - math.log10(x_lo)) / (math.log10(x_hi) - math.log10(x_lo)) * plot_w

    def py(y: float) -> float:
        return top + plot_h - (math.log10(y) - math.log10(y_lo)) / (math.log10(y_hi) - math.log10(y_lo)) * plot_h

    body = [_text(20, 28, title, size=16, weight="bold"), _text(20, 48, subtitle, size=12, fill="#555")]
    decade = x_lo
    while decade <= x_hi * 1.0001:
        x = px(decade)
        body.append(f"<line x1='{x:.1f}' y1='{top}' x2='{x:.1f}' y2='{top + plot_h}' stroke='#e6e6e6'/>")
        body.append(_text(x, top + plot_h + 18, f"{decade:,.0f}", size=11, anchor="middle", fill="#555"))
        decade *= 10
    decade = y_lo
    while decade <= y_hi * 1.0001:
        y = py(decade)
        body.append(f"<line x1='{left}' y1='{y:.1f}' x2='{left + plot_w}' y2='{y:.1f}' stroke='#e6e6e6'/>")
        body.append(_text(left - 8, y + 4, _fmt_seconds(decade), size=11, anchor="end", fill="#555"))
        decade *= 10
    body.append(_text(left + plot_w / 2, height - 18, x_label, size=12, anchor="middle", fill="#555"))
    body.append(
        f"<text transform='translate(22,{top + plot_h / 2:.1f}) rotate(-90)' {FONT} font-size='12' "
        f"text-anchor='middle' fill='#555'>{escape(y_label)}</text>"
    )
    legend_x = 20.0
    for n, s in enumerate(series):
        pts = [(px(x), py(y), y) for x, y in s.points if x > 0 and y > 0]
        if len(pts) > 1:
            path = " ".join(f"{x:.1f},{y:.1f}" for x, y, _ in pts)
            body.append(f"<polyline points='{path}' fill='none' stroke='{s.color}' stroke-width='2'/>")
        for x, y, raw in pts:
            body.append(f"<circle cx='{x:.1f}' cy='{y:.1f}' r='4' fill='{s.color}'/>")
            dy = -8 if n % 2 == 0 else 16
            body.append(_text(x + 6, y + dy, _fmt_seconds(raw), size=11, fill=s.color))
        body.append(f"<rect x='{legend_x:.1f}' y='66' width='14' height='4' fill='{s.color}'/>")
        body.append(_text(legend_x + 18, 72, s.name, size=12))
        legend_x += 30 + 7.2 * len(s.name)
    return _svg(width, height, body)
