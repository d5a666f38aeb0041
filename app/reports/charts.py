"""Hand-written inline SVG charts for the HTML report: no scripts, no fonts, nothing fetched.

Colours and type come from the page's stylesheet through class names, so the charts follow the
page (and print) without carrying their own styling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from app.reports.format import (
    esc,
    fmt_ms,
    fmt_ms_tick,
    fmt_percent,
    fmt_ratio,
    significant,
)

_PRECISION_CLASSES = {
    "float32": "p-f32",
    "fp32": "p-f32",
    "float": "p-f32",
    "float16": "p-f16",
    "fp16": "p-f16",
    "half": "p-f16",
    "bfloat16": "p-bf16",
    "bf16": "p-bf16",
    "int8": "p-int8",
    "qint8": "p-int8",
    "quint8": "p-int8",
    "dynamic_int8": "p-int8",
    "static_int8": "p-int8",
    "weight_int8": "p-int8",
    "int4": "p-int4",
    "weight_int4": "p-int4",
    "binary": "p-bin",
    "1-bit": "p-bin",
}


def nice_ticks(low: float, high: float, count: int = 4) -> list[float]:
    """Round tick values from at or below `low` to at or above `high` (steps of 1, 2 or 5 × 10^k)."""
    if high <= low:
        high = low + (abs(low) or 1.0)
    raw = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    first = math.floor(low / step + 1e-9)
    last = math.ceil(high / step - 1e-9)
    return [round(i * step, 12) for i in range(first, last + 1)]


def _svg(width: int, height: int, label: str, body: str) -> str:
    return (
        f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
        f'role="img" aria-label="{esc(label)}" xmlns="http://www.w3.org/2000/svg">'
        f"<title>{esc(label)}</title>{body}</svg>"
    )


@dataclass
class LatencyBar:
    """One bar of a latency panel: a model's p50 with p90 and p99 at one batch size."""

    label: str
    css: str
    p50: float
    p90: float | None
    p99: float | None


def latency_panel(batch: str, bars: list[LatencyBar], speedup: float | None) -> str:
    """Bars of p50 latency per model at one batch size, whiskers up to p90, a mark at p99.

    The axis stops a little above the highest p90: a p99 beyond it (one slow call out of a
    hundred) is drawn as an arrow at the top rather than squashing every bar.
    """
    width, height, left, top, bottom = 250, 220, 48, 34, 46
    plot_h = height - top - bottom
    ceiling = max(max(b.p90 if b.p90 is not None else b.p50, b.p50) for b in bars) * 1.2 or 1.0
    ticks = nice_ticks(0, ceiling, 4)
    ceiling = ticks[-1]

    def y(value: float) -> float:
        return top + plot_h * (1 - min(value, ceiling) / ceiling)

    parts = [_axis_y(ticks, y, left, width - 10, fmt_ms_tick)]
    slot = (width - left - 10) / len(bars)
    bar_w = min(54.0, slot * 0.55)
    for index, bar in enumerate(bars):
        cx = left + slot * (index + 0.5)
        x0 = cx - bar_w / 2
        tip = f"{bar.label}: p50 {fmt_ms(bar.p50)}, p90 {fmt_ms(bar.p90)}, p99 {fmt_ms(bar.p99)}"
        parts.append(
            f"<g><title>{esc(tip)}</title>"
            f'<rect class="{bar.css}" x="{x0:.1f}" y="{y(bar.p50):.1f}" width="{bar_w:.1f}" '
            f'height="{y(0) - y(bar.p50):.1f}" rx="2"/>'
        )
        if bar.p90 is not None and bar.p90 > bar.p50:
            parts.append(
                f'<line class="whisker" x1="{cx:.1f}" x2="{cx:.1f}" y1="{y(bar.p50):.1f}" y2="{y(bar.p90):.1f}"/>'
                f'<line class="whisker" x1="{cx - 7:.1f}" x2="{cx + 7:.1f}" y1="{y(bar.p90):.1f}" y2="{y(bar.p90):.1f}"/>'
            )
        if bar.p99 is not None:
            if bar.p99 > ceiling:
                parts.append(
                    f'<path class="p99" d="M{cx - 5:.1f},{top + 6} L{cx:.1f},{top} L{cx + 5:.1f},{top + 6} Z"/>'
                )
            else:
                parts.append(f'<circle class="p99" cx="{cx:.1f}" cy="{y(bar.p99):.1f}" r="2.5"/>')
        parts.append(
            f'<text class="tick" x="{cx:.1f}" y="{height - bottom + 16}" text-anchor="middle">{esc(bar.label)}</text>'
            f'<text class="value" x="{cx:.1f}" y="{height - bottom + 31}" text-anchor="middle">'
            f"{esc(fmt_ms(bar.p50))}</text></g>"
        )
    title = f"batch {batch}"
    if speedup is not None:
        title += f" · {fmt_ratio(speedup)} faster" if speedup >= 1 else f" · {fmt_ratio(1 / speedup)} slower"
    parts.append(f'<text class="panel-title" x="{left}" y="18">{esc(title)}</text>')
    return _svg(width, height, f"p50 latency at {title}", "".join(parts))


def _axis_y(ticks: list[float], y, x0: float, x1: float, label) -> str:
    parts = []
    for tick in ticks:
        parts.append(
            f'<line class="grid" x1="{x0}" x2="{x1}" y1="{y(tick):.1f}" y2="{y(tick):.1f}"/>'
            f'<text class="tick" x="{x0 - 6}" y="{y(tick) + 4:.1f}" text-anchor="end">{esc(label(tick))}</text>'
        )
    return "".join(parts)


@dataclass
class _Plane:
    """The latency-across, quality-up frame both scatter charts draw on: scales, grid and ticks."""

    width: int
    height: int
    left: int
    right: int
    top: int
    bottom: int
    x_ticks: list[float]
    y_ticks: list[float]

    @classmethod
    def fit(cls, latencies: list[float], qualities: list[float], width, height, left, right, top, bottom) -> _Plane:
        pad = max((max(qualities) - min(qualities)) * 0.25, 0.002)
        high = min(max(qualities) + pad, 1.0) if max(qualities) <= 1 else max(qualities) + pad
        x_ticks = nice_ticks(0, max(latencies) * 1.1 or 1.0, 5)
        return cls(
            width, height, left, right, top, bottom, x_ticks, nice_ticks(max(min(qualities) - pad, 0.0), high, 4)
        )

    def x(self, value: float) -> float:
        return self.left + (self.width - self.left - self.right) * value / self.x_ticks[-1]

    def y(self, value: float) -> float:
        low, high = self.y_ticks[0], self.y_ticks[-1]
        return self.top + (self.height - self.top - self.bottom) * (1 - (value - low) / ((high - low) or 1))

    def grid(self) -> str:
        """The quality grid in percent (as many decimals as the tick step needs) and the latency grid."""
        step_points = (self.y_ticks[1] - self.y_ticks[0]) * 100 if len(self.y_ticks) > 1 else 1.0
        decimals = 0 if step_points >= 1 else 1 if step_points >= 0.1 else 2
        parts = [_axis_y(self.y_ticks, self.y, self.left, self.width - self.right, lambda v: fmt_percent(v, decimals))]
        for tick in self.x_ticks:
            parts.append(
                f'<line class="grid" x1="{self.x(tick):.1f}" x2="{self.x(tick):.1f}" y1="{self.top}" '
                f'y2="{self.height - self.bottom}"/>'
                f'<text class="tick" x="{self.x(tick):.1f}" y="{self.height - self.bottom + 16}" '
                f'text-anchor="middle">{esc(fmt_ms_tick(tick))}</text>'
            )
        return "".join(parts)


@dataclass
class StagePoint:
    """One model on the quality-versus-latency plane."""

    label: str
    css: str
    latency_ms: float
    quality: float


def quality_latency_scatter(points: list[StagePoint], quality_name: str, batch: str) -> str:
    """Each stage as a point (latency at `batch` across, quality up), joined in pipeline order."""
    width, height, left, right, top, bottom = 620, 300, 70, 130, 18, 48
    plane = _Plane.fit(
        [p.latency_ms for p in points], [p.quality for p in points], *(width, height), left, right, top, bottom
    )
    x, y = plane.x, plane.y
    parts = [plane.grid()]
    path = " ".join(f"{'M' if i == 0 else 'L'}{x(p.latency_ms):.1f},{y(p.quality):.1f}" for i, p in enumerate(points))
    parts.append(f'<path class="trail" d="{path}"/>')
    for index, point in enumerate(points):
        px, py = x(point.latency_ms), y(point.quality)
        dy = -9 if index % 2 == 0 else 16
        parts.append(
            f"<g><title>{esc(point.label)}: {esc(fmt_ms(point.latency_ms))}, {esc(quality_name)} "
            f"{esc(fmt_percent(point.quality))}</title>"
            f'<circle class="{point.css}" cx="{px:.1f}" cy="{py:.1f}" r="6"/>'
            f'<text class="point-label" x="{px + 9:.1f}" y="{py + dy:.1f}">{esc(point.label)}</text></g>'
        )
    parts.append(
        f'<text class="axis-label" x="{(left + width - right) / 2:.1f}" y="{height - 8}" text-anchor="middle">'
        f"p50 latency at batch {esc(batch)}</text>"
    )
    parts.append(
        f'<text class="axis-label" transform="translate(14,{(top + height - bottom) / 2:.1f}) rotate(-90)" '
        f'text-anchor="middle">{esc(quality_name)}</text>'
    )
    return _svg(width, height, f"{quality_name} against p50 latency at batch {batch}, per stage", "".join(parts))


@dataclass
class LayerRow:
    """A layer's sparsity (fraction of weights or channels removed) and precision, either optional."""

    module: str
    sparsity: float | None
    precision: str | None


def precision_class(precision: str) -> str:
    return _PRECISION_CLASSES.get(precision.lower(), "p-other")


def layer_bars(rows: list[LayerRow], title: str) -> str:
    """One row per layer: its name, a precision chip and a bar of its sparsity (0–100%)."""
    row_h, label_w, chip_w, bar_w, top = 20, 250, 78, 300, 28
    show_chip = any(r.precision for r in rows)
    show_bar = any(r.sparsity is not None for r in rows)
    bar_x = label_w + (chip_w if show_chip else 0) + 8
    width = bar_x + (bar_w + 60 if show_bar else 0)
    height = top + row_h * len(rows) + 6
    parts = []
    if show_bar:
        for tick in (0, 0.25, 0.5, 0.75, 1.0):
            tx = bar_x + bar_w * tick
            parts.append(
                f'<line class="grid" x1="{tx:.1f}" x2="{tx:.1f}" y1="{top - 6}" y2="{height - 4}"/>'
                f'<text class="tick" x="{tx:.1f}" y="{top - 10}" text-anchor="middle">{int(tick * 100)}%</text>'
            )
    if show_chip:
        parts.append(
            f'<text class="tick" x="{label_w + chip_w / 2 - 4:.1f}" y="{top - 10}" text-anchor="middle">precision</text>'
        )
    for index, row in enumerate(rows):
        ry = top + index * row_h
        name = row.module if len(row.module) <= 36 else "…" + row.module[-35:]
        parts.append(
            f'<g><title>{esc(row.module)}</title><text class="layer-name" x="{label_w - 8}" y="{ry + 14}" '
            f'text-anchor="end">{esc(name)}</text></g>'
        )
        if show_chip and row.precision:
            parts.append(
                f'<rect class="chip {precision_class(row.precision)}" x="{label_w}" y="{ry + 3}" '
                f'width="{chip_w - 10}" height="{row_h - 6}" rx="7"/>'
                f'<text class="chip-text" x="{label_w + (chip_w - 10) / 2:.1f}" y="{ry + 14}" '
                f'text-anchor="middle">{esc(row.precision[:10])}</text>'
            )
        if show_bar and row.sparsity is not None:
            fraction = min(max(row.sparsity, 0.0), 1.0)
            parts.append(
                f'<rect class="track" x="{bar_x}" y="{ry + 4}" width="{bar_w}" height="{row_h - 8}" rx="3"/>'
                f'<rect class="sparsity" x="{bar_x}" y="{ry + 4}" width="{bar_w * fraction:.1f}" '
                f'height="{row_h - 8}" rx="3"/>'
                f'<text class="value" x="{bar_x + bar_w + 6}" y="{ry + 14}">{significant(fraction * 100, 3)}%</text>'
            )
    return _svg(int(width), int(height), title, "".join(parts))


@dataclass
class FrontPoint:
    """One trial on the search's front chart."""

    label: str
    latency_ms: float
    quality: float
    size_bytes: float
    on_front: bool
    picked: bool
    feasible: bool


def front_scatter(points: list[FrontPoint], quality_name: str, batch: str, limit: float | None) -> str:
    """Each trial at (latency, quality), its marker's area proportional to its size; the front
    joined by a line, the pick ringed, and the quality limit drawn across when there is one."""
    width, height, left, right, top, bottom = 660, 340, 70, 150, 18, 48
    qualities = [p.quality for p in points] + ([limit] if limit is not None else [])
    plane = _Plane.fit([p.latency_ms for p in points], qualities, width, height, left, right, top, bottom)
    x, y = plane.x, plane.y
    y_min, y_max = plane.y_ticks[0], plane.y_ticks[-1]
    largest = max(p.size_bytes for p in points) or 1.0
    parts = [plane.grid()]
    if limit is not None and y_min <= limit <= y_max:
        parts.append(
            f'<line class="limit" x1="{left}" x2="{width - right}" y1="{y(limit):.1f}" y2="{y(limit):.1f}"/>'
            f'<text class="tick" x="{width - right + 4}" y="{y(limit) + 4:.1f}">limit</text>'
        )
    front = sorted((p for p in points if p.on_front), key=lambda p: p.latency_ms)
    if len(front) > 1:
        path = " ".join(
            f"{'M' if i == 0 else 'L'}{x(p.latency_ms):.1f},{y(p.quality):.1f}" for i, p in enumerate(front)
        )
        parts.append(f'<path class="trail" d="{path}"/>')
    for point in sorted(points, key=lambda p: -p.size_bytes):
        px, py = x(point.latency_ms), y(point.quality)
        # Area, not radius, follows size: a model twice as large covers twice the ink.
        radius = 4 + 10 * math.sqrt(point.size_bytes / largest)
        css = "m-result" if point.picked else ("m-stage1" if point.on_front else "m-base")
        ring = f'<circle class="pick-ring" cx="{px:.1f}" cy="{py:.1f}" r="{radius + 4:.1f}"/>' if point.picked else ""
        parts.append(
            f"<g><title>{esc(point.label)}: {esc(fmt_ms(point.latency_ms))}, {esc(quality_name)} "
            f"{esc(fmt_percent(point.quality))}{' (pick)' if point.picked else ''}</title>{ring}"
            f'<circle class="{css}" fill-opacity="0.75" cx="{px:.1f}" cy="{py:.1f}" r="{radius:.1f}"/>'
            f'<text class="point-label" x="{px + radius + 3:.1f}" y="{py + 4:.1f}">{esc(point.label)}</text></g>'
        )
    parts.append(
        f'<text class="axis-label" x="{(left + width - right) / 2:.1f}" y="{height - 8}" text-anchor="middle">'
        f"p50 latency at batch {esc(batch)} (marker area: size)</text>"
    )
    parts.append(
        f'<text class="axis-label" transform="translate(14,{(top + height - bottom) / 2:.1f}) rotate(-90)" '
        f'text-anchor="middle">{esc(quality_name)}</text>'
    )
    return _svg(width, height, f"{quality_name} against p50 latency at batch {batch}, per trial", "".join(parts))
