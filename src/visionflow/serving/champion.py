"""The serving model: the registry's champion, loaded into an ONNX Runtime session and swapped when the alias moves.

A background thread polls the alias; a new version is downloaded and loaded before one reference swap, so requests
keep the session they started with and none is dropped.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from visionflow.config import Params
from visionflow.errors import VisionflowError
from visionflow.paths import ProjectPaths

# What a model card's "task" may name; the serving half of each is picked by it (serving.inference.BatchInference).
TASKS = ("classification", "detection")


@dataclass(frozen=True)
class LoadedModel:
    version: str
    session: Any
    card: dict[str, Any]
    tags: dict[str, str]
    path: Path | None = None  # the ONNX file: inference processes load their own session from it

    @property
    def task(self) -> str:
        """The card's task (cards from before detection have none: they are classifiers)."""
        return self.card.get("task", "classification")


class ChampionHolder:
    """Holds the current champion; `refresh()` reloads when the alias points at a different version."""

    def __init__(self, model_name: str, alias: str = "champion", *, cache_dir: Path, device: str = "cpu"):
        self.model_name = model_name
        self.alias = alias
        self.cache_dir = cache_dir
        self.device = device  # serve.device
        self.current: LoadedModel | None = None
        self.last_error: str | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def refresh(self) -> bool:
        from visionflow.onnxrt import ort_session
        from visionflow.registry.store import alias_version, download_onnx, version_info

        try:
            version = alias_version(self.model_name, self.alias)
            if version is None:
                self.last_error = f"{self.model_name} has no {self.alias!r} alias yet"
                return False
            if self.current is not None and self.current.version == version:
                return False
            path, card = download_onnx(self.model_name, version, self.cache_dir / version)
            if card.get("task", "classification") not in TASKS:
                raise VisionflowError(f"v{version}'s model card names the task {card['task']!r}; known: {TASKS}")
            # One ONNX Runtime thread: the parallelism is the inference processes', one per core; threads on top
            # of them oversubscribe the cores and stretch the latency tail.
            session = ort_session(path, threads=1, device=self.device)
            loaded = LoadedModel(version, session, card, version_info(self.model_name, version)["tags"], path)
            with self._lock:
                self.current = loaded  # one reference swap: in-flight requests keep the session they hold
            self.last_error = None
            return True
        except Exception as exc:  # noqa: BLE001 - registry unreachable: keep serving the model we have
            self.last_error = f"{type(exc).__name__}: {exc}"
            return False

    def watch(self, interval_s: float) -> threading.Thread:
        def loop() -> None:
            while not self._stop.wait(interval_s):
                self.refresh()

        t = threading.Thread(target=loop, name="champion-watch", daemon=True)
        t.start()
        return t

    def stop(self) -> None:
        self._stop.set()


def load_champion(p: Params, root: Path) -> ChampionHolder:
    """The registry's champion, loaded, for `visionflow serve`. A server without one would answer /health and
    refuse every prediction, so no registry, or nothing promoted in it, is an error; the store is only read, never
    created (setup_mlflow would create an empty one)."""
    import mlflow

    from visionflow.registry.tracking import tracking_uri

    uri = tracking_uri(p.registry.tracking_uri, root)
    if uri.startswith("sqlite:///") and not (store := Path(uri.removeprefix("sqlite:///"))).is_file():
        raise VisionflowError(
            f"no model registry at {store}: nothing to serve; train and promote a model first "
            "(`make pipeline`), or point registry.tracking_uri at the registry"
        )
    mlflow.set_tracking_uri(uri)
    from visionflow.onnxrt import providers

    providers(p.serve.device)  # a GPU asked for and not there is refused here, in one line, not as "no champion"
    holder = ChampionHolder(
        p.served_model_name, cache_dir=ProjectPaths.of(p, root).serving_models, device=p.serve.device
    )
    if not holder.refresh():
        raise VisionflowError(
            f"no champion to serve from {uri}: {holder.last_error}; train and promote a model first (`make pipeline`)"
        )
    return holder
