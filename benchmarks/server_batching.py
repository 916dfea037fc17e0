"""Does the server score the 2Q perturbed activations faster stacked into one forward? Side by side.

    python -m benchmarks.server_batching [--scenario sim_configs/quick_minilm.toml] [--queries 10] [--repeats 3]

Times SplitServer.score_perturbed on one real HOSL request with score_chunk_rows = batch size
(one forward per perturbed activation) against larger chunks (several per forward), interleaved.
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.report import write_report
from fl_app.batches import BatchStream
from fl_app.config import make_config, read_scenario
from fl_app.local_transport import InProcessLink
from fl_app.protocol import decode_frame
from fl_app.scenario import build_client, build_server, load_split, load_task_data


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scenario", default="sim_configs/quick_minilm.toml")
    parser.add_argument("--queries", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="runs/server_batching", help="writes <out>.md and <out>.json")
    args = parser.parse_args()
    config = make_config({**read_scenario(args.scenario), "zo-queries": args.queries})
    loaded, bottom, top = load_split(config)
    data = load_task_data(config, loaded)
    server = build_server(config, top, data.task.num_classes)
    client = build_client(config, bottom, 0)
    batch = BatchStream(data.encoder, data.client_examples(0), config["batch-size"], 0).batch(0)
    link = InProcessLink(server.handle_bytes, threaded=False, record=True)
    client.train_step(batch, link)
    frames = [decode_frame(f) for f in link.frames]
    request = frames[-1]
    request.perturbed = torch.cat([part.perturbed for part in frames[:-1]])
    rows = request.clean.shape[0]
    chunks = [rows, rows * 2, rows * 5, rows * 2 * args.queries]
    timings = {c: [] for c in chunks}
    reference = None
    for _ in range(args.repeats):
        for chunk in chunks:
            server.score_chunk_rows = chunk
            started = time.perf_counter()
            losses = server.score_perturbed(request, request.perturbed)
            timings[chunk].append(time.perf_counter() - started)
            reference = losses if reference is None else reference
            assert torch.allclose(losses, reference, atol=1e-5), "stacking changed the losses"
    base = min(timings[rows])
    lines = [
        f"| perturbed activations per forward | seconds (best of {args.repeats}) | speed-up vs 1 |",
        "|---|---|---|",
    ]
    for chunk in chunks:
        best = min(timings[chunk])
        lines.append(f"| {chunk // rows} | {best:.3f} | {base / best:.2f}x |")
    print("\n".join(lines))
    write_report(args.out, "\n".join(lines), {str(chunk // rows): timings[chunk] for chunk in chunks})


if __name__ == "__main__":
    main()
