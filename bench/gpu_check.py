"""`python -m bench --gpu-check`: the GPU figures issue 17 asks for, in one time-boxed script (< 8 min on one H200).

Steps, each in its own process with its own time box (a hung loader or an out-of-memory cannot take the rest
down), in order of importance, within an overall deadline:

  env       torch/CUDA versions, GPU, nvidia-ml-py (MLflow's GPU system metrics), ONNX Runtime providers
  data      a project on Fashion-MNIST (30,000 images), GPU profile: resnet50, 224 px, 3 channels, batch 256,
            8 workers, bf16 (precision auto), train.compile auto; ingest, validate, split
  train     `visionflow train` (the real entry point) on it: reports/train.json figures (GPU busy fraction after
            the cache, time to first step, images/s, cache seconds) and MLflow's system/ metrics
  plain     bench.train_step's plain PyTorch loop on the same profile, reading the same cached loader: images/s
  compile   the plain loop, torch.compile vs eager, on in-memory batches (goal >= 1.3x)
  evaluate  `visionflow evaluate` on the GPU, and CPU-vs-GPU logits on test images (stated tolerance)
  cache     the cache-build benchmark (a bench entry named *cache* when there is one, else input_pipeline)
  serve     `visionflow serve` of resnet50 at 224 px on ONNX Runtime's CUDA provider (serve.device: cuda; needs the
            onnxruntime-gpu wheel) against CPU on the same machine: req/s and p99 at 64 in flight (issue 22)

Without CUDA every step still runs what it can (tiny sizes: --images, --quick) and the GPU-only parts say
"no CUDA". Results: one JSON (bench/results/gpu-check-<stamp>.json, or --out) and, when $OUT is set, that JSON
with every step's log tarred into $OUT/gpu-check-<stamp>.tar.gz.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

from bench.common import REPO, write_json

STEPS = ("env", "data", "train", "plain", "compile", "evaluate", "cache", "serve")
# seconds per step on the H200 (the total is capped by --budget); the cache step runs last and takes what is left
BOXES = {"env": 30, "data": 120, "train": 210, "plain": 60, "compile": 120, "evaluate": 90, "cache": 90, "serve": 90}
GOALS = {"busy_fraction": 0.85, "time_to_first_step_after_cache_s": 20.0, "vs_plain_loop": 0.95, "compile": 1.3}


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _params_overrides(images: int, quick: bool) -> list[str]:
    gpu = _cuda()
    model = (
        [
            "train.model=resnet50",
            "train.image_size=224",
            "train.channels=3",
            "train.batch_size=256",
            "train.num_workers=8",
        ]
        if gpu
        else ["train.image_size=28", "train.batch_size=64", "train.num_workers=1"]
    )
    return [
        *model,
        f"data.max_images={images}",
        f"train.max_epochs={1 if quick else 2}",
        "train.early_stopping_patience=10",
        "train.system_metrics_interval_s=2",
        f"evaluate.robustness_images={100 if quick else 500}",
        "export.parity_images=100",
    ]


def _project(work: Path) -> Path:
    return work / "project"


def step_env(args) -> dict[str, Any]:
    import onnxruntime as ort
    import torch

    from bench.machine import machine_info

    out: dict[str, Any] = {
        "machine": machine_info(),
        "cuda": _cuda(),
        "torch": torch.__version__,
        "ort_providers": ort.get_available_providers(),
    }
    try:
        import pynvml  # noqa: F401  (nvidia-ml-py: what MLflow's GPU system metrics need)

        out["nvidia_ml_py"] = True
    except ImportError:
        out["nvidia_ml_py"] = "missing: MLflow logs no GPU system metrics (pip install nvidia-ml-py)"
    if _cuda():
        out["gpu"] = torch.cuda.get_device_name(0)
        out["capability"] = list(torch.cuda.get_device_capability(0))
    return out


def step_data(args) -> dict[str, Any]:
    import shutil

    from visionflow import stages
    from visionflow.config import load_params

    proj = _project(args.work)
    proj.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "params.yaml", proj / "params.yaml")
    (proj / "overrides.json").write_text(json.dumps(_params_overrides(args.images, args.quick)))
    p = load_params(proj / "params.yaml", _params_overrides(args.images, args.quick))
    t = {}
    for name, fn in (
        ("ingest", lambda: stages.ingest_stage(p, proj)),
        ("validate", lambda: stages.validate_stage(p, proj, None)),
        ("split", lambda: stages.split_stage(p, proj)),
    ):
        t0 = time.perf_counter()
        fn()
        t[f"{name}_s"] = round(time.perf_counter() - t0, 2)
    return {"images": args.images, "overrides": _params_overrides(args.images, args.quick), **t}


def _cli(args, *command: str) -> None:
    proj = _project(args.work)
    sets = [x for o in json.loads((proj / "overrides.json").read_text()) for x in ("--set", o)]
    subprocess.run(
        [sys.executable, "-m", "visionflow.cli", "--params", str(proj / "params.yaml"), *sets, *command],
        check=True,
        cwd=proj,
    )


def step_train(args) -> dict[str, Any]:
    import mlflow

    proj = _project(args.work)
    t0 = time.perf_counter()
    _cli(args, "train")
    report = json.loads((proj / "reports/train.json").read_text())
    run = mlflow.MlflowClient(f"sqlite:///{proj / 'mlruns/mlflow.db'}").get_run(report["mlflow_run_id"])
    system = {k: round(v, 2) for k, v in run.data.metrics.items() if k.startswith("system/")}
    f = report["figures"]
    return {
        "wall_s": round(time.perf_counter() - t0, 2),
        "figures": f,
        "runtime": report["runtime"],
        "system_metrics_last": system,
        "gpu_system_metrics": any("gpu" in k for k in system),
        "goals": {
            "busy_fraction >= 0.85": (f["busy_fraction"] >= GOALS["busy_fraction"]) if _cuda() else "no CUDA",
            "time to first step (after the cache) <= 20 s": f["time_to_first_step_after_cache_s"]
            <= GOALS["time_to_first_step_after_cache_s"],
        },
    }


def _profile(args, compile_: bool, steps: int):
    from bench.train_profiles import Profile
    from visionflow.config import load_params
    from visionflow.training.runtime import resolve_runtime

    p = load_params(
        _project(args.work) / "params.yaml", json.loads((_project(args.work) / "overrides.json").read_text())
    )
    rt = resolve_runtime(p.train.model_copy(update={"channels": 3 if _cuda() else 1}))
    return Profile(
        "gpu-check",
        p.train.model,
        p.train.image_size,
        3 if _cuda() else 1,
        p.train.batch_size,
        rt.accelerator,
        rt.precision,
        rt.channels_last,
        warmup=10 if compile_ else 5,
        steps=steps,
        workers=p.train.num_workers,
        goal=0.95,
        compile=compile_,
    ), p


def _ctx(args):
    from bench.common import Context

    return Context(quick=args.quick, repeats=1, workdir=args.work / "ctx", compile=False)


def step_plain(args) -> dict[str, Any]:
    from bench.train_data import LoaderView, train_datamodule
    from bench.train_loops import plain_run
    from visionflow.training.datamodule import class_names

    prof, p = _profile(args, False, 10 if args.quick else 60)
    proj = _project(args.work)
    classes = class_names(proj / p.data.splits_dir)
    dm = train_datamodule(prof, p, proj / p.data.splits_dir, proj / "data/cache", classes)
    loader = dm.train_dataloader()
    n = len(loader)
    if n < prof.total:
        prof = type(prof)(**{**prof.__dict__, "warmup": max(1, n // 4), "steps": max(1, n - n // 4 - 1)})
    m = plain_run(_ctx(args), prof, LoaderView(loader), classes)
    out: dict[str, Any] = {"plain_loop_images_per_s": round(m.value, 1), "profile": prof.describe()}
    trained = proj / "reports/train.json"
    if trained.is_file():
        ips = json.loads(trained.read_text())["figures"]["images_per_s"]
        out["visionflow_train_images_per_s"] = ips
        out["ratio"] = round(ips / m.value, 4) if ips else None
        out["goal >= 0.95x"] = (out["ratio"] or 0) >= GOALS["vs_plain_loop"] if _cuda() else "no CUDA"
    return out


def step_compile(args) -> dict[str, Any]:
    from bench.sample_data import synthetic_classes
    from bench.train_data import synthetic_batches
    from bench.train_loops import plain_run

    if not _cuda() and not args.quick:
        return {"skipped": "no CUDA"}
    out: dict[str, Any] = {}
    for flag in (False, True):
        prof, _ = _profile(args, flag, 5 if args.quick else 40)
        data = synthetic_batches(prof, prof.total)
        out["compiled" if flag else "eager"] = round(plain_run(_ctx(args), prof, data, synthetic_classes()).value, 1)
    out["ratio"] = round(out["compiled"] / out["eager"], 4)
    out["goal >= 1.3x"] = out["ratio"] >= GOALS["compile"] if _cuda() else "no CUDA (CPU dry run)"
    return out


def step_evaluate(args) -> dict[str, Any]:
    import numpy as np

    from visionflow.data.cache import build_cache
    from visionflow.training.evaluate import GPU_TOLERANCE, predict_logits
    from visionflow.training.train import load_classifier

    proj = _project(args.work)
    t0 = time.perf_counter()
    _cli(args, "evaluate")
    wall = time.perf_counter() - t0
    ev = json.loads((proj / "reports/evaluation/evaluation.json").read_text())
    out: dict[str, Any] = {
        "wall_s": round(wall, 2),
        "device": ev["device"],
        "test_accuracy": ev["test_accuracy"],
        "robust_accuracy": ev["robust_accuracy"],
        "n_test": ev["n_test"],
    }
    if not _cuda():
        out["cpu_vs_gpu"] = "no CUDA"
        return out
    model = load_classifier(proj / "models/model.ckpt")
    hp = model.hparams
    test = build_cache(
        proj / "data/splits/test.csv",
        proj / "data/cache",
        classes=list(hp.classes),
        image_size=hp.image_size,
        channels=hp.channels,
    )
    images = np.asarray(test.images[:1024])
    t0 = time.perf_counter()
    gpu = predict_logits(model.net, images, device="cuda")
    t_gpu = time.perf_counter() - t0
    t0 = time.perf_counter()
    cpu = predict_logits(model.net, images, device="cpu")
    t_cpu = time.perf_counter() - t0
    diff = float(np.abs(gpu - cpu).max())
    out["cpu_vs_gpu"] = {
        "images": len(images),
        "max_abs_logit_diff": diff,
        "tolerance": GPU_TOLERANCE,
        "within_tolerance": diff <= GPU_TOLERANCE,
        "top1_agreement": float((gpu.argmax(1) == cpu.argmax(1)).mean()),
        "gpu_images_per_s": round(len(images) / t_gpu, 1),
        "cpu_images_per_s": round(len(images) / t_cpu, 1),
    }
    return out


def step_cache(args) -> dict[str, Any]:
    import importlib

    from bench import BENCHMARKS, MODULES
    from bench.common import Context

    name = next((n for n in BENCHMARKS if "cache" in n), "input_pipeline")
    ctx = Context(quick=args.quick, repeats=1, workdir=args.work / "cache-bench")
    out: dict[str, Any] = {"benchmark": name, **importlib.import_module(MODULES[name]).run(ctx)}
    trained = _project(args.work) / "reports/train.json"
    if trained.is_file():  # the training run's own cache build, all splits, as visionflow train built it
        f = json.loads(trained.read_text())["figures"]
        out["train_cache_s"] = f["cache_s"]
        out["train_cache_images_per_s"] = round(args.images / f["cache_s"], 1) if f["cache_s"] > 0 else None
    return out


def step_serve(args) -> dict[str, Any]:
    """The served model's req/s and p99 on the CUDA provider and on CPU: resnet50 at 224 px on a GPU machine (the
    28 px default where there is none, so the step still runs), 64 requests in flight, one server at a time."""
    import asyncio

    import onnxruntime as ort

    from bench.common import scratch_project
    from bench.inference_serving import _register, closed_loop
    from bench.sample_data import N_CLASSES
    from visionflow.registry.export import export_onnx
    from visionflow.tools.loadtest.local import free_port, serve_command, start_server, stop_server
    from visionflow.tools.loadtest.run import default_image, multipart_body
    from visionflow.training.model import build_net

    ctx = _ctx(args)
    model, size = ("resnet50", 224) if _cuda() else ("test_resnet", 28)
    onnx_path = export_onnx(
        build_net(model, N_CLASSES, 3).eval(), image_size=size, channels=3, path=ctx.tmp("serve") / "model.onnx"
    )
    body, ctype = multipart_body(default_image(size, 3), "bench.png")
    seconds = 5.0 if args.quick else 20.0
    out: dict[str, Any] = {
        "model": model,
        "image_size": size,
        "in_flight": 64,
        "providers": ort.get_available_providers(),
    }
    # CPU: one process per core (serve.workers unset); GPU: two processes feeding it batches of up to 32 requests
    devices = {"cpu": {}, "cuda": {"serve.device": "cuda", "serve.workers": 2, "serve.max_concurrency": 32}}
    for device, settings in devices.items():
        if device == "cuda" and "CUDAExecutionProvider" not in out["providers"]:
            out[device] = "no CUDA provider (the onnxruntime-gpu wheel is not installed)"
            continue
        proj, p = scratch_project(ctx, f"serve-{device}", {"serve.review_threshold": 0.0, **settings})
        _register(proj, p, onnx_path, size, 3, model)
        port = free_port()
        proc = start_server(serve_command(proj / "params.yaml", [], port), proj, port, proj / "server.log")
        try:
            url = f"http://127.0.0.1:{port}/predict"
            asyncio.run(closed_loop(url, body, ctype, 64, 640, 10.0))  # warm-up (CUDA kernels, arenas)
            res = asyncio.run(closed_loop(url, body, ctype, 64, 10**6, seconds))
        finally:
            stop_server(proc)
        out[device] = {**res, "req_per_s": round(res["ok"] / res["seconds"], 1) if res["seconds"] else 0.0}
    return out


def _run_step(name: str, args, deadline: float, logs: Path) -> dict[str, Any]:
    box = min(BOXES[name], deadline - time.monotonic())
    if box < 5:
        return {"status": "skipped", "reason": "the overall budget is spent"}
    result = args.work / f"{name}.json"
    cmd = [
        sys.executable,
        "-m",
        "bench.gpu_check",
        "--step",
        name,
        "--work",
        str(args.work),
        "--images",
        str(args.images),
        *(["--quick"] if args.quick else []),
    ]
    t0 = time.monotonic()
    with open(logs / f"{name}.log", "w") as log:
        # its own session: on time-out the step's loader workers and compile workers go with it
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
        try:
            rc = proc.wait(timeout=box)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return {"status": "timed out", "box_s": round(box), "seconds": round(time.monotonic() - t0, 1)}
    entry = {
        "status": "ok" if rc == 0 and result.is_file() else f"failed (exit {rc})",
        "seconds": round(time.monotonic() - t0, 1),
    }
    if result.is_file():
        entry.update(json.loads(result.read_text()))
    return entry


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench --gpu-check", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--gpu-check", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--step", choices=STEPS, help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help="work folder (default: a new one under /tmp)")
    ap.add_argument("--images", type=int, default=30000, help="Fashion-MNIST images (default 30000)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a dry run of every step, not a measurement")
    ap.add_argument("--budget", type=float, default=450, help="overall seconds (default 450, under 8 min)")
    ap.add_argument("--only", nargs="+", choices=STEPS, help="run only these steps")
    ap.add_argument("--out", type=Path, help="results JSON (default bench/results/gpu-check-<stamp>.json)")
    args = ap.parse_args(argv)
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    if args.step:  # one step, in its own process
        args.work.mkdir(parents=True, exist_ok=True)
        out = globals()[f"step_{args.step}"](args)
        write_json(args.work / f"{args.step}.json", out)
        return 0
    import tempfile

    stamp = time.strftime("%Y%m%d-%H%M%S")
    args.work = args.work or Path(tempfile.mkdtemp(prefix="visionflow-gpu-check-"))
    logs = args.work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.budget
    results: dict[str, Any] = {
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "images": args.images,
        "quick": args.quick,
        "budget_s": args.budget,
        "goals": GOALS,
        "steps": {},
    }
    out = args.out or REPO / "bench/results" / f"gpu-check-{stamp}.json"
    for name in args.only or STEPS:
        print(f"{time.strftime('%H:%M:%S')} gpu-check: {name}", file=sys.stderr, flush=True)
        results["steps"][name] = _run_step(name, args, deadline, logs)
        print(f"  {json.dumps(results['steps'][name], default=str)[:600]}", file=sys.stderr, flush=True)
        write_json(out, results)
    results["seconds"] = round(args.budget - (deadline - time.monotonic()), 1)
    write_json(out, results)
    if os.environ.get("OUT"):
        tar = Path(os.environ["OUT"]) / f"gpu-check-{stamp}.tar.gz"
        with tarfile.open(tar, "w:gz") as tf:
            tf.add(out, arcname=out.name)
            tf.add(logs, arcname="logs")
        print(f"gpu-check: {tar}", file=sys.stderr)
    print(f"gpu-check: {out} ({results['seconds']:.0f} s)", file=sys.stderr)
    return 0 if all(s.get("status") == "ok" for s in results["steps"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
