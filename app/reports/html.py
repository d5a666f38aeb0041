"""The report as one self-contained HTML page: summary, charts, tables and the environment.

Nothing on the page is fetched (no scripts, fonts or stylesheets from elsewhere; a CSP meta tag
forbids it), so it reads the same offline, attached to a ticket or printed. Every user-supplied
string is escaped; every field may be missing or null.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from string import Template
from typing import Any

from app.reports.charts import (
    LatencyBar,
    LayerRow,
    StagePoint,
    latency_panel,
    layer_bars,
    precision_class,
    quality_latency_scatter,
)
from app.reports.format import (
    DASH,
    accuracy_phrase,
    batch_keys,
    dict_of,
    esc,
    fmt_bytes,
    fmt_count,
    fmt_float,
    fmt_ms,
    fmt_percent,
    fmt_ratio,
    fmt_value,
    get,
    list_of,
    num,
    size_phrase,
    speedup_phrase,
    trimmed,
)

_SPARSITY_KEYS = ("sparsity", "zero_fraction", "kept_zero_fraction", "pruned_fraction", "removed_fraction")
_PRECISION_KEYS = ("precision", "dtype", "weight_dtype")
_MAX_CHART_LAYERS = 80


@dataclass
class _Column:
    """One model of the report: the baseline, a stage, or the result."""

    label: str
    css: str
    metrics: dict
    speedup: dict[str, float] = field(default_factory=dict)
    is_result: bool = False


def render_report_html(report: dict) -> str:
    """Render a job report (API.md's Report) as one self-contained HTML page.

    Args:
        report: the Report dict (`job_id`, `spec`, `environment`, `baseline`, `result`,
            `stages`, `summary`, optional `notes`); any field may be missing or null.

    Returns:
        The page: inline CSS and hand-written SVG charts, no scripts, nothing fetched.

    Example:
        Path("report.html").write_text(render_report_html(client.get_report(job_id)))
    """
    report = dict_of(report)
    columns = _columns(report)
    sections = [
        _header(report, columns),
        _cards(report, columns),
        _latency_section(report, columns),
        _serving_section(report, columns),
        _stage_chart_section(columns),
        _metrics_section(columns),
        _layers_section(report),
        _macs_section(columns),
        _notes_section(report),
        _environment_section(report),
    ]
    job = get(report, "job_id")
    name = get(report, "spec", "name")
    title = f"Compactor report · {name or job or 'job'}"
    return PAGE.substitute(
        title=esc(title),
        style=STYLE,
        body="".join(s for s in sections if s),
        footer=esc(f"Compactor · job {job}" if job else "Compactor"),
    )


def _columns(report: dict) -> list[_Column]:
    columns = [_Column("baseline", "m-base", dict_of(report.get("baseline")))]
    stages = [s for s in list_of(report.get("stages")) if isinstance(s, dict)]
    for index, stage in enumerate(stages, 1):
        speedup = {str(k): v for k, v in dict_of(stage.get("speedup")).items() if num(v) is not None}
        columns.append(
            _Column(
                f"{index} · {stage.get('op', 'step')}",
                f"m-stage{min(index, 4)}",
                dict_of(stage.get("metrics")),
                speedup,
            )
        )
    summary_speedup = {str(k): v for k, v in dict_of(get(report, "summary", "speedup")).items() if num(v) is not None}
    if len(columns) > 1 and columns[-1].metrics:
        columns[-1].is_result = True
        columns[-1].speedup = summary_speedup or columns[-1].speedup
    elif isinstance(report.get("result"), dict) and stages:
        columns.append(_Column("result", "m-result", report["result"], summary_speedup, is_result=True))
    for column in columns:
        if column.is_result:
            column.css = "m-result"
    return columns


def _is_profile(columns: list[_Column]) -> bool:
    return len(columns) == 1


def _result(columns: list[_Column]) -> _Column:
    return columns[-1]


# --- header and summary -------------------------------------------------------------------------


def headline(report: dict) -> str:
    """The one-line summary: "3.1× faster at batch 32, 3.9× smaller, −0.2 pt accuracy"."""
    summary = dict_of(report.get("summary"))
    columns = _columns(report)
    if _is_profile(columns):
        return _profile_headline(columns[0].metrics)
    parts = []
    speedup = {k: num(v) for k, v in dict_of(summary.get("speedup")).items() if num(v) is not None}
    if speedup:
        batch = batch_keys(speedup)[-1]
        interval = dict_of(get(summary, "speedup_spread", batch, "interval"))
        low, high = num(interval.get("low")), num(interval.get("high"))
        parts.append(
            speedup_phrase(speedup[batch], batch, (low, high) if low is not None and high is not None else None)
            + _beyond_floor_phrase(summary, batch)
        )
    size_ratio = num(summary.get("size_ratio"))
    if size_ratio is None:
        base, result = num(get(report, "baseline", "size_bytes")), num(get(report, "result", "size_bytes"))
        size_ratio = base / result if base and result else None
    if size_ratio:
        parts.append(size_phrase(size_ratio))
    drop = num(summary.get("accuracy_drop"))
    if summary.get("stopped_early"):
        parts.append("not timed: it already misses its quality target")
    if drop is not None:
        parts.append(accuracy_phrase(drop))
    else:
        # the figure min_fidelity holds (quality.fidelity_score): top-1 agreement exists only for class
        # scores with labels; an embedding's fidelity is its worst sample's cosine
        agreement = num(get(report, "result", "fidelity", "top1_agreement"))
        cosine = num(get(report, "result", "fidelity", "cosine_min"))
        if agreement is not None:
            parts.append(f"{fmt_percent(agreement, 1)} top-1 agreement")
        elif cosine is not None:
            # rounded down: "≥ 0.9900" must not be claimed for a worst sample at 0.98996
            parts.append(f"cosine ≥ {math.floor(cosine * 1e4) / 1e4:.4f}")
    return ", ".join(parts) or "no summary figures in this report"


def _beyond_floor_phrase(summary: dict, batch: str) -> str:
    """ " (1.4× beyond the 2.1× lossless floor)" where serving the baseline with no compression is
    clearly faster than plain (its interval above 1.0): the part of the speed-up the lossy steps earned."""
    floor, beyond = dict_of(get(summary, "lossless_floor", batch)), dict_of(get(summary, "beyond_floor", batch))
    floor_low, floor_median = num(get(floor, "interval", "low")), num(floor.get("median"))
    median = num(beyond.get("median"))
    if floor_median is None or median is None or (floor_low if floor_low is not None else floor_median) <= 1.0:
        return ""
    low, high = num(get(beyond, "interval", "low")), num(get(beyond, "interval", "high"))
    if low is not None and high is not None and low <= 1.0 <= high:
        return f" (no clear gain beyond the {fmt_ratio(floor_median)} lossless floor)"
    if median < 1:
        return f" ({fmt_ratio(1 / median)} slower than the {fmt_ratio(floor_median)} lossless floor)"
    return f" ({fmt_ratio(median)} beyond the {fmt_ratio(floor_median)} lossless floor)"


def _profile_headline(metrics: dict) -> str:
    latency = dict_of(metrics.get("latency_ms"))
    parts = []
    if latency:
        parts.append("p50 " + ", ".join(f"{fmt_ms(get(latency, b, 'p50'))} at batch {b}" for b in batch_keys(latency)))
    if num(metrics.get("size_bytes")) is not None:
        parts.append(fmt_bytes(metrics["size_bytes"]))
    if num(metrics.get("macs")) is not None:
        parts.append(f"{fmt_count(metrics['macs'])} MACs per sample")
    return "Profile: " + ("; ".join(parts) or "no figures in this report")


def _header(report: dict, columns: list[_Column]) -> str:
    spec = dict_of(report.get("spec"))
    steps = [s for s in list_of(spec.get("steps")) if isinstance(s, dict)]
    recipe = " → ".join(esc(step_label(s)) for s in steps) or "profile only (no steps)"
    meta = [f"job <code>{esc(report.get('job_id') or DASH)}</code>"]
    if spec.get("name"):
        meta.insert(0, f"<strong>{esc(spec['name'])}</strong>")
    measured = get(report, "environment", "measured_at")
    if measured:
        meta.append(f"measured {esc(measured)}")
    targets = _targets(report)
    return (
        f'<header><p class="eyebrow">Compactor compression report</p>'
        f'<h1 class="headline" id="headline">{esc(headline(report))}</h1>'
        f'<p class="meta">{" · ".join(meta)}</p><p class="recipe">{recipe}</p>{targets}</header>'
    )


def step_label(step: dict) -> str:
    """A step in a few words (`prune channel 50 %`), as the job and search reports name it."""
    op = str(step.get("op", "step"))
    detail = step.get("scheme") or step.get("structure") or (f"{step['epochs']} epochs" if step.get("epochs") else None)
    amount = num(step.get("amount"))
    text = f"{op} {detail}" if detail else op
    return f"{text} {fmt_percent(amount, 0)}" if amount is not None else text


def _targets(report: dict) -> str:
    targets = dict_of(get(report, "summary", "targets"))
    badges = []
    for name, check in targets.items():
        check = dict_of(check)
        met = check.get("met") is True
        relation = "≤ " if str(name).startswith("max_") else "≥ " if str(name).startswith("min_") else ""
        badges.append(
            f'<span class="badge {"ok" if met else "bad"}">{"✓" if met else "✗"} {esc(name)} '
            f"{relation}{esc(fmt_value(check.get('limit')))} · actual {esc(fmt_value(check.get('actual')))}</span>"
        )
    return f'<p class="targets">{"".join(badges)}</p>' if badges else ""


def _card(title: str, value: str, detail: str) -> str:
    return (
        f'<div class="card"><div class="card-title">{esc(title)}</div><div class="card-value">{value}</div>'
        f'<div class="card-detail">{detail}</div></div>'
    )


def _arrow(before: str, after: str) -> str:
    return f"{esc(before)} → {esc(after)}"


def _cards(report: dict, columns: list[_Column]) -> str:
    base, result = columns[0].metrics, _result(columns).metrics
    cards = []
    if _is_profile(columns):
        for batch in batch_keys(base.get("latency_ms")):
            stats = dict_of(get(base, "latency_ms", batch))
            cards.append(
                _card(
                    f"latency at batch {batch}",
                    esc(fmt_ms(stats.get("p50"))),
                    f"p90 {esc(fmt_ms(stats.get('p90')))} · p99 {esc(fmt_ms(stats.get('p99')))}",
                )
            )
    else:
        spread = dict_of(get(report, "summary", "speedup_spread"))
        speedup = _result(columns).speedup
        for batch in batch_keys(speedup):
            value = speedup[batch]
            low, high = num(get(spread, batch, "min")), num(get(spread, batch, "max"))
            rounds = get(spread, batch, "rounds")
            detail = f"p50 {_arrow(fmt_ms(get(base, 'latency_ms', batch, 'p50')), fmt_ms(get(result, 'latency_ms', batch, 'p50')))}"
            if low is not None and high is not None:
                detail += f"<br>range {low:.2f}–{high:.2f}× over {esc(rounds or '?')} paired rounds"
            interval = dict_of(get(spread, batch, "interval"))
            if num(interval.get("low")) is not None and num(interval.get("high")) is not None:
                detail += (
                    f"<br>{fmt_percent(num(interval.get('confidence')) or 0, 1)} interval "
                    f"{interval['low']:.2f}–{interval['high']:.2f}×"
                )
            if get(spread, batch, "noisy") is True:
                detail += '<br><strong class="noisy">noisy</strong>: the interval stayed wide'
            if get(result, "latency_ms", batch, "noisy") is True:
                detail += '<br><strong class="noisy">noisy</strong>: timed on an oversubscribed host'
            cards.append(_card(f"speed-up at batch {batch}", esc(fmt_ratio(value)), detail))
    size_detail = f"deflated {esc(fmt_bytes(result.get('compressed_size_bytes')))}"
    size_ratio = num(get(report, "summary", "size_ratio"))
    if not _is_profile(columns):
        size_detail = (
            f"baseline {esc(fmt_bytes(base.get('size_bytes')))}"
            + (f" · {esc(size_phrase(size_ratio))}" if size_ratio else "")
            + f"<br>{size_detail}"
        )
    cards.append(_card("file size", esc(fmt_bytes(result.get("size_bytes"))), size_detail))
    cards.append(_quality_card(report, columns))
    work = f"{esc(fmt_count(result.get('nonzero_parameters')))} non-zero of {esc(fmt_count(result.get('parameters')))} parameters"
    memory = "one inference at the largest batch"
    if not _is_profile(columns):
        work = f"baseline {esc(fmt_count(base.get('macs')))}{_fewer(base.get('macs'), result.get('macs'))}<br>{work}"
        memory = f"baseline {esc(fmt_bytes(base.get('peak_memory_bytes')))}<br>{memory}"
    cards.append(_card("MACs per sample", esc(fmt_count(result.get("macs"))), work))
    cards.append(_card("peak memory", esc(fmt_bytes(result.get("peak_memory_bytes"))), memory))
    return f'<section class="cards">{"".join(cards)}</section>'


def _fewer(before: Any, after: Any) -> str:
    before, after = num(before), num(after)
    return f" · {esc(fmt_ratio(before / after))} fewer" if before and after and before > after else ""


def _quality_card(report: dict, columns: list[_Column]) -> str:
    base, result = columns[0].metrics, _result(columns).metrics
    accuracy = num(get(result, "accuracy", "top1"))
    if accuracy is not None:
        drop = num(get(report, "summary", "accuracy_drop"))
        if _is_profile(columns):
            return _card("top-1 accuracy", esc(fmt_percent(accuracy)), "on the evaluation data")
        detail = f"baseline {esc(fmt_percent(get(base, 'accuracy', 'top1')))}"
        if drop is not None:
            detail += f" ({esc(accuracy_phrase(drop))})"
        return _card("top-1 accuracy", esc(fmt_percent(accuracy)), detail)
    fidelity = dict_of(result.get("fidelity"))
    if _is_profile(columns) or not fidelity:
        return _card("accuracy", DASH, "no labels in the evaluation data")
    value = fidelity.get("top1_agreement")
    title, shown = (
        ("top-1 agreement", fmt_percent(value))
        if num(value) is not None
        else ("cosine min", fmt_float(fidelity.get("cosine_min")))
    )
    return _card(
        title,
        esc(shown),
        f"cosine mean {esc(fmt_float(fidelity.get('cosine_mean'), 6))} · "
        f"max |error| {esc(fmt_float(fidelity.get('max_abs_error')))}",
    )


# --- charts ---------------------------------------------------------------------------------------


def _latency_section(report: dict, columns: list[_Column]) -> str:
    shown = [columns[0]] if _is_profile(columns) else [columns[0], _result(columns)]
    panels = []
    for batch in batch_keys(*(c.metrics.get("latency_ms") for c in shown)):
        bars = []
        for column in shown:
            stats = dict_of(get(column.metrics, "latency_ms", batch))
            if num(stats.get("p50")) is not None:
                bars.append(
                    LatencyBar(
                        column.label if column is columns[0] else "result",
                        column.css,
                        num(stats["p50"]),
                        num(stats.get("p90")),
                        num(stats.get("p99")),
                    )
                )
        if bars:
            speedup = None if _is_profile(columns) else num(_result(columns).speedup.get(batch))
            panels.append(latency_panel(batch, bars, speedup))
    if not panels:
        return ""
    return (
        f'<section><h2>Latency per batch size</h2><p class="hint">Bars: median (p50) per call; '
        f"whisker: p90; dot or arrow: p99. Models timed interleaved in one process.</p>"
        f'<div class="panels">{"".join(panels)}</div></section>'
    )


def _serving_section(report: dict, columns: list[_Column]) -> str:
    """Every model in every serving mode (p50 and the paired speed-up over the baseline served plain),
    the lossless floor and what the result adds beyond it."""
    models = [columns[0]]
    compiled = dict_of(report.get("baseline_compiled"))
    if compiled:
        speedup = {str(b): num(get(s, "median")) for b, s in dict_of(compiled.get("speedup")).items()}
        models.append(_Column("baseline compiled", "m-base", dict_of(compiled.get("metrics")), speedup))
    models += columns[1:]
    modes = [str(m) for m in list_of(get(report, "spec", "benchmark", "serving")) if m != "plain"]
    modes = modes or sorted({str(m) for c in models for m in dict_of(c.metrics.get("serving"))})
    summary = dict_of(report.get("summary"))
    floor = dict_of(summary.get("lossless_floor"))
    if not modes and all((get(e, "model"), get(e, "mode")) == ("baseline", "plain") for e in floor.values()):
        return ""  # served plain only, and nothing lossless beats the baseline as uploaded
    batches = batch_keys(*(c.metrics.get("latency_ms") for c in models))
    rows = []
    for column in models:
        for mode in ["plain", *modes]:
            figures = column.metrics if mode == "plain" else dict_of(get(column.metrics, "serving", mode))
            label = [f'<span class="dot {column.css}"></span>{esc(column.label)}', esc(mode)]
            if mode != "plain" and figures.get("unavailable"):
                rows.append([*label, f'<span class="muted">not run: {esc(figures["unavailable"])}</span>'])
                continue
            if mode != "plain" and not figures:
                continue
            cells = []
            for batch in batches:
                p50 = get(figures, "latency_ms", batch, "p50")
                if mode == "plain":
                    ratio = column.speedup.get(batch)
                else:
                    ratio = num(get(figures, "speedup", batch, "median"))
                cells.append(
                    esc(fmt_ms(p50)) + (f' <span class="muted">{esc(fmt_ratio(ratio))}</span>' if ratio else "")
                )
            difference = "" if mode == "plain" else f"max |Δ| vs plain {fmt_float(figures.get('max_abs_difference'))}"
            rows.append(
                [
                    *label,
                    " · ".join(f"batch {b}: {c}" for b, c in zip(batches, cells))
                    + (f'<br><span class="muted">{esc(difference)}</span>' if difference else ""),
                ]
            )
    lines = []
    for batch in batch_keys(floor):
        entry = dict_of(floor[batch])
        text = (
            f"batch {batch}: lossless floor {fmt_ratio(entry.get('median'))} "
            f"({entry.get('model', '?')} served {entry.get('mode', '?')}, p50 {fmt_ms(entry.get('p50_ms'))})"
        )
        beyond = dict_of(get(summary, "beyond_floor", batch))
        if num(beyond.get("median")) is not None:
            interval = dict_of(beyond.get("interval"))
            spread = (
                f", interval {interval['low']:.2f}–{interval['high']:.2f}×"
                if num(interval.get("low")) is not None and num(interval.get("high")) is not None
                else ""
            )
            text += (
                f"; the result adds {fmt_ratio(beyond['median'])} beyond it, served {beyond.get('mode', '?')}{spread}"
            )
        lines.append(f"<li>{esc(text)}</li>")
    return (
        "<section><h2>Serving modes and the lossless floor</h2>"
        '<p class="hint">p50 per call, and the paired speed-up over the baseline served plain, for each way of '
        "serving each model, timed in the same interleaved rounds. The lossless floor is the fastest of them with "
        "no compression; a lossy result is credited only with what it adds beyond it.</p>"
        f"{_table(['model', 'mode', 'p50 · speed-up'], rows)}"
        + (f"<ul>{''.join(lines)}</ul>" if lines else "")
        + "</section>"
    )


def _stage_chart_section(columns: list[_Column]) -> str:
    if _is_profile(columns):
        return ""
    quality_name, key = _quality_axis(columns)
    if key is None:
        return ""
    shared = [
        b
        for b in batch_keys(*(c.metrics.get("latency_ms") for c in columns))
        if all(num(get(c.metrics, "latency_ms", b, "p50")) is not None for c in columns)
    ]
    if not shared:
        return ""
    batch = shared[-1]
    points = [
        StagePoint(c.label, c.css, num(get(c.metrics, "latency_ms", batch, "p50")), num(get(c.metrics, *key)))
        for c in columns
    ]
    return (
        f"<section><h2>Quality against latency, stage by stage</h2>"
        f'<p class="hint">Each step of the pipeline moves the model on this plane; up and to the left is better.</p>'
        f"{quality_latency_scatter(points, quality_name, batch)}</section>"
    )


def _quality_axis(columns: list[_Column]) -> tuple[str, tuple[str, str] | None]:
    for name, key in (
        ("top-1 accuracy", ("accuracy", "top1")),
        ("top-1 agreement", ("fidelity", "top1_agreement")),
        ("cosine mean", ("fidelity", "cosine_mean")),
    ):
        if all(num(get(c.metrics, *key)) is not None for c in columns):
            return name, key
    return "", None


# --- tables ---------------------------------------------------------------------------------------


def _table(head: list[str] | None, rows: list[list[str]], css: str = "") -> str:
    header = "<thead><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr></thead>" if head else ""
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f'<div class="scroll"><table class="{css}">{header}<tbody>{body}</tbody></table></div>'


def _metrics_section(columns: list[_Column]) -> str:
    batches = batch_keys(*(c.metrics.get("latency_ms") for c in columns))

    def row(label: str, cell) -> list[str]:
        return [esc(label)] + [cell(c) for c in columns]

    rows = [
        row("file size", lambda c: esc(fmt_bytes(c.metrics.get("size_bytes")))),
        row("deflated size", lambda c: esc(fmt_bytes(c.metrics.get("compressed_size_bytes")))),
        row("parameters", lambda c: esc(fmt_count(c.metrics.get("parameters")))),
        row("non-zero parameters", lambda c: _with_density(c.metrics)),
        row("buffers", lambda c: esc(fmt_bytes(c.metrics.get("buffers_bytes")))),
        row("MACs per sample", lambda c: esc(fmt_count(c.metrics.get("macs")))),
    ]
    for batch in batches:
        rows.append(row(f"latency at batch {batch}", lambda c, b=batch: _latency_cell(c.metrics, b)))
        rows.append(
            row(
                f"throughput at batch {batch}",
                lambda c, b=batch: esc(_throughput(get(c.metrics, "throughput_per_s", b))),
            )
        )
        if not _is_profile(columns):
            rows.append(
                row(
                    f"speed-up at batch {batch}",
                    lambda c, b=batch: esc(fmt_ratio(c.speedup.get(b))) if c.speedup.get(b) is not None else DASH,
                )
            )
    rows += [
        row("peak memory", lambda c: esc(fmt_bytes(c.metrics.get("peak_memory_bytes")))),
        row("top-1 accuracy", lambda c: esc(fmt_percent(get(c.metrics, "accuracy", "top1")))),
    ]
    if not _is_profile(columns):  # a lone baseline's fidelity is to itself
        rows += [
            row("top-1 agreement", lambda c: esc(fmt_percent(get(c.metrics, "fidelity", "top1_agreement")))),
            row(
                "cosine min / mean",
                lambda c: esc(
                    f"{_cosine(get(c.metrics, 'fidelity', 'cosine_min'))} / "
                    f"{_cosine(get(c.metrics, 'fidelity', 'cosine_mean'))}"
                ),
            ),
            row("max |error|", lambda c: esc(fmt_float(get(c.metrics, "fidelity", "max_abs_error")))),
        ]
    head = ["metric"] + [
        f'<span class="dot {c.css}"></span>{esc(c.label)}{" (result)" if c.is_result else ""}' for c in columns
    ]
    return f"<section><h2>Metrics</h2>{_table(head, rows, 'metrics')}</section>"


def _cosine(value: Any) -> str:
    n = num(value)
    return DASH if n is None else trimmed(n, 6)


def _with_density(metrics: dict) -> str:
    nonzero, total = num(metrics.get("nonzero_parameters")), num(metrics.get("parameters"))
    if nonzero is None:
        return DASH
    density = f' <span class="muted">({fmt_percent(nonzero / total, 1)})</span>' if total else ""
    return esc(fmt_count(nonzero)) + density


def _latency_cell(metrics: dict, batch: str) -> str:
    stats = dict_of(get(metrics, "latency_ms", batch))
    if num(stats.get("p50")) is None:
        return DASH
    return (
        f'{esc(fmt_ms(stats["p50"]))} <span class="muted">p90 {esc(fmt_ms(stats.get("p90")))} · '
        f"p99 {esc(fmt_ms(stats.get('p99')))} · n={esc(stats.get('iterations', '?'))}</span>"
    )


def _throughput(value: Any) -> str:
    n = num(value)
    return DASH if n is None else f"{fmt_count(n)}/s"


def _layers_section(report: dict) -> str:
    blocks = []
    for index, stage in enumerate(list_of(report.get("stages")), 1):
        details = dict_of(get(stage, "details"))
        layers = [layer for layer in list_of(details.get("layers")) if isinstance(layer, dict)]
        skipped = [s for s in list_of(details.get("skipped")) if isinstance(s, dict)]
        if not layers and not skipped:
            continue
        title = f"{index} · {get(stage, 'op') or 'step'}"
        block = [f'<h3>{esc(title)} <span class="muted">{len(layers)} layers, {len(skipped)} skipped</span></h3>']
        rows = [_layer_row(layer) for layer in layers]
        charted = [r for r in rows if r.sparsity is not None or r.precision]
        if charted:
            block.append(layer_bars(charted[:_MAX_CHART_LAYERS], f"per-layer sparsity and precision, stage {title}"))
            if len(charted) > _MAX_CHART_LAYERS:
                block.append(f'<p class="hint">… and {len(charted) - _MAX_CHART_LAYERS} more layers in the table.</p>')
        if layers:
            block.append(_free_table(layers))
        if skipped:
            block.append(
                "<h4>Skipped layers</h4>"
                + _table(
                    ["module", "reason"],
                    [[f"<code>{esc(s.get('module', DASH))}</code>", esc(s.get("reason", DASH))] for s in skipped],
                )
            )
        blocks.append(f'<div class="stage">{"".join(block)}</div>')
    if not blocks:
        return ""
    return f"<section><h2>Layers, stage by stage</h2>{''.join(blocks)}</section>"


def _layer_row(layer: dict) -> LayerRow:
    module = str(layer.get("module") or layer.get("name") or layer.get("layer") or "?")
    sparsity = next((num(layer[k]) for k in _SPARSITY_KEYS if num(layer.get(k)) is not None), None)
    if sparsity is None:
        sparsity = _shrink_fraction(layer)
    precision = next((str(layer[k]) for k in _PRECISION_KEYS if isinstance(layer.get(k), str) and layer[k]), None)
    if precision is None and num(layer.get("bits")) is not None:
        precision = f"{int(layer['bits'])}-bit"
    return LayerRow(module, sparsity, precision)


def _shrink_fraction(layer: dict) -> float | None:
    """1 − after/before for the first `X_before` / `X_after` pair (channels, parameters…)."""
    for key, before in layer.items():
        if isinstance(key, str) and key.endswith("_before"):
            after = num(layer.get(key[: -len("_before")] + "_after"))
            before = num(before)
            if after is not None and before:
                return 1 - after / before
    return None


def _free_table(layers: list[dict]) -> str:
    keys: list[str] = []
    for layer in layers:
        keys += [k for k in layer if k not in keys]
    keys.sort(key=lambda k: 0 if k in ("module", "name", "layer") else 1)
    rows = []
    for layer in layers:
        row = []
        for key in keys:
            value = layer.get(key)
            if key in _PRECISION_KEYS and isinstance(value, str):
                row.append(f'<span class="chip-inline {precision_class(value)}">{esc(value)}</span>')
            elif key in ("module", "name", "layer"):
                row.append(f"<code>{esc(fmt_value(value))}</code>")
            else:
                row.append(esc(fmt_value(value)))
        rows.append(row)
    return _table([esc(k) for k in keys], rows, "layers")


def _macs_section(columns: list[_Column]) -> str:
    ops: list[str] = []
    for column in columns:
        ops += [op for op in dict_of(column.metrics.get("macs_by_operator")) if op not in ops]
    uncounted = sorted({str(op) for c in columns for op in list_of(c.metrics.get("macs_uncounted"))})
    if not ops and not uncounted:
        return ""
    rows = [
        [f"<code>{esc(op)}</code>"] + [esc(fmt_count(get(c.metrics, "macs_by_operator", op))) for c in columns]
        for op in ops
    ]
    head = ["operator"] + [esc(c.label) for c in columns]
    warning = ""
    if uncounted:
        warning = (
            '<p class="warn">Not counted (no counting rule; the MAC totals leave them out): '
            + ", ".join(f"<code>{esc(op)}</code>" for op in uncounted)
            + "</p>"
        )
    return (
        f'<section><h2>MACs by operator</h2><p class="hint">Multiply-accumulates of one sample, read off a '
        f"forward pass of the TorchScript graph.</p>{_table(head, rows)}{warning}</section>"
    )


def _notes_section(report: dict) -> str:
    notes = [str(n) for n in list_of(report.get("notes")) if n]
    if not notes:
        return ""
    return "<section><h2>Notes</h2><ul>" + "".join(f"<li>{esc(n)}</li>" for n in notes) + "</ul></section>"


def _environment_section(report: dict) -> str:
    environment = dict_of(report.get("environment"))
    rows = [[esc(key), esc(fmt_value(value))] for key, value in environment.items()]
    spec = report.get("spec")
    spec_html = ""
    if spec is not None:
        spec_html = (
            f"<details><summary>Job spec</summary><pre>{esc(json.dumps(spec, indent=2, default=str))}</pre></details>"
        )
    if not rows and not spec_html:
        return ""
    table = _table(None, rows, "environment") if rows else ""
    return f"<section><h2>Environment</h2>{table}{spec_html}</section>"


# The page frame and its style, shared by the job and the search reports.
PAGE = Template("""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'; img-src data:">
<title>$title</title>
<style>$style</style>
</head>
<body>
<main>
$body
</main>
<footer>$footer</footer>
</body>
</html>
""")

STYLE = """
:root { --ink:#1f2937; --muted:#6b7280; --line:#e5e7eb; --panel:#f8fafc; --base:#94a3b8; --result:#2563eb;
  --s1:#0d9488; --s2:#d97706; --s3:#7c3aed; --s4:#db2777; --ok:#047857; --bad:#b91c1c; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--ink); background: #fff;
  font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1080px; margin: 0 auto; padding: 32px 24px 16px; }
footer { max-width: 1080px; margin: 0 auto; padding: 8px 24px 32px; color: var(--muted); font-size: 13px; }
header { border-bottom: 1px solid var(--line); padding-bottom: 16px; margin-bottom: 20px; }
.eyebrow { margin: 0; text-transform: uppercase; letter-spacing: .08em; font-size: 12px; color: var(--muted); }
h1.headline { margin: 6px 0 8px; font-size: 30px; line-height: 1.2; font-weight: 650; }
h2 { font-size: 19px; margin: 0 0 4px; }
h3 { font-size: 16px; margin: 18px 0 8px; }
h4 { font-size: 14px; margin: 14px 0 6px; color: var(--muted); }
section { margin: 28px 0; }
.meta, .recipe { margin: 2px 0; color: var(--muted); }
.recipe { color: var(--ink); font-weight: 500; }
code { font: 12.5px/1.4 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
.hint { color: var(--muted); font-size: 13px; margin: 0 0 10px; }
.muted { color: var(--muted); font-size: 12.5px; }
.warn { background: #fef3c7; border: 1px solid #fcd34d; padding: 8px 12px; border-radius: 6px; font-size: 13.5px; }
.targets { margin: 10px 0 0; display: flex; flex-wrap: wrap; gap: 8px; }
.badge { font-size: 13px; padding: 3px 10px; border-radius: 999px; border: 1px solid; }
.badge.ok { color: var(--ok); border-color: #a7f3d0; background: #ecfdf5; }
.badge.bad { color: var(--bad); border-color: #fecaca; background: #fef2f2; }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(160px, 1fr)); gap: 12px; }
.card { background: var(--panel); border: 1px solid var(--line); border-radius: 10px; padding: 12px 14px; }
.card-title { font-size: 12px; text-transform: uppercase; letter-spacing: .06em; color: var(--muted); }
.card-value { font-size: 24px; font-weight: 650; margin: 2px 0; }
.card-detail { font-size: 12.5px; color: var(--muted); }
.panels { display: flex; flex-wrap: wrap; gap: 16px; }
svg.chart { max-width: 100%; height: auto; font-size: 11px; overflow: visible; }
svg .grid { stroke: var(--line); stroke-width: 1; }
svg .tick { fill: var(--muted); font-size: 11px; }
svg .value { fill: var(--ink); font-size: 11px; font-weight: 600; }
svg .panel-title { fill: var(--ink); font-size: 13px; font-weight: 600; }
svg .axis-label { fill: var(--muted); font-size: 12px; }
svg .point-label { fill: var(--ink); font-size: 12px; }
svg .layer-name { fill: var(--ink); font: 11.5px ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
svg .whisker { stroke: var(--ink); stroke-width: 1.4; }
svg .p99 { fill: var(--ink); }
svg .trail { fill: none; stroke: var(--muted); stroke-width: 1.5; stroke-dasharray: 4 3; }
svg .track { fill: #f1f5f9; }
svg .sparsity { fill: var(--s1); }
svg .chip-text { fill: #fff; font-size: 10.5px; font-weight: 600; }
.m-base { fill: var(--base); background: var(--base); }
.m-result { fill: var(--result); background: var(--result); }
.m-stage1 { fill: var(--s1); background: var(--s1); }
.m-stage2 { fill: var(--s2); background: var(--s2); }
.m-stage3 { fill: var(--s3); background: var(--s3); }
.m-stage4 { fill: var(--s4); background: var(--s4); }
.p-f32 { fill: #64748b; background: #64748b; } .p-f16 { fill: #0891b2; background: #0891b2; }
.p-bf16 { fill: #0e7490; background: #0e7490; } .p-int8 { fill: #2563eb; background: #2563eb; }
.p-int4 { fill: #7c3aed; background: #7c3aed; } .p-bin { fill: #ea580c; background: #ea580c; }
.p-other { fill: #374151; background: #374151; }
.chip-inline { color: #fff; border-radius: 999px; padding: 1px 8px; font-size: 12px; font-weight: 600; }
.dot { display: inline-block; width: 10px; height: 10px; border-radius: 50%; margin-right: 6px; vertical-align: baseline; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; width: 100%; font-size: 13.5px; margin: 6px 0; }
th, td { text-align: left; padding: 6px 10px; border-bottom: 1px solid var(--line); vertical-align: top; }
th { font-weight: 600; background: var(--panel); white-space: nowrap; }
table.metrics td:first-child { color: var(--muted); white-space: nowrap; }
table.layers td { white-space: nowrap; }
table.environment td:first-child { color: var(--muted); width: 160px; }
.stage { border-top: 1px solid var(--line); margin-top: 10px; }
details { margin-top: 12px; }
summary { cursor: pointer; color: var(--muted); }
pre { background: var(--panel); border: 1px solid var(--line); border-radius: 8px; padding: 12px; overflow-x: auto;
  font: 12.5px/1.45 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
@media print { main { padding: 0; } .card, pre { break-inside: avoid; } section { break-inside: avoid-page; } }
"""
