"""Scoring several clients' perturbed activations in one forward (score-across-clients)."""

import threading
import time

import pytest
import torch

from fl_app.batches import BatchStream
from fl_app.config import make_config, read_scenario
from fl_app.cross_scoring import CrossClientScorer
from fl_app.protocol import StepRequest
from fl_app.scenario import build_server, load_split, load_task_data
from fl_app.server_party import ScoreJob


def job(server, data, pid: int, width: int, count: int) -> ScoreJob:
    """``count`` perturbed activations of client ``pid``'s first batch, cut to ``width`` tokens."""
    batch = BatchStream(data.encoder, data.client_examples(pid), 4, 0).batch(0)
    keep = {k: v[:, :width] if k in ("input_ids", "attention_mask", "token_type_ids") else v for k, v in batch.items()}
    keep["attention_mask"] = keep["attention_mask"].clone()
    keep["attention_mask"][:, :2] = 1
    if "target_ids" in keep:  # one target id per candidate row, kept inside the cut
        targets = torch.full_like(keep["target_ids"][:, :width], -100)
        targets[:, 1] = keep["target_ids"].max(1).values
        keep["target_ids"] = targets
    fields = {k: keep[k] for k in ("attention_mask", "labels", "score_ids", "target_ids") if k in keep}
    hidden = torch.randn(count, keep["input_ids"].shape[0], width, server.top.hidden_size)
    return ScoreJob(str(pid), StepRequest(kind="zo", clean=hidden[0], **fields), hidden)


@pytest.mark.parametrize("model", ["tiny-opt", "tiny-llama", "tiny-bert"])
def test_jobs_of_different_lengths_scored_together_match_each_scored_alone(model):
    config = make_config({**read_scenario("sim_configs/smoke_tiny.toml"), "model": model, "num-clients": 3})
    torch.manual_seed(0)
    loaded, _, top = load_split(config)
    data = load_task_data(config, loaded)
    server = build_server(config, top, data.task.num_classes)
    jobs = [job(server, data, 0, 12, 4), job(server, data, 1, 7, 2), job(server, data, 2, 12, 6)]
    alone = [server.score_jobs([j])[0] for j in jobs]
    together = server.score_jobs(jobs)
    assert [t.shape for t in together] == [torch.Size([4]), torch.Size([2]), torch.Size([6])]
    for a, t in zip(alone, together):
        assert torch.allclose(a, t, atol=1e-5), (a, t)  # padding is masked: float noise at most
    assert all(t.unique().numel() == t.numel() for t in together)  # distinct activations, distinct losses
    assert jobs[1].head.attention_mask.shape[1] < jobs[0].head.attention_mask.shape[1]  # it was padded


class RecordingServer:
    """Stands in for SplitServer: records how jobs were scored; a job keyed "bad" cannot be scored."""

    def __init__(self):
        self.batches, self.added = [], {}

    def score_jobs(self, jobs):
        self.batches.append([j.key for j in jobs])
        if any(j.key == "bad" for j in jobs):
            raise FloatingPointError("bad activations")
        return [torch.full((j.perturbed.shape[0],), float(len(j.key))) for j in jobs]

    def add_scores(self, job, losses):
        self.added[job.key] = losses.tolist()


def queued_while_locked(scorer, server, keys):
    """Each key's job submitted from its own thread while the lock is held; then the lock released."""
    errors = {}

    def submit(key):
        try:
            scorer.score(server, ScoreJob(key, None, torch.zeros(2, 1)))
        except Exception as err:  # noqa: BLE001
            errors[key] = err

    threads = [threading.Thread(target=submit, args=(k,)) for k in keys]
    with scorer.lock:
        for t in threads:
            t.start()
        deadline = time.time() + 10
        while len(scorer._queued) < len(keys) and time.time() < deadline:
            time.sleep(0.01)
    for t in threads:
        t.join(10)
    return errors


def test_jobs_waiting_together_are_scored_in_one_batch():
    scorer, server = CrossClientScorer(threading.Lock()), RecordingServer()
    assert not queued_while_locked(scorer, server, ["a", "bb", "ccc"])
    assert len(server.batches) == 1 and sorted(server.batches[0]) == ["a", "bb", "ccc"]
    assert server.added == {"a": [1.0, 1.0], "bb": [2.0, 2.0], "ccc": [3.0, 3.0]} and scorer.forwards == [3]


def test_a_job_that_cannot_be_scored_fails_only_its_own_session():
    scorer, server = CrossClientScorer(threading.Lock()), RecordingServer()
    errors = queued_while_locked(scorer, server, ["a", "bad", "cc"])
    assert set(errors) == {"bad"} and isinstance(errors["bad"], FloatingPointError)
    assert server.added == {"a": [1.0, 1.0], "cc": [2.0, 2.0]}  # scored alone after the batch failed
