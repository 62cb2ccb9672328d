"""Typed view of params.yaml: one model per section, validated once at load.

Every stage receives the section it needs as a typed object; nothing else in the package reads YAML.
"""

from __future__ import annotations

import hashlib
import json
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from visionflow.errors import ConfigError

DEFAULT_PARAMS = Path("params.yaml")
# params.yaml is a few KB; a bigger file is a mistake (or an attack on the YAML parser), refused unread.
MAX_PARAMS_BYTES = 1 << 20


def _admits(annotation: Any, kind: type) -> bool:
    """Whether a field's annotation takes values of `kind` (through Optional, unions, Annotated, Literal)."""
    if annotation is kind:
        return True
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return any(type(a) is kind for a in args)
    if origin in (typing.Union, types.UnionType, Annotated):
        return any(_admits(a, kind) for a in args)
    return False


class _Section(BaseModel):
    # A misspelt key must fail loudly instead of silently falling back to a default. Strict: YAML's `true`, "3"
    # or 2.0 never turn into a number, and .inf/.nan are never a number here.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _plain_yaml_types(cls, value: Any, info: ValidationInfo) -> Any:
        annotation = cls.model_fields[info.field_name].annotation
        # Strict mode takes only Path objects for a Path; from YAML a path is a string.
        if isinstance(value, str) and _admits(annotation, Path):
            return Path(value)
        # Strict mode still reads `true` as 1 for a Literal[1, 3] (True == 1 in Python).
        if isinstance(value, bool) and not _admits(annotation, bool):
            raise ValueError("true/false is not allowed here")
        return value


class BaseParams(_Section):
    seed: int = Field(42, ge=0, le=2**32 - 1)  # numpy and Lightning take unsigned 32-bit seeds
    project: str = "visionflow"
    # classification: one label per image (data/raw/<class>/<file>). detection: boxes per image, configured in
    # the `detection` section (visionflow.tasks.detection); each stage dispatches once on this.
    task: Literal["classification", "detection"] = "classification"


class DataParams(_Section):
    source: str = Field(
        "fashion-mnist",
        description="'fashion-mnist', 'fashion-mnist-photos' (camera-like "
        "JPEGs made from it, see visionflow.data.photos) or a folder with one sub-folder per class",
    )
    max_images: int | None = Field(30000, ge=10, le=10**9)
    raw_dir: Path = Path("data/raw")
    # loose: data/raw/<class>/<file>; shards: content-addressed tar shards (visionflow.data.shards), for 100k+ images
    layout: Literal["loose", "shards"] = "loose"
    shard_mb: float = Field(256, gt=0, le=65536)
    remote_url: str = ".dvc-remote"
    remote_name: str = Field("local", pattern=r"^[A-Za-z0-9_-]+$")
    val_fraction: float = Field(0.1, gt=0, lt=0.5)
    test_fraction: float = Field(0.15, gt=0, lt=0.5)
    splits_dir: Path = Path("data/splits")
    manifest_path: Path = Path("data/validated/manifest.csv")
    # Expected class names; null means the class folders found. Images of any other class are quarantined.
    labels: list[str] | None = None
    # Label corrections (sha256,label,...; visionflow.data.overrides) that ingest applies to the next data version.
    label_overrides: Path = Path("data/label_overrides.csv")


ImageFormat = Literal["PNG", "JPEG", "BMP", "WEBP", "GIF", "TIFF"]


class ValidateParams(_Section):
    allowed_formats: list[ImageFormat] = ["PNG", "JPEG", "BMP", "WEBP"]
    min_width: int = Field(8, ge=1, le=1 << 20)
    min_height: int = Field(8, ge=1, le=1 << 20)
    max_width: int = Field(8192, ge=1, le=1 << 20)
    max_height: int = Field(8192, ge=1, le=1 << 20)
    max_pixels: int = Field(40_000_000, ge=1, le=10**9)
    max_file_mb: float = Field(50, gt=0, le=4096)
    decode_timeout_s: float = Field(10, gt=0, le=3600)
    min_images_per_class: int = Field(10, ge=1, le=10**7)
    min_class_balance: float = Field(0.2, ge=0, le=1)
    max_quarantine_fraction: float = Field(0.05, ge=0, le=1)
    quarantine_dir: Path = Path("data/quarantine")
    report_dir: Path = Path("reports/validation")

    @model_validator(mode="after")
    def _bounds(self) -> ValidateParams:
        if self.min_width > self.max_width or self.min_height > self.max_height:
            raise ValueError("min_width/min_height must not exceed max_width/max_height")
        return self


class AugmentParams(_Section):
    hflip: float = Field(0.5, ge=0, le=1)
    shift_scale_rotate: float = Field(0.3, ge=0, le=1)
    brightness_contrast: float = Field(0.3, ge=0, le=1)
    blur: float = Field(0.0, ge=0, le=1)
    noise: float = Field(0.0, ge=0, le=1)
    jpeg: float = Field(0.0, ge=0, le=1)
    random_crop: float = Field(0.0, ge=0, le=1)


class TrainParams(_Section):
    model: str = "test_resnet"
    pretrained_weights: str | None = None
    image_size: int = Field(28, ge=8, le=1024)
    # "auto": 3 when most training images are colour, 1 when most are grey (decided at train time, and logged).
    channels: Literal[1, 3, "auto"] = "auto"
    batch_size: int = Field(128, ge=1, le=1 << 16)
    max_epochs: int = Field(12, ge=1, le=10_000)
    lr: float = Field(0.004, gt=0, le=10)
    weight_decay: float = Field(1e-4, ge=0, le=10)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    scheduler: Literal["cosine", "none"] = "cosine"
    early_stopping_patience: int = Field(3, ge=1, le=10_000)
    precision: Literal["auto", "32-true", "16-mixed", "bf16-mixed"] = "auto"
    accelerator: Literal["auto", "cpu", "gpu"] = "auto"
    devices: Annotated[int, Field(ge=1, le=4096)] | Literal["auto"] = "auto"
    # Lightning multi-node training (each node runs `devices` processes); strategy e.g. ddp, fsdp, deepspeed.
    num_nodes: int = Field(1, ge=1, le=4096)
    strategy: str = "auto"
    num_workers: int = Field(1, ge=0, le=512)
    # torch.compile the network for training. auto: on a CUDA GPU that Triton supports (compute capability 7.0
    # or newer), where it pays (resnet50: ~1.46x); off on CPU, where compiling costs more than short runs gain.
    compile: Literal["auto"] | bool = "auto"
    # Seconds between MLflow system-metric samples (CPU, RAM, and GPU utilisation and memory when nvidia-ml-py
    # can see a GPU) logged under system/ for every training run.
    system_metrics_interval_s: float = Field(10, ge=0.1, le=3600)
    augment: AugmentParams = AugmentParams()


Corruption = Literal["brightness", "contrast", "blur", "noise", "jpeg", "pixelate"]


class EvaluateParams(_Section):
    severities: list[int] = [1, 3, 5]
    corruptions: list[Corruption] = ["brightness", "contrast", "blur", "noise", "jpeg", "pixelate"]
    # Test images the corruption suite runs on (a fixed subset; the clean metrics use the whole test split).
    robustness_images: int = Field(1000, ge=10, le=10**7)
    report_dir: Path = Path("reports/evaluation")

    @field_validator("severities")
    @classmethod
    def _severity_range(cls, v: list[int]) -> list[int]:
        if not v or any(s < 1 or s > 5 for s in v):
            raise ValueError("severities must be a non-empty list of integers from 1 to 5")
        return v


class ExportParams(_Section):
    parity_tolerance: float = Field(1e-4, gt=0, le=100)
    parity_images: int = Field(500, ge=1, le=10**7)
    # A reduced-precision variant of the classifier (registry.quantize), registered as <model_name>-<precision>
    # and promoted only through its gates against the fp32 parent; none: no variant (classification only).
    quantize: Literal["none", "int8", "fp16"] = "none"
    # The accuracy the variant may lose: the bootstrap lower bound of accuracy(variant) - accuracy(fp32) on the
    # clean and corrupted test images must be at least -quantize_max_drop.
    quantize_max_drop: float = Field(0.01, ge=0, le=1)
    # Training images int8 calibration reads (activation ranges); fp16 needs none.
    calibration_images: int = Field(256, ge=1, le=100_000)


class RegistryParams(_Section):
    model_name: str = "visionflow-classifier"
    tracking_uri: str | None = None
    # Artifact root for experiments visionflow creates (e.g. s3://bucket/path). null: the local store's
    # mlruns/artifacts, or on a tracking server its own default (proxied artifacts: clients need no S3 keys).
    artifact_location: str | None = None
    accuracy_floor: float = Field(0.85, ge=0, le=1)
    min_gain: float = Field(0.0, ge=-1, le=1)
    max_class_drop: float = Field(0.05, ge=0, le=1)
    latency_budget_ms: float = Field(50, gt=0, le=3_600_000)
    # Paired bootstrap over the same test + corruption images: the gain's lower bound must clear min_gain.
    bootstrap_samples: int = Field(2000, ge=100, le=10**7)
    bootstrap_alpha: float = Field(0.05, gt=0, lt=0.5)


# evidently stattest names (evidently.legacy.calculations.stattests); ed = energy distance.
NumericDriftMethod = Literal[
    "wasserstein",
    "ks",
    "psi",
    "kl_div",
    "jensenshannon",
    "hellinger",
    "ed",
    "empirical_mmd",
    "anderson",
    "cramer_von_mises",
    "mannw",
    "t_test",
]
CategoricalDriftMethod = Literal["jensenshannon", "chisquare", "psi", "kl_div", "hellinger", "z", "g_test"]
Shift = Literal["none", "darker", "brighter", "blur", "jpeg", "noise", "color_cast", "resolution"]


class DriftParams(_Section):
    # Verdict: drifted when at least this share of the compared columns drifted.
    drift_share: float = Field(0.3, gt=0, le=1)
    numeric_method: NumericDriftMethod = "wasserstein"
    numeric_threshold: float = Field(0.1, gt=0, le=10**6)
    categorical_method: CategoricalDriftMethod = "jensenshannon"
    categorical_threshold: float = Field(0.1, gt=0, le=10**6)
    embedding_components: int = Field(8, ge=1, le=64)
    reference_size: int = Field(5000, ge=50, le=10**8)
    batch_size: int = Field(500, ge=1, le=10**8)
    min_batch_size: int = Field(30, ge=5, le=10**8)
    default_shift: Shift = "noise"
    default_severity: int = Field(5, ge=1, le=5)
    schedule_cron: str = "0 * * * *"
    retrain_cron: str = "0 2 * * *"
    cooldown_hours: float = Field(6, ge=0, le=24 * 366)
    # Retraining warm-starts from the champion's weights for this many epochs (null: train.max_epochs from scratch).
    warm_start_epochs: int | None = Field(4, ge=1, le=10_000)
    warm_start_lr: float = Field(0.002, gt=0, le=10)
    batches_dir: Path = Path("data/batches")
    # Drift attribution: test-split images each simulated shift is applied to (once per champion, cached), and
    # the signature distance past which a drifted batch is "no close match" rather than its nearest shift.
    attribution_images: int = Field(500, ge=10, le=100_000)
    attribution_max_distance: float = Field(0.8, gt=0, le=10**6)


class ServeParams(_Section):
    host: str = "127.0.0.1"  # loopback unless configured
    port: int = Field(8000, ge=1, le=65535)
    review_threshold: float = Field(0.6, ge=0, le=1)
    max_upload_mb: float = Field(10, gt=0, le=4096)
    max_pixels: int = Field(40_000_000, ge=1, le=10**9)
    # Pixels one request may decode, all its images together (a JPEG counts at the reduced scale it is decoded
    # at): the bound on how long one request holds the single inference thread (~0.5 s per 40 MP of PNG).
    max_request_pixels: int = Field(50_000_000, ge=1, le=1_000_000_000)
    max_batch: int = Field(64, ge=1, le=1 << 16)
    max_form_fields: int = Field(16, ge=1, le=1 << 16)
    request_timeout_s: float = Field(10, gt=0, le=3600)
    # A connection must send a request's headers within header_timeout_s (from its start or the previous
    # response) and its body within body_timeout_s, or it is closed: idle and trickling (slowloris) clients
    # would otherwise hold their connections for ever.
    header_timeout_s: float = Field(10, gt=0, le=300)
    body_timeout_s: float = Field(60, gt=0, le=3600)
    # Requests inferred together (one batch), and how many more may wait before the server answers 503. The wait
    # is queue_depth / throughput: 64 is ~35 ms at the 28 px default's ~1,900 req/s on 2 cores; 16 (~8 ms) shed
    # requests during ordinary GC and scheduling pauses at 70% load. Lower it for slow models.
    max_concurrency: int = Field(4, ge=1, le=1 << 16)
    queue_depth: int = Field(64, ge=0, le=1 << 20)
    # Inference processes the event loop feeds (visionflow.serving.workers): null is one per core this process may
    # run on (its CPU affinity), and none on a single core; 0 runs inference in a thread of the server process
    # (one GIL for the event loop and inference: on one core the cheaper choice, on more it leaves cores idle).
    workers: int | None = Field(None, ge=0, le=256)
    # Where the model runs: cpu, or cuda (ONNX Runtime's CUDA provider, from onnxruntime-gpu; refused at start
    # where it is missing). On a GPU one or two processes suffice and larger batches pay: raise max_concurrency.
    device: Literal["cpu", "cuda"] = "cpu"
    # The precision served: fp32, or the quantized variant export.quantize registers (<model>-int8 / -fp16), whose
    # champion its own gates against the fp32 parent set.
    precision: Literal["fp32", "int8", "fp16"] = "fp32"
    reload_interval_s: float = Field(10, gt=0, le=86_400)
    # uvicorn's per-request access log line; off, since every prediction is in the prediction log and the
    # request counts and latencies are on /metrics (the line cost about a tenth of the event loop's time).
    access_log: bool = False
    # Name of an environment variable holding a bearer token; null leaves the API open. Set but unset or empty
    # in the environment, the server refuses to start.
    auth_token_env: str | None = None
    review_dir: Path = Path("data/review")
    reviewed_dir: Path = Path("data/reviewed")
    prediction_log: Path = Path("data/predictions/predictions.jsonl")
    # Shadow and canary (visionflow.serving.canary; classification only: a detection server leaves them off and
    # says so in its log). With shadow on, the registry's challenger also runs on shadow_fraction of requests, off
    # the response path, and each disagreement with the champion goes to the review queue.
    shadow: bool = False
    shadow_fraction: float = Field(0.1, gt=0, le=1)
    # New review-queue items the shadow's disagreements may add per second (over the whole server, a token bucket
    # holding ten seconds' worth); the rest are counted (visionflow_shadow_unqueued_total) but not stored. Each
    # costs a PNG, a file and an SQLite commit (~5 ms of the server's CPU), and a person labels review.budget a
    # day: a challenger that disagrees on every image would otherwise spend a third of a busy core on writes
    # nobody reads, and fill the disk. Agreement on /metrics counts every shadowed image either way.
    shadow_review_per_s: float = Field(2.0, gt=0, le=100_000)
    # Share of requests the challenger answers instead of the champion (0: off; below 1, so that the champion
    # keeps traffic to compare with). It is rolled back when, on at least canary_min_reviewed reviewed images per
    # side, the (1 - registry.bootstrap_alpha) upper bound of its accuracy minus the champion's is below 0.
    canary_fraction: float = Field(0, ge=0, lt=1)
    canary_min_reviewed: int = Field(50, ge=1, le=10**7)


class ReviewParams(_Section):
    """What a person is asked to label (visionflow.monitoring.selection) and how reviewed labels are audited."""

    # Images the review queue offers per window, the most useful first; 0 turns labelling requests off.
    budget: int = Field(200, ge=0, le=10**7)
    window_hours: float = Field(24, gt=0, le=24 * 366)
    strategy: Literal["uncertainty-diversity", "uncertainty", "random"] = "uncertainty-diversity"
    # A reviewed batch with a larger share of suspected label errors is held back from the next data version.
    max_suspect_share: float = Field(0.2, ge=0, le=1)
    audit_dir: Path = Path("reports/label_audit")


class DetectionParams(_Section):
    """Everything detection does differently; read only when base.task is detection (visionflow.tasks.detection)."""

    # "fashion-mnist-scenes" (bundled: Fashion-MNIST items on textured canvases, exact boxes), a COCO JSON file
    # (images resolved beside it or in its images/ folder), or a YOLO folder (images/, labels/, classes.txt or
    # data.yaml).
    source: str = "fashion-mnist-scenes"
    scenes: int = Field(1600, ge=10, le=10**7)
    scene_size: int = Field(128, ge=32, le=4096)
    max_objects: int = Field(4, ge=1, le=100)
    # The detector's input: images are resized inside the model (and the ONNX graph) to this shorter side.
    image_size: int = Field(128, ge=32, le=2048)
    model: Literal["fcos_mobilenetv2"] = "fcos_mobilenetv2"
    # The registered model (its own champion and aliases, apart from the classifier's).
    model_name: str = "visionflow-detector"
    pretrained_weights: str | None = "mobilenetv2_100.imagenet"
    batch_size: int = Field(16, ge=1, le=1 << 14)
    max_epochs: int = Field(8, ge=1, le=10_000)
    lr: float = Field(0.001, gt=0, le=10)
    # Boxes at or above this score are the model's answer (served, counted, compared in the parity gate).
    score_threshold: float = Field(0.3, gt=0, lt=1)
    # An image with a served box scoring below this goes to the review queue.
    review_threshold: float = Field(0.5, gt=0, le=1)
    # Annotation checks: a box narrower or lower than this many pixels is degenerate; two boxes of one class
    # overlapping at this IoU or more are duplicates.
    min_box_px: float = Field(2.0, ge=0, le=4096)
    duplicate_iou: float = Field(0.95, gt=0, le=1)
    # Promotion: the floor on test mAP@0.5, and the largest per-class AP@0.5 drop against the champion.
    map_floor: float = Field(0.5, ge=0, le=1)
    max_class_ap_drop: float = Field(0.05, ge=0, le=1)
    # ONNX Runtime batch-1 p50 on CPU (a detector at 128 px: ~10 ms on an idle core, several times that on a
    # machine also training).
    latency_budget_ms: float = Field(250, gt=0, le=3_600_000)
    # Matched boxes (ONNX vs PyTorch) must overlap at least this much.
    parity_iou: float = Field(0.99, gt=0, le=1)
    robustness_images: int = Field(200, ge=10, le=10**7)


class Params(_Section):
    base: BaseParams = BaseParams()
    data: DataParams = DataParams()
    # `validate` in params.yaml; the attribute cannot be named so (BaseModel.validate is a pydantic method)
    validation: ValidateParams = Field(ValidateParams(), alias="validate")
    train: TrainParams = TrainParams()
    evaluate: EvaluateParams = EvaluateParams()
    export: ExportParams = ExportParams()
    registry: RegistryParams = RegistryParams()
    drift: DriftParams = DriftParams()
    serve: ServeParams = ServeParams()
    review: ReviewParams = ReviewParams()
    detection: DetectionParams = DetectionParams()

    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="after")
    def _quantize_task(self) -> Params:
        if self.base.task == "detection" and self.export.quantize != "none":
            raise ValueError("export.quantize is for the classifier only; set it to none with base.task=detection")
        if self.base.task == "detection" and self.serve.precision != "fp32":
            raise ValueError("serve.precision is for the classifier only; set it to fp32 with base.task=detection")
        return self

    @property
    def model_name(self) -> str:
        """The registered model this task's stages, server and monitors work on (each task has its own)."""
        return self.detection.model_name if self.base.task == "detection" else self.registry.model_name

    @property
    def served_model_name(self) -> str:
        """The registered model the server follows: model_name, or its serve.precision variant (a classifier's)."""
        if self.serve.precision == "fp32":
            return self.model_name
        return f"{self.model_name}-{self.serve.precision}"  # (registry.quantize.variant_name's rule)

    @property
    def architecture(self) -> str:
        """The network this task trains (train.model, or detection.model)."""
        return self.detection.model if self.base.task == "detection" else self.train.model

    def as_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)

    def digest(self) -> str:
        """Short stable hash of the resolved params, tagged on every run so equal configs are findable."""
        blob = json.dumps(self.as_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


def _describe(err: dict[str, Any], raw: dict[str, Any]) -> str:
    loc = ".".join(str(p) for p in err["loc"])  # pydantic names a section by its params.yaml key (the alias)
    kind = err["type"]
    if kind == "extra_forbidden":
        section = err["loc"][0] if len(err["loc"]) > 1 else None
        sections = {f.alias or n: f for n, f in Params.model_fields.items()}
        model = Params if section is None else sections[str(section)].annotation
        allowed = sorted((f.alias or n) for n, f in getattr(model, "model_fields", {}).items())
        return f"{loc}: unknown key; allowed keys here: {', '.join(allowed)}"
    ctx = err.get("ctx") or {}
    got = repr(err.get("input"))
    got = got if len(got) <= 60 else got[:57] + "..."
    if kind == "value_error" and not loc:  # a rule across sections (Params' own validators): its message says it all
        return str(err["msg"]).removeprefix("Value error, ")
    if kind == "literal_error" and "expected" in ctx:
        return f"{loc}: got {got}; allowed: {ctx['expected']}"
    if kind in ("int_type", "float_type") and isinstance(err.get("input"), str):
        # YAML reads 1e3 (no dot) and quoted numbers as text
        return f"{loc}: {err['msg']} (got the text {got}; write a plain number such as 1000 or 1.0e3)"
    return f"{loc}: {err['msg']} (got {got})"


def parse_params(raw: Any, source: str = "params.yaml") -> Params:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        # one line (every problem found, each naming its key), as the CLI prints errors
        problems = sorted({_describe(e, raw) for e in exc.errors()})
        raise ConfigError(f"{source} is invalid: " + "; ".join(problems)) from None


class _NoAliasLoader(yaml.SafeLoader):
    """yaml.safe_load without aliases. Params never need them, and a few hundred bytes of nested aliases (a
    "billion laughs") expand to gigabytes before any validation could look at them."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, f"YAML aliases (*{event.anchor}) are not allowed in params", event.start_mark
            )
        return super().compose_node(parent, index)


# YAML 1.1 reads 1e-05 or 1e3 (no dot) as text; read them as numbers, as YAML 1.2 and Python's str(float) do.
_NoAliasLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_NoAliasLoader)  # a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{source}: not valid YAML{where}: {problem}".replace("\n", " ")) from None
    except RecursionError:
        raise ConfigError(f"{source}: YAML nested too deeply") from None


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` overrides (values parsed as YAML) to a raw params mapping."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        dotted, value = item.split("=", 1)
        node = raw
        parts = dotted.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p} is not a section")
        node[parts[-1]] = _parse_yaml(value, f"--set {dotted.strip()}")
    return raw


def _read_params_file(path: Path) -> str:
    try:
        size = path.stat().st_size
        if size > MAX_PARAMS_BYTES:
            raise ConfigError(f"{path}: too large for a params file ({size:,} bytes, at most {MAX_PARAMS_BYTES:,})")
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the params file ({exc.strerror or exc})") from None


def load_params(path: Path | str = DEFAULT_PARAMS, overrides: list[str] | None = None) -> Params:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found (run from the project root, or pass --params PATH)")
    raw = _parse_yaml(_read_params_file(path), str(path))
    if overrides and isinstance(raw, dict | None):
        raw = apply_overrides(raw or {}, overrides)
    return parse_params(raw, str(path))
