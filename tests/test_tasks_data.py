"""Tasks parse the shipped files; sampling and partitions are seeded; batches have the right shape."""

import json
import warnings

import numpy as np
import pytest

from fl_app.data import (
    SHARED_TEST_FILE,
    BatchEncoder,
    in_test_part,
    load_examples,
    partition,
    row_groups,
    sample_splits,
)
from fl_app.tasks import TASK_NAMES, TASKS, Example, get_task, parse_row
from fl_app.tiny_tokenizer import build_tiny_tokenizer

# (rows in train pool, rows in test file, classes) as listed in data/*/PROVENANCE.md
EXPECTED = {
    "sst2": (67349, 872, 2),
    "rte": (2490, 277, 2),
    "cb": (250, 56, 3),
    "boolq": (2195, 1138, 2),  # FewGLUE's 64 + the validation file's non-test passages; its test third
    "wic": (5428, 638, 2),
    "wsc": (554, 104, 2),
    "copa": (400, 100, 2),
    "multirc": (27243, 4848, 2),
}


@pytest.fixture(scope="module")
def causal_tok():
    return build_tiny_tokenizer("causal")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_task_loads_from_shipped_files(name):
    n_train, n_test, classes = EXPECTED[name]
    task = get_task(name)
    train, test = load_examples(name, "train"), load_examples(name, "test")
    assert (len(train), len(test), task.num_classes) == (n_train, n_test, classes)
    assert {ex.label for ex in train} == set(range(classes))
    ex = train[0]
    assert len(task.candidates(ex)) == classes and task.prompt(ex).strip()


def test_sst2_label_counts_match_provenance():
    labels = [ex.label for ex in load_examples("sst2", "train")]
    assert (labels.count(0), labels.count(1)) == (29780, 37569)


def test_sampling_is_seeded_disjoint_and_sized():
    a, b, c = (sample_splits("rte", 100, 50, 40, seed=s) for s in (0, 0, 1))
    assert [ex.fields for ex in a["train"]] == [ex.fields for ex in b["train"]]
    assert [ex.fields for ex in a["train"]] != [ex.fields for ex in c["train"]]
    assert (len(a["train"]), len(a["dev"]), len(a["test"])) == (100, 50, 40)
    train_ids = {ex.fields["idx"] for ex in a["train"]}
    assert not train_ids & {ex.fields["idx"] for ex in a["dev"]}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_encoder_pair_carries_every_field_of_the_example(name):
    """An encoder sees only its text pair: each required field (COPA's cause / effect question too)
    must be in it, and examples differing in one field only must encode differently."""
    task = get_task(name)
    example = load_examples(name, "train")[0]
    text = " ".join(t for t in task.text_pair(example) if t)
    for field in task.required:
        assert str(example.fields[field]) in text, (name, field)


def test_copa_encoder_input_tells_cause_from_effect():
    task = get_task("copa")
    fields = {"premise": "The man fell.", "choice1": "He slipped.", "choice2": "He laughed.", "label": 0}
    cause, effect = (task.text_pair(Example({**fields, "question": q}, 0)) for q in ("cause", "effect"))
    assert cause != effect and "cause" in cause[0] and "effect" in effect[0]


@pytest.mark.parametrize("name", sorted(n for n in EXPECTED if TASKS[n].groups))
@pytest.mark.parametrize("seed", [0, 1])
def test_train_and_dev_share_no_group(name, seed):
    """No passage, premise, text or sentence is in both train and dev (tuning picks by dev)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # small pools warn
        splits = sample_splits(name, 1000, 200, 10, seed=seed)
    task = get_task(name)
    values = {side: {ex.fields[f] for ex in splits[side] for f in task.groups} for side in ("train", "dev")}
    assert splits["dev"] and not values["train"] & values["dev"], name


def test_groups_join_rows_through_any_shared_field():
    """WiC-like rows: a sentence shared as sentence1 of one pair and sentence2 of another joins them."""
    rows = [
        {"sentence1": "a", "sentence2": "b"},
        {"sentence1": "c", "sentence2": "a"},
        {"sentence1": "d", "sentence2": "e"},
        {"sentence1": "e", "sentence2": "c"},
        {"sentence1": "f", "sentence2": "g"},
    ]
    groups = row_groups(get_task("wic"), rows)
    assert len({groups[i] for i in range(4)}) == 1 and groups[4] != groups[0]


def test_large_pools_keep_their_train_sample_and_drop_leaking_dev_rows():
    """Train is still the first n-train rows of the seeded order; dev skips rows of train's groups."""
    import random

    pool = load_examples("multirc", "train")
    order = list(range(len(pool)))
    random.Random(3).shuffle(order)
    splits = sample_splits("multirc", 300, 100, 0, seed=3)
    assert splits["train"] == [pool[i] for i in order[:300]]
    naive_dev = [pool[i] for i in order[300:400]]
    assert len(splits["dev"]) == 100 and splits["dev"] != naive_dev


def test_boolq_train_pool_and_test_are_disjoint_by_passage():
    """BoolQ's pool is FewGLUE's 64 plus two thirds of the validation file by passage, the test set the
    other third: enough for n-train 1000 + n-dev 200, and no passage on both sides."""
    field, parts = SHARED_TEST_FILE["boolq"]
    train, test = load_examples("boolq", "train"), load_examples("boolq", "test")
    assert len(train) >= 1200 and len(test) >= 1000
    assert all(in_test_part(ex.fields[field], parts) for ex in test)
    assert not {ex.fields[field] for ex in train} & {ex.fields[field] for ex in test}
    splits = sample_splits("boolq", 1000, 200, 1000, seed=0)
    assert [len(splits[s]) for s in ("train", "dev", "test")] == [1000, 200, 1000]


def test_small_pool_is_split_with_a_warning():
    with pytest.warns(UserWarning, match="cb"):
        s = sample_splits("cb", 1000, 500, 10)
    assert len(s["train"]) + len(s["dev"]) == 250 and len(s["dev"]) == 83


def test_iid_partition_covers_all_disjointly():
    parts = partition([0, 1] * 50, 7, "iid", seed=3)
    flat = [i for p in parts for i in p]
    assert sorted(flat) == list(range(100)) and max(map(len, parts)) - min(map(len, parts)) <= 1
    assert parts == partition([0, 1] * 50, 7, "iid", seed=3) != partition([0, 1] * 50, 7, "iid", seed=4)


def test_dirichlet_partition_is_label_skewed():
    labels = [i % 2 for i in range(1000)]

    def skew(parts):
        shares = [max(sum(labels[i] for i in p), len(p) - sum(labels[i] for i in p)) / len(p) for p in parts]
        return sum(shares) / len(shares)

    dirichlet = partition(labels, 5, "dirichlet", alpha=0.1, seed=0)
    assert sorted(i for p in dirichlet for i in p) == list(range(1000))
    assert skew(dirichlet) > 0.8 > skew(partition(labels, 5, "iid", seed=0)) - 0.25


def test_dirichlet_partition_works_at_scale_without_redrawing():
    """alpha = 0.1 over 1,000 clients of an SST-2-sized pool (it failed for 50 clients: the old
    partitioner redrew everything until no client was empty): every client gets at least
    ``min_size``, all examples once, seeded, and still label-skewed."""
    labels = np.random.default_rng(0).integers(0, 2, 67_349)
    parts = partition(labels, 1000, "dirichlet", alpha=0.1, seed=1, min_size=8)
    sizes = [len(p) for p in parts]
    assert min(sizes) >= 8 and sorted(i for p in parts for i in p) == list(range(len(labels)))
    assert parts == partition(labels, 1000, "dirichlet", alpha=0.1, seed=1, min_size=8)
    top_share = np.median([np.bincount(labels[p], minlength=2).max() / len(p) for p in parts])
    assert top_share > 0.9  # most clients hold (almost) one class


def test_shard_partition_gives_each_client_about_its_shards_of_classes():
    labels = np.repeat(np.arange(10), 100)  # 10 classes x 100
    parts = partition(labels, 50, "shard", seed=2, shards_per_client=2)
    assert sorted(i for p in parts for i in p) == list(range(1000)) and {len(p) for p in parts} == {20}
    assert max(len(set(labels[p])) for p in parts) <= 2  # shards of 10 never straddle a class here
    assert parts == partition(labels, 50, "shard", seed=2) != partition(labels, 50, "shard", seed=3)
    with pytest.raises(ValueError, match="shards-per-client = 1002 shards, but n-train is 1000"):
        partition(labels, 501, "shard", seed=0)


def test_draw_partition_gives_more_clients_than_examples_their_own_seeded_draws():
    labels = [0, 1] * 50
    parts = partition(labels, 1000, scheme="draw", min_size=4, seed=3)
    assert len(parts) == 1000 and all(len(p) == len(set(p)) == 4 and 0 <= min(p) and max(p) < 100 for p in parts)
    assert len({tuple(p) for p in parts}) > 900  # each client's own draw, not a few repeated
    assert parts == partition(labels, 1000, scheme="draw", min_size=4, seed=3)
    assert parts != partition(labels, 1000, scheme="draw", min_size=4, seed=4)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"num_clients": 0}, "num-clients"),
        ({"scheme": "shards"}, "partition"),
        ({"scheme": "dirichlet", "alpha": 0.0}, "dirichlet-alpha"),
        ({"scheme": "shard", "shards_per_client": 0}, "shards-per-client"),
        ({"scheme": "shard", "num_clients": 11}, "n-train is 20"),
        ({"scheme": "draw", "min_size": 21}, "min-partition-size 21"),
    ],
)
def test_bad_partition_settings_name_the_field(kwargs, field):
    args = {"num_clients": 2, **kwargs}
    with pytest.raises(ValueError, match=field):
        partition([0, 1] * 10, **args)


def test_unknown_task_and_malformed_rows():
    with pytest.raises(ValueError, match="unknown task 'sst5'.*field 'task'"):
        get_task("sst5")
    rte = get_task("rte")
    with pytest.raises(ValueError, match="missing field 'hypothesis'"):
        parse_row(rte, {"premise": "a", "label": "entailment"})
    with pytest.raises(ValueError, match="field 'label' has value 'maybe'"):
        parse_row(rte, {"premise": "a", "hypothesis": "b", "label": "maybe"})
    assert TASK_NAMES == tuple(sorted(EXPECTED))


def test_single_token_prompted_batch(causal_tok):
    examples = sample_splits("sst2", 4, 0, 0)["train"]
    batch = BatchEncoder(causal_tok, "sst2", "prompted", 32)(examples)
    assert set(batch) == {"input_ids", "attention_mask", "score_ids", "labels"}
    assert batch["score_ids"].shape == (4, 2) and batch["input_ids"].shape[0] == 4
    assert causal_tok.decode(batch["score_ids"][0]) == "terrible great"
    last = batch["attention_mask"].sum(1) - 1
    assert causal_tok.decode(batch["input_ids"][0, last[0]]) == "was"  # prompt ends "... It was"


def test_multi_token_candidates_expand_rows(causal_tok):
    examples = sample_splits("copa", 3, 0, 0)["train"]
    batch = BatchEncoder(causal_tok, "copa", "prompted", 48)(examples)
    assert batch["input_ids"].shape[0] == 6 and batch["labels"].shape == (3,)
    targets = batch["target_ids"]
    for row in range(6):
        ids = targets[row][targets[row] != -100]
        choice = examples[row // 2].fields[f"choice{row % 2 + 1}"]
        assert causal_tok.decode(ids) == causal_tok.decode(causal_tok(choice, add_special_tokens=False)["input_ids"])


def test_left_truncation_keeps_the_prompt_end(causal_tok):
    long = Example({"sentence": "good " * 100}, 1)
    batch = BatchEncoder(causal_tok, "sst2", "prompted", 16)([long])
    assert batch["input_ids"].shape[1] == 16
    assert causal_tok.decode(batch["input_ids"][0, -2:]) == "it was"
    assert batch["input_ids"][0, 0] == causal_tok.bos_token_id


def test_a_long_passage_is_shortened_keeping_the_question_and_cue(causal_tok):
    """BoolQ: the passage's end is cut, not the question (left truncation would cut the passage's start
    and, for a long enough passage, keep nothing of it)."""
    long = Example({"passage": "a bad day " + "the movie is good " * 40, "question": "is the film great"}, 1)
    encoder = BatchEncoder(causal_tok, "boolq", "prompted", 32)
    ids = encoder([long])["input_ids"][0]
    text = causal_tok.decode(ids[ids != causal_tok.pad_token_id]).replace(" ?", "?")
    assert (
        len(ids) <= 32 and text.rstrip().endswith("is the film great?") and text.startswith("</s> a bad day the movie")
    )
    assert encoder.truncated([long]) == 1 and encoder.truncated([Example({**long.fields, "passage": "a"}, 1)]) == 0


def test_max_length_zero_takes_the_task_default(causal_tok):
    assert BatchEncoder(causal_tok, "multirc", "prompted").max_length == get_task("multirc").max_length == 384
    assert BatchEncoder(causal_tok, "sst2", "prompted", 16).max_length == 16


def test_truncated_examples_are_counted_per_split_and_recorded_in_results(tmp_path):
    from fl_app.config import make_config, read_scenario
    from fl_app.scenario import load_client_bottom, load_task_data
    from fl_app.train import run

    config = make_config(
        {**read_scenario("sim_configs/smoke_tiny.toml"), "task": "rte", "max-length": 24, "num-rounds": 1}
    )
    with pytest.warns(UserWarning, match="do not fit whole"):
        data = load_task_data(config, load_client_bottom(config)[0])
    assert data.truncated["train"] > 0 and set(data.truncated) == {"train", "dev", "test"}
    for split, examples in data.splits.items():
        assert data.truncated[split] == data.encoder.truncated(examples)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run(config.updated({"out-dir": str(tmp_path), "local-steps": 1}), tmp_path)
    recorded = json.loads((tmp_path / "results.json").read_text())["data"]
    assert recorded == {"max_length": 24, "truncated": data.truncated}


def test_classification_pairs_have_token_types():
    tok = build_tiny_tokenizer("encoder")
    batch = BatchEncoder(tok, "rte", "classification", 64)(sample_splits("rte", 2, 0, 0)["train"])
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert batch["token_type_ids"].max() == 1 and batch["input_ids"][0, 0] == tok.cls_token_id


def test_bad_batches_are_rejected(causal_tok):
    enc = BatchEncoder(causal_tok, "sst2", "prompted", 32)
    with pytest.raises(ValueError, match="empty"):
        enc([])
    with pytest.raises(ValueError, match="field 'label' has value 5"):
        enc([Example({"sentence": "x"}, 5)])


@pytest.mark.slow
def test_data_found_from_a_bundle_copy_without_data(tmp_path):
    """Flower runs the apps from a bundle copy of the package that leaves the .gz data out; the
    data must still be found through the installed distribution."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    shutil.copytree(root / "fl_app", tmp_path / "fl_app", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "data").mkdir()  # the bundle has data/README.md etc. but no data files
    code = (
        "import fl_app, fl_app.data as d; print(fl_app.__file__); print(d.default_data_dir()); "
        "print(len(d.load_examples('rte', 'test')))"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "HOSL_DATA_DIR"}
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path / "data",
        env={**env, "PYTHONPATH": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout.split("\n")
    assert out[0].startswith(str(tmp_path)) and Path(out[1], "sst2", "train.tsv.gz").exists() and out[2] == "277"


def test_sampling_parses_only_the_examples_it_keeps(monkeypatch):
    """The 67k-example SST-2 pool is never materialised: only the sampled rows become examples, and
    they are the same examples as shuffling the whole parsed pool gives."""
    import random

    import fl_app.data as data

    parsed = []
    real = data.parse_row
    monkeypatch.setattr(data, "parse_row", lambda task, row: parsed.append(row) or real(task, row))
    splits = sample_splits("sst2", n_train=40, n_dev=10, n_test=20, seed=5)
    assert len(parsed) == 70
    monkeypatch.setattr(data, "parse_row", real)
    pool = load_examples("sst2", "train")
    random.Random(5).shuffle(pool)
    assert splits["train"] == pool[:40] and splits["dev"] == pool[40:50]


def test_min_partition_size_reaches_every_client_through_the_scenario():
    from fl_app.config import make_config, read_scenario
    from fl_app.scenario import sample_and_partition

    config = make_config(
        {
            **read_scenario("sim_configs/smoke_tiny.toml"),
            "num-clients": 8,
            "partition": "dirichlet",
            "dirichlet-alpha": 0.05,
            "min-partition-size": 6,
        }
    )
    _, parts = sample_and_partition(config)
    assert min(len(p) for p in parts) >= 6 and sum(len(p) for p in parts) == 64
