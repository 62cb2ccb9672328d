"""shadow: the champion's p50 latency over HTTP with the shadow challenger on (serve.shadow, shadow_fraction as in
params.yaml) against off (issue 22's goal: p50 grows <= 10%).

Two `visionflow serve` subprocesses on 127.0.0.1, each in a throwaway project whose registry holds the default
model (untrained, seed 0) as champion and another (seed 1) as challenger: one with the shadow off, one with it on.
Both run for the whole benchmark and are measured in turn (on, off, on, off, ...; the idle one only polls its
registry), at one client and at serve.max_concurrency clients. The review queue is off (review_threshold 0) as
in the serving benchmark, so what the shadow adds is its own work: the challenger's model call on the sampled
requests and the review-queue writes of their disagreements (two untrained models disagree often: a worst case).

`python -m bench.shadow_serving [--quick] [--repeats N]` prints the rows as JSON; `run(ctx)` is the suite's entry.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import tempfile
from pathlib import Path
from typing import Any

from bench.common import Context, Measurement, compare, goal, scratch_project
from bench.inference_serving import _register, _sample_image, closed_loop
from bench.process_state import silenced
from bench.sample_data import synthetic_classes
from visionflow.tools.loadtest import cpus
from visionflow.tools.loadtest.local import free_port, serve_command, start_server, stop_server


def _export(ctx: Context, seed: int) -> Path:
    import torch

    from visionflow.registry.export import export_onnx
    from visionflow.training.model import build_net

    cfg = ctx.params().train
    torch.manual_seed(seed)
    net = build_net(cfg.model, len(synthetic_classes()), cfg.channels).eval()
    return export_onnx(
        net, image_size=cfg.image_size, channels=cfg.channels, path=ctx.tmp(f"shadow/export{seed}") / "model.onnx"
    )


def _server(ctx: Context, name: str, champion: Path, challenger: Path, settings: dict[str, Any]):
    """(process, port) of a server whose registry has `champion` promoted and `challenger` only registered."""
    import mlflow

    from visionflow.registry.export import write_model_card
    from visionflow.registry.store import register_onnx
    from visionflow.registry.tracking import setup_mlflow

    cfg = ctx.params().train
    proj, p = scratch_project(ctx, f"shadow/{name}", {"serve.review_threshold": 0.0, **settings})
    with silenced(logs=True):
        _register(proj, p, champion, cfg.image_size, cfg.channels, cfg.model)
        card = write_model_card(
            challenger,
            image_size=cfg.image_size,
            channels=cfg.channels,
            classes=synthetic_classes(),
            model_name=cfg.model,
            data_version="bench",
        )
        with mlflow.start_run(experiment_id=setup_mlflow(p.registry.tracking_uri, proj, p.base.project)) as run:
            pass
        register_onnx(
            onnx_path=challenger,
            card=card,
            model_name=p.registry.model_name,
            mlflow_run_id=run.info.run_id,
            tags={},
            metrics={},
        )  # (register_onnx sets the challenger alias)
    port = free_port()
    # on the server's CPUs of loadtest's split (1 + 1 on 2 cores), the clients on the others, as in `inference`
    sets = cpus.default_split(cpus.usable_cpus()) if cpus.can_pin() else None
    proc = start_server(
        serve_command(proj / "params.yaml", [], port), proj, port, proj / "server.log", sets and sets[0]
    )
    return proc, port, p


def _p50(port: int, body: bytes, ctype: str, clients: int, n: int) -> Measurement:
    url = f"http://127.0.0.1:{port}/predict"
    asyncio.run(closed_loop(url, body, ctype, clients, clients * 20, 5.0))  # warm-up
    res = asyncio.run(closed_loop(url, body, ctype, clients, n, 30.0))
    return Measurement(res["p50_ms"], {"requests": res["requests"], "errors": sum(res["errors"].values())})


def _shadow_counts(port: int) -> dict[str, float]:
    import httpx

    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10, trust_env=False).text
    found = re.findall(r'^(visionflow_shadow_\w+(?:\{outcome="\w+"\})?) (\S+)$', text, re.M)
    return {k: float(v) for k, v in found if "_created" not in k}


def run(ctx: Context, agreeing: bool = False) -> dict[str, Any]:
    """agreeing: the challenger is the champion's own weights (every image agrees: the shadow's model call alone,
    no review-queue writes); otherwise another untrained net, which disagrees on nearly every image."""
    from visionflow.tools.loadtest.run import multipart_body

    cfg = ctx.params()
    champion, challenger = _export(ctx, 0), _export(ctx, 0 if agreeing else 1)
    data, image_source = _sample_image(cfg.train.image_size, cfg.train.channels)
    body, ctype = multipart_body(data, "bench.png")
    n = 100 if ctx.quick else 1000
    on, on_port, p = _server(ctx, "on", champion, challenger, {"serve.shadow": True})
    try:
        off, off_port, _ = _server(ctx, "off", champion, challenger, {})
        try:
            rows = [
                compare(
                    ctx,
                    f"p50, shadow on vs off, {clients} client(s)",
                    lambda clients=clients: _p50(on_port, body, ctype, clients, n),
                    lambda clients=clients: _p50(off_port, body, ctype, clients, n),
                    unit="ms",
                    a_label=f"shadow on (shadow_fraction {p.serve.shadow_fraction})",
                    b_label="shadow off",
                    higher_is_better=False,
                    the_goal=goal("<= 1.10x", "<=", 1.10),
                    notes=[f"image: {image_source}; {n} requests per timed run; client and servers share this machine"],
                )
                for clients in (1, p.serve.max_concurrency)
            ]
            shadow = _shadow_counts(on_port)
        finally:
            stop_server(off)
    finally:
        stop_server(on)
    return {
        "rows": rows,
        "notes": [
            f"shadow server's counters at the end: {shadow}",
            "server pinned as in `inference` (1 + 1 on 2 cores)",
        ],
        "config": {"model": cfg.train.model},
    }


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.shadow_serving", description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--agreeing", action="store_true", help="a challenger that agrees on every image (best case)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-shadow-") as work:
        ctx = Context(quick=args.quick, repeats=args.repeats or (2 if args.quick else 5), workdir=Path(work))
        print(json.dumps(run(ctx, args.agreeing), indent=2, default=str))


if __name__ == "__main__":
    main()
