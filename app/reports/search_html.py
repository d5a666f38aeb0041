"""A search's report as one self-contained HTML page: the front chart, the pick, and every trial.

Same page, styles and escaping as the job report (app.reports.html); nothing is fetched.
"""

from __future__ import annotations

from typing import Any

from app.reports.charts import FrontPoint, front_scatter
from app.reports.format import dict_of, esc, fmt_bytes, fmt_count, fmt_ms, fmt_percent, fmt_ratio, get, list_of, num
from app.reports.html import PAGE, STYLE, step_label

_EXTRA_STYLE = """
svg .pick-ring { fill: none; stroke: var(--result); stroke-width: 2; }
svg .limit { stroke: var(--bad); stroke-width: 1.2; stroke-dasharray: 6 4; }
tr.pick td { background: #eff6ff; font-weight: 600; }
"""


def _recipe(steps: Any) -> str:
    labels = [step_label(step) for step in list_of(steps) if isinstance(step, dict)]
    return " → ".join(labels) or "no steps (the uploaded model)"


def render_search_html(report: dict) -> str:
    """Render a search report (GET /v1/searches/{id}/report) as one HTML page.

    Args:
        report: the report dict; any field may be missing or null (a running search's is partial).

    Returns:
        The page, with the front as an inline SVG chart and a table of trials linking to their jobs.

    Example:
        Path("search.html").write_text(render_search_html(client.get_search_report(search_id)))
    """
    report = dict_of(report)
    sections = [_header(report), _front_section(report), _trials_section(report)]
    name = report.get("name") or report.get("search_id") or "search"
    return PAGE.substitute(
        title=esc(f"Compactor search · {name}"),
        style=STYLE + _EXTRA_STYLE,
        body="".join(s for s in sections if s),
        footer=esc(f"Compactor · search {report.get('search_id')}"),
    )


def _quality_name(report: dict) -> str:
    return "accuracy" if get(report, "constraints", "max_accuracy_drop") is not None else "fidelity"


def _header(report: dict) -> str:
    progress = dict_of(report.get("progress"))
    chosen = report.get("pick") or report.get("closest")
    if report.get("feasible") is True and chosen:
        figures = dict_of(chosen.get("figures"))
        headline = (
            f"Pick: {_recipe(chosen.get('steps'))} — {fmt_ratio(figures.get('speedup'))} faster, "
            f"accuracy drop {fmt_percent(figures.get('accuracy_drop'))}"
            if figures.get("accuracy_drop") is not None
            else f"Pick: {_recipe(chosen.get('steps'))} — {fmt_ratio(figures.get('speedup'))} faster"
        )
    elif report.get("feasible") is False:
        headline = "No candidate met every constraint: the closest is kept"
    else:
        headline = f"Search {report.get('status', '')}: {progress.get('trials_done', 0)} of {progress.get('trials_planned', 0)} trials done"
    constraints = dict_of(report.get("constraints"))
    limits = []
    if constraints.get("max_accuracy_drop") is not None:
        kind = "relative" if constraints.get("relative") else "absolute points"
        limits.append(f"max accuracy drop {fmt_percent(constraints['max_accuracy_drop'])} ({kind})")
    if constraints.get("min_fidelity") is not None:
        limits.append(f"min fidelity {constraints['min_fidelity']}")
    if constraints.get("max_latency_ms") is not None:
        limits.append(
            f"max latency {fmt_ms(constraints['max_latency_ms'])} at batch {constraints.get('latency_batch_size')}"
        )
    if constraints.get("max_size_bytes") is not None:
        limits.append(f"max size {fmt_bytes(constraints['max_size_bytes'])}")
    objective = dict_of(report.get("objective"))
    lines = [
        f'<p class="eyebrow">Compactor search · {esc(report.get("status"))}</p>',
        f'<h1 class="headline">{esc(headline)}</h1>',
        f'<p class="meta">Constraints: {esc("; ".join(limits) or "none")}. Objective: {esc(objective.get("metric"))}'
        f" at batch {esc(objective.get('batch_size'))}. Trials: {esc(progress.get('trials_done'))} done, "
        f"{esc(progress.get('trials_pruned'))} stopped early by their prefix, "
        f"{esc(progress.get('trials_not_timed') or 0)} not timed (their quality pass missed).</p>",
    ]
    if report.get("stopped_by_time"):
        lines.append('<p class="warn">The time budget ended the search: the best candidate found so far is kept.</p>')
    return f"<header>{''.join(lines)}</header>"


def _front_section(report: dict) -> str:
    batch = str(get(report, "objective", "batch_size") or 1)
    chosen = report.get("pick") or report.get("closest")
    picked = chosen.get("number") if isinstance(chosen, dict) else None
    front = set(list_of(report.get("front")))
    quality_key = "accuracy" if _quality_name(report) == "accuracy" else "fidelity"
    points = []
    for trial in list_of(report.get("trials")):
        figures = dict_of(get(trial, "figures"))
        latency, quality = num(figures.get("latency_ms")), num(figures.get(quality_key))
        if get(trial, "role") == "verify" or latency is None or quality is None:
            continue
        points.append(
            FrontPoint(
                label=f"#{trial.get('number')}",
                latency_ms=latency,
                quality=quality,
                size_bytes=num(figures.get("size_bytes")) or 1.0,
                on_front=trial.get("number") in front,
                picked=trial.get("number") == picked,
                feasible=bool(trial.get("feasible")),
            )
        )
    if not points:
        return ""
    limit = None
    baseline_quality = num(get(report, "baseline", "accuracy"))
    drop = num(get(report, "constraints", "max_accuracy_drop"))
    if quality_key == "accuracy" and baseline_quality is not None and drop is not None:
        limit = baseline_quality * (1 - drop) if get(report, "constraints", "relative") else baseline_quality - drop
    elif quality_key == "fidelity":
        limit = num(get(report, "constraints", "min_fidelity"))
    chart = front_scatter(points, quality_key, batch, limit)
    return (
        "<section><h2>The front</h2>"
        f'<p class="hint">Each trial at its p50 latency and {esc(quality_key)}; joined: the Pareto front '
        "(no other trial is both faster and better); ringed: the pick.</p>"
        f'<div class="scroll">{chart}</div></section>'
    )


def _trials_section(report: dict) -> str:
    chosen = report.get("pick") or report.get("closest")
    picked = chosen.get("number") if isinstance(chosen, dict) else None
    front = set(list_of(report.get("front")))
    rows = []
    for trial in list_of(report.get("trials")):
        trial = dict_of(trial)
        figures = dict_of(trial.get("figures"))
        job = trial.get("job_id")
        link = f'<a href="/v1/jobs/{esc(job)}/report.html">{esc(str(job)[:8])}</a>' if job else "—"
        status = (
            (trial.get("pruned") and "stopped early")
            or (trial.get("stopped_early") and "not timed: misses the constraint")
            or trial.get("status")
        )
        marks = " ".join(
            m for m, on in (("pick", trial.get("number") == picked), ("front", trial.get("number") in front)) if on
        )
        recipe = (
            "re-check of the pick on its reloaded artifact"
            if trial.get("role") == "verify"
            else _recipe(trial.get("steps"))
        )
        css = ' class="pick"' if trial.get("number") == picked else ""
        rows.append(
            f"<tr{css}><td>{esc(trial.get('number'))}</td><td>{esc(recipe)}</td><td>{esc(status)}</td>"
            f"<td>{esc(fmt_percent(figures.get('accuracy')) if figures.get('accuracy') is not None else '—')}</td>"
            f"<td>{esc(figures.get('fidelity') if figures.get('fidelity') is not None else '—')}</td>"
            f"<td>{esc(fmt_ms(figures.get('latency_ms')))}</td><td>{esc(fmt_ratio(figures.get('speedup')))}</td>"
            f"<td>{esc(fmt_bytes(figures.get('size_bytes')))}</td><td>{esc(fmt_count(figures.get('macs')))}</td>"
            f"<td>{esc(marks)}</td><td>{link}</td></tr>"
        )
    head = "".join(
        f"<th>{h}</th>"
        for h in ("#", "recipe", "status", "accuracy", "fidelity", "p50", "speed-up", "size", "MACs", "", "job")
    )
    return (
        "<section><h2>Trials</h2>"
        '<p class="hint">Every trial is an ordinary job: its link opens the job\'s own report, and its spec '
        "replays as a plain POST /v1/jobs.</p>"
        f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table></div></section>'
    )
