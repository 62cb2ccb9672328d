"""Label audit: which labels are likely wrong, from a model's out-of-sample probabilities (confident learning) or
from how training treated each sample (area under the margin). Groundwork for issue 20; numpy only.

Confident learning (Northcutt, Jiang and Chuang, "Confident Learning: Estimating Uncertainty in Dataset Labels",
JAIR 2021), implemented here from the paper (cleanlab, its reference implementation, is AGPL):
- per class j, a threshold t_j: the mean predicted probability of j over the samples labelled j (how confident the
  model is, on average, when the label is right);
- a sample labelled i "confidently belongs" to j when p_j >= t_j; among such classes the one with the highest p_j;
- the confident joint C[i][j] counts samples labelled i that confidently belong to j, calibrated so that each row
  sums to the number of samples labelled i;
- prune by noise rate: for every i != j, the C[i][j] samples labelled i with the largest margin p_j - p_i are label
  issues. They are ranked by self-confidence p_label (lowest first), the ranking the paper recommends.

The probabilities must be out-of-sample (cross-validation, or a model that never trained on these samples): a
model's probabilities on its own training samples have memorised the wrong labels.

Area under the margin (Pleiss, Zhang, Elenberg and Weinberger, "Identifying Mislabeled Data using the Area Under
the Margin Ranking", NeurIPS 2020): during training, each sample's margin is its assigned label's logit minus the
largest other logit; averaged over epochs, it is low or negative for mislabelled samples, which the network only
fits late if at all. The threshold comes from "threshold samples": a known share of samples deliberately given an
extra, fake class; the 99th percentile of their AUM separates the mislabelled from the hard.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from visionflow.errors import DataError


def _check(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels, probs = np.asarray(labels), np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or labels.shape != (probs.shape[0],):
        raise DataError(
            f"label audit: {labels.shape[0] if labels.ndim else 0} labels for probabilities of shape "
            f"{probs.shape}; expected one row of class probabilities per label"
        )
    if len(labels) == 0:
        raise DataError("label audit: no samples to audit")
    if labels.min() < 0 or labels.max() >= probs.shape[1]:
        raise DataError(f"label audit: a label is outside the {probs.shape[1]} classes of the probabilities")
    if not np.isfinite(probs).all() or (probs < 0).any():
        raise DataError("label audit: probabilities must be finite and non-negative")
    return labels.astype(np.int64), probs


def class_thresholds(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """t_j: the mean probability of class j over the samples labelled j (nan-free: a class without samples gets
    threshold 1, so nothing confidently belongs to it)."""
    labels, probs = _check(labels, probs)
    k = probs.shape[1]
    counts = np.bincount(labels, minlength=k)
    sums = np.zeros(k)
    np.add.at(sums, labels, probs[np.arange(len(labels)), labels])
    return np.where(counts > 0, sums / np.maximum(counts, 1), 1.0)


def confident_class(probs: np.ndarray, thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(whether any class confidently holds, which one) per sample: among the classes j with p_j >= t_j, the one
    with the highest p_j. Thresholds may come from other samples than probs (a reviewed batch is too small to set
    them, so they come from the champion's test split)."""
    above = np.asarray(probs) >= np.asarray(thresholds)[None, :]
    return above.any(axis=1), np.where(above, probs, -np.inf).argmax(axis=1)


def confident_joint(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """C[i][j]: samples labelled i that confidently belong to j, calibrated so that row i sums to the number of
    samples labelled i (rows of classes without confident samples stay zero)."""
    labels, probs = _check(labels, probs)
    k = probs.shape[1]
    confident, suggested = confident_class(probs, class_thresholds(labels, probs))
    joint = np.zeros((k, k))
    np.add.at(joint, (labels[confident], suggested[confident]), 1)
    given = np.bincount(labels, minlength=k).astype(float)
    rows = joint.sum(axis=1)
    return np.where(rows[:, None] > 0, joint / np.maximum(rows, 1)[:, None] * given[:, None], 0.0)


@dataclass(frozen=True)
class LabelIssues:
    """Samples whose label is likely wrong, most likely first."""

    index: np.ndarray  # sample positions
    suggested: np.ndarray  # the class the model confidently puts each one in
    self_confidence: np.ndarray  # p(label) for each: the ranking key, lowest first


def find_label_issues(labels: np.ndarray, probs: np.ndarray) -> LabelIssues:
    """Confident learning's prune-by-noise-rate: for each pair i != j, the round(C[i][j]) samples labelled i with
    the largest margin p_j - p_i; ranked by self-confidence."""
    labels, probs = _check(labels, probs)
    joint = confident_joint(labels, probs)
    k = probs.shape[1]
    chosen: dict[int, int] = {}
    for i in range(k):
        members = np.flatnonzero(labels == i)
        for j in range(k):
            n = int(round(joint[i, j]))
            if i == j or n == 0 or len(members) == 0:
                continue
            margin = probs[members, j] - probs[members, i]
            for pos in members[np.argsort(-margin, kind="stable")[:n]]:
                # a sample picked for two classes keeps the one it is more likely to be
                if pos not in chosen or probs[pos, j] > probs[pos, chosen[pos]]:
                    chosen[int(pos)] = j
    index = np.array(sorted(chosen), dtype=np.int64)
    self_conf = probs[index, labels[index]] if len(index) else np.zeros(0)
    order = np.argsort(self_conf, kind="stable")
    return LabelIssues(
        index=index[order],
        suggested=np.array([chosen[int(i)] for i in index[order]], dtype=np.int64),
        self_confidence=self_conf[order],
    )


def margins(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Each sample's margin: its assigned label's logit minus the largest other logit (one training epoch)."""
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    assigned = logits[np.arange(len(labels)), labels]
    others = logits.copy()
    others[np.arange(len(labels)), labels] = -np.inf
    return assigned - others.max(axis=1)


def area_under_margin(per_epoch: np.ndarray) -> np.ndarray:
    """AUM: each sample's margin averaged over the epochs recorded (rows: epochs, columns: samples)."""
    per_epoch = np.asarray(per_epoch, dtype=np.float64)
    if per_epoch.ndim != 2 or per_epoch.shape[0] == 0:
        raise DataError("area under the margin: expected margins of shape (epochs, samples), at least one epoch")
    return per_epoch.mean(axis=0)


def aum_threshold(threshold_sample_aum: np.ndarray, percentile: float = 99.0) -> float:
    """The AUM below which a sample is flagged: the given percentile of the threshold samples' AUM (samples given
    a fake class on purpose, so their AUM is what a mislabelled sample's looks like)."""
    values = np.asarray(threshold_sample_aum, dtype=np.float64)
    if values.size == 0:
        raise DataError("area under the margin: no threshold samples to set the threshold from")
    return float(np.percentile(values, percentile))


def precision_recall(flagged: np.ndarray, truly_wrong: np.ndarray) -> tuple[float, float]:
    """Precision and recall of the flagged positions against the positions known to be wrong (benchmarks)."""
    flagged, truth = set(map(int, flagged)), set(map(int, truly_wrong))
    hits = len(flagged & truth)
    return (hits / len(flagged) if flagged else 1.0), (hits / len(truth) if truth else 1.0)


# The audit's findings, one file per scope under review.audit_dir (reports/label_audit/suspects-<scope>.csv), read
# by the review page's label audit view and logged to MLflow. path: project-relative (a file or a shard locator);
# score: the ranking key (self-confidence for confident learning, AUM for training dynamics), lowest first;
# scope: "train" (the training split, by training dynamics) or "reviewed-<batch>" (a reviewed batch, by confident
# learning against the champion).
SUSPECT_COLUMNS = ("rank", "path", "sha256", "label", "suggested", "score", "method", "scope")


def write_suspects(path, rows: list[dict]) -> None:
    """Write a suspects table (SUSPECT_COLUMNS, ranked) atomically."""
    import pandas as pd

    from visionflow.report import write_text_atomic

    frame = pd.DataFrame(rows, columns=list(SUSPECT_COLUMNS))
    write_text_atomic(path, frame.to_csv(index=False))
