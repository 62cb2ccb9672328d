"""Training dynamics: each training sample's margin, every time training sees it, for the label audit.

The margin (Pleiss et al. 2020; the math in visionflow.monitoring.label_audit) is the assigned label's logit minus
the largest other logit, taken from the logits training_step already computed (on the augmented image, as in the
paper): no extra forward pass. Sums and counts stay on the training device, updated with vectorised scatters, and
reach the CPU only when a checkpoint is written and when training ends. Averaged over the epochs, the margin is
the area under the margin (AUM): low or negative for a sample whose label the network contradicts.

The callback's state travels in the checkpoints (Lightning saves a callback's state_dict), so a resumed run's
table covers the whole run; the `epochs` column says how many times each sample was seen (a mid-epoch resume may
see a few samples once more or once less). Under a multi-process strategy the ranks' sums are added at the end;
a resumed multi-process run keeps only rank 0's share of the time before the interruption (fewer epochs for the
other ranks' samples, which the column shows).

The table (one row per cached train sample): path (as stored in the train split), sha256, label, aum, suggested
(the class that was most often the largest other logit), epochs. Beside it, <table>.json: the train split's
sha256 (the audit refuses a table of another split), the MLflow run and the epochs recorded.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

from visionflow.data.cache import CachedSplit
from visionflow.data.validate import read_manifest
from visionflow.report import write_json_atomic, write_text_atomic

TABLE_COLUMNS = ("path", "sha256", "label", "aum", "suggested", "epochs")


class TrainingDynamics(L.Callback):
    """Per-sample margin sums, times seen, and how often each other class had the largest logit."""

    def __init__(self, n_samples: int, n_classes: int):
        self.n, self.k = n_samples, n_classes
        self.margin_sum: torch.Tensor | None = None  # (n,) float64: margins added up
        self.seen: torch.Tensor | None = None  # (n,) int32: times trained on
        self.rival: torch.Tensor | None = None  # (n, k) int32: times each class was the largest other logit
        self._loaded: dict[str, torch.Tensor] | None = None  # from a checkpoint, moved to the device on first use

    @property
    def state_key(self) -> str:
        return "TrainingDynamics"

    def _allocate(self, device: torch.device) -> None:
        state = self._loaded or {}
        self.margin_sum = state.get("margin_sum", torch.zeros(self.n, dtype=torch.float64)).to(device)
        self.seen = state.get("seen", torch.zeros(self.n, dtype=torch.int32)).to(device)
        self.rival = state.get("rival", torch.zeros(self.n, self.k, dtype=torch.int32)).to(device)
        self._loaded = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not isinstance(outputs, dict) or "logits" not in outputs or len(batch) < 3:
            return  # a loader without indices, or a module that does not hand back its logits
        logits, y, idx = outputs["logits"].float(), batch[1], batch[2]
        if self.margin_sum is None:
            self._allocate(logits.device)
        assigned = logits.gather(1, y[:, None]).squeeze(1)
        others = logits.scatter(1, y[:, None], float("-inf"))
        # argmax + gather, not max(dim=1): on CPU, max over a dim ran ~15 ms per call (its intra-op threads) where
        # these take microseconds
        rival = others.argmax(dim=1)
        rival_logit = others.gather(1, rival[:, None]).squeeze(1)
        self.margin_sum.index_add_(0, idx, (assigned - rival_logit).double())
        self.seen.index_add_(0, idx, torch.ones_like(idx, dtype=torch.int32))
        self.rival.index_put_((idx, rival), torch.ones_like(idx, dtype=torch.int32), accumulate=True)

    def state_dict(self) -> dict[str, Any]:
        if self.margin_sum is None:
            return dict(self._loaded or {})
        return {"margin_sum": self.margin_sum.cpu(), "seen": self.seen.cpu(), "rival": self.rival.cpu()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict and state_dict["seen"].shape[0] == self.n:  # a checkpoint of the same split
            self._loaded = dict(state_dict)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.margin_sum is not None and trainer.world_size > 1:
            for t in (self.margin_sum, self.seen, self.rival):
                t.copy_(trainer.strategy.reduce(t, reduce_op="sum"))

    @property
    def recorded(self) -> bool:
        """Whether this process holds any margins (a spawn-launched strategy trains in other processes)."""
        return self.margin_sum is not None or self._loaded is not None

    def result(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(aum, suggested class index, times seen) per sample; aum is nan for a sample never seen."""
        if self.margin_sum is None:
            self._allocate(torch.device("cpu"))
        seen = self.seen.cpu().numpy().astype(np.int64)
        with np.errstate(invalid="ignore", divide="ignore"):
            aum = np.where(seen > 0, self.margin_sum.cpu().numpy() / np.maximum(seen, 1), np.nan)
        return aum, self.rival.cpu().numpy().argmax(axis=1), seen


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def write_table(
    path: Path, dynamics: TrainingDynamics, split: CachedSplit, manifest: Path, classes: list[str], meta: dict
) -> None:
    """The per-sample table at `path` (CSV, TABLE_COLUMNS) and its description at path.with_suffix(".json"):
    meta plus the train split's sha256, the samples and the most epochs any sample was seen."""
    import pandas as pd

    aum, suggested, seen = dynamics.result()
    sha = read_manifest(manifest).drop_duplicates("path").set_index("path")["sha256"]
    names = np.asarray(classes, dtype=object)
    frame = pd.DataFrame(
        {
            "path": split.paths,
            "sha256": sha.reindex(split.paths).fillna("").to_numpy(),
            "label": names[np.asarray(split.labels, dtype=np.int64)],
            "aum": np.round(aum, 5),
            "suggested": names[suggested],
            "epochs": seen,
        },
        columns=list(TABLE_COLUMNS),
    )
    write_text_atomic(path, frame.to_csv(index=False))
    write_json_atomic(
        path.with_suffix(".json"),
        {
            **meta,
            "method": "aum",
            "split_sha256": file_sha256(manifest),
            "samples": len(frame),
            "epochs": int(seen.max()) if len(seen) else 0,
            "classes": list(classes),
        },
    )


def record_table(
    dynamics: TrainingDynamics,
    path: Path,
    split: tuple[CachedSplit, Path, list[str]],
    meta: dict,
    client,
    log,
) -> Path | None:
    """At the end of a training run: the table at `path` (write_table; split is the cached train split, its
    manifest and the class names), logged to the MLflow run meta["mlflow_run_id"] through `client` (artifact
    folder training_dynamics/). None, with a warning, when this process recorded nothing (a spawn-launched
    strategy trains in other processes)."""
    if not dynamics.recorded:
        log.warning("no training dynamics recorded in this process: no table for the label audit")
        return None
    write_table(path, dynamics, *split, meta)
    for f in (path, path.with_suffix(".json")):
        client.log_artifact(meta["mlflow_run_id"], str(f), "training_dynamics")
    return path


def read_meta(path: Path) -> dict:
    return json.loads(Path(path).with_suffix(".json").read_text())
