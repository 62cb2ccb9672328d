"""visionflow's benchmark suite: `python -m bench [--quick] [--only NAME ...] [--out FILE]`.

Every benchmark times visionflow's way of doing something (A) against a plain baseline (B), interleaved
(A, B, A, B, ...) so that a machine that gets busier or quieter during the run shifts both alike, and reports the
median ratio with its min and max. Goals are printed beside the figures; nothing here asserts a speed.
See BENCHMARKS.md for what each benchmark measures.
"""

BENCHMARKS = ("train_step", "input_pipeline", "cache_build", "inference", "orchestration", "drift", "dvc")
# Run only when named with --only: the shards scaling benchmark takes about 40 minutes at its full sizes; selection
# and label_audit train models (tens of minutes on 2 cores); attribution builds a champion unless given one.
# inference_large repeats inference's serving comparison with a model whose own time dominates (MobileNetV2 at 128 px).
OPT_IN = ("shards", "selection", "label_audit", "attribution", "inference_large")

# benchmark name -> module under bench/ (drift and dvc get longer module names so that `bench/` on sys.path
# could never shadow the real `dvc` package or visionflow's drift module)
MODULES = {
    "train_step": "bench.train_step",
    "input_pipeline": "bench.input_pipeline",
    "cache_build": "bench.cache_build",
    "inference": "bench.inference",
    "orchestration": "bench.orchestration",
    "drift": "bench.drift_check",
    "dvc": "bench.dvc_files",
    "shards": "bench.dvc_shards",
    "selection": "bench.selection",
    "label_audit": "bench.label_audit",
    "attribution": "bench.attribution",
    "inference_large": "bench.inference_large",
}
