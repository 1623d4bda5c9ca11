"""The workers of a study: who owns a trial, whether that process still lives, trial counts toward the budget,
and trials a dead worker left RUNNING failed and re-enqueued."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compress.nas.pareto import FAIL_REASON_ATTR
from compress.nas.storage import heartbeat_enabled, stale_trial_retry

if TYPE_CHECKING:
    import optuna
    from optuna.storages import BaseStorage
    from optuna.trial import FrozenTrial

# optuna itself is imported where trials are reaped: importing compress.nas stays cheap (see its docstring).

_log = logging.getLogger(__name__)

WORKER_ATTR = "worker"
SKIPPED_ATTR = "skipped"

# A RUNNING trial whose owner is unknown (killed between ask() and recording its owner) is given
# this long before it is failed, on storages without heartbeats.
_ORPHAN_AGE_S = 120.0


@dataclass(frozen=True)
class WorkerIdentity:
    """Who runs a trial, precise enough to tell later whether that process still lives."""

    worker_id: str | None
    host: str
    pid: int
    start: str | None

    @classmethod
    def current(cls, worker_id: str | None) -> WorkerIdentity:
        """Return the identity of this process."""
        return cls(worker_id, socket.gethostname(), os.getpid(), _process_start(os.getpid()))

    def attr(self, trial_number: int) -> dict[str, Any]:
        """Return the user attr value recording this worker as the owner of one trial."""
        return {"id": self.worker_id, "host": self.host, "pid": self.pid, "start": self.start, "trial": trial_number}


def _proc_stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may hold spaces and parentheses; the fields after the last ')' are fixed.
    return text.rsplit(")", 1)[-1].split()


def _process_start(pid: int) -> str | None:
    fields = _proc_stat(pid)
    return fields[19] if fields and len(fields) > 19 else None


def process_alive(pid: int, start: str | None = None) -> bool:
    """Return whether process `pid` (started at `start` ticks, when known) still runs on this machine."""
    if os.name == "nt":
        return True  # os.kill(pid, 0) would signal the process on Windows; assume alive
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    fields = _proc_stat(pid)
    if fields is None:
        return True
    if fields[0] in ("Z", "X"):
        return False
    # A different start time means the pid was reused by another process.
    return start is None or len(fields) <= 19 or fields[19] == start


def _counts_toward_budget(trial: FrozenTrial) -> bool:
    state = trial.state.name
    if state == "COMPLETE":
        return True
    if state == "FAIL":
        # Failures of the objective count; a worker that died or was interrupted does not.
        return FAIL_REASON_ATTR in trial.user_attrs
    if state == "PRUNED":
        return SKIPPED_ATTR not in trial.user_attrs
    return False


def trial_counts(study: optuna.Study) -> dict[str, int]:
    """Return counted (toward n_trials), complete, failed, running and waiting trial counts."""
    counts = {"counted": 0, "complete": 0, "failed": 0, "running": 0, "waiting": 0}
    for t in study.get_trials(deepcopy=False):
        counts["counted"] += _counts_toward_budget(t)
        state = t.state.name
        counts["complete"] += state == "COMPLETE"
        counts["failed"] += state == "FAIL"
        counts["running"] += state == "RUNNING"
        counts["waiting"] += state == "WAITING"
    return counts


def reap_dead_trials(study: optuna.Study, storage: BaseStorage, max_retry: int | None = 2) -> list[int]:
    """Fail RUNNING trials whose worker process is gone and re-enqueue their parameters; return their numbers.

    Owners on this machine are checked directly (pid and start time), so a killed single-process run
    resumes at once; owners elsewhere are left to the storage heartbeat.
    """
    import optuna
    from optuna.trial import TrialState

    host = socket.gethostname()
    hb = heartbeat_enabled(storage)
    now = datetime.now()
    reaped = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = t.user_attrs.get(WORKER_ATTR)
        if isinstance(owner, Mapping) and owner.get("trial") == t.number:
            if owner.get("host") != host or process_alive(int(owner["pid"]), owner.get("start")):
                continue
            why = f"worker process {owner['pid']} on {host} is gone"
        else:
            # No owner recorded for this trial (or only the one copied from the trial it retries).
            started = t.datetime_start
            if hb or started is None or (now - started).total_seconds() < _ORPHAN_AGE_S:
                continue
            why = f"no worker recorded itself for {_ORPHAN_AGE_S:.0f} s"
        study_id = storage.get_study_id_from_name(study.study_name)
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, t.number)
        try:
            if not storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker finished or reaped it first
        _log.warning("trial %d was left RUNNING (%s): marked FAIL and re-enqueued", t.number, why)
        stale_trial_retry(max_retry)(study, storage.get_trial(trial_id))
        reaped.append(t.number)
    return reaped
