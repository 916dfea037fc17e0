"""What a user takes away from a run: the trained model in Hugging Face format.

    hosl-export RUN_DIR --out DIR [--client N | --synced] [--states DIR]   (fl_app.export_cli)

The run's trained top (``checkpoint.pt``: its latest finished round, so a run still going exports
too) is stitched with a bottom into the model family's own class, LoRA adapters merged into their
weights, and saved with ``save_pretrained`` beside the tokenizer: ``AutoModelForCausalLM`` (OPT,
Llama-family) or ``AutoModelForSequenceClassification`` (BERT-style, with the classifier the run
trained) loads it with no import of this project. Which bottom: a client's personal one
(``--client N``, from the client states the run kept), the synced one (``--synced``: the pristine
bottom with every client's ZO updates replayed, or the clients' average for FO bottoms), or, for a
run whose bottom never trained, the pristine one. Before anything is written the stitched model's
logits on a probe batch are checked against the split model's (bottom, then top).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import logging as hf_logging

from fl_app.checkpoint import CheckpointRefused, check_run_checkpoint, read_checkpoint
from fl_app.client_store import load_client_state
from fl_app.config import Config, make_config
from fl_app.part_loading import BOTTOM_KEY_PREFIXES, layer_of, load_model
from fl_app.records import ClientState, History
from fl_app.split import ClientBottom, ServerTop
from fl_app.tasks import get_task

# Largest |logit| difference between the exported model and the split one, relative to the largest
# |logit| (at least 1): merging LoRA into a weight rounds it once more in float32, which a 30-layer
# model with logits near 30 carries to about 6e-5 in absolute terms (SmolLM2), 2e-6 of their scale.
AGREEMENT = 1e-5


class ExportError(ValueError):
    """A run that cannot be exported as asked: one line saying why."""


@dataclass(frozen=True)
class RunCheckpoint:
    """A run folder's config and its latest checkpoint."""

    folder: Path
    config: Config
    saved: dict[str, Any]

    @property
    def round(self) -> int:
        return int(self.saved["round"])

    @property
    def run_id(self) -> str:
        return str(self.saved["run_id"])


def read_run(folder: Path) -> RunCheckpoint:
    """The run in ``folder``: its config (results.json) and latest checkpoint; ExportError if it has none."""
    results_file, checkpoint_file = folder / "results.json", folder / "checkpoint.pt"
    if not results_file.is_file():
        raise ExportError(f"{folder} is not a run folder (no results.json)")
    if not checkpoint_file.is_file():
        raise ExportError(f"{folder} has no checkpoint.pt yet (the run has not finished a round)")
    try:
        config = make_config(json.loads(results_file.read_text())["config"])
    except (KeyError, ValueError) as err:
        raise ExportError(f"{results_file} holds no usable run config: {err}") from err
    try:
        saved = read_checkpoint(checkpoint_file)
    except CheckpointRefused as err:
        raise ExportError(str(err)) from None
    return RunCheckpoint(folder, config, saved)


def client_states(run: RunCheckpoint, states: Path | None = None) -> dict[int, ClientState]:
    """Each client's state as of the checkpoint (the one its last committed session wrote), from
    ``states`` (a node's ``state-dir`` for this run) or the run folder's ``clients/<run id>``."""
    folder = states if states is not None else run.folder / "clients" / run.run_id
    found = {}
    for client, session in sorted(run.saved["committed"].items()):
        if (state := load_client_state(folder, client, run.round, run.run_id, session=session)) is not None:
            found[client] = state
    return found


def trained_split(
    run: RunCheckpoint, client: int | None = None, synced: bool = False, states: Path | None = None
) -> tuple[ClientBottom, ServerTop, Any, dict[str, Any]]:
    """(bottom, top, tokenizer, which bottom) of the run as trained, built as the run built them."""
    from fl_app.client_session import catch_up, replay_own, restore
    from fl_app.scenario import build_server, client_trainable, load_split, split_client

    config = run.config
    loaded, bottom, top = load_split(config)
    num_classes = get_task(config.data.task).num_classes
    server = build_server(config, top, num_classes)
    try:  # what resume checks: names, shapes, float dtypes, finite values, a round its results reached
        check_run_checkpoint(run.saved, server.top, "export")
    except CheckpointRefused as err:
        raise ExportError(str(err)) from None
    params = dict(server.top.named_parameters())
    with torch.no_grad():
        for name, value in run.saved["server"].items():
            params[name].copy_(value)
    index = 0 if client is None else client
    trainable = client_trainable(config, bottom, index)
    which = _bottom_choice(run, trainable, client, synced, states)
    side = split_client(config, bottom, trainable, index)  # the bottom as a client holds it
    if which["bottom"] == "client":
        state = which.pop("state")
        restore(side, state)
        if state.updates:  # a state kept as seeds (client-state = seeds): its own steps, replayed
            replay_own(side, state.updates)
    elif which["bottom"] == "synced" and config.client_order == "zo":  # every client's updates, replayed
        catch_up(side, History(**run.saved["history"]), partition_id=-1, synced_round=0)
    elif which["bottom"] == "synced":  # FO: the clients' average, taken as a client takes it
        if not run.saved.get("average"):
            raise ExportError("the checkpoint holds no averaged bottom yet")
        restore(side, ClientState(weights=dict(run.saved["average"])))
    server.top.to("cpu")
    bottom.to("cpu")
    return bottom, server.top, loaded.tokenizer, which


def _bottom_choice(
    run: RunCheckpoint, trainable: list[nn.Parameter], client: int | None, synced: bool, states: Path | None
) -> dict[str, Any]:
    """Which bottom goes into the export, checked against what the run has."""
    config = run.config
    if client is not None and synced:
        raise ExportError("give --client N or --synced, not both")
    if not trainable:
        if client is not None or synced:
            raise ExportError("the run's bottom never trained (client-params = frozen): leave out --client / --synced")
        return {"bottom": "pristine"}
    is_synced = config.federation.bottoms == "synced"
    if synced:
        if not is_synced:
            raise ExportError("the run kept personal bottoms (bottoms = personal): choose one with --client N")
        return {"bottom": "synced"}
    kept = client_states(run, states)
    choices = (
        f"--client {' / '.join(map(str, sorted(kept)))}" if kept else "no client states were kept (client-checkpoints)"
    )
    if is_synced:
        choices += " or --synced"
    if client is None:
        if len(kept) == 1 and not is_synced:
            client = next(iter(kept))
        else:
            raise ExportError(f"the run trained its bottoms: choose one: {choices}")
    if client not in kept:
        raise ExportError(f"no state of client {client} up to round {run.round}; choose {choices}")
    return {"bottom": "client", "client": client, "state": kept[client]}


def merge_lora(module: nn.Module) -> None:
    """Fold every LoRA adapter in ``module`` into its base weight and put the base layer back in the
    adapter's place (what peft's ``merge_and_unload`` does to a whole PeftModel)."""
    from peft.tuners.lora import LoraLayer

    for name, sub in list(module.named_modules()):
        if isinstance(sub, LoraLayer):
            sub.merge()
            parent, _, attr = name.rpartition(".")
            setattr(module.get_submodule(parent) if parent else module, attr, sub.get_base_layer())


def whole_model_values(bottom: ClientBottom, top: ServerTop, cut: int) -> dict[str, torch.Tensor]:
    """The bottom's and the top's tensors under the whole model's names (layer i of the top is layer
    cut + i of the whole)."""
    family = bottom.family
    values = {f"{BOTTOM_KEY_PREFIXES[family][0]}{k}": v for k, v in bottom.body.state_dict().items()}
    for key, value in top.model.state_dict().items():
        layer = layer_of(key, family)
        values[f"{layer[0]}.{cut + layer[1]}.{layer[2]}" if layer else key] = value
    return values


def stitch(bottom: ClientBottom, top: ServerTop, whole: PreTrainedModel, cut: int) -> PreTrainedModel:
    """``whole`` (a freshly loaded model of the same name) with the bottom's and the top's weights, LoRA
    merged; a tied LM head whose weight now differs from the bottom's embedding is untied."""
    merge_lora(bottom)
    merge_lora(top)
    values = whole_model_values(bottom, top, cut)
    if bottom.family != "bert":
        head, embedding = whole.get_output_embeddings(), whole.get_input_embeddings()
        tied = head.weight is embedding.weight
        embed_key = f"{BOTTOM_KEY_PREFIXES[bottom.family][0]}embed_tokens.weight"
        if tied and not torch.equal(values["lm_head.weight"], values[embed_key]):
            whole.config.tie_word_embeddings = False
            getattr(whole.config, "text_config", whole.config).tie_word_embeddings = False
            head.weight = nn.Parameter(head.weight.detach().clone())
    expected = whole.state_dict()
    missing = sorted(set(expected) - set(values))
    if missing:
        raise RuntimeError(f"the split model lacks weights of the whole model: {missing[:5]}")
    whole.load_state_dict({k: values[k] for k in expected}, strict=True)
    return whole.eval()


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """Loading reports and progress bars off: the reports list a head as newly initialised, which the
    trained one replaces."""
    ours, verbosity = logging.getLogger("fl_app.part_loading"), hf_logging.get_verbosity()
    level = ours.level
    ours.setLevel(logging.ERROR)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        ours.setLevel(level)
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()


def probe_batch(vocab_size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [2, 12] (away from the special ids at the start of a vocabulary) and a mask whose
    second row is right-padded, as prompts are."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(min(8, vocab_size - 1), vocab_size, (2, 12), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    return ids, mask


@torch.no_grad()
def split_logits(bottom: ClientBottom, top: ServerTop, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The split model's logits: the bottom's cut activations through the top."""
    return top(bottom(ids, mask), mask).float()


@torch.no_grad()
def whole_logits(model: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, attention_mask=mask).logits.float()


def _max_gap(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    """Largest |a - b|, over the real tokens only for per-token logits."""
    if a.dim() == 3:
        a, b = a[mask.bool()], b[mask.bool()]
    return float((a - b).abs().max())


def _commit() -> str:
    """The commit of the code that exported (``unknown`` outside a git checkout)."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    except OSError:
        return "unknown"
    return out.stdout.strip() or "unknown"


def provenance(run: RunCheckpoint, which: dict[str, Any]) -> dict[str, Any]:
    """What the export came from: run, round, bottom, code and the run's config."""
    return {
        "run_dir": str(run.folder),
        "run_id": run.run_id,
        "round": run.round,
        "bottom": which["bottom"],
        **({"client": which["client"]} if "client" in which else {}),
        "commit": _commit(),
        "task": run.config.data.task,
        "config": dict(run.config),
    }


def model_card(record: dict[str, Any], parts: str, family: str) -> str:
    """README.md of the export: what it is, where it came from and how to load it."""
    from fl_app.tasks import Example

    config = record["config"]
    task = get_task(config["task"])
    loader = "AutoModelForSequenceClassification" if family == "bert" else "AutoModelForCausalLM"
    example = Example({name: "{" + name + "}" for name in task.required}, 0)
    use = (
        f"Classes are the classifier's {task.num_classes} logits."
        if family == "bert"
        else f"Prompt (MeZO's template for {task.name}): `{task.prompt(example)!r}`; a class's score is the "
        f"log-probability of its candidate {task.candidates(example)!r} after the prompt (the first token "
        "of each candidate, read at the prompt's last token)."
    )
    bottom = record["bottom"] + (f" (client {record['client']})" if "client" in record else "")
    lora = "lora" in (config["client-params"], config["server-params"])
    model_lines = [f"model = {loader}.from_pretrained(PATH)" + ("  # LoRA merged into the weights" if lora else "")]
    adapter_dir = "PATH/adapter" if parts == "both" else "PATH"
    adapter_lines = [
        "from peft import PeftModel",
        f"base = {loader}.from_pretrained(BASE)  # the run's base model: adapter_config.json names it",
        f'model = PeftModel.from_pretrained(base, "{adapter_dir}")',
    ]
    code = {"model": model_lines, "adapters": adapter_lines, "both": model_lines + ["# or", *adapter_lines]}[parts]
    return "\n".join(
        [
            f"# {config['model']} fine-tuned on {task.name} with HOSL-Flower",
            "",
            f"Mode `{config['mode']}`: the first {config['cut-layer']} layers trained on the clients "
            f"({config['client-params']}), the rest on the server ({config['server-params']}). "
            f"Exported from run `{record['run_id']}` after round {record['round']}, bottom: {bottom}, "
            f"at commit {record['commit']}.",
            "",
            "```python",
            f"from transformers import {loader}, AutoTokenizer",
            *code,
            "tokenizer = AutoTokenizer.from_pretrained(PATH)",
            "```",
            "",
            use,
            "",
            "The run's config:",
            "",
            "```json",
            json.dumps(config, indent=1, sort_keys=True, default=float),
            "```",
            "",
        ]
    )


ADAPTER_SIDES = ("lora", "frozen")  # what each side may have trained for peft adapters to hold it all
HEAD_MODULES = {"bert": ["classifier", "pooler"]}  # trained whole beside the adapters (peft's modules_to_save)


def _plain_name(name: str) -> str:
    """A peft model's parameter name as the split parts name it (adapter "default")."""
    name = name.removeprefix("base_model.model.")
    return name.replace(".modules_to_save.default.", ".").replace(".original_module.", ".")


def adapter_model(bottom: ClientBottom, top: ServerTop, whole: PreTrainedModel, config: Config) -> nn.Module:
    """``whole`` (the pristine base model) as a peft model whose LoRA adapters (and, for encoders, the
    trained classifier and pooler) are the run's; ExportError unless both sides trained LoRA or nothing."""
    from peft import LoraConfig, get_peft_model

    from fl_app.trainable import DEFAULT_LORA_TARGETS

    model = config.model
    _require_adapters(config)
    family = bottom.family
    lora = LoraConfig(
        r=model.lora_r,
        lora_alpha=model.lora_alpha,
        target_modules=list(model.targets or DEFAULT_LORA_TARGETS[family]),
        lora_dropout=0.0,
        modules_to_save=HEAD_MODULES.get(family),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # peft asks transformers a deprecated question
        peft_model = get_peft_model(whole, lora)
    values = whole_model_values(bottom, top, config.model.cut_layer)
    with torch.no_grad():
        for name, tensor in peft_model.state_dict(keep_vars=True).items():
            plain = _plain_name(name)
            if plain in values:
                tensor.copy_(values[plain])
            elif "lora_B" in plain:  # a frozen side's layer: its adapter adds nothing
                tensor.zero_()
    return peft_model.eval()


def export_run(
    folder: Path,
    out: Path,
    client: int | None = None,
    synced: bool = False,
    states: Path | None = None,
    parts: str = "auto",
) -> Path:
    """Export the run in ``folder`` to ``out`` (a new or empty folder) and return ``out``. ``parts``:
    ``model`` (the merged model), ``adapters`` (peft adapters only), ``both`` (the model, and its
    adapters in ``out/adapter``), ``auto`` (``both`` for a LoRA run, else ``model``)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"--out {out} exists and is not an empty folder")
    run = read_run(folder)
    config = run.config
    if parts == "auto":
        parts = "both" if adapters_possible(config) else "model"
    elif parts != "model":
        _require_adapters(config)
    with quiet_loading():
        bottom, top, tokenizer, which = trained_split(run, client, synced, states)
        num_classes = get_task(config.data.task).num_classes
        copies = 2 if parts == "both" else 1  # the adapters wrap one pristine model, the merged model fills one
        fresh = [load_model(config.model.name, num_classes, config.run.seed).model for _ in range(copies)]
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))  # ours alone: safe to remove
    partial.chmod(0o755)
    try:
        with quiet_loading():
            _write_parts(partial, parts, config, bottom, top, fresh, tokenizer, provenance(run, which))
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)  # nothing half-written is left
        raise
    if out.exists():
        out.rmdir()
    partial.rename(out)
    return out


def _write_parts(
    folder: Path,
    parts: str,
    config: Config,
    bottom: ClientBottom,
    top: ServerTop,
    fresh: list[PreTrainedModel],
    tokenizer: Any,
    record: dict[str, Any],
) -> None:
    """Write what ``parts`` asks for into ``folder``, each checked against the split model first."""
    ids, mask = probe_batch(fresh[0].config.vocab_size)
    expected = split_logits(bottom, top, ids, mask)
    if parts in ("adapters", "both"):
        adapted = adapter_model(bottom, top, fresh.pop(), config)
        record["adapter_logit_gap"] = _check(whole_logits(adapted, ids, mask), expected, mask, "adapters")
        adapted.peft_config["default"].base_model_name_or_path = base_model_path(config.model.name)
        # embeddings never train under LoRA: no lookup of the base model's vocabulary (a download)
        adapted.save_pretrained(folder / "adapter" if parts == "both" else folder, save_embedding_layers=False)
    if parts in ("model", "both"):
        model = stitch(bottom, top, fresh.pop(), config.model.cut_layer)
        record["logit_gap"] = _check(whole_logits(model, ids, mask), expected, mask, "stitched model")
        model.config.hosl_export = {k: v for k, v in record.items() if k != "config"}
        if bottom.family == "bert":  # a classifier: its logits named by the task's classes in pipelines
            names = get_task(config.data.task).class_names
            model.config.id2label = dict(enumerate(names))
            model.config.label2id = {name: i for i, name in enumerate(names)}
        model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "README.md").write_text(model_card(record, parts, bottom.family))
    (folder / "hosl_run_config.json").write_text(json.dumps(record["config"], indent=1, default=float))
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.rglob("*"):  # every file as the user's other files (some writers make theirs 0600)
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def adapters_possible(config: Config) -> bool:
    """Whether peft adapters can hold everything the run trained."""
    sides = (config.model.client_params, config.model.server_params)
    return all(v in ADAPTER_SIDES for v in sides) and "lora" in sides


def _require_adapters(config: Config) -> None:
    if not adapters_possible(config):
        sides = f"client-params = {config.model.client_params}, server-params = {config.model.server_params}"
        raise ExportError(
            "adapters hold LoRA runs only (both sides lora or frozen, one of them lora); "
            f"this run has {sides}: export the merged model instead"
        )


def base_model_path(name: str) -> str:
    """What ``PeftModel.from_pretrained`` needs to find the base model: a hub name as it is, a local or
    packaged model's folder; a tiny model has none (it is built in-process)."""
    from fl_app.model_catalog import TINY_MODELS, resolve_model_path

    return name if name in TINY_MODELS else str(resolve_model_path(name))


def _check(got: torch.Tensor, expected: torch.Tensor, mask: torch.Tensor, what: str) -> float:
    """The largest logit difference, relative to the logits' scale; an error past :data:`AGREEMENT`."""
    scale = max(1.0, float(expected.abs().max()))
    gap = _max_gap(got, expected, mask) / scale
    if not gap <= AGREEMENT:
        raise RuntimeError(f"the {what}'s logits differ from the split model's by {gap:.2e} of their scale")
    return gap
