"""Accuracy-aware searches: create (idempotently), read, list, cancel, and advance.

A search is advanced by `advance`: whenever one of its jobs ends (the notifier, sent by the job's
final transition), when it is created, and by every worker's sweeper as a backstop. Each advance
locks the search's row, rebuilds the trials from their jobs, proposes and queues the next ones
(app.services.search_strategy), and once the budget is spent or the space explored picks the best
candidate, re-checks it in a job of its own (the artifact loaded from its file, in the sandbox),
and stores the result. Trials are ordinary jobs created through app.services.jobs.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from datetime import timedelta

from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session, undefer

from app import queue
from app.db import after_commit, unit_of_work
from app.errors import Conflict, InvalidInput, NotFound
from app.models import CompressionJob, Search, UploadedModel
from app.models.base import utcnow
from app.models.job import ACTIVE_STATUSES, FINAL_STATUSES, JobStatus
from app.schemas.job import JobSpec
from app.schemas.search import SearchSpec
from app.services import idempotency, jobs, lifecycle
from app.services.models import get_model
from app.services.pagination import paginate
from app.services.search_space import Candidate, Space, hopeless, resolve_space

log = logging.getLogger(__name__)

FLOOR, CANDIDATE = "floor", "candidate"
CHECK_ITERATIONS = 5  # the fewest timing iterations a job's benchmark accepts


def _spec_hash(spec: SearchSpec) -> str:
    return hashlib.sha256(json.dumps(spec.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


def trial_spec(spec: SearchSpec, steps: list[dict], name: str) -> dict:
    """The plain job spec of a trial: POST it to /v1/jobs to replay the trial."""
    batches = sorted({spec.objective.batch_size, spec.constraints.latency_batch_size})
    target = {}
    if spec.constraints.max_accuracy_drop is not None and not spec.constraints.relative:
        target["max_accuracy_drop"] = spec.constraints.max_accuracy_drop
    if spec.constraints.min_fidelity is not None:
        target["min_fidelity"] = spec.constraints.min_fidelity
    if target:
        # the cheap proxy: a trial whose accuracy (or fidelity) pass already misses is not timed
        target["stop_early"] = True
    raw = {
        "model_id": spec.model_id,
        "name": name[:255],
        "calibration_dataset_id": spec.calibration_dataset_id,
        "eval_dataset_id": spec.eval_dataset_id,
        "input_spec": [item.model_dump(mode="json") for item in spec.input_spec] if spec.input_spec else None,
        "steps": steps,
        # the floor trial times the floor; the others time the baseline (to pair with) and their result
        "benchmark": {
            "device": "cpu",
            "batch_sizes": batches,
            "time_stages": False,
            **spec.benchmark.model_dump(mode="json"),
        },
        "target": target or None,
        "seed": spec.seed,
    }
    return JobSpec.model_validate(raw).model_dump(mode="json")


def create_search(session: Session, tenant: str, spec: SearchSpec, idempotency_key: str | None) -> tuple[Search, bool]:
    """Store a queued search and start advancing it once committed; returns (search, created).

    With an `idempotency_key`, the same key and spec return the existing search; another spec is a 409.
    """
    spec_hash = _spec_hash(spec)
    existing = idempotency.stored(session, Search, tenant, idempotency_key, spec_hash, "search")
    if existing is not None:
        return existing, False
    model = get_model(session, tenant, spec.model_id)
    space = resolve_space(spec, model.summary)
    if not space.candidates():
        raise InvalidInput(
            "the space has no candidate: give prune_amounts or quantize_schemes, or leave compile on",
            code="search_space_empty",
        )
    # Every trial's spec passes the job rules: checked once here on the longest candidate.
    longest = space.steps(space.candidates()[-1])
    try:
        probe = JobSpec.model_validate(trial_spec(spec, longest, "probe"))
    except ValidationError as exc:
        raise InvalidInput(
            f"the search's trials would be refused as jobs: {exc.errors()[0]['msg']}",
            code="invalid_search_spec",
            errors=[{"loc": ["body", *e["loc"]], "msg": e["msg"]} for e in exc.errors()],
        ) from None
    jobs.check_spec(session, tenant, probe)
    search = Search(
        tenant=tenant,
        name=spec.name,
        model_id=spec.model_id,
        spec=spec.model_dump(mode="json"),
        spec_hash=spec_hash,
        idempotency_key=idempotency_key,
        status=JobStatus.QUEUED,
        progress=_progress("queued", 0, min(spec.budget.max_trials, len(space.candidates())), 0, 0),
        state={"trials": []},
    )
    search, created = idempotency.insert(session, search, "search")
    if not created:
        return search, False
    search_id = search.id
    log.info("search %s created", search_id)
    after_commit(session, lambda: dispatch_advance(search_id))
    return search, True


def dispatch_advance(search_id: str) -> None:
    """Ask the notifier to advance a search now; when the broker refuses, the sweepers do it."""
    queue.send(queue.ADVANCE_SEARCH, search_id)


def get_search(session: Session, tenant: str, search_id: str, with_result: bool = False) -> Search:
    query = select(Search).where(Search.id == search_id)
    if with_result:
        query = query.options(undefer(Search.result))
    search = session.scalar(query)
    if search is None or search.tenant != tenant:
        raise NotFound(f"search {search_id} does not exist", code="search_not_found")
    return search


def list_searches(session: Session, tenant: str, limit: int, cursor: str | None, status: str | None):
    query = select(Search).where(Search.tenant == tenant)
    if status:
        query = query.where(Search.status == status)
    return paginate(session, query, Search, limit, cursor)


def cancel_search(session: Session, tenant: str, search_id: str) -> Search:
    """Cancel a queued or running search and every trial it has queued or running; a finished
    search is returned unchanged."""
    search = session.scalar(select(Search).where(Search.id == search_id).with_for_update())
    if search is None or search.tenant != tenant:
        raise NotFound(f"search {search_id} does not exist", code="search_not_found")
    if search.status in FINAL_STATUSES:
        return search
    _cancel_trials(session, search_id)
    search.status = JobStatus.CANCELED
    search.finished_at = utcnow()
    search.progress = {**search.progress, "stage": "canceled", "trials_running": 0, "message": "canceled by request"}
    search.revision += 1
    return search


def _cancel_trials(session: Session, search_id: str) -> int:
    active = session.scalars(
        select(CompressionJob.id).where(
            CompressionJob.search_id == search_id, CompressionJob.status.in_(ACTIVE_STATUSES)
        )
    ).all()
    return sum(lifecycle.cancel(session, job_id) for job_id in active)


def get_result(session: Session, tenant: str, search_id: str) -> dict:
    """The search's report: every trial, the front, the pick; partial while it runs."""
    search = get_search(session, tenant, search_id, with_result=True)
    return {
        "search_id": search.id,
        "name": search.name,
        "status": search.status,
        "progress": search.progress,
        "spec": search.spec,
        **(search.result or _empty_result()),
    }


def _empty_result() -> dict:
    return {"baseline": None, "trials": [], "front": [], "pick": None, "feasible": None, "closest": None}


def get_artifact(session: Session, tenant: str, search_id: str) -> tuple[str, int]:
    """The (sha256, size) of the search's artifact: the pick's, or the closest candidate's when infeasible."""
    search = get_search(session, tenant, search_id, with_result=True)
    chosen = (search.result or {}).get("pick") or (search.result or {}).get("closest")
    if search.status != JobStatus.SUCCEEDED or not chosen:
        raise Conflict(
            f"search {search_id} is {search.status}: its artifact exists once it has succeeded",
            code="search_not_succeeded",
        )
    return jobs.get_artifact(session, tenant, chosen["job_id"])


# ---- advancing ---------------------------------------------------------------------------------


def advance(search_id: str) -> None:
    """Advance one search in a transaction of its own (safe to call from any process, any time)."""
    with unit_of_work() as session:
        _advance(session, search_id)


def advance_active() -> int:
    """The sweepers' backstop: advance every queued or running search; returns how many."""
    with unit_of_work() as session:
        ids = session.scalars(select(Search.id).where(Search.status.in_(ACTIVE_STATUSES))).all()
    for search_id in ids:
        try:
            advance(search_id)
        except Exception:
            log.exception("advancing search %s failed; the next sweep retries", search_id)
    return len(ids)


def _advance(session: Session, search_id: str) -> None:
    # The row lock serialises advancers: two processes never both queue the next trials.
    search = session.scalar(
        select(Search).options(undefer(Search.result)).where(Search.id == search_id).with_for_update()
    )
    if search is None or search.status in FINAL_STATUSES:
        return
    spec = SearchSpec.model_validate(search.spec)
    model = session.get(UploadedModel, spec.model_id)
    space = resolve_space(spec, model.summary if model else None)
    state = copy.deepcopy(search.state) or {"trials": []}
    now = utcnow()
    status_before = search.status
    if search.status == JobStatus.QUEUED:
        search.status, search.started_at = JobStatus.RUNNING, now
    by_id = {
        job.id: job
        for job in session.scalars(
            select(CompressionJob).options(undefer(CompressionJob.report)).where(CompressionJob.search_id == search_id)
        )
    }
    trials = _evaluate(spec, state["trials"], by_id)
    out_of_time = now >= search.started_at + timedelta(seconds=spec.budget.time_limit_s)
    phase = state.get("phase", "exploring")
    if phase == "exploring":
        if out_of_time:
            stopped = _cancel_trials(session, search_id)
            state["stopped_by_time"] = True
            log.info("search %s: time limit reached, %d running trial(s) canceled", search_id, stopped)
            by_id = {**by_id, **_refreshed(session, search_id)}
            trials = _evaluate(spec, state["trials"], by_id)
        else:
            _schedule(session, search, spec, space, state, trials)
            by_id = _refreshed(session, search_id)
            trials = _evaluate(spec, state["trials"], by_id)
            if _check_early(session, search, spec, state, trials, by_id):
                by_id = _refreshed(session, search_id)
                trials = _evaluate(spec, state["trials"], by_id)
        if not any(t["status"] in ACTIVE_STATUSES for t in trials):
            phase = state["phase"] = "picking"
    if phase in ("picking", "verifying"):
        _pick(session, search, spec, state, trials, by_id, out_of_time)
    result = _result(spec, state, trials)
    progress = _progress_of(search, spec, space, state, trials)
    # The sweepers advance every running search every few seconds: only a change is written.
    if (state, result, progress) != (search.state, search.result, search.progress) or search.status != status_before:
        search.state, search.result, search.progress = state, result, progress
        search.revision += 1


def _refreshed(session: Session, search_id: str) -> dict[str, CompressionJob]:
    session.flush()
    session.expire_all()
    return {
        job.id: job
        for job in session.scalars(
            select(CompressionJob).options(undefer(CompressionJob.report)).where(CompressionJob.search_id == search_id)
        )
    }


def _schedule(
    session: Session, search: Search, spec: SearchSpec, space: Space, state: dict, trials: list[dict]
) -> None:
    """Stop hopeless candidates, then queue new trials into the free slots."""
    from app.services.search_strategy import Finished, propose

    finished = [
        Finished(
            Candidate.from_params(t["params"]),
            t["quality"],
            t["objective"],
            {name: value for name, value in t["violations"].items()},
        )
        for t in trials
        if t["status"] in (JobStatus.SUCCEEDED, JobStatus.FAILED) and t["role"] != "verify"
    ]
    violated = {
        Candidate.from_params(t["params"]): t["violations"].get("quality", 0.0)
        for t in trials
        if t["status"] == JobStatus.SUCCEEDED and t["role"] != "verify"
    }
    tried = {Candidate.from_params(t["params"]) for t in state["trials"] if t["role"] != "verify"}
    for candidate in space.candidates():
        if candidate in tried:
            continue
        ancestor = hopeless(candidate, violated)
        if ancestor is not None:
            state["trials"].append(
                {
                    "number": len(state["trials"]),
                    "role": CANDIDATE,
                    "params": candidate.params,
                    "steps": space.steps(candidate),
                    "job_id": None,
                    "pruned": f"stopped early: its prefix ({ancestor.key}) already misses the accuracy "
                    "constraint, and the steps it adds cannot win accuracy back",
                }
            )
            tried.add(candidate)
    run = [t for t in state["trials"] if t["job_id"] and t["role"] != "verify"]
    running = sum(1 for t in trials if t["status"] in ACTIVE_STATUSES)
    slots = min(spec.budget.parallel - running, spec.budget.max_trials - len(run))
    if slots <= 0:
        return
    stopped = {Candidate.from_params(t["params"]) for t in state["trials"] if t.get("pruned")}
    for candidate in propose(space, finished, tried - stopped, stopped, slots, spec.seed):
        number = len(state["trials"])
        role = FLOOR if candidate.lossless else CANDIDATE
        steps = space.steps(candidate)
        job = _queue_trial(session, search, spec, steps, f"{search.name or 'search'} · trial {number}", number)
        state["trials"].append(
            {"number": number, "role": role, "params": candidate.params, "steps": steps, "job_id": job.id}
        )


def _queue_trial(
    session: Session, search: Search, spec: SearchSpec, steps: list[dict], name: str, number
) -> CompressionJob:
    job_spec = JobSpec.model_validate(trial_spec(spec, steps, name))
    # Keyed per trial, so an advance that is retried after a crash finds the job it had made.
    job, _ = jobs.create_job(session, search.tenant, job_spec, f"search:{search.id}:{number}", search_id=search.id)
    return job


def _evaluate(spec: SearchSpec, stored: list[dict], by_id: dict[str, CompressionJob]) -> list[dict]:
    """Each stored trial with its job's status and measured figures."""
    evaluated = []
    for trial in stored:
        job = by_id.get(trial["job_id"]) if trial["job_id"] else None
        status = "pruned" if trial.get("pruned") else (job.status if job is not None else JobStatus.QUEUED)
        figures = trial_figures(spec, job.report) if job is not None and job.status == JobStatus.SUCCEEDED else None
        evaluated.append(
            {
                **trial,
                "status": status,
                "error": job.error if job is not None else None,
                "figures": figures,
                "quality": figures["quality"] if figures else None,
                "objective": figures["objective"] if figures else None,
                "violations": violations(spec, figures) if figures else {},
                "stopped_early": figures["stopped_early"] if figures else None,
                "job_spec": job.spec if job is not None else None,
            }
        )
    return evaluated


def trial_figures(spec: SearchSpec, report: dict | None) -> dict | None:
    """A trial's accuracy, fidelity, latency, size and MACs from its job's report; its quality
    (what the constraint holds: accuracy, or fidelity without labels) and objective (lower wins)."""
    if not report:
        return None
    result, baseline, summary = report.get("result") or {}, report.get("baseline") or {}, report.get("summary") or {}
    batch = str(spec.objective.batch_size)
    latency = ((result.get("latency_ms") or {}).get(batch) or {}).get("p50")
    limit_batch = str(spec.constraints.latency_batch_size)
    speedup = (summary.get("speedup") or {}).get(batch)
    accuracy = (result.get("accuracy") or {}).get("top1")
    baseline_accuracy = (baseline.get("accuracy") or {}).get("top1")
    fidelity = result.get("fidelity") or {}
    held_fidelity = (
        fidelity.get("top1_agreement") if fidelity.get("top1_agreement") is not None else fidelity.get("cosine_min")
    )
    drop = None
    if accuracy is not None and baseline_accuracy is not None:
        drop = baseline_accuracy - accuracy
    objective = {
        # Ranked by the speed-up paired with the baseline in the trial's own job: trials timed at
        # different moments of a shared host compare fairly only against their own baseline.
        "latency": 1.0 / speedup if speedup else None,
        "size": result.get("size_bytes"),
        "macs": result.get("macs"),
    }[spec.objective.metric]
    quality = accuracy if spec.constraints.max_accuracy_drop is not None else held_fidelity
    return {
        "accuracy": accuracy,
        "baseline_accuracy": baseline_accuracy,
        "accuracy_drop": round(drop, 6) if drop is not None else None,
        "fidelity": held_fidelity,
        "latency_ms": latency,
        "baseline_latency_ms": ((baseline.get("latency_ms") or {}).get(batch) or {}).get("p50"),
        "limit_latency_ms": ((result.get("latency_ms") or {}).get(limit_batch) or {}).get("p50"),
        "speedup": speedup,
        "size_bytes": result.get("size_bytes"),
        "macs": result.get("macs"),
        "quality": quality,
        "objective": objective,
        "stopped_early": summary.get("stopped_early"),
    }


def violations(spec: SearchSpec, figures: dict) -> dict[str, float]:
    """How far each constraint is missed, as a fraction of its limit (> 0: missed, ≤ 0: held)."""
    limits = spec.constraints
    missed: dict[str, float] = {}
    if limits.max_accuracy_drop is not None:
        drop = figures["accuracy_drop"]
        if drop is None:
            missed["quality"] = 1.0
        else:
            allowed = limits.max_accuracy_drop * (figures["baseline_accuracy"] if limits.relative else 1.0)
            # 1e-9: a drop of exactly the limit holds (float noise in the accuracy's division).
            missed["quality"] = (drop - allowed - 1e-9) / max(limits.max_accuracy_drop, 1e-3)
    if limits.min_fidelity is not None:
        held = figures["fidelity"]
        missed["fidelity"] = 1.0 if held is None else (limits.min_fidelity - held) / max(1 - limits.min_fidelity, 1e-3)
        if limits.max_accuracy_drop is None:
            missed["quality"] = missed.pop("fidelity")
    if limits.max_latency_ms is not None:
        latency = figures["limit_latency_ms"]
        missed["latency"] = 1.0 if latency is None else (latency - limits.max_latency_ms) / limits.max_latency_ms
    if limits.max_size_bytes is not None:
        missed["size"] = (figures["size_bytes"] - limits.max_size_bytes) / limits.max_size_bytes
    return missed


def _feasible(trial: dict) -> bool:
    return trial["status"] == JobStatus.SUCCEEDED and all(v <= 0 for v in trial["violations"].values())


def pareto_front(trials: list[dict]) -> list[int]:
    """Numbers of the measured trials no other trial beats on quality (up) and objective (down)."""
    measured = [t for t in trials if t["quality"] is not None and t["objective"] is not None]

    def dominates(a: dict, b: dict) -> bool:
        return (
            a["quality"] >= b["quality"]
            and a["objective"] <= b["objective"]
            and (a["quality"] > b["quality"] or a["objective"] < b["objective"])
        )

    return [t["number"] for t in measured if not any(dominates(o, t) for o in measured)]


def _ranked_feasible(trials: list[dict], rejected: set[int]) -> list[dict]:
    candidates = [
        t
        for t in trials
        if t["role"] != "verify" and _feasible(t) and t["objective"] is not None and t["number"] not in rejected
    ]
    return sorted(candidates, key=lambda t: (t["objective"], -t["quality"], t["number"]))


def _closest(trials: list[dict]) -> dict | None:
    measured = [t for t in trials if t["role"] != "verify" and t["status"] == JobStatus.SUCCEEDED and t["figures"]]
    if not measured:
        return None
    return min(
        measured,
        key=lambda t: (sum(max(v, 0.0) for v in t["violations"].values()), t["objective"] or 0.0, t["number"]),
    )


def _pick(
    session: Session,
    search: Search,
    spec: SearchSpec,
    state: dict,
    trials: list[dict],
    by_id: dict[str, CompressionJob],
    out_of_time: bool,
) -> None:
    """Choose the best feasible trial and re-check it in a job on its reloaded artifact; finish the
    search once a pick holds (or nothing is feasible)."""
    ranked, _ = _settle_check(session, spec, state, trials, by_id)
    if state.get("verify") is not None:
        return
    if ranked:
        best = ranked[0]["number"]
        if any(v["trial"] == best and v["holds"] for v in state.get("verified", [])):
            _finish(search, state, best, feasible=True)
            return
        _queue_verification(session, search, spec, state, ranked[0], by_id)
        state["phase"] = "verifying"
        return
    if not any(t["status"] == JobStatus.SUCCEEDED and t["role"] != "verify" for t in trials):
        errors = sorted(
            {(t.get("error") or {}).get("code", "unknown") for t in trials if t["status"] == JobStatus.FAILED}
        )
        search.status, search.finished_at = JobStatus.FAILED, utcnow()
        search.error = {
            "code": "search_no_trial_succeeded",
            "message": "no trial of the search succeeded"
            + (f" (trial errors: {', '.join(errors)})" if errors else "")
            + (": the time limit ended them" if out_of_time else ""),
        }
        state["phase"] = "done"
        return
    closest = _closest(trials)
    _finish(search, state, closest["number"], feasible=False)


def _check_early(
    session: Session, search: Search, spec: SearchSpec, state: dict, trials: list[dict], by_id: dict
) -> bool:
    """While trials still run, re-check the best feasible trial so far in a slot no trial wants:
    when it is still the best at the end, the search finishes without a check job of its own
    (on two workers the last check was the part no second worker could share). Returns whether
    it queued or canceled a job."""
    ranked, canceled = _settle_check(session, spec, state, trials, by_id)
    if state.get("verify") is not None:
        return canceled
    # only where it would start now: a check queued behind waiting trials would run after them
    active = [t for t in trials if t["status"] in ACTIVE_STATUSES]
    if len(active) >= spec.budget.parallel or any(t["status"] == JobStatus.QUEUED for t in active):
        return canceled
    if ranked and not any(v["trial"] == ranked[0]["number"] for v in state.get("verified", [])):
        _queue_verification(session, search, spec, state, ranked[0], by_id)
        return True
    return canceled


def _settle_check(
    session: Session, spec: SearchSpec, state: dict, trials: list[dict], by_id: dict
) -> tuple[list[dict], bool]:
    """Bring the pick check up to date: record the outcome of one whose job has ended (a failed
    check rejects its trial, a canceled one, by the time limit, is forgotten and made again), and
    cancel one whose trial is no longer the best. Returns the feasible trials, best first, and
    whether a check was canceled."""
    verify = state.get("verify")
    job = None if verify is None else by_id.get(verify["job_id"]) or session.get(CompressionJob, verify["job_id"])
    if job is not None and job.status not in ACTIVE_STATUSES:
        state["verify"] = None
        if job.status != JobStatus.CANCELED:
            verify.update(_verified(spec, trials, verify["trial"], job))
            state.setdefault("verified", []).append(dict(verify))
            if not verify["holds"]:
                state["rejected"] = sorted({*state.get("rejected", []), verify["trial"]})
    ranked = _ranked_feasible(trials, set(state.get("rejected", [])))
    verify = state.get("verify")
    if verify is not None and (not ranked or ranked[0]["number"] != verify["trial"]):
        lifecycle.cancel(session, verify["job_id"])
        state["verify"] = None
        return ranked, True
    return ranked, False


def _queue_verification(
    session: Session, search: Search, spec: SearchSpec, state: dict, trial: dict, by_id: dict[str, CompressionJob]
) -> None:
    """Register the candidate's artifact as a model of the tenant (validated in the sandbox like
    any upload) and queue a job that measures it alone on the eval set."""
    source = by_id[trial["job_id"]]
    model = UploadedModel(
        tenant=search.tenant,
        name=f"{search.name or 'search ' + search.id[:8]} pick (trial {trial['number']})"[:255],
        size_bytes=source.artifact_size_bytes,
        sha256=source.artifact_sha256,
        status="validating",
    )
    session.add(model)
    session.flush()
    checked = spec.model_copy(update={"model_id": model.id})
    number = len(state["trials"])
    raw = trial_spec(checked, [], f"{search.name or 'search'} · pick check")
    # The check holds accuracy; its trial's job timed the artifact already: time it as little as a
    # job allows, at one batch size (the check is the search's last job, which no worker shares).
    raw["benchmark"] |= {"batch_sizes": [spec.objective.batch_size], "warmup": 0, "iterations": CHECK_ITERATIONS}
    job_spec = JobSpec.model_validate(raw)
    job, _ = jobs.create_job(session, search.tenant, job_spec, f"search:{search.id}:{number}", search_id=search.id)
    state["trials"].append(
        {"number": number, "role": "verify", "params": {}, "steps": [], "job_id": job.id, "checks": trial["number"]}
    )
    state["verify"] = {"trial": trial["number"], "job_id": job.id, "model_id": model.id}


def _verified(spec: SearchSpec, trials: list[dict], number: int, job: CompressionJob) -> dict:
    """Whether the pick holds on its reloaded artifact: accuracy against the search's baseline."""
    trial = next(t for t in trials if t["number"] == number)
    if job.status != JobStatus.SUCCEEDED or not job.report:
        return {"holds": False, "reason": f"the check job {job.status}: {(job.error or {}).get('message', '')}"[:500]}
    measured = ((job.report.get("baseline") or {}).get("accuracy") or {}).get("top1")
    if spec.constraints.max_accuracy_drop is None or measured is None:
        # Fidelity is measured against the uploaded model in the trial itself; the check job
        # proves that the artifact loads from its file and runs on the eval set.
        return {
            "holds": True,
            "accuracy": measured,
            "reason": "the artifact loads from its file and runs on the eval set",
        }
    baseline = trial["figures"]["baseline_accuracy"]
    allowed = spec.constraints.max_accuracy_drop * (baseline if spec.constraints.relative else 1.0)
    drop = baseline - measured
    holds = drop <= allowed + 1e-9
    return {
        "holds": holds,
        "accuracy": measured,
        "accuracy_drop": round(drop, 6),
        "reason": f"reloaded artifact: accuracy {measured:.4f}, drop {drop:.4f} (allowed {allowed:.4f})",
    }


def _finish(search: Search, state: dict, number: int, feasible: bool) -> None:
    state["phase"] = "done"
    state["chosen"] = {"trial": number, "feasible": feasible}
    search.status, search.finished_at = JobStatus.SUCCEEDED, utcnow()


def _public_trial(trial: dict) -> dict:
    return {
        "number": trial["number"],
        "role": trial["role"],
        "status": trial["status"],
        "job_id": trial["job_id"],
        "params": trial["params"],
        "steps": trial["steps"],
        "job_spec": trial["job_spec"],
        "figures": trial["figures"],
        "violations": trial["violations"],
        "feasible": _feasible(trial) if trial["role"] != "verify" else None,
        "pruned": trial.get("pruned"),
        "stopped_early": trial.get("stopped_early"),
        "error": trial.get("error"),
        **({"checks": trial["checks"]} if "checks" in trial else {}),
    }


def _result(spec: SearchSpec, state: dict, trials: list[dict]) -> dict:
    explored = [t for t in trials if t["role"] != "verify"]
    front = pareto_front(explored)
    chosen = state.get("chosen")
    public = [_public_trial(t) for t in trials]
    by_number = {t["number"]: t for t in public}
    floor = next((t for t in public if t["role"] == FLOOR and t["figures"]), None)
    baseline = None
    # a trial stopped early by its quality pass timed nothing, its baseline neither
    first = next((t for t in public if t["figures"] and t["figures"]["baseline_latency_ms"] is not None), None)
    if first is not None:
        figures = first["figures"]
        baseline = {
            "accuracy": figures["baseline_accuracy"],
            "latency_ms": figures["baseline_latency_ms"],
            "from_job": first["job_id"],
        }
    pick = closest = None
    if chosen is not None:
        entry = {**by_number[chosen["trial"]], "on_front": chosen["trial"] in front}
        verified = [v for v in state.get("verified", []) if v["trial"] == chosen["trial"]]
        if verified:
            entry["check"] = {k: v for k, v in verified[-1].items() if k != "trial"}
        if chosen["feasible"]:
            pick = entry
        else:
            closest = entry
    return {
        "objective": spec.objective.model_dump(mode="json"),
        "constraints": spec.constraints.model_dump(mode="json"),
        "baseline": baseline,
        "lossless_floor": floor["number"] if floor else None,
        "trials": public,
        "front": front,
        "pick": pick,
        "closest": closest,
        "feasible": None if chosen is None else chosen["feasible"],
        "stopped_by_time": bool(state.get("stopped_by_time")),
        "rejected_by_check": state.get("rejected", []),
    }


def _progress(
    stage: str, done: int, planned: int, running: int, pruned: int, not_timed: int = 0, message: str = ""
) -> dict:
    return {
        "stage": stage,
        "trials_done": done,
        "trials_planned": planned,
        "trials_running": running,
        "trials_pruned": pruned,
        "trials_not_timed": not_timed,
        "message": message,
    }


def _progress_of(search: Search, spec: SearchSpec, space: Space, state: dict, trials: list[dict]) -> dict:
    explored = [t for t in trials if t["role"] != "verify"]
    pruned = sum(1 for t in explored if t["status"] == "pruned")
    done = sum(1 for t in explored if t["status"] in FINAL_STATUSES)
    running = sum(1 for t in trials if t["status"] in ACTIVE_STATUSES)
    candidates = len(space.candidates()) - pruned
    phase = state.get("phase", "exploring")
    planned = min(spec.budget.max_trials, candidates) if phase == "exploring" else done
    stage = {"exploring": "exploring", "picking": "verifying", "verifying": "verifying"}.get(phase, "done")
    if search.status == JobStatus.FAILED:
        stage = "failed"
    message = {
        "exploring": f"{done} of {planned} trial(s) done, {running} running",
        "verifying": "re-checking the pick on its reloaded artifact",
        "done": "done",
    }.get(stage, (search.error or {}).get("message", ""))
    not_timed = sum(1 for t in explored if t.get("stopped_early"))
    return _progress(stage, done, planned, running, pruned, not_timed, message)
