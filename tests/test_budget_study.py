"""The search's Optuna storage shared by worker processes: each queued trial runs in exactly one."""

import collections
import subprocess
import sys
import threading

import optuna

from leanfit.budget.study import storage_for

WORKER = """
import sys, time
import optuna
from leanfit.budget.study import storage_for
optuna.logging.set_verbosity(optuna.logging.ERROR)
study = optuna.load_study(study_name="queue", storage=storage_for(sys.argv[1]))
ran = []
def objective(trial):
    ran.append(trial.number)
    time.sleep(0.002)  # long enough for another worker to read the queue meanwhile
    return trial.suggest_float("x", 0, 1)
for _ in range(int(sys.argv[2])):
    study.optimize(objective, n_trials=1)  # raises if another worker finished this trial first
print(" ".join(map(str, ran)))
"""


def test_workers_popping_one_sqlite_queue_never_run_a_trial_twice(tmp_path):
    # Before the storage began each transaction with the write lock, 4 workers over 200 queued trials
    # ran about 20 of them twice and crashed on recording about 13 (UpdateFinishedTrialError).
    url = f"sqlite:///{tmp_path / 'queue.db'}"
    study = optuna.create_study(study_name="queue", storage=storage_for(url))
    for i in range(200):
        study.enqueue_trial({"x": i / 200})
    workers = [subprocess.Popen([sys.executable, "-c", WORKER, url, "50"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for _ in range(4)]
    outputs = [worker.communicate(timeout=300) for worker in workers]
    assert [worker.returncode for worker in workers] == [0] * 4, [err[-2000:] for _, err in outputs]
    runs = collections.Counter(int(n) for out, _ in outputs for n in out.split())
    assert sorted(runs) == list(range(200))
    assert [n for n, times in runs.items() if times > 1] == []


def test_a_point_another_worker_is_training_is_waited_for_not_trained_again():
    from leanfit.budget.search import _same_point
    study = optuna.create_study()
    for _ in range(2):  # two workers queued the same point
        study.enqueue_trial({"x": 0.5, "rank": 4})
    first, second = study.ask(), study.ask()
    for trial in (first, second):
        trial.suggest_float("x", 0, 1)
        trial.suggest_int("rank", 2, 16)
    found = {}
    waiter = threading.Thread(target=lambda: found.update(same=_same_point(second)), daemon=True)
    waiter.start()
    waiter.join(timeout=2.5)
    assert waiter.is_alive()  # the later trial waits while the earlier one trains
    study.tell(first, 0.9)
    waiter.join(timeout=30)
    assert found["same"].number == first.number
    study.enqueue_trial({"x": 0.25, "rank": 4})
    other = study.ask()
    other.suggest_float("x", 0, 1)
    other.suggest_int("rank", 2, 16)
    assert _same_point(other) is None  # another point trains at once


def test_the_wait_ends_when_the_earlier_trials_worker_is_dead(tmp_path):
    from optuna.storages import RDBStorage

    from leanfit.budget.search import _same_point
    storage = RDBStorage(f"sqlite:///{tmp_path / 'stale.db'}", heartbeat_interval=1, grace_period=1)
    study = optuna.create_study(storage=storage)
    for _ in range(2):
        study.enqueue_trial({"x": 0.5})
    first, second = study.ask(), study.ask()
    for trial in (first, second):
        trial.suggest_float("x", 0, 1)
    storage.record_heartbeat(first._trial_id)  # its worker beat once, then died
    found = {}
    waiter = threading.Thread(target=lambda: found.update(same=_same_point(second)), daemon=True)
    waiter.start()
    waiter.join(timeout=60)
    assert not waiter.is_alive() and found["same"] is None  # the dead worker's trial failed; this one trains
    assert study.trials[first.number].state.name == "FAIL"
