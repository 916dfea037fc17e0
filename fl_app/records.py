"""What crosses between rounds and processes, and its flat form: the synced ZO history, a client's
saved state and a training session's report.

Flower records hold scalars and flat lists of scalars, so nested per-step lists are flattened here,
once, for both apps (``client_app`` stores and sends them, ``server_app`` sends and reads them).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class History:
    """ZO updates of successful sessions, as scalars: one entry per client step."""

    rounds: list[int] = field(default_factory=list)
    clients: list[int] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    seeds: list[list[int]] = field(default_factory=list)
    grads: list[list[float]] = field(default_factory=list)
    rows: list[bytes] = field(default_factory=list)  # packed embedding-row selection per step (b"": all rows)

    def extend(
        self,
        rnd: int,
        client: int,
        lr: float | list[float],
        seeds: list[list[int]],
        grads: list[list[float]],
        rows: list[bytes] | None = None,
    ) -> None:
        """Add one session's steps; ``lr`` is one rate for all of them, or each step's (a schedule's)."""
        rows = rows if rows is not None else [b""] * len(seeds)
        lrs = [float(x) for x in lr] if isinstance(lr, (list, tuple)) else [float(lr)] * len(seeds)
        if not len(seeds) == len(grads) == len(rows) == len(lrs):
            raise ValueError(
                f"history needs seeds, grads, rows and rates per step, got {len(seeds)}, {len(grads)}, "
                f"{len(rows)}, {len(lrs)}"
            )
        for step_seeds, step_grads, step_rows, step_lr in zip(seeds, grads, rows, lrs):
            self.rounds.append(rnd)
            self.clients.append(client)
            self.lrs.append(step_lr)
            self.seeds.append(step_seeds)
            self.grads.append(step_grads)
            self.rows.append(step_rows)

    def since(self, rnd: int, exclude_client: int | None = None) -> History:
        """Entries of rounds after ``rnd``, leaving out ``exclude_client``'s own (it already applied them)."""
        keep = [i for i, r in enumerate(self.rounds) if r > rnd and self.clients[i] != exclude_client]
        return History(
            [self.rounds[i] for i in keep],
            [self.clients[i] for i in keep],
            [self.lrs[i] for i in keep],
            [self.seeds[i] for i in keep],
            [self.grads[i] for i in keep],
            [self.rows[i] for i in keep],
        )

    def __len__(self) -> int:
        return len(self.rounds)


@dataclass
class ClientState:
    """Everything a client keeps between rounds: trainable weights, step count, sync position, the
    tuning trial they belong to and the subset of batches it trains on (ids and weights)."""

    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    steps: int = 0
    synced_round: int = 0
    trial: int = 0
    subset_ids: list[int] = field(default_factory=list)
    subset_weights: list[float] = field(default_factory=list)


def _flatten(steps: list[list[Any]]) -> tuple[int, list[Any]]:
    """(entries per step, the entries in order); every step must have the same number."""
    width = len(steps[0]) if steps else 0
    if any(len(step) != width for step in steps):
        raise ValueError(f"per-step lists differ in length: {sorted({len(s) for s in steps})}")
    return width, [x for step in steps for x in step]


def _unflatten(flat: list[Any], width: int, count: int) -> list[list[Any]]:
    if len(flat) != width * count:
        raise ValueError(f"expected {count} steps of {width} entries, got {len(flat)} entries")
    return [list(flat[i * width : (i + 1) * width]) for i in range(count)]


def history_to_record(history: History) -> dict[str, Any]:
    """The history as scalars and flat lists."""
    queries, seeds = _flatten(history.seeds)
    _, grads = _flatten(history.grads)
    return {
        "h-rounds": list(history.rounds),
        "h-clients": list(history.clients),
        "h-lrs": list(history.lrs),
        "h-queries": queries,
        "h-seeds": [int(s) for s in seeds],
        "h-grads": [float(g) for g in grads],
        "h-rows": [bytes(r) for r in history.rows],
    }


def history_from_record(record: Mapping[str, Any]) -> History:
    """Inverse of :func:`history_to_record`."""
    count, queries = len(record["h-rounds"]), int(record["h-queries"])
    return History(
        rounds=[int(r) for r in record["h-rounds"]],
        clients=[int(c) for c in record["h-clients"]],
        lrs=[float(lr) for lr in record["h-lrs"]],
        seeds=_unflatten([int(s) for s in record["h-seeds"]], queries, count),
        grads=_unflatten([float(g) for g in record["h-grads"]], queries, count),
        rows=[bytes(r) for r in record["h-rows"]],
    )


def state_to_records(state: ClientState) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(weights, counters) of a client state. bfloat16 weights become float32 (numpy, under Flower's
    ArrayRecord, has no bfloat16): exact, and restoring copies them back into the bfloat16 bottom."""
    weights = {k: v.float() if v.dtype == torch.bfloat16 else v for k, v in state.weights.items()}
    return weights, {
        "steps": state.steps,
        "synced-round": state.synced_round,
        "trial": state.trial,
        "subset-ids": list(state.subset_ids),
        "subset-weights": list(state.subset_weights),
    }


def state_from_records(weights: Mapping[str, torch.Tensor], counters: Mapping[str, Any]) -> ClientState:
    """Inverse of :func:`state_to_records` (weights stay float32 until restored into the bottom)."""
    return ClientState(
        weights=dict(weights),
        steps=int(counters["steps"]),
        synced_round=int(counters["synced-round"]),
        trial=int(counters["trial"]),
        subset_ids=[int(i) for i in counters["subset-ids"]],
        subset_weights=[float(w) for w in counters["subset-weights"]],
    )


def report_to_record(report: Mapping[str, Any]) -> dict[str, Any]:
    """A training report with its per-step seeds and projected gradients flattened."""
    queries, seeds = _flatten(report["seeds"])
    _, grads = _flatten(report["grads"])
    flat = {k: v for k, v in report.items() if k not in ("seeds", "grads", "rows", "losses")}
    return {
        **flat,
        "queries": queries,
        "seeds": [int(s) for s in seeds],
        "grads": [float(g) for g in grads],
        "rows": [bytes(r) for r in report["rows"]],
        "losses": [float(x) for x in report["losses"]],
    }


def report_from_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`report_to_record` (one row selection per step; b"" = all rows)."""
    report = {k: v for k, v in record.items() if k != "queries"}
    steps = len(record["losses"])
    report["losses"] = [float(x) for x in record["losses"]]
    report["seeds"] = _unflatten([int(s) for s in record["seeds"]], int(record["queries"]), steps)
    report["grads"] = _unflatten([float(g) for g in record["grads"]], int(record["queries"]), steps)
    report["rows"] = [bytes(r) for r in record["rows"]]
    return report


def metric_value(value: Any) -> float | list[int]:
    """An evaluation metric as a Flower MetricRecord holds it and the round loop reads it: a number as a
    float, a per-example 0/1 list (``correct``, ``swap-correct``) as ints."""
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    return float(value)
