"""Optuna studies for the search: storage, samplers, and the loop that several workers share.

A study lives in a relational Optuna storage (SQLite by default), so a killed search resumes and
several processes, on one machine or many, work on one study: each asks the storage for its next
trial. Heartbeats mark a dead worker's running trial as failed after a grace period and queue it
again (Optuna's RetryHeartbeatStaleTrialCallback), so its configuration is not lost.
"""

from __future__ import annotations

import os
import time
import warnings
from typing import Callable

from ..errors import ConfigError

HEARTBEAT_S = 20
GRACE_S = 60
POLL_S = 1.0
SAMPLERS = ("tpe", "nsga2", "gp", "random")
FINISHED = ("COMPLETE", "PRUNED")
TRAINED = ("trained", "failed")  # trial statuses that cost a training run; the others count for nothing
PROPOSALS_PER_TRIAL = 5  # a space nearly exhausted or nearly all over budget stops after this many proposals each
RATES_SUFFIX = "/rates"  # the study of a search's rate descent: "<study name>/rates"


def storage_for(url: str):
    """An Optuna RDB storage for `url` (sqlite:///..., postgresql://..., mysql://...) with heartbeats."""
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    for attempt in range(5):  # two workers creating the same new database can collide once
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                storage = RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
                                     heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=2))
            if url.startswith("sqlite"):
                _serialise_sqlite(storage.engine)
            return storage
        except ImportError as err:
            raise ConfigError(f"The storage {url} needs a database driver that is not installed ({err}); "
                              "install it or use sqlite:///PATH.") from None
        except Exception as err:  # sqlalchemy's OperationalError / IntegrityError on a race
            if attempt == 4 or "rgument" in str(err) or "Could not parse" in str(err):
                raise ConfigError(f"Cannot open the study storage {url} ({str(err).splitlines()[0]}); "
                                  "pass an Optuna storage URL such as sqlite:///out/search/study.db.") from None
            time.sleep(0.2 * (attempt + 1))


def _serialise_sqlite(engine) -> None:
    """Make each SQLite transaction take the write lock at its start (BEGIN IMMEDIATE).

    Python's sqlite3 driver begins a transaction only at the first write, so the read and the update
    of Optuna's "pop a waiting trial" (a SELECT ... FOR UPDATE elsewhere) were two steps: two workers
    could both read a trial as waiting and both run it, and the slower one then failed to record its
    result (UpdateFinishedTrialError). With 4 processes popping 200 queued trials, 20 ran twice
    (2026-11-25); the SQLAlchemy recipe for serialisable SQLite below makes it none."""
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def driver_begins_nothing(dbapi_connection, _record):
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def begin_immediate(connection):
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # connections opened before the listeners: closed, so every one is set up alike


def make_sampler(name: str, seed: int, trials: int, startup_trials: int | None = None, fixed: dict | None = None):
    """TPE (multivariate, grouped for the conditional rank, constant liar for parallel workers),
    NSGA-II, Optuna's Gaussian process sampler (it models only parameters every trial has, so the
    conditional rank is drawn at random, and only trained trials, so not what over budget was), or
    random search; all honour the budget constraints that trials set. `fixed` holds some
    parameters at a value (Optuna's PartialFixedSampler) while the sampler draws the others."""
    import optuna
    if name not in SAMPLERS:
        raise ConfigError(f"Unknown sampler '{name}'; choose one of {', '.join(SAMPLERS)}.")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if name == "tpe":
            startup = startup_trials if startup_trials is not None else min(10, max(3, trials // 3))
            sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, multivariate=True, group=True,
                                                 constant_liar=True)
        elif name == "nsga2":
            sampler = optuna.samplers.NSGAIISampler(seed=seed, population_size=max(4, min(20, trials // 3)))
        elif name == "gp":  # Optuna's Gaussian process (log expected hypervolume improvement); random at first
            startup = startup_trials if startup_trials is not None else min(10, max(3, trials // 2))
            sampler = optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup, warn_independent_sampling=False)
        else:
            sampler = optuna.samplers.RandomSampler(seed=seed)
        return optuna.samplers.PartialFixedSampler(fixed, sampler) if fixed else sampler


def open_study(storage, name: str, directions: list[str], sampler_factory: Callable[[int], object],
               seed: int, settings: dict):
    """Create the study, or join it if it exists (a resumed run, another worker).

    The process that creates it samples with `seed`; a process that joins draws its own seed from its
    process id, so workers do not propose the same points. A study started with other settings
    (space, budget, objectives, fidelity, model, data) is refused rather than mixed.
    """
    import optuna
    try:
        study = optuna.create_study(storage=storage, study_name=name, directions=directions,
                                    sampler=sampler_factory(seed))
        study.set_user_attr("settings", settings)
        return study
    except optuna.exceptions.DuplicatedStudyError:
        pass
    study = optuna.load_study(study_name=name, storage=storage, sampler=sampler_factory(seed + 1 + os.getpid()))
    for _ in range(50):  # the creator writes the settings right after creating the study
        stored = study.user_attrs.get("settings")
        if stored is not None:
            break
        time.sleep(0.1)
    if stored is not None and stored != settings:
        key = next(k for k in sorted(set(stored) | set(settings)) if stored.get(k) != settings.get(k))
        raise ConfigError(f"The study '{name}' was started with another {key} ({stored.get(key)!r}, now "
                          f"{settings.get(key)!r}); use the same options to resume it, or a new --study-name.")
    if [d.name.lower() for d in study.directions] != directions:
        raise ConfigError(f"The study '{name}' optimises other objectives; use a new --study-name.")
    return study


def counts(study) -> dict[str, int]:
    """Trials by state, and under "trained" the finished ones that trained (see TRAINED)."""
    found: dict[str, int] = {"trained": 0}
    for trial in study.get_trials(deepcopy=False):
        found[trial.state.name] = found.get(trial.state.name, 0) + 1
        if trial.state.name in FINISHED and trial.user_attrs.get("status") in TRAINED:
            found["trained"] += 1
    return found


def fail_stale(study) -> None:
    """Fail the trials of dead workers (heartbeat older than the grace period); the storage's callback
    queues each again."""
    import optuna
    from optuna.storages import fail_stale_trials
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        fail_stale_trials(study)


def run_waiting(study, objective, on_trial: Callable | None = None) -> None:
    """Run one queued trial, if one still waits (another worker may have taken it)."""
    if counts(study).get("WAITING", 0):
        study.optimize(objective, n_trials=1, callbacks=[on_trial] if on_trial else None, gc_after_trial=True)


def work(study, objective, *, target: int | None, on_trial: Callable | None = None) -> None:
    """Run trials until `target` of them have trained (None: until the queue of waiting trials is
    empty), then wait for other workers' running trials, so every worker sees the same results.

    A proposal over the budget or equal to a point already trained costs no training and does not
    count: `--trials 20` trains 20 configurations (or stops after PROPOSALS_PER_TRIAL x 20 proposals)."""
    callbacks = [on_trial] if on_trial else None
    while True:
        fail_stale(study)
        state = counts(study)
        proposed = sum(state.get(s, 0) for s in FINISHED) + state.get("RUNNING", 0)
        wanted = (target is not None and state["trained"] + state.get("RUNNING", 0) < target
                  and proposed < PROPOSALS_PER_TRIAL * target)
        if state.get("WAITING", 0) or wanted:
            study.optimize(objective, n_trials=1, callbacks=callbacks, gc_after_trial=True)
        elif state.get("RUNNING", 0):
            time.sleep(POLL_S)
        else:
            return
