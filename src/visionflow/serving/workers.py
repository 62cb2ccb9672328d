"""Inference processes: `serve.workers` processes, each running the batch work (serving.inference) on what one
inference thread of the server hands it over a pipe.

Why processes: a request's cost in the server is Python work (multipart parse, decode, answers) that holds the GIL;
in one process the event loop and the inference thread took turns on it, and the server reached 0.32x of
in-process decode + ONNX Runtime. In their own processes the event loop only moves bytes.

What crosses the pipe: the jobs, with each model named by a ModelRef (version, ONNX file, card; a process keeps its
own sessions, loaded on first use, so every process follows the registry as the server's champion moves); back
come the outcomes, a failure already turned into its HTTP answer (`Answered`), and the batch's prediction-log
records, which the server process alone writes (one writer: no torn lines); then what the shadow challenger
counted, after the answers (BatchInference.after).

A process that dies (killed, out of memory) fails the batch it held with a 503 and is started again; a request
never waits on a dead process.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, NamedTuple

from visionflow.config import Params
from visionflow.serving.champion import LoadedModel
from visionflow.serving.inference import Job, batch_inference, logged
from visionflow.serving.predict import Answered, failure_answer
from visionflow.serving.predictions import PredictionLog

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 120  # importing the stack and building the review queues; generous for a loaded machine
MODELS_KEPT = 4  # sessions a process keeps: the champion, a challenger, and the ones just swapped out


class ModelRef(NamedTuple):
    """A LoadedModel as it crosses to an inference process: everything but the session."""

    version: str
    path: str
    card: dict[str, Any]
    tags: dict[str, str]


def usable_cores() -> int:
    """The cores this process may run on (its affinity: a server pinned to one core counts one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class InferenceProcess:
    """The server's side of one inference process: a Batcher handler that sends a batch and waits for its outcomes.
    Only its Batcher thread calls it, so one batch is in flight per process."""

    def __init__(self, p: Params, root: Path, log: PredictionLog, index: int, share: float = 1.0):
        self.p, self.root, self.log, self.name = p, Path(root), log, f"visionflow-infer-{index}"
        self.share = share  # its part of the server's limits (batch_inference)
        self._ctx = multiprocessing.get_context("spawn")  # not fork: the server has threads (uvicorn, the watch)
        self._proc: Any = None
        self._conn: Any = None
        self.start()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self) -> None:
        """Start the process (it gets ready on its own: `wait_ready` waits for it)."""
        ours, theirs = self._ctx.Pipe()
        proc = self._ctx.Process(
            target=_serve, args=(theirs, self.p, str(self.root), self.share), name=self.name, daemon=True
        )
        proc.start()
        theirs.close()
        self._proc, self._conn, self._ready = proc, ours, False

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> None:
        if self._ready:
            return
        if not self._conn.poll(timeout_s):
            raise RuntimeError(f"{self.name} did not start within {timeout_s:.0f} s")
        message = self._conn.recv()  # ("ready",) or ("failed", why)
        if message[0] != "ready":
            raise RuntimeError(f"{self.name} could not start: {message[1]}")
        self._ready = True

    def __call__(self, jobs: list[Job]) -> list[Any]:
        try:
            self.wait_ready()
            self._conn.send([_portable(job) for job in jobs])
            outcomes, records = self._conn.recv()
        except (EOFError, OSError, RuntimeError) as exc:  # died, or could not start: this batch fails, not hangs
            self._replace(exc)
            died = Answered(503, "an inference process stopped while serving this request; retry", {"Retry-After": "1"})
            return [died] * len(jobs)
        return logged(self.log, records, outcomes)

    def after(self) -> dict[str, int] | None:
        """What the process's work after the answers (the shadow challenger) counted; the Batcher asks once the
        answers are settled, and the process would do that work before the next batch anyway."""
        try:
            return self._conn.recv()
        except (EOFError, OSError) as exc:  # died in the shadow's work: the next batch finds it replaced
            self._replace(exc)
            return None

    def _replace(self, exc: BaseException) -> None:
        code = self._proc.exitcode if self._proc is not None else None
        logger.error("%s (pid %s) failed: %s (exit code %s); starting a new one", self.name, self.pid, exc, code)
        self.close()
        time.sleep(0.2)  # a process that cannot start must not be restarted in a tight loop
        self.start()

    def close(self) -> None:
        """Stop the process: asked first (the end of the pipe), killed if it does not go."""
        if self._proc is None:
            return
        try:
            self._conn.close()
        except OSError:
            pass
        self._proc.join(timeout=5)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(timeout=5)
        self._proc = None


def inference_processes(p: Params, root: Path, log: PredictionLog) -> list[InferenceProcess]:
    """`serve.workers` inference processes, started (each gets ready in the background). Unset, one per usable
    core, and none on a single core: there the processes only add hand-offs to the same core's work (measured on
    one pinned core: 1,550 req/s with one process against 1,850 with the server's own thread)."""
    n = p.serve.workers
    if n is None:
        n = usable_cores() if usable_cores() > 1 else 0
    return [InferenceProcess(p, root, log, i, share=1 / n) for i in range(n)]


def _portable(job: Job) -> Job:
    """The job as it can cross the pipe: each model (the ONNX Runtime session cannot) as its ModelRef."""
    return job._replace(**{k: _ref(v) for k, v in job._asdict().items() if isinstance(v, LoadedModel)})


def _ref(model: LoadedModel) -> ModelRef:
    if model.path is None:
        raise RuntimeError(f"model v{model.version} has no ONNX file an inference process could load")
    return ModelRef(model.version, str(model.path), model.card, model.tags)


class _Models:
    """An inference process's sessions, by version and file: loaded on first use, the least recent dropped."""

    def __init__(self, device: str) -> None:
        self.device = device
        self._loaded: OrderedDict[tuple[str, str], LoadedModel] = OrderedDict()

    def resolve(self, job: Job) -> Job:
        return job._replace(**{k: self.get(v) for k, v in job._asdict().items() if isinstance(v, ModelRef)})

    def get(self, ref: ModelRef) -> LoadedModel:
        from visionflow.onnxrt import ort_session

        key = (ref.version, ref.path)
        if key not in self._loaded:
            # One ONNX Runtime thread: parallelism comes from the processes, one per core.
            session = ort_session(ref.path, threads=1, device=self.device)
            self._loaded[key] = LoadedModel(ref.version, session, ref.card, ref.tags)
            while len(self._loaded) > MODELS_KEPT:
                self._loaded.popitem(last=False)
        self._loaded.move_to_end(key)
        return self._loaded[key]


class _Records:
    """The prediction log as an inference process sees it: the batch's records, handed back to the server."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def append(self, *records: dict[str, Any]) -> None:
        self.records.extend(records)

    def take(self) -> list[dict[str, Any]]:
        taken, self.records = self.records, []
        return taken


def _serve(conn, p: Params, root: str, share: float) -> None:
    """An inference process: batches in, outcomes and log records out, until the server closes the pipe."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the server stops us
    try:
        records = _Records()
        handle = batch_inference(p, Path(root), records, share)
        models = _Models(p.serve.device)
    except Exception as exc:  # noqa: BLE001 - told to the server, which says why it cannot start us
        conn.send(("failed", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready",))
    while True:
        try:
            jobs = conn.recv()
        except (EOFError, OSError):  # the server closed the pipe (shutdown) or is gone
            return
        outcomes: list[Any] = []
        for job in jobs:
            try:
                outcomes.append(models.resolve(job))
            except Exception as exc:  # noqa: BLE001 - a model that cannot be loaded fails its requests only
                outcomes.append(exc)
        ready = [j for j in outcomes if isinstance(j, Job)]
        done = iter(handle(ready)) if ready else iter(())
        outcomes = [next(done) if isinstance(o, Job) else o for o in outcomes]
        # Exceptions become their answers here: theirs may not survive pickling (HTTPException's do not).
        answers = [failure_answer(o) if isinstance(o, BaseException) else o for o in outcomes]
        conn.send((answers, records.take()))
        conn.send(handle.after())  # the shadow's work, once the answers are on their way
