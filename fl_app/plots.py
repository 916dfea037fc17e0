"""The plots every run writes beside results.json (matplotlib, no display needed)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any


def plot_results(results: Mapping[str, Any], path: Path) -> Path:
    """Dev accuracy per round, training loss per step, bytes and client peak memory per round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rounds = results["rounds"]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    dev = [e for e in results["eval"]["history"] if e.get("accuracy") is not None]
    axes[0, 0].plot([e["round"] for e in dev], [e["accuracy"] for e in dev], marker="o")
    axes[0, 0].set(title="dev accuracy", xlabel="round (0 = untrained)")
    losses = [h["train_loss"] for h in results["history"]]
    axes[0, 1].plot(range(1, len(losses) + 1), losses, linewidth=0.8)
    axes[0, 1].set(title="training loss per client step", xlabel="step (all clients, in round order)")
    numbers = [r["round"] for r in rounds]
    axes[1, 0].bar([n - 0.2 for n in numbers], [r["bytes_up"] / 2**20 for r in rounds], width=0.4, label="up")
    axes[1, 0].bar([n + 0.2 for n in numbers], [r["bytes_down"] / 2**20 for r in rounds], width=0.4, label="down")
    axes[1, 0].set(title="bytes per round (all clients)", xlabel="round", ylabel="MiB")
    axes[1, 0].legend()
    peaks = [
        max((h["peak_memory_bytes"] for h in results["history"] if h["round"] == n), default=0) / 2**20 for n in numbers
    ]
    axes[1, 1].plot(numbers, peaks, marker="o")
    axes[1, 1].set(title="client peak memory per round", xlabel="round", ylabel="MiB")
    axes[1, 1].set_ylim(bottom=0)
    for ax in (axes[0, 0], axes[1, 0], axes[1, 1]):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(f"{results['mode']}: {results['config']['task']} on {results['config']['model']}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
