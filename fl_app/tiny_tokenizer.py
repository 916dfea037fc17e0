"""An in-process word-level tokenizer for tests and the tiny smoke scenario (no downloads)."""

from __future__ import annotations

import functools
import gzip
import re
from collections import Counter
from typing import Literal

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from fl_app.data import default_data_dir
from fl_app.tasks import TASKS

CAUSAL_SPECIALS = ["<pad>", "</s>", "<unk>"]
ENCODER_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
SAMPLE_LINES = 20_000  # SST-2 lines the vocabulary is counted from


@functools.lru_cache(maxsize=4)
def _vocabulary(size: int) -> tuple[str, ...]:
    """Most frequent lower-cased words of the first SST-2 train lines (ties alphabetical) plus every verbaliser word."""
    counts: Counter[str] = Counter()
    with gzip.open(default_data_dir() / "sst2" / "train.tsv.gz", "rt", encoding="utf-8") as fh:
        next(fh)
        for _, line in zip(range(SAMPLE_LINES), fh):
            counts.update(re.findall(r"\w+|[^\w\s]", line.rsplit("\t", 1)[0].lower()))
    verbalisers = {
        w.strip().lower()
        for name in ("sst2", "rte", "cb", "boolq", "wic", "wsc", "multirc")
        for w in TASKS[name]._candidates({})
    }
    ranked = [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
    words = sorted(verbalisers) + [w for w in ranked if w not in verbalisers]
    return tuple(words[:size])


def build_tiny_tokenizer(kind: Literal["causal", "encoder"], vocab_size: int = 2000) -> PreTrainedTokenizerFast:
    """Word-level tokenizer: lower-cased words and punctuation; a leading space never changes a token."""
    specials = CAUSAL_SPECIALS if kind == "causal" else ENCODER_SPECIALS
    unk = specials[2] if kind == "causal" else "[UNK]"
    vocab = {tok: i for i, tok in enumerate(specials + list(_vocabulary(vocab_size - len(specials))))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    if kind == "causal":
        tok.post_processor = processors.TemplateProcessing(
            single="</s> $A", pair="</s> $A $B", special_tokens=[("</s>", vocab["</s>"])]
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=tok,
            pad_token="<pad>",
            bos_token="</s>",
            eos_token="</s>",
            unk_token="<unk>",
            padding_side="right",
        )
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        padding_side="right",
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )
