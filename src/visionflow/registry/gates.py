"""The promotion gates: what a challenger must pass to become champion, judged on per-image correctness.

No registry access here: registry.promotion computes both models' correctness on the same images, gate_decision
turns it into gates, and registry.store.apply_promotion moves the aliases by them (its Decision).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from visionflow.config import RegistryParams


@dataclass
class Gate:
    name: str
    passed: bool
    detail: str
    value: float | None = None


@dataclass
class Decision:
    model: str
    version: str
    promoted: bool
    champion_before: str | None
    champion_after: str | None
    gates: list[Gate] = field(default_factory=list)

    @property
    def reasons(self) -> list[str]:
        return [f"{g.name}: {g.detail}" for g in self.gates if not g.passed]

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "reasons": self.reasons}


def paired_bootstrap_lower(
    correct_new: np.ndarray, correct_old: np.ndarray, *, n_boot: int, alpha: float, seed: int
) -> tuple[float, float]:
    """Mean accuracy gain (new - old) on the same images and its one-sided (1 - alpha) bootstrap lower bound.

    Per image the paired difference is -1, 0 or +1, so resampling images with replacement is exactly a
    multinomial draw over those three outcomes: the same bootstrap without materialising n_boot x n indices.
    """
    diff = correct_new.astype(np.int8) - correct_old.astype(np.int8)
    n = len(diff)
    probs = [(diff == -1).mean(), (diff == 0).mean(), (diff == 1).mean()]
    draws = np.random.default_rng(seed).multinomial(n, probs, size=n_boot)
    boots = (draws[:, 2] - draws[:, 0]) / n
    return float(diff.mean()), float(np.quantile(boots, alpha))


def unpaired_bootstrap_upper(
    correct_new: np.ndarray, correct_old: np.ndarray, *, n_boot: int, alpha: float, seed: int
) -> tuple[float, float]:
    """Accuracy difference (new - old) measured on different images (a canary's and the champion's traffic) and
    its one-sided (1 - alpha) bootstrap upper bound: below 0, new is worse with that confidence.

    Each side is resampled on its own; resampling n 0/1 outcomes with replacement is a binomial draw, so this is
    that bootstrap without materialising n_boot x n indices (as paired_bootstrap_lower does for its pairs)."""
    rng = np.random.default_rng(seed)
    new, old = correct_new.astype(bool), correct_old.astype(bool)
    boots = rng.binomial(len(new), new.mean(), n_boot) / len(new) - rng.binomial(len(old), old.mean(), n_boot) / len(
        old
    )
    return float(new.mean() - old.mean()), float(np.quantile(boots, 1 - alpha))


def per_class_recall(correct: np.ndarray, labels: np.ndarray, n_classes: int) -> np.ndarray:
    return np.array([correct[labels == c].mean() if (labels == c).any() else np.nan for c in range(n_classes)])


def gate_decision(
    *,
    cfg: RegistryParams,
    parity_passed: bool,
    parity_detail: str,
    latency_ms: float,
    clean_new: np.ndarray,
    labels: np.ndarray,
    classes: list[str],
    seed: int,
    clean_old: np.ndarray | None = None,
    all_new: np.ndarray | None = None,
    all_old: np.ndarray | None = None,
    compared_on: str = "clean+corrupted",
) -> list[Gate]:
    """Every gate the challenger must pass. clean_* are per-image correctness on the clean test split;
    all_* add the corruption suite; both models are judged on exactly the same images."""
    gates = [Gate("parity", parity_passed, parity_detail)]
    acc = float(clean_new.mean())
    gates.append(
        Gate(
            "accuracy_floor",
            acc >= cfg.accuracy_floor,
            f"test accuracy {acc:.4f} {'>=' if acc >= cfg.accuracy_floor else '<'} floor {cfg.accuracy_floor}",
            acc,
        )
    )
    gates.append(
        Gate(
            "latency",
            latency_ms <= cfg.latency_budget_ms,
            f"ONNX Runtime batch-1 latency {latency_ms:.2f} ms vs budget {cfg.latency_budget_ms} ms",
            latency_ms,
        )
    )
    if clean_old is not None:
        new = all_new if all_new is not None else clean_new
        old = all_old if all_old is not None else clean_old
        gates += _champion_gates(
            cfg=cfg,
            new=new,
            old=old,
            clean_new=clean_new,
            clean_old=clean_old,
            labels=labels,
            classes=classes,
            seed=seed,
            compared_on=compared_on,
        )
    return gates


def _champion_gates(
    *,
    cfg: RegistryParams,
    new: np.ndarray,
    old: np.ndarray,
    clean_new: np.ndarray,
    clean_old: np.ndarray,
    labels: np.ndarray,
    classes: list[str],
    seed: int,
    compared_on: str,
) -> list[Gate]:
    """The gates against a champion: a gain on every compared image (new/old), and no class's recall on the
    clean split falling by more than the limit."""
    gain, lower = paired_bootstrap_lower(new, old, n_boot=cfg.bootstrap_samples, alpha=cfg.bootstrap_alpha, seed=seed)
    return [
        Gate(
            "beats_champion",
            lower > cfg.min_gain,
            f"accuracy gain over champion {gain:+.4f} on {len(new)} {compared_on} images, "
            f"{1 - cfg.bootstrap_alpha:.0%} lower bound {lower:+.4f} "
            f"{'>' if lower > cfg.min_gain else '<='} margin {cfg.min_gain}",
            lower,
        ),
        class_regression_gate(cfg, clean_new, clean_old, labels, classes),
    ]


def class_regression_gate(
    cfg: RegistryParams, clean_new: np.ndarray, clean_old: np.ndarray, labels: np.ndarray, classes: list[str]
) -> Gate:
    """No class's recall on the clean split falls by more than registry.max_class_drop."""
    k = len(classes)
    drop = per_class_recall(clean_old, labels, k) - per_class_recall(clean_new, labels, k)
    worst = int(np.nanargmax(drop))
    return Gate(
        "no_class_regression",
        bool(drop[worst] <= cfg.max_class_drop),
        f"largest per-class recall drop {drop[worst]:+.4f} ({classes[worst]}) vs limit {cfg.max_class_drop}",
        float(drop[worst]),
    )


def variant_gates(
    *,
    cfg: RegistryParams,
    max_drop: float,
    new: np.ndarray,
    old: np.ndarray,
    clean_new: np.ndarray,
    clean_old: np.ndarray,
    labels: np.ndarray,
    classes: list[str],
    seed: int,
) -> tuple[list[Gate], tuple[float, float]]:
    """The accuracy gates of a reduced-precision variant against its fp32 parent on the same images (new/old:
    clean + corrupted correctness): the bootstrap lower bound of the accuracy change may not fall below -max_drop,
    and no class may regress. Also returns (mean change, lower bound)."""
    delta, lower = paired_bootstrap_lower(new, old, n_boot=cfg.bootstrap_samples, alpha=cfg.bootstrap_alpha, seed=seed)
    ok = lower >= -max_drop
    drop = Gate(
        "accuracy_drop",
        ok,
        f"accuracy change vs fp32 {delta:+.4f} on {len(new)} clean+corrupted images, "
        f"{1 - cfg.bootstrap_alpha:.0%} lower bound {lower:+.4f} {'>=' if ok else '<'} "
        f"-{max_drop} (export.quantize_max_drop)",
        lower,
    )
    return [drop, class_regression_gate(cfg, clean_new, clean_old, labels, classes)], (delta, lower)
