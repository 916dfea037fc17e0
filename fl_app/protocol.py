"""The messages a client and the server exchange: tensors with explicit dtype and shape, plus scalars.

Both messages serialise to bytes with safetensors (dtype and shape travel with each tensor,
scalars travel as JSON metadata), so the bytes counted are exactly the bytes sent.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fl_app.config import DTYPES, MOST_QUERIES

STEP_KINDS = ("zo", "fo", "frozen", "eval", "proxy")  # client update rule, evaluation, or a GradMatch proxy
WIRE_DTYPES = {name: getattr(torch, name) for name in DTYPES}  # activation dtypes a frame may carry
LABEL_KEYS = ("labels", "score_ids", "target_ids")
DEFAULT_MAX_BYTES = 512 * 1024 * 1024
PART_KIND = "zo-part"
SELECT_KIND = "select"
MAX_STEP_WEIGHT = 1e4
MAX_QUERIES = MOST_QUERIES  # Q for a server without frame limits: a client cannot make it buffer without limit
MAX_META_BYTES = 64 * 1024  # a frame's metadata: a flat JSON object of scalars and lists of numbers
MAX_META_KEYS = 32


class ProtocolError(ValueError):
    """A malformed message: names the field, the value found and what was expected."""


@dataclass(frozen=True)
class FrameLimits:
    """The largest frame the run's scenario sends, checked on a frame's header before its tensors are
    read: ``batch`` examples per step (labels), ``rows`` activation rows (batch x candidates with
    multi-token candidates), ``tokens`` per row (the run's max-length), ``classes`` candidates per
    example, ``activations`` perturbed activations per step (2Q)."""

    batch: int
    rows: int
    tokens: int
    classes: int
    activations: int

    def dims(self, name: str) -> tuple[tuple[str, int | None], ...] | None:
        """Field ``name``'s dimensions as (what, bound); None bounds one the model checks (hidden)."""
        rows, tokens = ("rows", self.rows), ("tokens", self.tokens)
        return {
            "clean": (rows, tokens, ("hidden", None)),
            "perturbed": (("activations", self.activations), rows, tokens, ("hidden", None)),
            "attention_mask": (rows, tokens),
            "target_ids": (rows, tokens),
            "labels": (("batch", self.batch),),
            "score_ids": (rows, ("classes", self.classes)),
        }.get(name)


@dataclass
class StepRequest:
    """Client -> server: activations at the cut for one batch and what is needed to score them.

    ``perturbed`` holds the 2Q activations of a ZO step in the order (+z_1, -z_1, +z_2, -z_2, ...);
    ``clean`` the unperturbed activations the server trains on (or evaluates).
    """

    kind: str
    clean: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    score_ids: torch.Tensor | None = None
    target_ids: torch.Tensor | None = None
    perturbed: torch.Tensor | None = None
    meta: dict = field(default_factory=dict)  # client id, step, round: JSON scalars only

    def to_bytes(self) -> bytes:
        return st_save(_on_wire(self._tensors()), metadata={"kind": self.kind, "meta": json.dumps(self.meta)})

    def to(self, device: torch.device) -> StepRequest:
        """This request with its tensors on ``device`` (a server placed on an accelerator)."""
        return dataclasses.replace(self, **{k: v.to(device) for k, v in self._tensors().items()})

    def _tensors(self) -> dict[str, torch.Tensor]:
        out = {"clean": self.clean, "attention_mask": self.attention_mask, "labels": self.labels}
        for name in ("score_ids", "target_ids", "perturbed"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return out

    @classmethod
    def from_bytes(cls, payload: bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> StepRequest:
        frame = decode_frame(payload, max_bytes)
        if not isinstance(frame, cls):
            raise ProtocolError("expected a step request, got a perturbed-activation part")
        return frame

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> StepRequest:
        unknown = set(tensors) - {"clean", "attention_mask", "labels", "score_ids", "target_ids", "perturbed"}
        if unknown:
            raise ProtocolError(f"unknown tensor field(s) {sorted(unknown)} in request")
        for name in ("clean", "attention_mask", "labels"):
            if name not in tensors:
                raise ProtocolError(f"request is missing field '{name}'")
        return cls(kind=metadata.get("kind", ""), meta=_meta(metadata), **tensors)


@dataclass
class PerturbedPart:
    """Client -> server, no reply: perturbed activations of the current ZO step, sent as soon as each
    is computed so the client never holds all 2Q at once. The first part of a step also carries the
    batch's ``attention_mask`` and label fields, so the server can score each (+, -) pair as soon as
    it arrives; the step's final ``zo`` request must repeat the same fields."""

    perturbed: torch.Tensor
    meta: dict = field(default_factory=dict)
    attention_mask: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    score_ids: torch.Tensor | None = None
    target_ids: torch.Tensor | None = None

    def _tensors(self) -> dict[str, torch.Tensor]:
        out = {"perturbed": self.perturbed}
        for name in ("attention_mask", *LABEL_KEYS):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return out

    def to_bytes(self) -> bytes:
        return st_save(_on_wire(self._tensors()), metadata={"kind": PART_KIND, "meta": json.dumps(self.meta)})

    def to(self, device: torch.device) -> PerturbedPart:
        """This part with its tensors on ``device``."""
        return dataclasses.replace(self, **{k: v.to(device) for k, v in self._tensors().items()})

    def head(self) -> StepRequest | None:
        """The step's batch fields as an ``eval`` request over the first activation (None if absent)."""
        if self.attention_mask is None and self.labels is None:
            return None
        _expect(
            self.attention_mask is not None and self.labels is not None,
            "the first perturbed part of a step must carry both 'attention_mask' and 'labels'",
        )
        return StepRequest(
            kind="eval",
            clean=self.perturbed[0],
            attention_mask=self.attention_mask,
            labels=self.labels,
            score_ids=self.score_ids,
            target_ids=self.target_ids,
            meta=dict(self.meta),
        )


@dataclass
class SelectRequest:
    """Client -> server: choose ``budget`` of the ``num_batches`` batches whose ``proxy`` steps this
    session sent (GradMatch on the server's last-layer gradient proxies); ``seed`` fills shortfalls."""

    budget: int
    num_batches: int
    seed: int
    meta: dict = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        fields = {"budget": self.budget, "num_batches": self.num_batches, "seed": self.seed}
        return st_save({}, metadata={"kind": SELECT_KIND, "meta": json.dumps({**self.meta, **fields})})

    @classmethod
    def from_metadata(cls, metadata: dict[str, str]) -> SelectRequest:
        meta = _meta(metadata)
        values = {k: meta.pop(k, None) for k in ("budget", "num_batches", "seed")}
        for name, value in values.items():
            least = 1 if name != "seed" else 0
            _expect(
                isinstance(value, int) and not isinstance(value, bool) and least <= value < 2**62,
                f"field '{name}' of a select request is {str(value)[:40]}, expected a positive integer below 2**62",
            )
        _expect(
            values["budget"] <= values["num_batches"],
            f"field 'budget' ({values['budget']}) exceeds 'num_batches' ({values['num_batches']})",
        )
        return cls(meta=meta, **values)


def decode_frame(
    payload: bytes, max_bytes: int = DEFAULT_MAX_BYTES, limits: FrameLimits | None = None
) -> StepRequest | PerturbedPart | SelectRequest:
    """Parse a client frame: a :class:`PerturbedPart`, a :class:`SelectRequest` or a :class:`StepRequest`.
    With ``limits``, every tensor's declared shape is checked against them before any is read."""
    if len(payload) > max_bytes:
        raise ProtocolError(f"request of {len(payload)} bytes exceeds the limit of {max_bytes} bytes")
    tensors, metadata = _load(payload, limits)
    if metadata.get("kind") == SELECT_KIND:
        _expect(not tensors, f"a '{SELECT_KIND}' frame carries no tensors, got {sorted(tensors)}")
        return SelectRequest.from_metadata(metadata)
    if metadata.get("kind") == PART_KIND:
        allowed = {"perturbed", "attention_mask", *LABEL_KEYS}
        if "perturbed" not in tensors or not set(tensors) <= allowed:
            raise ProtocolError(
                f"a '{PART_KIND}' frame carries field 'perturbed' and optionally "
                f"{sorted(allowed - {'perturbed'})}, got {sorted(tensors)}"
            )
        return PerturbedPart(meta=_meta(metadata), **tensors)
    return StepRequest.from_tensors(tensors, metadata)


def validate_part(part: PerturbedPart, hidden_size: int) -> None:
    """A part holds [k, rows, seq_len, hidden] finite float activations."""
    pert = part.perturbed
    _expect(
        pert.dtype in WIRE_DTYPES.values() and pert.ndim == 4 and pert.shape[0] > 0 and pert.shape[-1] == hidden_size,
        f"field 'perturbed' of a part has shape {_shape(pert)} dtype {pert.dtype}, "
        f"expected [k, rows, seq_len, {hidden_size}] float",
    )
    _expect(torch.isfinite(pert).all().item(), "field 'perturbed' contains NaN or Inf activations")


@dataclass
class StepReply:
    """Server -> client: the 2Q losses of the perturbed activations, the clean loss, and for FO
    clients the gradient of the (weighted) loss with respect to the clean activations. A reply to
    a :class:`SelectRequest` carries the chosen ``batch_ids`` and their ``batch_weights``; a reply to an
    ``eval`` step carries ``example_correct``, 1 per example the top scored right (else 0)."""

    clean_loss: float
    perturbed_losses: torch.Tensor | None = None
    grad: torch.Tensor | None = None
    batch_ids: torch.Tensor | None = None
    batch_weights: torch.Tensor | None = None
    correct: int = 0
    count: int = 0
    example_correct: torch.Tensor | None = None

    def to_bytes(self) -> bytes:
        tensors = {}
        if self.perturbed_losses is not None:  # to the CPU first: MPS has no float64
            tensors["perturbed_losses"] = self.perturbed_losses.to("cpu", torch.float64)
        if self.grad is not None:
            tensors["grad"] = self.grad
        if self.batch_ids is not None:
            tensors["batch_ids"] = self.batch_ids.to("cpu", torch.int64)
            tensors["batch_weights"] = self.batch_weights.to("cpu", torch.float64)
        if self.example_correct is not None:
            tensors["example_correct"] = self.example_correct.to("cpu", torch.uint8)
        meta = {"clean_loss": self.clean_loss, "correct": self.correct, "count": self.count}
        return st_save(_on_wire(tensors), metadata={"meta": json.dumps(meta)})

    @classmethod
    def from_bytes(cls, payload: bytes) -> StepReply:
        tensors, metadata = _load(payload)
        meta = _meta(metadata)
        return cls(
            perturbed_losses=tensors.get("perturbed_losses"),
            grad=tensors.get("grad"),
            batch_ids=tensors.get("batch_ids"),
            batch_weights=tensors.get("batch_weights"),
            example_correct=tensors.get("example_correct"),
            **meta,
        )


def _on_wire(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors as a frame carries them: contiguous, on the CPU (the stream boundary: a party on an
    accelerator moves its activations, gradients and losses off it here, and decodes onto the CPU)."""
    return {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}


def _load(payload: bytes, limits: FrameLimits | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Deserialise a safetensors payload, turning any parse failure into a ProtocolError; with
    ``limits``, the header's declared shapes are checked first (nothing is allocated for a refused frame)."""
    header_len = int.from_bytes(payload[:8], "little")
    _expect(8 + header_len <= len(payload), f"malformed frame ({len(payload)} bytes): header runs past its end")
    try:
        header = json.loads(payload[8 : 8 + header_len])
    except (ValueError, RecursionError) as err:
        raise ProtocolError(f"malformed frame ({len(payload)} bytes): header is not JSON ({err})") from err
    _expect(isinstance(header, dict), f"malformed frame: header is a {type(header).__name__}, expected an object")
    metadata = header.pop("__metadata__", None) or {}
    _expect(
        isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values()),
        "malformed frame: header field '__metadata__' must map names to strings",
    )
    if limits is not None:
        for name, entry in header.items():
            _check_declared(name, entry, limits)
    try:
        tensors = st_load(payload)
    except Exception as err:  # safetensors raises several error types for corrupt input
        raise ProtocolError(f"malformed frame ({len(payload)} bytes): {err}") from err
    return tensors, metadata


def _check_declared(name: str, entry: Any, limits: FrameLimits) -> None:
    """Field ``name``'s declared shape (from the header) within the scenario's ``limits``."""
    dims = limits.dims(name)
    _expect(dims is not None, f"unknown tensor field '{name}' in frame")
    shape = entry.get("shape") if isinstance(entry, dict) else None
    _expect(
        isinstance(shape, list) and all(isinstance(n, int) and not isinstance(n, bool) for n in shape),
        f"malformed frame: field '{name}' declares shape {shape!r}",
    )
    _expect(
        len(shape) == len(dims) and all(bound is None or 0 <= n <= bound for n, (_, bound) in zip(shape, dims)),
        f"field '{name}' declares shape {shape}, expected at most "
        f"[{', '.join(what if bound is None else f'{what} <= {bound}' for what, bound in dims)}] (the run's "
        f"batch-size, max-length, classes and zo-queries)",
    )


def _meta(metadata: dict[str, str]) -> dict[str, Any]:
    """A frame's ``meta``: a JSON object whose values are scalars or flat lists of numbers."""
    text = metadata.get("meta", "{}")
    _expect(len(text) <= MAX_META_BYTES, f"field 'meta' is {len(text)} bytes, over {MAX_META_BYTES}")
    try:
        meta = json.loads(text)
    except (ValueError, RecursionError) as err:
        raise ProtocolError(f"field 'meta' is not JSON: {str(err)[:80]}") from err
    _expect(isinstance(meta, dict), f"field 'meta' is a {type(meta).__name__}, expected an object")
    _expect(len(meta) <= MAX_META_KEYS, f"field 'meta' has {len(meta)} entries, expected at most {MAX_META_KEYS}")
    for key, value in meta.items():
        flat = isinstance(value, list) and all(isinstance(v, (int, float)) for v in value)
        _expect(
            flat or value is None or isinstance(value, (str, int, float, bool)),
            f"field 'meta.{key}' is {str(value)[:60]}, expected a scalar or a list of numbers",
        )
    return meta


def _expect(cond: bool, message: str) -> None:
    if not cond:
        raise ProtocolError(message)


def _shape(t: torch.Tensor) -> list[int]:
    return list(t.shape)


def step_weight(req: StepRequest) -> float:
    """The request's loss weight (``meta['weight']``, 1 when absent): a finite number in (0, 1e4]."""
    weight = req.meta.get("weight", 1.0)
    _expect(
        isinstance(weight, (int, float)) and not isinstance(weight, bool) and 0 < weight <= MAX_STEP_WEIGHT,
        f"field 'weight' is {weight!r}, expected a number in (0, {MAX_STEP_WEIGHT:g}]",
    )
    return float(weight)


def class_weights(req: StepRequest) -> list[float] | None:
    """The request's per-class loss weights (``meta['class_weights']``, ``gradmatch-pc`` subsets) or
    None: finite numbers in [0, MAX_STEP_WEIGHT], one per class, positive for some example's label."""
    weights = req.meta.get("class_weights")
    if weights is None:
        return None
    _expect(
        isinstance(weights, list)
        and weights
        and all(isinstance(w, (int, float)) and not isinstance(w, bool) and 0 <= w <= MAX_STEP_WEIGHT for w in weights),
        f"field 'class_weights' is {weights!r}, expected a list of numbers in [0, {MAX_STEP_WEIGHT:g}], one per class",
    )
    return [float(w) for w in weights]


def validate_request(
    req: StepRequest,
    hidden_size: int,
    num_classes: int | None = None,
    streamed: bool = False,
    vocab_size: int | None = None,
    decoder: bool | None = None,
    per_query: int = 2,
) -> None:
    """Check every field's dtype, shape and values against the server's model; raise ProtocolError.

    ``per_query``: perturbed activations per direction (2: central differences, 1: forward ones).
    ``streamed``: the perturbed activations of this ``zo`` step arrived (and were scored) as parts.
    ``vocab_size``: a decoder's LM-head rows, the range of ``score_ids`` and ``target_ids``.
    ``decoder``: the model scores candidates (``score_ids`` or ``target_ids`` required) or is an
    encoder with a classifier (neither allowed); None: not checked."""
    _check_kind(req)
    rows, seq_len = _check_clean(req.clean, hidden_size)
    _check_mask(req.attention_mask, rows, seq_len)
    labels = req.labels
    _expect(
        labels.dtype == torch.int64 and labels.ndim == 1 and labels.numel() > 0,
        f"field 'labels' has shape {_shape(labels)} dtype {labels.dtype}, expected [batch] int64",
    )
    if decoder is not None:
        given = [name for name in ("score_ids", "target_ids") if getattr(req, name) is not None]
        wanted = "a decoder: it needs one of 'score_ids', 'target_ids'" if decoder else "an encoder: it takes neither"
        _expect(len(given) == (1 if decoder else 0), f"fields {given} sent to {wanted}")
    classes = _check_candidates(req, rows, seq_len, num_classes, vocab_size)
    if classes is not None:
        _expect(
            bool(((labels >= 0) & (labels < classes)).all()),
            f"field 'labels' has values {labels.tolist()} outside [0, {classes})",
        )
    _check_class_weights(req, classes)
    _check_perturbed(req, streamed, per_query)


def _check_kind(req: StepRequest) -> None:
    """Fields ``kind``, ``weight`` and, for a proxy step, ``batch``."""
    _expect(req.kind in STEP_KINDS, f"field 'kind' is '{req.kind}', expected one of {STEP_KINDS}")
    step_weight(req)
    if req.kind == "proxy":
        batch = req.meta.get("batch")
        _expect(
            isinstance(batch, int) and not isinstance(batch, bool) and batch >= 0,
            f"field 'batch' of a proxy step is {batch!r}, expected a batch index >= 0",
        )


def _check_clean(clean: torch.Tensor, hidden_size: int) -> tuple[int, int]:
    """Field ``clean``: float activations [rows, seq_len, hidden], finite; returns (rows, seq_len)."""
    _expect(
        clean.dtype in WIRE_DTYPES.values(),
        f"field 'clean' has dtype {clean.dtype}, expected a float dtype {list(WIRE_DTYPES)}",
    )
    _expect(
        clean.ndim == 3 and clean.shape[-1] == hidden_size,
        f"field 'clean' has shape {_shape(clean)}, expected [rows, seq_len, {hidden_size}]",
    )
    rows, seq_len = clean.shape[:2]
    _expect(rows > 0 and seq_len > 0, f"field 'clean' has shape {_shape(clean)}, expected non-empty rows and seq_len")
    _expect(torch.isfinite(clean).all().item(), "field 'clean' contains NaN or Inf activations")
    return rows, seq_len


def _check_mask(mask: torch.Tensor, rows: int, seq_len: int) -> None:
    """Field ``attention_mask``: 0/1 integers [rows, seq_len], at least one real token per row."""
    _expect(
        mask.dtype in (torch.int64, torch.int32, torch.bool) and _shape(mask) == [rows, seq_len],
        f"field 'attention_mask' has shape {_shape(mask)} dtype {mask.dtype}, expected [{rows}, {seq_len}] integer",
    )
    _expect(
        bool(((mask == 0) | (mask == 1)).all()) and bool((mask.sum(1) > 0).all()),
        "field 'attention_mask' must be 0/1 with at least one real token per row",
    )


def _check_candidates(
    req: StepRequest, rows: int, seq_len: int, num_classes: int | None, vocab_size: int | None
) -> int | None:
    """Fields ``score_ids`` (a decoder's verbaliser tokens) or ``target_ids`` (multi-token candidates),
    or neither (an encoder's classes); returns the number of classes the labels index."""
    batch = req.labels.shape[0]
    if req.score_ids is not None:
        ids = req.score_ids
        want = num_classes or "num_candidates"
        _expect(
            ids.dtype == torch.int64
            and ids.ndim == 2
            and ids.shape[0] == rows == batch
            and ids.shape[1] > 0
            and (num_classes is None or ids.shape[1] == num_classes),
            f"field 'score_ids' has shape {_shape(ids)}, expected [{batch}, {want}] with rows == batch",
        )
        _expect(
            vocab_size is None or bool(((ids >= 0) & (ids < vocab_size)).all()),
            f"field 'score_ids' has token ids outside [0, {vocab_size})",
        )
        return ids.shape[1]
    if req.target_ids is not None:
        tgt = req.target_ids
        _expect(
            tgt.dtype == torch.int64
            and _shape(tgt) == [rows, seq_len]
            and rows % batch == 0
            and (num_classes is None or rows == batch * num_classes),
            f"field 'target_ids' has shape {_shape(tgt)}, expected [{rows}, {seq_len}] with rows = batch {batch} x "
            f"{num_classes or 'the candidates'}",
        )
        real = tgt[tgt != -100]
        _expect(
            vocab_size is None or bool(((real >= 0) & (real < vocab_size)).all()),
            f"field 'target_ids' has token ids outside [0, {vocab_size}) (or -100 for no target)",
        )
        _expect(
            bool((tgt[:, 1:] != -100).any(1).all()),
            "field 'target_ids' has a row with no target token after position 0",
        )
        return rows // batch
    _expect(rows == batch, f"field 'clean' has {rows} rows but 'labels' has {batch}")
    return num_classes


def _check_class_weights(req: StepRequest, classes: int | None) -> None:
    """Field ``class_weights`` (gradmatch-pc): one weight per class, some weight on this batch's labels."""
    weights = class_weights(req)
    if weights is None:
        return
    labels = req.labels
    _expect(
        classes is None or len(weights) == classes,
        f"field 'class_weights' has {len(weights)} weights, expected one per class ({classes})",
    )
    _expect(
        int(labels.max()) < len(weights) and sum(weights[int(y)] for y in labels) > 0,
        f"field 'class_weights' {weights} gives no weight to this batch's labels {sorted(set(labels.tolist()))}",
    )


def _check_perturbed(req: StepRequest, streamed: bool, per_query: int = 2) -> None:
    """Field ``perturbed``: only on ``zo`` steps, [per_query x Q, rows, seq_len, hidden] finite floats (or
    streamed)."""
    if req.perturbed is None:
        _expect(req.kind != "zo" or streamed, "a 'zo' step request must carry field 'perturbed' or follow its parts")
        return
    pert, clean = req.perturbed, req.clean
    _expect(req.kind == "zo", f"field 'perturbed' sent with kind '{req.kind}', only 'zo' steps carry it")
    _expect(
        pert.dtype in WIRE_DTYPES.values()
        and pert.ndim == 4
        and pert.shape[0] % per_query == 0
        and _shape(pert)[1:] == _shape(clean),
        f"field 'perturbed' has shape {_shape(pert)} dtype {pert.dtype}, expected "
        f"[{'2Q' if per_query == 2 else 'Q'}, {clean.shape[0]}, {clean.shape[1]}, {clean.shape[2]}] float",
    )
    _expect(torch.isfinite(pert).all().item(), "field 'perturbed' contains NaN or Inf activations")
