"""Error and bytes of sending activations as float16 / bfloat16 instead of float32, on one HOSL step.

    python -m benchmarks.wire_dtype [--scenario sim_configs/quick_minilm.toml] [--steps 3]

The same client (same seeds, same batches) runs against identical servers with each wire dtype;
reported: upload bytes per step, the clean-loss error, and the error of the ZO projected
gradients (l+ - l-) / 2 eps, which is what the client's update is made of.
"""

from __future__ import annotations

import argparse
import copy

import torch

from benchmarks.report import write_report
from fl_app.batches import BatchStream
from fl_app.config import make_config, read_scenario
from fl_app.local_transport import InProcessLink
from fl_app.scenario import build_client, build_server, load_split, load_task_data


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scenario", default="sim_configs/quick_minilm.toml")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", default="runs/wire_dtype", help="writes <out>.md and <out>.json")
    args = parser.parse_args()
    base = make_config(read_scenario(args.scenario))
    loaded, bottom, top = load_split(base)
    data = load_task_data(base, loaded)
    results = {}
    for dtype in ("float32", "float16", "bfloat16"):
        config = base.updated({"wire-dtype": dtype})
        server = build_server(config, copy.deepcopy(top), data.task.num_classes)
        client = build_client(config, bottom, 0)
        stream = BatchStream(data.encoder, data.client_examples(0), config["batch-size"], 0)
        link = InProcessLink(server.handle_bytes)
        stats = [client.train_step(stream.batch(step), link) for step in range(args.steps)]
        link.close()
        results[dtype] = stats
    ref = results["float32"]
    lines = [
        "| wire dtype | upload MiB / step | max clean-loss error | max projected-gradient error | "
        "median |g| (fp32) | sign agreement of g |",
        "|---|---|---|---|---|---|",
    ]
    rows = []
    for dtype, stats in results.items():
        loss_err = max(abs(a.loss - b.loss) for a, b in zip(stats, ref))
        g, g_ref = torch.tensor([x.projected_grads for x in stats]), torch.tensor([x.projected_grads for x in ref])
        sign = float((torch.sign(g) == torch.sign(g_ref)).float().mean())
        up = sum(s.bytes_up for s in stats) / len(stats)
        grad_err = float((g - g_ref).abs().max())
        rows.append(
            {
                "dtype": dtype,
                "bytes_up_per_step": up,
                "loss_error": loss_err,
                "grad_error": grad_err,
                "sign_agreement": sign,
            }
        )
        lines.append(
            f"| {dtype} | {up / 2**20:.2f} | {loss_err:.2e} | {grad_err:.2e} | "
            f"{float(g_ref.abs().median()):.2e} | {sign:.2f} |"
        )
    print("\n".join(lines))
    write_report(args.out, "\n".join(lines), rows)


if __name__ == "__main__":
    main()
