"""Scoring perturbed activations of several clients' steps in one forward.

A session's complete (+, -) pairs become a :class:`~fl_app.server_party.ScoreJob`. Its stream
thread queues the job and waits for the run's lock; whichever thread gets the lock first scores
every job queued by then, from any session, in as few forwards as the row budget allows, and
hands each its losses. Scoring leaves the weights unchanged, and it runs under the same lock as
the clean steps, so each job is still scored under one version of the weights, and clean steps
keep their arrival order.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future
from typing import Protocol

import torch

from fl_app.server_party import ScoreJob

log = logging.getLogger(__name__)


class Scorer(Protocol):
    def score_jobs(self, jobs: list[ScoreJob]) -> list[torch.Tensor]: ...

    def add_scores(self, job: ScoreJob, losses: torch.Tensor) -> None: ...


class CrossClientScorer:
    """Scores the jobs of concurrent sessions together, under ``lock`` (the run's server lock)."""

    def __init__(self, lock: threading.Lock):
        self.lock = lock
        self._queued: list[tuple[ScoreJob, Future]] = []
        self._queue_lock = threading.Lock()
        self.forwards: list[int] = []  # jobs scored together, per batch (for the benchmark and tests)

    def score(self, server: Scorer, job: ScoreJob) -> None:
        """Score ``job`` (with whatever other sessions queued meanwhile) and put its losses back
        into its step; raises what scoring it raised."""
        done: Future = Future()
        with self._queue_lock:
            self._queued.append((job, done))
        with self.lock:
            with self._queue_lock:
                batch, self._queued = self._queued, []
            if batch:
                self._score(server, batch)
        done.result()

    def _score(self, server: Scorer, batch: list[tuple[ScoreJob, Future]]) -> None:
        """Score the batch in one go; if that fails, each job alone, so one session's failure stays
        that session's. Every job's future is settled, whatever raised."""
        jobs = [job for job, _ in batch]
        try:
            results: list[torch.Tensor] | None = server.score_jobs(jobs)
            self.forwards.append(len(jobs))
        except Exception:  # noqa: BLE001
            log.warning("scoring %d sessions' activations together failed; scoring each alone", len(jobs))
            results = None
        for index, (job, done) in enumerate(batch):
            try:
                server.add_scores(job, results[index] if results is not None else server.score_jobs([job])[0])
                done.set_result(None)
            except Exception as err:  # noqa: BLE001
                done.set_exception(err)
