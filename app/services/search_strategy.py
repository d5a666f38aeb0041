"""Which candidates a search runs next: Optuna's multi-objective TPE with constraints, over trials
rebuilt from the rows, plus the order and early stop that `search_space` defines.

Nothing is kept in one process's memory: each call builds an in-memory study from the finished
trials (their parameters, measured objectives and constraint values) and asks it for the next
candidates, so any process that advances the search (the notifier, any worker's sweeper) proposes
from the same history.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import optuna
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState

from app.services.search_space import Candidate, Space

optuna.logging.set_verbosity(optuna.logging.WARNING)
# multivariate TPE (it models the choices jointly: a scheme's effect depends on the pruning) is
# marked experimental; its warning would repeat on every advance.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
log = logging.getLogger(__name__)

# Asks per free slot before falling back to the first candidate not yet run in the space's order
# (with a finite space, a sampler keeps proposing what was already tried once most of it was).
_ASKS_PER_SLOT = 16


@dataclass(frozen=True)
class Finished:
    """A trial whose job ended: its objectives (quality up, objective down) and constraint values."""

    candidate: Candidate
    quality: float | None
    objective: float | None
    constraints: dict[str, float]


def _distributions(space: Space) -> dict[str, CategoricalDistribution]:
    return {name: CategoricalDistribution(choices) for name, choices in space.choices().items()}


def _study(space: Space, finished: list[Finished], seed: int) -> optuna.Study:
    distributions = _distributions(space)
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=4, multivariate=True)
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler)
    for trial in finished:
        params = {name: trial.candidate.params[name] for name in distributions}
        if trial.quality is None or trial.objective is None:
            study.add_trial(
                optuna.trial.create_trial(state=TrialState.FAIL, params=params, distributions=distributions)
            )
            continue
        study.add_trial(
            optuna.trial.create_trial(
                params=params,
                distributions=distributions,
                values=[trial.quality, trial.objective],
                constraints=trial.constraints,
            )
        )
    return study


def propose(
    space: Space,
    finished: list[Finished],
    tried: set[Candidate],
    stopped: set[Candidate],
    slots: int,
    seed: int,
) -> list[Candidate]:
    """Up to `slots` candidates to run now, none of them tried, stopped, or waiting on a parent
    that has not finished (a parent not yet tried is run first instead of its child)."""
    done = {trial.candidate for trial in finished}
    every = space.candidates()
    chosen: list[Candidate] = []

    def runnable(candidate: Candidate) -> Candidate | None:
        if candidate in tried or candidate in stopped or candidate in chosen:
            return None
        parent = candidate.parent
        if parent is None or parent in done:
            return candidate
        if parent in tried or parent in chosen:
            return None  # its parent runs now: this one waits for the parent's checkpoint and figures
        return runnable(parent)

    floor = Candidate()
    if floor in every and (pick := runnable(floor)):
        chosen.append(pick)  # the lossless floor is always measured, first
    study = _study(space, finished, seed + len(finished)) if len(chosen) < slots else None
    distributions = _distributions(space)
    while len(chosen) < slots:
        pick = None
        for _ in range(_ASKS_PER_SLOT):
            trial = study.ask(distributions)
            pick = runnable(Candidate.from_params(trial.params))
            if pick is not None:
                break
        if pick is None:
            pick = next((c for c in every if runnable(c) is c), None)
        if pick is None:
            break
        chosen.append(pick)
    return chosen
