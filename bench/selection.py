"""selection: accuracy on drifted data after labelling K images chosen by each review.strategy, K = 50..200.

A champion (a project where `visionflow pipeline --no-loop` ran: VISIONFLOW_BENCH_SELECTION_PROJECT, or one built
here in a clone of this repository), the noise shift at severity 5 (visionflow.monitoring.simulate) as a pool of
production images and a separate drifted holdout batch (disjoint held-out images). A simulated reviewer (the true
labels) labels the K images each strategy (visionflow.monitoring.selection.select) picks from the pool. Every
retrain is the same: the champion's weights, AdamW at drift.warm_start_lr, `steps` steps of 64 images (32 drawn
from the K labelled, 32 from a replay sample of the training split), no augmentation; each (strategy, K) is the
mean over `seeds` retrain seeds (torch and batch draws; random also draws its K with that seed), the same seeds
for every strategy. Then top-1 accuracy on the drifted holdout. Goal: the default strategy reaches random's K=200
accuracy with <= 60% of the labels (K <= 120). Writes bench/results/selection.json and selection.png.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import REPO, Context, goal, single, write_json

NAME = "selection"
ENV = "VISIONFLOW_BENCH_SELECTION_PROJECT"
STRATEGIES = ("random", "uncertainty", "uncertainty-diversity")
DEFAULT = "uncertainty-diversity"
KS = (50, 100, 120, 200)
BATCH = 64


def run(ctx: Context) -> dict[str, Any]:
    from visionflow.config import load_params
    from visionflow.registry.tracking import setup_mlflow

    root = _project(ctx)
    p = load_params(root / "params.yaml")
    setup_mlflow(p.registry.tracking_uri, root, p.base.project, p.registry.artifact_location)
    # 80 steps of 64 images: 20-200 s per retrain on 2 cores shared with other work
    sizes = {"pool": 600, "holdout": 400, "replay": 1000, "steps": 40, "seeds": 1} if ctx.quick else {}
    sizes = {"pool": 2000, "holdout": 1000, "replay": 4000, "steps": 80, "seeds": 2} | sizes
    if os.environ.get("BENCH_SELECTION_SEEDS"):  # more seeds separate the strategies better (a quiet machine)
        sizes["seeds"] = int(os.environ["BENCH_SELECTION_SEEDS"])
    data = _data(ctx, p, root, sizes)
    ctx.log(
        f"selection: pool {len(data['pool_y'])}, holdout {len(data['hold_y'])}, champion holdout accuracy "
        f"{data['champion_accuracy']:.4f}; {len(KS)} budgets x {len(STRATEGIES)} strategies"
    )
    results, runs = _sweep(ctx, p, data, sizes)
    summary = _summary(results, data, sizes, root)
    out = REPO / "bench/results" / ("selection-quick" if ctx.quick else "selection")
    write_json(out.with_suffix(".json"), {**summary, "runs": runs, "quick": ctx.quick})
    _plot(results, data["champion_accuracy"], out.with_suffix(".png"))
    return {"rows": _rows(results, summary), "notes": summary["notes"]}


def _project(ctx: Context) -> Path:
    """A project with a champion: the one named by ENV, or a clone of this repository where the pipeline ran."""
    if os.environ.get(ENV):
        return Path(os.environ[ENV]).resolve()
    proj = ctx.workdir / "selection-project"
    subprocess.run(["git", "clone", "-q", str(REPO), str(proj)], check=True)
    quick = ["--set", "data.max_images=6000", "--set", "train.max_epochs=3"] if ctx.quick else []
    ctx.log(f"selection: building a champion in {proj} (`visionflow pipeline --no-loop`; minutes)")
    cmd = [sys.executable, "-c", "from visionflow.cli import entrypoint; entrypoint()", "pipeline", "--no-loop"]
    subprocess.run([*cmd, *quick], cwd=proj, check=True, capture_output=True)
    return proj


def _data(ctx: Context, p, root: Path, sizes: dict[str, int]) -> dict[str, Any]:
    """Pool and holdout (noise, severity 5) through the champion, the replay sample, and the pool's drift."""
    from visionflow.data.imageio import DecodeRules
    from visionflow.data.validate import read_manifest
    from visionflow.monitoring.drift import check, load_champion
    from visionflow.monitoring.drift_features import extract, reference_features
    from visionflow.monitoring.selection import drift_membership
    from visionflow.monitoring.simulate import simulate
    from visionflow.paths import ProjectPaths
    from visionflow.stages import champion_weights

    champion = load_champion(p, root)
    version, session, card = champion
    rules, classes = DecodeRules.from_params(p.validation), list(card["classes"])
    seed, n_pool = p.base.seed + 101, sizes["pool"]
    pool = simulate(p, root, ctx.workdir / "sel-pool", shift="noise", severity=5, n=n_pool, seed=seed)
    hold = simulate(
        p, root, ctx.workdir / "sel-holdout", shift="noise", severity=5, n=sizes["holdout"], seed=seed, skip=n_pool
    )
    pool_f = extract(pool.images, session, card, rules)
    hold_f = extract(hold.images, session, card, rules)
    verdict = check(p, root, batch=pool.folder, name="bench-selection-pool", log_to_mlflow=False, html=False)
    ref = reference_features(p, root, version, session, card)
    train = read_manifest(ProjectPaths.of(p, root).splits / "train.csv")
    pick = np.random.default_rng(p.base.seed).choice(len(train), min(sizes["replay"], len(train)), replace=False)
    paths = ProjectPaths.of(p, root)
    hold_y = np.array([classes.index(y) for y in hold.labels])
    return {
        "p": p,
        "card": card,
        "weights": champion_weights(p, root),
        "pool_x": _decode(pool.images, card, rules),
        "pool_y": np.array([classes.index(y) for y in pool.labels]),
        "probs": pool_f.probabilities,
        "emb": pool_f.embeddings,
        "drift": drift_membership(ref.frame, pool_f.frame, verdict.get("moved") or []),
        "moved": verdict.get("moved"),
        "hold_x": _decode(hold.images, card, rules),
        "hold_y": hold_y,
        "replay_x": _decode([paths.resolve(x) for x in train["path"].iloc[pick]], card, rules),
        "replay_y": np.array([classes.index(y) for y in train["label"].iloc[pick]]),
        "champion_accuracy": float((hold_f.probabilities.argmax(1) == hold_y).mean()),
    }


def _decode(files, card, rules) -> np.ndarray:
    from visionflow.data.imageio import decode_with_properties, read_limited

    size, ch = card["image_size"], card["channels"]
    return np.stack([decode_with_properties(read_limited(f, None), size, ch, rules)[0] for f in files])


def _sweep(ctx: Context, p, data: dict[str, Any], sizes: dict[str, int]) -> tuple[dict, list]:
    """Accuracy per (strategy, K): the mean over the same retrain seeds for every strategy."""
    from visionflow.monitoring.selection import select

    results: dict[str, dict[int, float]] = {s: {} for s in STRATEGIES}
    runs = []
    for k in KS:
        for strategy in STRATEGIES:
            accs = []
            for s in range(sizes["seeds"]):
                t0 = time.perf_counter()
                chosen = select(data["probs"], data["emb"], k, strategy, seed=s, drift=data["drift"])
                acc = _retrain_accuracy(data, chosen, sizes["steps"], seed=s)
                accs.append(acc)
                runs.append({"strategy": strategy, "k": k, "seed": s, "accuracy": acc})
                ctx.log(f"selection: {strategy} K={k} seed {s}: {acc:.4f} ({time.perf_counter() - t0:.1f} s)")
            results[strategy][k] = float(np.mean(accs))
    return results, runs


def _retrain_accuracy(data: dict[str, Any], chosen: np.ndarray, steps: int, seed: int) -> float:
    """Warm start from the champion, fine-tune on the chosen images mixed 1:1 with replay, holdout accuracy."""
    import torch

    from visionflow.training.model import build_net

    p, card = data["p"], data["card"]
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = build_net(p.train.model, len(card["classes"]), card["channels"], str(data["weights"]))
    opt = torch.optim.AdamW(net.parameters(), lr=p.drift.warm_start_lr, weight_decay=p.train.weight_decay)
    lab_x, lab_y = data["pool_x"][chosen], data["pool_y"][chosen]
    net.train()
    for _ in range(steps):
        li = rng.integers(0, len(lab_x), BATCH // 2)
        ri = rng.integers(0, len(data["replay_x"]), BATCH // 2)
        x = np.concatenate([lab_x[li], data["replay_x"][ri]])
        y = np.concatenate([lab_y[li], data["replay_y"][ri]])
        loss = torch.nn.functional.cross_entropy(net(_nchw(x)), torch.from_numpy(y))
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        pred = torch.cat(
            [net(_nchw(data["hold_x"][i : i + 500])).argmax(1) for i in range(0, len(data["hold_x"]), 500)]
        )
    return float((pred.numpy() == data["hold_y"]).mean())


def _nchw(x: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _summary(results: dict, data: dict[str, Any], sizes: dict[str, int], root: Path) -> dict[str, Any]:
    target = results["random"][max(KS)]
    reach = [k for k in KS if results[DEFAULT][k] >= target]
    k_needed = min(reach) if reach else None
    notes = [
        f"random's K={max(KS)} accuracy {target:.4f} (every figure: mean of {sizes['seeds']} retrain seed(s)); "
        f"{DEFAULT} reaches it at "
        + (f"K={k_needed} ({k_needed / max(KS):.0%} of the labels)" if k_needed else "no measured K: goal missed"),
        f"champion before any retrain: {data['champion_accuracy']:.4f} on the drifted holdout",
        f"retrain: {sizes['steps']} steps x {BATCH} images (half labelled, half replay of {len(data['replay_y'])} "
        f"training images), AdamW lr {data['p'].drift.warm_start_lr}; drift check moved: {data['moved']}",
    ]
    return {
        "accuracy": {s: {str(k): round(v, 4) for k, v in r.items()} for s, r in results.items()},
        "champion_accuracy": round(data["champion_accuracy"], 4),
        "random_k200_accuracy": round(target, 4),
        "default_k_to_reach_random_k200": k_needed,
        "goal_met": bool(k_needed and k_needed <= 120),
        "sizes": sizes,
        "project": str(root),
        "notes": notes,
    }


def _rows(results: dict, summary: dict[str, Any]) -> list[dict[str, Any]]:
    rows = [
        single(f"{s} K={k}", round(v, 4), unit="accuracy", label="drifted holdout accuracy after retrain")
        for s, r in results.items()
        for k, v in r.items()
    ]
    rows.append(
        single(
            f"{DEFAULT}: labels to reach random K={max(KS)}",
            summary["default_k_to_reach_random_k200"],
            unit="images",
            label="smallest measured K",
            the_goal=goal("<= 120 labels (60% of 200)", "<=", 120, on="value"),
        )
    )
    return rows


def _plot(results: dict, champion: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for s, r in results.items():
        ax.plot(list(r), list(r.values()), marker="o", label=s)
    ax.axhline(champion, color="grey", linestyle=":", label="champion (no labels)")
    ax.set_xlabel("labelled images K")
    ax.set_ylabel("accuracy on the drifted holdout")
    ax.set_title("noise severity 5: retrain on K images chosen by each strategy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
