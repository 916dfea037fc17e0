"""Score SST-2's validation file with an exported model and plain transformers code, importing nothing
of this project: what a user who takes the model away would write. Prints the example count and the
accuracy.

    python benchmarks/plain_sst2.py MODEL_DIR DATA_TSV_GZ MAX_LENGTH

Encoders (a sequence-classification model): the classifier's argmax over each sentence, truncated to
MAX_LENGTH tokens. Causal LMs: MeZO's prompt "<sentence> It was"; each candidate, " terrible" and
" great", scored by the log-probability of its first token after the prompt (a prompt over
MAX_LENGTH tokens loses its start, a leading BOS kept).
"""

import csv
import gzip
import sys

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

BATCH = 32


def rows(path: str) -> list[dict[str, str]]:
    with gzip.open(path, "rt", newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))


def encoder_predictions(model_dir: str, sentences: list[str], max_length: int) -> list[int]:
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    predicted = []
    for start in range(0, len(sentences), BATCH):
        batch = sentences[start : start + BATCH]
        enc = tokenizer(batch, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        with torch.no_grad():
            predicted += model(**enc).logits.argmax(-1).tolist()
    return predicted


def prompt_ids(tokenizer, sentence: str, max_length: int) -> list[int]:
    ids = tokenizer(f"{sentence.strip()} It was", add_special_tokens=True)["input_ids"]
    if len(ids) <= max_length:
        return ids
    keep_bos = tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id
    return ([ids[0]] if keep_bos else []) + ids[len(ids) - max_length + keep_bos :]


def decoder_predictions(model_dir: str, sentences: list[str], max_length: int) -> list[int]:
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    candidates = [tokenizer(word, add_special_tokens=False)["input_ids"][0] for word in (" terrible", " great")]
    predicted = []
    for start in range(0, len(sentences), BATCH):
        prompts = [prompt_ids(tokenizer, s, max_length) for s in sentences[start : start + BATCH]]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, : len(p)], mask[i, : len(p)] = torch.tensor(p), 1
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits
        last = logits[torch.arange(len(prompts)), mask.sum(1) - 1].float().log_softmax(-1)
        predicted += last[:, candidates].argmax(-1).tolist()
    return predicted


def main() -> None:
    model_dir, data, max_length = sys.argv[1], sys.argv[2], int(sys.argv[3])
    examples = rows(data)
    sentences = [r["sentence"] for r in examples]
    encoder = any(a.endswith("ForSequenceClassification") for a in AutoConfig.from_pretrained(model_dir).architectures)
    predict = encoder_predictions if encoder else decoder_predictions
    predicted = predict(model_dir, sentences, max_length)
    right = sum(p == int(r["label"]) for p, r in zip(predicted, examples))
    assert not any(name == "fl_app" or name.startswith("fl_app.") for name in sys.modules)
    print(len(examples), right / len(examples))


if __name__ == "__main__":
    main()
