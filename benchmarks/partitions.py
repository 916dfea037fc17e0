"""Label-skewed partitions at scale: our Dirichlet partitioner beside Flower Datasets'
``DirichletPartitioner`` on the shipped SST-2 and CB training pools, in one run.

    python -m benchmarks.partitions [--out docs/results/partitions] [--alpha 0.1]

Needs ``flwr-datasets`` (0.6.1 pins ``datasets<5``, which this project does not use; it runs with
``pip install --no-deps flwr-datasets==0.6.1 seaborn==0.13.2``). For each task and client count it
reports client sizes (min / median / max), the median client's share of its top class, and the
seconds taken, or why a partitioner failed; the same for ``shard`` partitions beside Flower
Datasets' ``ShardPartitioner`` (2 shards per client).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from benchmarks.report import write_report
from fl_app.data import load_examples, partition

CLIENTS = (10, 100, 1000)
SHARDS_PER_CLIENT = 2
READING = """With 10 SST-2 clients both Dirichlet partitioners give the same partition: the same per-class
Dirichlet split from the same seeded generator. Where a draw leaves a client empty,
`DirichletPartitioner` draws everything again (10 tries) and fails from 100 SST-2 clients and from 10
CB clients. Ours moves examples of the needy client's likeliest class from the client holding most
of it, so it succeeds at every size the pool allows, and the skew stays. CB has 250 training
examples, so 1,000 clients cannot each get one.

Both shard partitioners cut the label-sorted pool into equal shards and deal them out at random,
so every client gets the same number of examples. With two or three classes, whether a client's
two shards share a class is chance: that is why the median client's top-class share differs
between them (SST-2, 10 clients: 1.00 ours, 0.79 ShardPartitioner), not a difference in method."""


def stats(client_labels: list[np.ndarray], seconds: float) -> dict:
    """Sizes and the median client's top-class share, from each client's labels."""
    sizes = np.array([len(c) for c in client_labels])
    top = [np.bincount(c).max() / len(c) for c in client_labels if len(c)]
    return {
        "min": int(sizes.min()),
        "median": float(np.median(sizes)),
        "max": int(sizes.max()),
        "top_share": float(np.median(top)),
        "seconds": seconds,
    }


def ours(labels: np.ndarray, clients: int, alpha: float) -> dict:
    started = time.perf_counter()
    parts = partition(labels.tolist(), clients, "dirichlet", alpha=alpha, seed=0)
    seconds = time.perf_counter() - started
    return stats([labels[p] for p in parts], seconds)


def ours_shard(labels: np.ndarray, clients: int, _: float) -> dict:
    started = time.perf_counter()
    parts = partition(labels.tolist(), clients, "shard", seed=0, shards_per_client=SHARDS_PER_CLIENT)
    seconds = time.perf_counter() - started
    return stats([labels[p] for p in parts], seconds)


def flower_shards(labels: np.ndarray, clients: int, _: float) -> dict:
    import datasets
    from flwr_datasets.partitioner import ShardPartitioner

    started = time.perf_counter()
    partitioner = ShardPartitioner(
        num_partitions=clients, partition_by="label", num_shards_per_partition=SHARDS_PER_CLIENT, seed=0
    )
    partitioner.dataset = datasets.Dataset.from_dict({"label": labels.tolist()})
    parts = [partitioner.load_partition(i)["label"] for i in range(clients)]
    seconds = time.perf_counter() - started
    return stats([np.asarray(p) for p in parts], seconds)


def flower_datasets(labels: np.ndarray, clients: int, alpha: float) -> dict:
    import datasets
    from flwr_datasets.partitioner import DirichletPartitioner

    started = time.perf_counter()
    partitioner = DirichletPartitioner(
        num_partitions=clients, partition_by="label", alpha=alpha, min_partition_size=1, seed=0
    )
    partitioner.dataset = datasets.Dataset.from_dict({"label": labels.tolist()})
    parts = [partitioner.load_partition(i)["label"] for i in range(clients)]
    seconds = time.perf_counter() - started
    return stats([np.asarray(p) for p in parts], seconds)


def attempt(fn, labels: np.ndarray, clients: int, alpha: float) -> dict:
    try:
        return fn(labels, clients, alpha)
    except ValueError as err:
        return {"failed": str(err).splitlines()[0][:140]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/results/partitions")
    parser.add_argument("--alpha", type=float, default=0.1)
    args = parser.parse_args(argv)
    try:
        import flwr_datasets  # noqa: F401
    except ImportError as err:
        raise SystemExit(f"benchmarks.partitions needs flwr-datasets ({err}); see this module's docstring") from err
    rows = []
    for task in ("sst2", "cb"):
        labels = np.array([ex.label for ex in load_examples(task, "train")])
        for clients in CLIENTS:
            partitioners = (
                ("ours: dirichlet", ours),
                ("DirichletPartitioner", flower_datasets),
                ("ours: shard", ours_shard),
                ("ShardPartitioner", flower_shards),
            )
            for name, fn in partitioners:
                rows.append(
                    {
                        "task": task,
                        "examples": len(labels),
                        "clients": clients,
                        "partitioner": name,
                        **attempt(fn, labels, clients, args.alpha),
                    }
                )
    lines = [
        "| task (train examples) | clients | partitioner | min / median / max size "
        "| top-class share (median client) | s |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "failed" in r:
            lines.append(
                f"| {r['task']} ({r['examples']}) | {r['clients']} | {r['partitioner']} | failed: {r['failed']} | | |"
            )
        else:
            lines.append(
                f"| {r['task']} ({r['examples']}) | {r['clients']} | {r['partitioner']} | "
                f"{r['min']} / {r['median']:.0f} / {r['max']} | {r['top_share']:.2f} | {r['seconds']:.2f} |"
            )
    text = (
        "# Label-skewed partitions at scale\n\n"
        f"`python -m benchmarks.partitions --out {args.out}` (needs `pip install --no-deps "
        'flwr-datasets==0.6.1 seaborn==0.13.2`): our partitioners (`partition = "dirichlet"`, '
        '`partition = "shard"`) beside Flower Datasets\' `DirichletPartitioner` and `ShardPartitioner` '
        "on the shipped training pools.\n\n"
        f"Dirichlet alpha = {args.alpha}, seed 0, at least 1 example per client; shards: "
        f"{SHARDS_PER_CLIENT} label-sorted shards per client.\n\n" + "\n".join(lines) + "\n\n" + READING
    )
    print(text)
    write_report(args.out, text, rows)


if __name__ == "__main__":
    main()
