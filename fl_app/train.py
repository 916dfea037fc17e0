"""Local runner: one server and M in-process clients, the same parties the Flower apps use.

    python -m fl_app.train sim_configs/smoke_tiny.toml --set mode=fo-fo --out runs/smoke
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from fl_app.config import make_config, parse_overrides, read_scenario
from fl_app.local_transport import InProcessLink
from fl_app.metrics import pool_eval
from fl_app.scenario import (BatchStream, build_client, build_server, client_seed, describe_parties, eval_batches,
                              load_split, load_task_data, shard)

log = logging.getLogger("fl_app.train")


def write_json_atomic(path: Path, payload: Mapping[str, Any]) -> None:
    """Write JSON via a temporary file and rename, so a crash never leaves a truncated file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=float))
    os.replace(tmp, path)


def eval_examples(data, split: str, config: Mapping[str, Any]) -> list:
    """The examples evaluated on ``split``: the first ``eval-examples`` of dev (0 = all), all of test."""
    examples = data.splits[split]
    limit = config["eval-examples"] if split == "dev" else 0
    return examples[:limit] if limit else examples


def evaluate_clients(clients, link: InProcessLink, data, split: str, config: Mapping[str, Any]) -> dict[str, Any]:
    """Federated evaluation: client i scores shard i of ``split`` with its bottom and the shared top."""
    examples = eval_examples(data, split, config)
    reports = []
    for index, client in enumerate(clients):
        part = shard(examples, index, len(clients))
        if part:
            reports.append(client.evaluate(eval_batches(data.encoder, part, config["batch-size"]), link))
    return pool_eval(reports)


FLOWER_ONLY = {"tune-trials": 0, "subset-selector": "full", "local-epochs": 0.0}


def check_local_runnable(config: Mapping[str, Any]) -> None:
    """Raise naming the key if the scenario needs the Flower apps (tuning, data subsets)."""
    for key, plain in FLOWER_ONLY.items():
        if config[key] != plain:
            raise ValueError(f"config key '{key}' = {config[key]!r}: tuning and data subsets run in the Flower apps "
                             f"(flwr run); the local runner needs {key} = {plain!r}")


def run(config: Mapping[str, Any], out_dir: Path) -> dict[str, Any]:
    """Run a scenario in-process and write ``out_dir/results.json``; returns the results."""
    check_local_runnable(config)
    torch.manual_seed(config["seed"])
    started = time.perf_counter()
    loaded, bottom, top = load_split(config)  # each part loaded on its own, never the whole model
    data = load_task_data(config, loaded)
    server = build_server(config, top, data.task.num_classes)
    count = config["num-clients"]  # the last client takes the loaded bottom itself, the others a copy
    clients = [build_client(config, bottom, i, copy_bottom=i < count - 1) for i in range(count)]
    del bottom
    link = InProcessLink(server)
    streams = [BatchStream(data.encoder, data.client_examples(i), config["batch-size"], client_seed(config, i))
               for i in range(len(clients))]
    results: dict[str, Any] = {
        "mode": config["mode"], "config": dict(config), "parameters": describe_parties(clients[0], server),
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads()},
        "history": [], "eval": {"history": []}, "client": {}, "comm": {},
    }
    initial = evaluate_clients(clients, link, data, "dev", config)
    results["eval"]["history"].append({"round": 0, **initial})
    log.info("round 0 (untrained): dev accuracy %.4f", initial["accuracy"])
    step = 0
    for rnd in range(1, config["num-rounds"] + 1):
        for index, (client, stream) in enumerate(zip(clients, streams)):
            for _ in range(config["local-steps"]):
                stats = client.train_step(stream.batch(client.steps), link)
                step += 1
                results["history"].append({
                    "round": rnd, "client": index, "step": step, "train_loss": stats.loss,
                    "bytes_up": stats.bytes_up, "bytes_down": stats.bytes_down,
                    "peak_memory_bytes": stats.peak_memory_bytes, "seconds": stats.seconds})
        if rnd % config["eval-every"] == 0 or rnd == config["num-rounds"]:
            dev = evaluate_clients(clients, link, data, "dev", config)
            results["eval"]["history"].append({"round": rnd, "step": step, **dev})
            losses = [h["train_loss"] for h in results["history"] if h["round"] == rnd]
            log.info("round %d: train loss %.4f, dev accuracy %.4f", rnd, sum(losses) / len(losses), dev["accuracy"])
    final = results["eval"]["history"][-1]
    results["eval"]["accuracy"] = final["accuracy"]
    if config["eval-test"]:
        results["eval"]["test"] = evaluate_clients(clients, link, data, "test", config)
    history = results["history"]
    results["client"] = {
        "peak_memory_bytes": max(h["peak_memory_bytes"] for h in history),
        "seconds_per_step": sum(h["seconds"] for h in history) / len(history),
    }
    train_up = sum(h["bytes_up"] for h in history)
    train_down = sum(h["bytes_down"] for h in history)
    results["comm"] = {"bytes_up": link.bytes_up, "bytes_down": link.bytes_down,
                       "train_bytes_up_per_step": train_up / len(history),
                       "train_bytes_down_per_step": train_down / len(history)}
    results["wall_seconds"] = time.perf_counter() - started
    link.close()
    write_json_atomic(out_dir / "results.json", results)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scenario", help="flat TOML scenario file (e.g. sim_configs/smoke_tiny.toml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a scenario key")
    parser.add_argument("--out", required=True, help="output directory for results.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        config = make_config({**read_scenario(args.scenario), **parse_overrides(args.set)})
        check_local_runnable(config)
    except ValueError as err:
        parser.error(str(err))
    results = run(config, Path(args.out))
    out = (Path(args.out) / "results.json").resolve()
    print(f"mode={results['mode']} dev accuracy={results['eval']['accuracy']:.4f} "
          f"client peak memory={results['client']['peak_memory_bytes'] / 2**20:.1f} MiB")
    print(f"results: {out}")


if __name__ == "__main__":
    main()
