"""Prompted classification tasks (MeZO templates and verbalisers) and their text pairs for encoders."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Example:
    """One labelled example: the raw row fields and a class index."""

    fields: Mapping[str, Any]
    label: int


@dataclass(frozen=True)
class Task:
    """A task: label parsing, a MeZO prompt ending right before the answer, one candidate per class."""

    name: str
    num_classes: int
    required: tuple[str, ...]
    label_values: tuple[tuple[Any, ...], ...]  # accepted raw label values per class index
    _prompt: Callable[[Mapping[str, Any]], str]
    _candidates: Callable[[Mapping[str, Any]], list[str]]
    _pair: Callable[[Mapping[str, Any]], tuple[str, str | None]]
    # fields whose values tie examples together (a passage with many questions, a sentence in several
    # pairs): rows sharing any of them stay on one side of the train / dev split
    groups: tuple[str, ...] = ()
    passage: str = ""  # the long field a too-long prompt is shortened in (its question and answer cue kept)
    max_length: int = 64  # default tokens per example (config max-length = 0): ~95 % of prompts fit whole
    class_names: tuple[str, ...] = ()  # per class index, the dataset's own name (an exported classifier's id2label)

    def prompt(self, ex: Example) -> str:
        return self._prompt(ex.fields)

    def candidates(self, ex: Example) -> list[str]:
        return self._candidates(ex.fields)

    def text_pair(self, ex: Example) -> tuple[str, str | None]:
        return self._pair(ex.fields)


def _const(words: list[str]) -> Callable[[Mapping[str, Any]], list[str]]:
    return lambda f: list(words)


def _copa_prompt(f: Mapping[str, Any]) -> str:
    connector = " so" if f["question"] == "effect" else " because"
    return f["premise"].rstrip(".") + connector


def _lower_first(text: str) -> str:
    return " " + text[:1].lower() + text[1:]


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task(
            "sst2",
            2,
            ("sentence",),
            ((0, "0"), (1, "1")),
            lambda f: f"{f['sentence'].strip()} It was",
            _const([" terrible", " great"]),
            lambda f: (f["sentence"], None),
            groups=("sentence",),
            class_names=("negative", "positive"),
        ),
        Task(
            "rte",
            2,
            ("premise", "hypothesis"),
            (("entailment", 0, "0"), ("not_entailment", 1, "1")),
            lambda f: f'{f["premise"]}\nDoes this mean that "{f["hypothesis"]}" is true? Yes or No?\n',
            _const(["Yes", "No"]),
            lambda f: (f["premise"], f["hypothesis"]),
            groups=("premise",),
            passage="premise",
            max_length=192,
            class_names=("entailment", "not_entailment"),
        ),
        Task(
            "cb",
            3,
            ("premise", "hypothesis"),
            (("entailment", 0, "0"), ("contradiction", 1, "1"), ("neutral", 2, "2")),
            lambda f: f'Suppose {f["premise"]} Can we infer that "{f["hypothesis"]}"? Yes, No, or Maybe?\n',
            _const(["Yes", "No", "Maybe"]),
            lambda f: (f["premise"], f["hypothesis"]),
            groups=("premise",),
            passage="premise",
            max_length=192,
            class_names=("entailment", "contradiction", "neutral"),
        ),
        Task(
            "boolq",
            2,
            ("passage", "question"),
            ((False, 0, "False", "false"), (True, 1, "True", "true")),
            lambda f: f"{f['passage']} {f['question']}?",
            _const([" No", " Yes"]),
            lambda f: (f["question"], f["passage"]),
            groups=("passage",),
            passage="passage",
            max_length=256,
            class_names=("false", "true"),
        ),
        Task(
            "wic",
            2,
            ("word", "sentence1", "sentence2"),
            ((False, 0, "False", "false"), (True, 1, "True", "true")),
            lambda f: (
                f'Does the word "{f["word"]}" have the same meaning in these two sentences? Yes, No?\n'
                f"{f['sentence1']}\n{f['sentence2']}\n"
            ),
            _const(["No", "Yes"]),
            lambda f: (f"{f['word']}: {f['sentence1']}", f["sentence2"]),
            groups=("sentence1", "sentence2"),
            class_names=("false", "true"),
        ),
        Task(
            "wsc",
            2,
            ("text", "span1_text", "span2_text"),
            ((False, 0, "False", "false"), (True, 1, "True", "true")),
            lambda f: (
                f'{f["text"]}\nIn the previous sentence, does the pronoun "{f["span2_text"].lower()}" refer to '
                f"{f['span1_text']}? Yes or No?\n"
            ),
            _const(["No", "Yes"]),
            lambda f: (f["text"], f"{f['span2_text']} refers to {f['span1_text']}"),
            groups=("text",),
            max_length=96,
            class_names=("false", "true"),
        ),
        Task(
            "copa",
            2,
            ("premise", "choice1", "choice2", "question"),
            ((0, "0"), (1, "1")),
            _copa_prompt,
            lambda f: [_lower_first(f["choice1"]), _lower_first(f["choice2"])],
            lambda f: (f"{f['premise']} What was the {f['question']}?", f"{f['choice1']} / {f['choice2']}"),
            groups=("premise",),
            class_names=("choice1", "choice2"),
        ),
        Task(
            "multirc",
            2,
            ("paragraph", "question", "answer"),
            ((0, False, "0"), (1, True, "1")),
            lambda f: (
                f'{f["paragraph"]}\nQuestion: {f["question"]}\nI found this answer "{f["answer"]}". '
                "Is that correct? Yes or No?\n"
            ),
            _const(["No", "Yes"]),
            lambda f: (f"{f['question']} {f['answer']}", f["paragraph"]),
            groups=("paragraph",),
            passage="paragraph",
            max_length=384,
            class_names=("false", "true"),
        ),
    )
}
TASK_NAMES: tuple[str, ...] = tuple(sorted(TASKS))


def get_task(name: str | Task) -> Task:
    """The task called ``name`` (case-insensitive), or a ValueError listing the known ones."""
    if isinstance(name, Task):
        return name
    task = TASKS.get(str(name).lower().replace("-", ""))
    if task is None:
        raise ValueError(f"unknown task '{name}' (field 'task'); known: {', '.join(TASK_NAMES)}")
    return task


def parse_row(task: Task, row: Mapping[str, Any]) -> Example:
    """A raw file row as an Example; missing fields or unknown labels raise naming the field and value."""
    for key in task.required:
        if key not in row or row[key] is None:
            raise ValueError(f"task '{task.name}': row is missing field '{key}' (row keys: {sorted(row)})")
    raw = row.get("label")
    for index, accepted in enumerate(task.label_values):
        if any(raw == value and type(raw) is type(value) for value in accepted):
            return Example(fields=dict(row), label=index)
    raise ValueError(
        f"task '{task.name}': field 'label' has value {raw!r}; accepted: "
        f"{[v for values in task.label_values for v in values]}"
    )
