"""The plots every run writes beside results.json (matplotlib, no display needed)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any


def plot_results(results: Mapping[str, Any], path: Path) -> Path:
    """Dev accuracy per round, training loss per step, bytes and client peak memory per round, the
    bottom's drift from its start per evaluation, and the swap evaluations (the final top over the
    trained and the initial bottom, with the flips and McNemar's p)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rounds = results["rounds"]
    fig, axes = plt.subplots(3, 2, figsize=(10, 10))
    dev = [e for e in results["eval"]["history"] if e.get("accuracy") is not None]
    axes[0, 0].plot([e["round"] for e in dev], [e["accuracy"] for e in dev], marker="o", label="dev")
    test = results["eval"].get("test") or {}
    if test.get("accuracy") is not None and rounds:
        last = rounds[-1]["round"]
        axes[0, 0].plot([last], [test["accuracy"]], marker="*", markersize=12, linestyle="", label="test (end)")
        axes[0, 0].annotate(
            f"{test['accuracy']:.3f}", (last, test["accuracy"]), textcoords="offset points", xytext=(6, -4)
        )
    axes[0, 0].set(title="accuracy", xlabel="round (0 = untrained)")
    axes[0, 0].legend(fontsize=8)
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
    _plot_drift(axes[2, 0], results["eval"]["history"])
    _plot_swaps(axes[2, 1], results["eval"])
    for ax in (axes[0, 0], axes[0, 1], axes[1, 0], axes[1, 1], axes[2, 0]):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    if len(numbers) == 1:  # one round: a range around it, so no fractional ticks appear
        for ax in (axes[1, 0], axes[1, 1], axes[2, 0]):
            ax.set_xlim(numbers[0] - 1, numbers[0] + 1)
    fig.suptitle(f"{results['mode']}: {results['config']['task']} on {results['config']['model']}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _plot_drift(ax, history: list[Mapping[str, Any]]) -> None:
    """The bottom's relative change from its start at each evaluation (trainable tensors, cut activations)."""
    drifted = [e for e in history if "drift" in e]
    for key, label in (("params", "trainable tensors"), ("activations", "cut activations (probe batch)")):
        ax.plot([e["round"] for e in drifted], [100 * e["drift"][key] for e in drifted], marker="o", label=label)
    ax.set(title="bottom's drift from its start", xlabel="round", ylabel="% of its norm")
    ax.set_ylim(bottom=0)
    if drifted:
        ax.legend()


def _plot_swaps(ax, evaluation: Mapping[str, Any]) -> None:
    """Each swap evaluation: accuracy of the same top over the trained and over the initial bottom."""
    swaps = [(f"round {e['round']}", e["swap"]) for e in evaluation["history"] if "swap" in e]
    if (evaluation.get("test") or {}).get("swap"):
        swaps.append(("test", evaluation["test"]["swap"]))
    ax.set(title="swap: the top over the trained / initial bottom", ylabel="accuracy")
    if not swaps:
        ax.text(0.5, 0.5, "no swap evaluation (eval-swap = none)", ha="center", va="center", transform=ax.transAxes)
        return
    at = range(len(swaps))
    ax.bar([i - 0.2 for i in at], [s["accuracy"] for _, s in swaps], width=0.4, label="trained bottom")
    ax.bar([i + 0.2 for i in at], [s["initial_accuracy"] for _, s in swaps], width=0.4, label="initial bottom")
    for i, (_, s) in zip(at, swaps):
        ax.annotate(f"+{s['gained']} / -{s['lost']}\np={s['p_value']:.2g}", (i, 0.02), ha="center", fontsize=8)
    ax.set_xticks(list(at), [name for name, _ in swaps])
    ax.set_ylim(0, 1)
    ax.legend(loc="upper right", fontsize=8)
