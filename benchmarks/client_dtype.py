"""What storing a ZO client's bottom in half precision does to one step, against float32.

    python -m benchmarks.client_dtype [--scenario sim_configs/sst2_minilm_full.toml] [--steps 3] \
        [--out docs/results/client_dtype]

For each ``client-dtype`` the same bottom takes the same ZO steps (same seeds, batches and row
selection) against a fixed smooth readout of its activations, L(h) = <r, h> / sqrt(numel) (the
server is left out, so only the client's rounding differs). Per dtype it reports:

* the projected gradients' relative error against float32's (the perturbation eps z is rounded
  to the weights' spacing, and the forward runs in that dtype);
* the drift a perturb / restore walk leaves (before the update), relative to eps;
* the update actually applied against the intended -lr/Q sum g_q z_q computed in float64 from the
  same gradients: the fraction lost to rounding (||actual - intended|| / ||intended||);
* the weights' bytes and the forward time (this CPU has no native half-precision matmul).

Writes ``<out>.md`` and ``<out>.json``.
"""

from __future__ import annotations

import argparse
import functools
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.report import write_report
from fl_app.batches import BatchStream
from fl_app.config import make_config, read_scenario
from fl_app.scenario import client_trainable, load_client_bottom, load_task_data, split_client
from fl_app.zo import ZOEstimator, draw_seeds, step_generator

ROOT = Path(__file__).resolve().parents[1]
DTYPES = ("float32", "float16", "bfloat16")


def _measure(scenario: dict[str, Any], dtype: str, steps: int) -> dict[str, Any]:
    config = make_config({**scenario, "client-dtype": dtype})
    loaded, bottom = load_client_bottom(config)
    data = load_task_data(config, loaded)
    client = split_client(config, bottom, client_trainable(config, bottom, 0), 0)
    stream = BatchStream(data.encoder, data.client_examples(0), config["batch-size"], config.client_seed(0))
    readout = torch.randn(data.encoder.max_length * bottom.hidden_size, generator=torch.Generator().manual_seed(0))
    eps, q = config["zo-eps"], config["zo-queries"]
    out: dict[str, Any] = {
        "dtype": dtype,
        "grads": [],
        "drift": [],
        "drift_rms": [],
        "update_error": [],
        "forward_s": [],
        "weights_mib": sum(p.numel() * p.element_size() for p in bottom.parameters()) / 2**20,
    }

    def loss(batch) -> float:
        started = time.perf_counter()
        h = client._forward(batch).double().flatten(1)
        out["forward_s"].append(time.perf_counter() - started)
        return float((h * readout[: h.shape[1]].double()).sum() / h.numel() ** 0.5)

    with torch.no_grad():
        for step in range(steps):
            batch = stream.batch(step)
            rows = client.step_rows(batch)
            seeds = draw_seeds(step_generator(config["seed"], step), q)
            before = [p.detach().double().clone() for p in client.params]
            losses = client.zo.walk(seeds, functools.partial(loss, batch), rows)
            walked = [p.detach().clone() for p in client.params]
            client.zo.perturb(seeds[-1], +1.0, rows)  # restore, to see what the walk left behind
            drift = max(float((p.double() - b).abs().max()) for p, b in zip(client.params, before))
            squares = sum(float((p.double() - b).pow(2).sum()) for p, b in zip(client.params, before))
            out["drift_rms"].append((squares / sum(b.numel() for b in before)) ** 0.5 / eps)
            for p, w in zip(client.params, walked):  # back to the walk's end exactly (a -eps pass would round)
                p.copy_(w)
            grads = client.zo.finish(seeds, losses, rows)
            intended = [b.clone() for b in before]
            ZOEstimator(intended, eps, config["client-lr"], directions=config["zo-directions"]).update(
                seeds, grads, rows=rows
            )
            num = sum(
                float(((p.double() - b) - (i - b)).pow(2).sum()) for p, b, i in zip(client.params, before, intended)
            )
            den = sum(float((i - b).pow(2).sum()) for b, i in zip(before, intended))
            out["grads"].append(grads)
            out["drift"].append(drift / eps)
            out["update_error"].append((num / den) ** 0.5)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", default="sim_configs/sst2_minilm_full.toml")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", default="docs/results/client_dtype")
    args = parser.parse_args()
    scenario = read_scenario(args.scenario)
    results = [_measure(scenario, dtype, args.steps) for dtype in DTYPES]
    reference = torch.tensor(results[0]["grads"], dtype=torch.float64)
    lines = [
        f"# Half-precision ZO client weights ({Path(args.scenario).name}, {args.steps} steps, "
        f"eps {scenario.get('zo-eps', 1e-3)}, client-lr {scenario.get('client-lr')})",
        "",
        "`python -m benchmarks.client_dtype " + " ".join(f"--{k} {v}" for k, v in vars(args).items()) + "`",
        "",
        "| client-dtype | weights MiB | forward ms | projected-gradient error vs float32 | walk drift / eps "
        "| walk drift rms / eps | update lost to rounding |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        grads = torch.tensor(r["grads"], dtype=torch.float64)
        r["grad_error"] = float((grads - reference).norm() / reference.norm())
        r["forward_ms"] = 1000 * sorted(r["forward_s"])[len(r["forward_s"]) // 2]
        lines.append(
            f"| {r['dtype']} | {r['weights_mib']:.1f} | {r['forward_ms']:.1f} | {r['grad_error']:.3f} "
            f"| {max(r['drift']):.3f} | {max(r['drift_rms']):.4f} | {max(r['update_error']):.3f} |"
        )
    lines += [
        "",
        "Projected-gradient error: ||g - g_float32|| / ||g_float32|| over all queries and steps. Walk drift: "
        "the largest change a perturb / restore walk leaves on any weight, in units of eps (float32: "
        "float rounding only; weights far from zero, e.g. LayerNorm gains near 1, have the widest "
        "spacing), and its root mean square over all perturbed weights. Update lost: "
        "||applied - intended|| / ||intended|| for the step's update, "
        "the intended one computed in float64 from the same projected gradients (1.0: nothing applied).",
    ]
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    write_report(out, "\n".join(lines), results)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
