"""Each side loads only its own part: bottom-only / top-only loading equals cutting the whole model,
the other side's layers are never read, and a client's reset reproduces its starting weights."""

from pathlib import Path

import pytest
import torch
import transformers.modeling_utils
from transformers import LlamaForCausalLM

import fl_app.part_loading
from fl_app.part_loading import load_bottom, load_model, load_top
from fl_app.split import param_counts, split_model
from fl_app.tiny_models import build_tiny_model
from fl_app.trainable import TrainableSpec, configure_trainable, init_lora

LAYERS = 4
# family, how the checkpoint is saved: whole model / base model only (BERT keys without ``bert.``,
# no classifier: the top draws it from the seed) / Llama with an untied head
VARIANTS = ["opt", "llama", "llama-untied", "bert", "bert-base"]


def save_variant(variant: str, folder: Path) -> str:
    """A tiny random model saved with ``save_pretrained`` (safetensors) and its tokenizer."""
    family = variant.split("-")[0]
    loaded = build_tiny_model(f"tiny-{family}", num_labels=3, seed=7, num_layers=LAYERS)
    model = loaded.model
    if variant == "llama-untied":
        config = model.config
        config.tie_word_embeddings = False
        torch.manual_seed(8)
        model = LlamaForCausalLM(config)
    elif variant == "bert-base":
        model = model.bert
    model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    return {v: save_variant(v, tmp_path_factory.mktemp(v)) for v in VARIANTS}


def batch(variant: str, vocab: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(3, vocab, (3, 9), generator=gen)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    out = {"input_ids": ids, "attention_mask": mask}
    if variant.startswith("bert"):
        out["token_type_ids"] = (torch.arange(9) >= 5).long().expand(3, 9).contiguous()
    return out


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("cut", [0, 1, LAYERS])
def test_parts_equal_the_cut_whole_model(checkpoints, variant, cut):
    path = checkpoints[variant]
    reference = load_model(path, num_labels=3, seed=5)
    ref_bottom, ref_top = split_model(reference, cut)
    bottom, tokenizer, family = load_bottom(path, cut, num_labels=3, seed=5)
    top, _, top_family = load_top(path, cut, num_labels=3, seed=5)
    assert family == top_family == reference.family and tokenizer.padding_side == "right"
    b = batch(variant, len(tokenizer))
    tti = b.get("token_type_ids")
    with torch.no_grad():
        hidden = bottom(b["input_ids"], b["attention_mask"], tti)
        ref_hidden = ref_bottom(b["input_ids"], b["attention_mask"], tti)
        assert max_diff(hidden, ref_hidden) <= 1e-5  # all positions, padded ones too
        assert max_diff(top(hidden, b["attention_mask"]), ref_top(ref_hidden, b["attention_mask"])) <= 1e-5
    # the same parameters under the same names (so checkpoints, LoRA targets and ZO orders are unchanged)
    for part, ref in ((bottom, ref_bottom), (top, ref_top)):
        mine, theirs = dict(part.named_parameters()), dict(ref.named_parameters())
        assert list(mine) == list(theirs)
        assert all(torch.equal(mine[n], theirs[n]) for n in mine)
        assert param_counts(part) == param_counts(ref)
    # non-persistent buffers (BERT position / token type ids, rotary frequencies) are right too
    mine, theirs = dict(bottom.named_buffers()), dict(ref_bottom.named_buffers())
    assert list(mine) == list(theirs) and all(torch.equal(mine[n], theirs[n]) for n in mine)


@pytest.mark.parametrize("variant", ["opt", "llama", "bert"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_bottom_is_loaded_in_that_dtype(checkpoints, variant, dtype):
    """client-dtype: the bottom's weights are loaded straight into the dtype (the float32 values
    rounded), and its activations stay close to the float32 bottom's."""
    path = checkpoints[variant]
    bottom, tokenizer, _ = load_bottom(path, 2, num_labels=3, seed=5)
    half, _, _ = load_bottom(path, 2, num_labels=3, seed=5, dtype=dtype)
    full, low = dict(bottom.named_parameters()), dict(half.named_parameters())
    assert list(full) == list(low) and all(p.dtype == dtype for p in low.values())
    assert all(torch.equal(low[n], full[n].to(dtype)) for n in full)
    b = batch(variant, len(tokenizer))
    with torch.no_grad():
        reference = bottom(b["input_ids"], b["attention_mask"], b.get("token_type_ids"))
        rounded = half(b["input_ids"], b["attention_mask"], b.get("token_type_ids"))
    keep = b["attention_mask"].bool()
    assert rounded.dtype == dtype
    assert max_diff(rounded.float()[keep], reference[keep]) <= 0.05 * reference[keep].abs().max().item()


def test_classifier_missing_from_checkpoint_is_drawn_from_the_seed(checkpoints):
    """A base-model checkpoint has no classifier: the top's is seeded exactly as the whole model's."""
    path = checkpoints["bert-base"]
    top5, _, _ = load_top(path, 2, num_labels=3, seed=5)
    top6, _, _ = load_top(path, 2, num_labels=3, seed=6)
    whole = load_model(path, num_labels=3, seed=5).model
    assert torch.equal(top5.model.classifier.weight, whole.classifier.weight)
    assert not torch.equal(top5.model.classifier.weight, top6.model.classifier.weight)
    assert top5.model.classifier.out_features == 3


class ReadRecorder:
    """Wraps transformers' ``safe_open`` to record which checkpoint tensors are actually read."""

    def __init__(self, monkeypatch):
        self.read: set[str] = set()
        original = transformers.modeling_utils.safe_open
        recorder = self

        class Slice:
            def __init__(self, inner, key):
                self.inner, self.key = inner, key

            def __getitem__(self, index):
                recorder.read.add(self.key)
                return self.inner[index]

            def __getattr__(self, name):
                return getattr(self.inner, name)

        class Handle:
            def __init__(self, *args, **kwargs):
                self.inner = original(*args, **kwargs)

            def get_slice(self, key):
                return Slice(self.inner.get_slice(key), key)

            def get_tensor(self, key):
                recorder.read.add(key)
                return self.inner.get_tensor(key)

            def __enter__(self):
                self.inner.__enter__()
                return self

            def __exit__(self, *exc):
                return self.inner.__exit__(*exc)

            def __getattr__(self, name):
                return getattr(self.inner, name)

        monkeypatch.setattr(transformers.modeling_utils, "safe_open", Handle)  # transformers' own loading
        monkeypatch.setattr(fl_app.part_loading, "safe_open", Handle)  # the top's lazy state dict


def layer_of(key: str) -> int | None:
    """Layer index of a checkpoint key, None for keys outside the layer list."""
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        if part in ("layers", "layer") and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


@pytest.mark.parametrize("variant", ["opt", "llama-untied", "bert"])
def test_each_side_reads_only_its_own_tensors(checkpoints, monkeypatch, variant):
    path, cut = checkpoints[variant], 2
    recorder = ReadRecorder(monkeypatch)
    bottom, _, _ = load_bottom(path, cut, num_labels=3)
    client_reads = set(recorder.read)
    assert client_reads, "the recorder saw no reads: the loading path changed"
    assert {layer_of(k) for k in client_reads} - {None} == set(range(cut))
    # outside its layers the client reads only the embeddings (and the final norm's few values, then dropped)
    others = {k for k in client_reads if layer_of(k) is None}
    assert others and all("embed" in k or k.rsplit(".", 2)[-2] in ("norm", "final_layer_norm") for k in others)
    assert not any(word in k for k in client_reads for word in ("lm_head", "classifier", "pooler"))
    recorder.read.clear()
    top, _, _ = load_top(path, cut, num_labels=3)
    assert {layer_of(k) for k in recorder.read} - {None} == set(range(cut, LAYERS))
    # module lists: each side holds only its own layers
    layers = {
        "opt": lambda m: m.decoder.layers if hasattr(m, "decoder") else m.layers,
        "llama": lambda m: m.layers,
        "bert": lambda m: m.encoder.layer,
    }[variant.split("-")[0]]
    assert len(layers(bottom.body)) == cut and len(layers(top._body)) == LAYERS - cut
    names = [n for n, _ in bottom.named_parameters()]
    assert not any(word in n for n in names for word in ("lm_head", "classifier", "pooler"))
    assert not any(n.startswith(("body.norm.", "body.final_layer_norm.")) for n in names)  # dropped after loading
    assert not any("embed" in n for n, _ in top.named_parameters()) or variant != "bert"


@pytest.mark.parametrize("cut", [-1, LAYERS + 1, 1.5, True])
def test_cut_layer_out_of_range_is_rejected(checkpoints, cut):
    for loader in (load_bottom, load_top):
        with pytest.raises(ValueError, match=rf"cut-layer must be an integer in \[0, {LAYERS}\]"):
            loader(checkpoints["opt"], cut)


def test_tiny_parts_are_todays_split():
    whole_bottom, whole_top = split_model(build_tiny_model("tiny-llama", num_labels=2, seed=3), 2)
    bottom, _, _ = load_bottom("tiny-llama", 2, num_labels=2, seed=3)
    top, _, _ = load_top("tiny-llama", 2, num_labels=2, seed=3)
    for part, ref in ((bottom, whole_bottom), (top, whole_top)):
        mine, theirs = dict(part.named_parameters()), dict(ref.named_parameters())
        assert list(mine) == list(theirs) and all(torch.equal(mine[n], theirs[n]) for n in mine)


def test_seeded_lora_init_is_reproducible_and_leaves_the_global_rng_alone():
    bottom, _, _ = load_bottom("tiny-opt", 2)
    spec = TrainableSpec(mode="lora", lora_r=2, lora_alpha=4)
    state = torch.get_rng_state()
    params = configure_trainable(bottom, spec, "opt", lora_seed=11)
    assert torch.equal(torch.get_rng_state(), state)
    first = [p.detach().clone() for p in params]
    assert any(p.abs().sum() > 0 for p in first)
    with torch.no_grad():
        for p in params:
            p.add_(1.0)
    torch.manual_seed(999)  # whatever the global RNG holds
    init_lora(bottom, 11)
    assert all(torch.equal(p, f) for p, f in zip(params, first))
    init_lora(bottom, 12)
    assert not all(torch.equal(p, f) for p, f in zip(params, first))


def session_config(model: str, **over):
    from fl_app.config import make_config, read_scenario

    return make_config({**read_scenario("sim_configs/smoke_tiny.toml"), "model": model, "num-clients": 3, **over})


def trainable(client) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in client.bottom.named_parameters() if p.requires_grad}


def scramble(client) -> None:
    with torch.no_grad():
        for p in client.params:
            p.add_(torch.randn_like(p))


@pytest.fixture
def working_cleared():
    from fl_app import client_session

    client_session._working.cache_clear()
    yield client_session
    client_session._working.cache_clear()


@pytest.mark.parametrize("variant", ["opt", "bert-base"])
def test_reset_rereads_pristine_weights_from_disk(checkpoints, monkeypatch, working_cleared, variant):
    """One working bottom per process; a state-less client gets the untrained weights back, read
    tensor by tensor from the checkpoint (no rebuilt bottom, no in-memory pristine copy)."""
    cfg = session_config(checkpoints[variant])
    first, _ = working_cleared.make_client(cfg, 0, None)
    start = trainable(first)
    assert start and set(start) == {n for n, _ in first.bottom.named_parameters()}  # full: everything trains
    scramble(first)
    recorder = ReadRecorder(monkeypatch)
    monkeypatch.setattr(fl_app.part_loading, "load_bottom", lambda *a, **k: pytest.fail("reset rebuilt the bottom"))
    second, _ = working_cleared.make_client(cfg, 1, None)
    assert second.bottom is first.bottom
    assert len(recorder.read) == len(start)  # every trainable tensor re-read from disk, nothing else
    assert all(torch.equal(v, start[n]) for n, v in trainable(second).items())
    saved = working_cleared.ClientState(weights={n: v + 1 for n, v in start.items()}, steps=3)
    third, _ = working_cleared.make_client(cfg, 0, saved)  # a saved state is restored, not reset
    assert third.steps == 3 and all(torch.equal(v, saved.weights[n]) for n, v in trainable(third).items())


def test_clients_taking_turns_on_a_tiny_bottom_reset_from_one_kept_build(monkeypatch, working_cleared):
    """A simulation resets the working bottom for every new client: a tiny model is rebuilt once and
    its untrained values kept (the kept copy is not the bottom's: training never changes it), and a
    new client's first step is not profiled again (one StepMemory per config in the process)."""
    import fl_app.client_party as client_party
    from fl_app.batches import BatchStream
    from fl_app.local_transport import InProcessLink
    from fl_app.scenario import build_server, load_server_top

    cfg = session_config("tiny-opt")
    fl_app.part_loading._tiny_bottom_tensors.cache_clear()
    first, data = working_cleared.make_client(cfg, 0, None)
    start = trainable(first)
    builds, profiled = [], []
    real_load, real_track = fl_app.part_loading.load_bottom, client_party.track_peak_memory
    monkeypatch.setattr(fl_app.part_loading, "load_bottom", lambda *a, **k: builds.append(1) or real_load(*a, **k))
    monkeypatch.setattr(client_party, "track_peak_memory", lambda device: profiled.append(1) or real_track(device))
    server = build_server(cfg, load_server_top(cfg)[1], num_classes=2)
    for pid in (1, 2, 0):
        scramble(first)
        client, _ = working_cleared.make_client(cfg, pid, None)
        assert all(torch.equal(v, start[n]) for n, v in trainable(client).items()), pid
        batch = BatchStream(data.encoder, data.client_examples(pid), 8, 0).batch(0)
        link = InProcessLink(server.handle_bytes)
        assert client.train_step(batch, link).peak_memory_bytes > 0
        link.close()
    fl_app.part_loading._tiny_bottom_tensors.cache_clear()  # later tests start without it
    assert len(builds) == 1  # the first reset built it; the others reused it
    assert len(profiled) == 1  # the first client's step; the next clients' steps of the same size were not


@pytest.mark.parametrize("model", ["tiny-opt", "saved-llama"])
def test_lora_reset_reproduces_each_clients_initial_adapters(checkpoints, working_cleared, model):
    """LoRA adapters depend on (seed, client) only: a reset gives exactly a fresh build's adapters."""
    from fl_app.scenario import build_client, load_client_bottom

    name = checkpoints["llama"] if model == "saved-llama" else model
    cfg = session_config(name, **{"client-params": "lora", "lora-r": 2})
    fresh = {}
    for pid in (0, 1):
        torch.manual_seed(100 + pid)  # the global RNG does not matter
        fresh[pid] = trainable(build_client(cfg, load_client_bottom(cfg)[1], pid, copy_bottom=False))
    assert fresh[0] and all("lora_" in n for n in fresh[0])
    assert not all(torch.equal(fresh[0][n], fresh[1][n]) for n in fresh[0])  # clients start from their own adapters
    client, _ = working_cleared.make_client(cfg, 0, None)
    assert all(torch.equal(v, fresh[0][n]) for n, v in trainable(client).items())
    scramble(client)
    for pid in (1, 0):
        client, _ = working_cleared.make_client(cfg, pid, None)
        assert all(torch.equal(v, fresh[pid][n]) for n, v in trainable(client).items())


@pytest.mark.parametrize("variant, keeps_head_weight", [("llama-untied", False), ("llama", True), ("opt", True)])
def test_server_top_holds_no_unused_input_embedding(checkpoints, variant, keeps_head_weight):
    """The top's input is a hidden state: an untied top drops its input embedding (not kept, counted or
    perturbed); a tied one keeps the weight only as its LM head."""
    top, tokenizer, _ = load_top(checkpoints[variant], 1, num_labels=3, seed=5)
    names = [n for n, _ in top.named_parameters()]
    assert not any("embed_tokens" in n for n in names), names
    head = top.model.lm_head.weight
    embedding = load_model(checkpoints[variant], num_labels=3, seed=5).model.get_input_embeddings().weight
    assert torch.equal(head, embedding) == keeps_head_weight  # tied: the head is the embedding matrix
