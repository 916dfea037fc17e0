"""Task data: loading (shipped local files or the hub), seeded sampling, client partitions, batches."""

from __future__ import annotations

import importlib.metadata
import json
import os
import random
import urllib.parse
import warnings
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from fl_app.tasks import Example, Task, get_task, parse_row

# Local files per task: (train pool files, test file). Test = the public validation split, as in MeZO.
LOCAL_FILES: dict[str, tuple[tuple[str, ...], str]] = {
    "sst2": (("sst2/train.tsv.gz",), "sst2/dev.tsv.gz"),
    "rte": (("rte/train.jsonl.gz",), "rte/val.jsonl.gz"),
    "cb": (("cb/train.jsonl.gz",), "cb/val.jsonl.gz"),
    "boolq": (("boolq/fewglue_train32.jsonl.gz", "boolq/fewglue_dev32.jsonl.gz"), "boolq/val.jsonl.gz"),
    "wic": (("wic/train.jsonl.gz",), "wic/val.jsonl.gz"),
    "wsc": (("wsc/train.jsonl.gz",), "wsc/val.jsonl.gz"),
    "copa": (("copa/train.jsonl.gz",), "copa/val.jsonl.gz"),
    "multirc": (("multirc/train.jsonl.gz",), "multirc/val.jsonl.gz"),
}
HUB_NAMES = {"sst2": ("glue", "sst2", "train", "validation")}  # others: super_glue/<task>, train / validation
# Tasks whose shipped train pool is too small (BoolQ: FewGLUE's 32 + 32): the test file is cut by a
# group field, 1 group in ``parts`` (by a fixed hash) being the test set, the others joining the train
# pool; pool rows sharing a group with the test set are left out, so the two never share a passage.
SHARED_TEST_FILE: dict[str, tuple[str, int]] = {"boolq": ("passage", 3)}


MARKER = Path("sst2") / "train.tsv.gz"


def _installed_data_dirs() -> list[Path]:
    """Where installed copies of hosl-flower keep ``data/``: the checkout of an editable install
    (``direct_url.json``) or the folder holding the distribution's metadata.

    Flower runs the apps from a copy of the project bundle that leaves data files out; the
    installed distribution still points at the checkout that has them.
    """
    found = []
    for dist in importlib.metadata.distributions(name="hosl-flower"):
        text = dist.read_text("direct_url.json")
        url = json.loads(text).get("url", "") if text else ""
        if url.startswith("file://"):
            found.append(Path(urllib.parse.unquote(urllib.parse.urlparse(url).path)) / "data")
        found.append(Path(str(dist.locate_file(""))).resolve() / "data")
    return found


def default_data_dir() -> Path:
    """``HOSL_DATA_DIR`` if set, else the ``data/`` folder beside the package, else that of the installed checkout."""
    env = os.environ.get("HOSL_DATA_DIR")
    if env:
        return Path(env)
    beside = Path(__file__).resolve().parents[1] / "data"
    if (beside / MARKER).exists():
        return beside
    for candidate in _installed_data_dirs():
        if (candidate / MARKER).exists():
            return candidate
    return beside


def _rows_from_files(paths: list[Path]):
    """The rows of local csv/tsv/json files as a memory-mapped ``datasets.Dataset`` (not materialised)."""
    from datasets import load_dataset
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise ValueError(f"data file(s) not found: {missing} (field 'data-dir'; set HOSL_DATA_DIR or data-dir)")
    files = [str(p) for p in paths]
    try:
        if files[0].endswith((".tsv", ".tsv.gz")):
            return load_dataset("csv", data_files=files, delimiter="\t", split="train", quoting=3)
        return load_dataset("json", data_files=files, split="train")
    except Exception as err:  # noqa: BLE001 - datasets raises many kinds (EOFError, DatasetGenerationError, ...)
        cause = err.__cause__ or err  # DatasetGenerationError wraps the parser's own error
        raise ValueError(
            f"cannot read data file(s) {files} (field 'data-dir'): {type(cause).__name__}: "
            f"{str(cause).strip().splitlines()[0] if str(cause).strip() else 'no detail'}"
        ) from err


def _flatten_multirc(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """MultiRC files hold one paragraph per line; each answer option is one example."""
    out = []
    for row in rows:
        passage = row["passage"]
        for question in passage["questions"]:
            for answer in question["answers"]:
                out.append(
                    {
                        "paragraph": passage["text"],
                        "question": question["question"],
                        "answer": answer["text"],
                        "label": answer["label"],
                    }
                )
    return out


def _flatten_wsc(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**row, **row["target"]} if "target" in row else row for row in rows]


def _load_rows(task: Task, split: Literal["train", "test"], source: str, data_dir: str | Path | None):
    """A split's raw rows, indexable and sized: a memory-mapped dataset, or a list for tasks whose files
    need flattening (one MultiRC paragraph holds many examples)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if source == "local":
        base = Path(data_dir) if data_dir else default_data_dir()
        train_files, test_file = LOCAL_FILES[task.name]
        rows = _rows_from_files([base / f for f in (train_files if split == "train" else (test_file,))])
    elif source == "hub":
        from datasets import load_dataset

        path, name, train_split, test_split = HUB_NAMES.get(task.name, ("super_glue", task.name, "train", "validation"))
        rows = load_dataset(path, name, split=train_split if split == "train" else test_split)
    else:
        raise ValueError(f"unknown data source {source!r} (field 'data-source'); known: local, hub")
    if source == "local" and task.name in SHARED_TEST_FILE:
        return _share_test_file(task, split, rows, _rows_from_files([base / test_file]))
    if task.name == "multirc" and len(rows) and isinstance(rows[0].get("passage"), dict):
        return _flatten_multirc([dict(r) for r in rows])
    if task.name == "wsc":
        return _flatten_wsc([dict(r) for r in rows])
    return rows


def in_test_part(value: str, parts: int) -> bool:
    """Whether a group value (e.g. a passage) falls in the test part of a shared test file (fixed hash)."""
    return zlib.crc32(value.encode("utf-8")) % parts == 0


def _share_test_file(task: Task, split: str, pool, test_rows) -> list[dict[str, Any]]:
    """``split``'s rows when the test file is shared (see :data:`SHARED_TEST_FILE`): the test part's
    groups, or the pool plus the rest of the test file, less any row of a test group."""
    field, parts = SHARED_TEST_FILE[task.name]
    test = [dict(r) for r in test_rows if in_test_part(r[field], parts)]
    if split == "test":
        return test
    held = {r[field] for r in test}
    return [dict(r) for r in [*pool, *test_rows] if r[field] not in held]


def _column(rows, field: str) -> list[Any]:
    """One field of every row (a memory-mapped dataset's column is read from Arrow, not row by row)."""
    if isinstance(rows, list):
        return [r[field] for r in rows]
    return rows.with_format("arrow")[field].to_pylist()


def row_groups(task: Task, rows) -> list[int]:
    """Per row, a group id: rows sharing a value of any of the task's group fields (a passage, a
    sentence) share one, transitively; without group fields every row is its own group."""
    parent = list(range(len(rows)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[Any, int] = {}
    for field in task.groups:
        for i, value in enumerate(_column(rows, field)):
            j = first.setdefault(value, i)
            if j != i:
                parent[root(i)] = root(j)
    return [root(i) for i in range(len(rows))]


def _examples(task: Task, rows, indices: Sequence[int]) -> list[Example]:
    """Parse only the rows at ``indices`` (in that order)."""
    if isinstance(rows, list):
        return [parse_row(task, rows[i]) for i in indices]
    return [parse_row(task, dict(row)) for row in rows.select(list(indices))] if len(indices) else []


def load_examples(
    task: str | Task,
    split: Literal["train", "test"],
    source: Literal["local", "hub"] = "local",
    data_dir: str | Path | None = None,
) -> list[Example]:
    """All examples of a split: ``train`` is the pool train/dev are sampled from, ``test`` the validation set."""
    task = get_task(task)
    rows = _load_rows(task, split, source, data_dir)
    return _examples(task, rows, range(len(rows)))


def sample_splits(
    task: str | Task,
    n_train: int = 1000,
    n_dev: int = 500,
    n_test: int = 1000,
    seed: int = 0,
    source: Literal["local", "hub"] = "local",
    data_dir: str | Path | None = None,
) -> dict[str, list[Example]]:
    """MeZO-style seeded sampling: train and dev from the train pool, disjoint by the task's groups (no
    passage or sentence in both: tuning picks by dev accuracy), test from the test file.

    The pool's rows are taken in a seeded order, a row joining the side its group is on; a new group
    joins train until it is full, then dev. A pool smaller than n-train + n-dev is split in their
    proportion, dev filled first (so rows sharing a group with train are not left over)."""
    task = get_task(task)
    for field, n in (("n-train", n_train), ("n-dev", n_dev), ("n-test", n_test)):
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"{field} must be a non-negative integer, got {n!r}")
    # Shuffle positions, not examples (the same permutation), and parse only the rows kept: the pool
    # itself is never materialised.
    pool = _load_rows(task, "train", source, data_dir)
    order = list(range(len(pool)))
    random.Random(seed).shuffle(order)
    if n_train + n_dev > len(order):  # small task: split the pool in the requested proportion
        n_dev_small = round(len(order) * n_dev / max(1, n_train + n_dev))
        warnings.warn(
            f"task '{task.name}': train pool has {len(order)} examples, fewer than n-train + n-dev = "
            f"{n_train + n_dev}; using {len(order) - n_dev_small} train / {n_dev_small} dev",
            stacklevel=2,
        )
        n_train, n_dev = len(order) - n_dev_small, n_dev_small
        sides = [("dev", n_dev), ("train", n_train)]
    else:
        sides = [("train", n_train), ("dev", n_dev)]
    group = row_groups(task, pool)
    chosen: dict[str, list[int]] = {"train": [], "dev": []}
    side_of: dict[int, str] = {}
    for pos in order:
        if all(len(chosen[name]) >= size for name, size in sides):
            break
        side = side_of.get(group[pos])
        if side is None:
            side = next((name for name, size in sides if len(chosen[name]) < size), sides[-1][0])
            side_of[group[pos]] = side
        if len(chosen[side]) < dict(sides)[side]:
            chosen[side].append(pos)
    short = [f"{name} {len(chosen[name])} of {size}" for name, size in sides if len(chosen[name]) < size]
    if short:
        warnings.warn(
            f"task '{task.name}': keeping train and dev apart by {', '.join(task.groups)} leaves "
            f"{' and '.join(short)} examples",
            stacklevel=2,
        )
    kept = _examples(task, pool, chosen["train"] + chosen["dev"])
    n_train = len(chosen["train"])
    test_rows = _load_rows(task, "test", source, data_dir)
    test_order = list(range(len(test_rows)))
    random.Random(seed + 1).shuffle(test_order)
    if n_test > len(test_order):
        warnings.warn(
            f"task '{task.name}': asked for {n_test} test examples, only {len(test_order)} available", stacklevel=2
        )
    test = _examples(task, test_rows, test_order[:n_test])
    return {"train": kept[:n_train], "dev": kept[n_train:], "test": test}


def partition(
    labels: Sequence[int],
    num_clients: int,
    scheme: Literal["iid", "dirichlet", "shard", "draw"] = "iid",
    alpha: float = 0.5,
    seed: int = 0,
    min_size: int = 1,
    shards_per_client: int = 2,
) -> list[list[int]]:
    """Disjoint index lists covering all examples, seeded: an IID split; label-skewed
    Dirichlet(alpha) (each class split among the clients by its own Dirichlet draw, then clients
    below ``min_size`` take examples of their likeliest class from whoever holds most of it: no
    redrawing, so it works at any scale); or
    ``shard`` (pathological non-IID: examples sorted by label, cut into ``shards_per_client`` shards
    per client, each client getting that many shards, so about that many classes). ``draw`` is the
    one scheme whose lists overlap: each client draws ``min_size`` distinct examples at random, so a
    scaling study can have more clients than the task has examples (100,000 clients of SST-2's 67k)."""
    n = len(labels)
    if not isinstance(num_clients, int) or num_clients < 1:
        raise ValueError(f"num-clients must be a positive integer, got {num_clients!r}")
    if scheme == "draw":
        if min_size > n:
            raise ValueError(f"partition 'draw' needs min-partition-size {min_size} <= the train examples, have {n}")
        rng = np.random.default_rng(seed)
        return [sorted(rng.choice(n, size=min_size, replace=False).tolist()) for _ in range(num_clients)]
    if num_clients * min_size > n:
        each = f" x min-partition-size {min_size}" if min_size > 1 else ""
        raise ValueError(
            f"num-clients {num_clients}{each} needs at least {num_clients * min_size} examples, have {n} (n-train)"
        )
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        order = rng.permutation(n)
        return [sorted(part.tolist()) for part in np.array_split(order, num_clients)]
    labels = np.asarray(labels)
    if scheme == "shard":
        return _shard_partition(labels, num_clients, shards_per_client, rng)
    if scheme != "dirichlet":
        raise ValueError(f"unknown partition scheme {scheme!r} (field 'partition'); known: iid, dirichlet, shard, draw")
    if not alpha > 0:
        raise ValueError(f"dirichlet-alpha must be > 0, got {alpha!r}")
    classes = np.unique(labels)
    shares = rng.dirichlet([alpha] * num_clients, size=len(classes))  # [class, client]
    held = np.zeros((num_clients, len(classes)), dtype=np.int64)  # examples per client and class
    pools: list[list[list[int]]] = [[[] for _ in classes] for _ in range(num_clients)]
    for c, cls in enumerate(classes):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        cuts = (np.cumsum(shares[c])[:-1] * len(idx)).astype(int)
        for client, chunk in enumerate(np.split(idx, cuts)):
            pools[client][c] = chunk.tolist()
            held[client, c] = len(chunk)
    _top_up(pools, held, shares, min_size, rng)
    return [sorted(i for pool in client for i in pool) for client in pools]


def _top_up(
    pools: list[list[list[int]]], held: np.ndarray, shares: np.ndarray, min_size: int, rng: np.random.Generator
) -> None:
    """Bring clients below ``min_size`` up to it (in place, seeded): each takes examples of its own
    most likely class (by its Dirichlet shares) from the client holding most of that class, so the
    skew stays; from the largest client if no one can spare that class."""
    sizes = held.sum(1)
    for needy in np.flatnonzero(sizes < min_size):
        cls = int(np.argmax(shares[:, needy]))
        while sizes[needy] < min_size:
            spare = np.where((sizes > min_size) & (np.arange(len(sizes)) != needy), held[:, cls], 0)
            donor, c = (int(np.argmax(spare)), cls) if spare.max() > 0 else (int(np.argmax(sizes)), -1)
            if c < 0:
                c = int(np.argmax(held[donor]))
            moved = pools[donor][c].pop(int(rng.integers(len(pools[donor][c]))))
            pools[needy][c].append(moved)
            held[donor, c] -= 1
            held[needy, c] += 1
            sizes[donor] -= 1
            sizes[needy] += 1


def _shard_partition(
    labels: np.ndarray, num_clients: int, shards_per_client: int, rng: np.random.Generator
) -> list[list[int]]:
    """Sort by label (random order within a label), cut into equal shards, deal them out at random."""
    if not isinstance(shards_per_client, int) or shards_per_client < 1:
        raise ValueError(f"shards-per-client must be a positive integer, got {shards_per_client!r}")
    shards = num_clients * shards_per_client
    if shards > len(labels):
        raise ValueError(
            f"partition 'shard' needs num-clients x shards-per-client = {shards} shards, but n-train is {len(labels)}"
        )
    order = np.lexsort((rng.random(len(labels)), labels))
    pieces = np.array_split(order, shards)
    dealt = rng.permutation(shards)
    return [
        sorted(int(i) for k in dealt[c * shards_per_client : (c + 1) * shards_per_client] for i in pieces[k])
        for c in range(num_clients)
    ]


class BatchEncoder:
    """Turns examples into model inputs.

    * ``prompted`` with single-token candidates: right-padded prompts + ``score_ids`` [B, C].
    * ``prompted`` with any multi-token candidate: B*C rows of prompt + candidate, ``target_ids``
      marking candidate tokens (-100 elsewhere).
    * ``classification``: (pair) inputs for an encoder with a classification head.
    A prompt longer than ``max_length`` (0: the task's default) is shortened in the task's passage
    field (its end cut), so the question and the answer cue stay; a task without one, or a prompt
    still too long, is truncated from the left so the end of the template (where the answer goes)
    stays. Encoder pairs are truncated longest first (the passage, where there is one).
    """

    def __init__(self, tokenizer, task: str | Task, kind: Literal["prompted", "classification"], max_length: int = 0):
        if kind not in ("prompted", "classification"):
            raise ValueError(f"batch kind must be 'prompted' or 'classification', got {kind!r}")
        self.tokenizer, self.task, self.kind = tokenizer, get_task(task), kind
        self.max_length = max_length or self.task.max_length

    def truncated(self, examples: Sequence[Example]) -> int:
        """How many of ``examples`` do not fit in ``max_length`` whole (their passage or start is cut)."""
        if not examples:
            return 0
        if self.kind == "classification":
            firsts, seconds = zip(*(self.task.text_pair(ex) for ex in examples))
            pairs = None if seconds[0] is None else list(seconds)
            lengths = [len(ids) for ids in self.tokenizer(list(firsts), pairs)["input_ids"]]
            return sum(n > self.max_length for n in lengths)
        prompts = self.tokenizer([self.task.prompt(ex) for ex in examples], add_special_tokens=True)["input_ids"]
        texts = [self.task.candidates(ex) for ex in examples]
        flat = iter(self.tokenizer([c for cands in texts for c in cands], add_special_tokens=False)["input_ids"])
        count = 0
        for ids, cands in zip(prompts, texts):  # one batched tokenizer call each for prompts and candidates
            lengths = [len(next(flat)) for _ in cands]
            reserve = 0 if all(n == 1 for n in lengths) else max(lengths)
            count += len(ids) > self.max_length - reserve
        return count

    def __call__(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("cannot encode an empty batch (field 'examples')")
        for ex in examples:
            if not 0 <= ex.label < self.task.num_classes:
                raise ValueError(
                    f"field 'label' has value {ex.label} outside [0, {self.task.num_classes}) "
                    f"for task '{self.task.name}'"
                )
        labels = torch.tensor([ex.label for ex in examples], dtype=torch.long)
        if self.kind == "classification":
            firsts, seconds = zip(*(self.task.text_pair(ex) for ex in examples))
            enc = self.tokenizer(
                list(firsts),
                None if seconds[0] is None else list(seconds),
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
            return {
                **{k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")},
                "labels": labels,
            }
        candidates = [[self._ids(c) for c in self.task.candidates(ex)] for ex in examples]
        if all(len(ids) == 1 for row in candidates for ids in row):
            rows = [self._prompt_ids(ex, 0) for ex in examples]
            batch = self._pad(rows)
            batch["score_ids"] = torch.tensor([[ids[0] for ids in row] for row in candidates], dtype=torch.long)
        else:
            rows, targets = [], []
            for ex, cands in zip(examples, candidates):
                for cand in cands:
                    prompt = self._prompt_ids(ex, len(cand))
                    rows.append(prompt + cand)
                    targets.append([-100] * len(prompt) + cand)
            batch = self._pad(rows)
            batch["target_ids"] = self._pad(targets, pad=-100)["input_ids"]
        batch["labels"] = labels
        return batch

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _prompt_ids(self, ex: Example, reserve: int) -> list[int]:
        ids = self.tokenizer(self.task.prompt(ex), add_special_tokens=True)["input_ids"]
        budget = self.max_length - reserve
        if budget < 1:
            raise ValueError(f"max-length {self.max_length} leaves no room for the prompt")
        if len(ids) > budget and self.task.passage:
            ids = self._shortened_passage(ex, ids, budget)
        if len(ids) <= budget:
            return ids
        bos = self.tokenizer.bos_token_id
        keep_bos = bos is not None and ids[0] == bos
        return ([bos] if keep_bos else []) + ids[len(ids) - budget + keep_bos :]

    def _shortened_passage(self, ex: Example, ids: list[int], budget: int) -> list[int]:
        """The prompt's ids with the end of its passage cut until it fits in ``budget`` (re-rendered and
        re-tokenized, since tokens at the cut may merge); as short as the passage allows."""
        field = self.task.passage
        passage = self._ids(str(ex.fields[field]))
        keep = len(passage)
        while len(ids) > budget and keep > 0:
            keep = max(0, keep - (len(ids) - budget))
            text = self.tokenizer.decode(passage[:keep]).strip()
            ids = self.tokenizer(self.task.prompt(Example({**ex.fields, field: text}, ex.label)))["input_ids"]
        return ids

    def _pad(self, rows: list[list[int]], pad: int | None = None) -> dict[str, torch.Tensor]:
        pad = self.tokenizer.pad_token_id if pad is None else pad
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = 1
        return {"input_ids": ids, "attention_mask": mask}
