"""Turn the server top's outputs into per-class scores and the classification loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fl_app.split import ServerTop


def class_scores(
    top: ServerTop,
    hidden: torch.Tensor,
    attention_mask: torch.Tensor,
    score_ids: torch.Tensor | None = None,
    target_ids: torch.Tensor | None = None,
    batch_size: int = 0,
) -> torch.Tensor:
    """Scores ``[B, C]``: candidate log-likelihoods for decoders, classifier logits for encoders.

    * ``score_ids`` ``[B, C]``: single-token candidates read at each row's last real token.
    * ``target_ids`` ``[B*C, T]`` (-100 off-target): mean log-likelihood of each candidate's tokens;
      ``batch_size`` B is then required.
    """
    return scores_and_features(top, hidden, attention_mask, score_ids, target_ids, batch_size)[0]


def scores_and_features(
    top: ServerTop,
    hidden: torch.Tensor,
    attention_mask: torch.Tensor,
    score_ids: torch.Tensor | None = None,
    target_ids: torch.Tensor | None = None,
    batch_size: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`class_scores` and the features ``[B, F]`` the last layer scored them from.

    Encoders: the pooled output the classifier reads. Single-token candidates: the final hidden
    state at the answer position (the LM head's input; the CE gradient w.r.t. the head is
    non-zero only on the candidates' rows). Multi-token candidates: the mean final hidden state
    over each example's candidate tokens (an approximation: each token has its own input).
    """
    if top.family == "bert":
        final = top.hidden(hidden, attention_mask)
        return top.head(final), final.pooler_output
    final = top.hidden(hidden, attention_mask)
    if score_ids is not None:
        last = attention_mask.long().sum(1) - 1
        picked = final[torch.arange(final.shape[0], device=final.device), last]
        logp = torch.log_softmax(top.head(picked).float(), dim=-1)
        return logp.gather(1, score_ids), picked
    if target_ids is None:
        raise ValueError("a decoder batch needs 'score_ids' or 'target_ids'")
    targets = target_ids[:, 1:]
    where = targets != -100
    picked = final[:, :-1][where]
    logp = torch.log_softmax(top.head(picked).float(), dim=-1)
    token_logp = logp.gather(1, targets[where].unsqueeze(1)).squeeze(1)
    rows = where.nonzero()[:, 0]
    counts = where.sum(1).clamp(min=1)
    sums = final.new_zeros(final.shape[0], dtype=token_logp.dtype).index_add(0, rows, token_logp)
    feats = final.new_zeros(final.shape[0], final.shape[-1], dtype=picked.dtype).index_add(0, rows, picked)
    features = (feats / counts.unsqueeze(1)).view(batch_size, -1, final.shape[-1]).mean(1)
    return (sums / counts).view(batch_size, -1), features


def classification_loss(
    scores: torch.Tensor, labels: torch.Tensor, class_weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean cross entropy over the class scores; with ``class_weights`` [C], each example's term is
    weighted by its label's weight (still divided by the batch size)."""
    if class_weights is None:
        return F.cross_entropy(scores, labels)
    return (
        class_weights.to(scores.device, torch.float32)[labels] * F.cross_entropy(scores, labels, reduction="none")
    ).mean()
