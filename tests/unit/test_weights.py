import pytest
import timm
import torch

from visionflow.errors import ConfigError
from visionflow.training.weights import BUNDLED, load_pretrained, read_state_dict, resolve


@pytest.mark.parametrize("spec", sorted(BUNDLED))
def test_bundled_weights_load_completely(spec):
    arch = BUNDLED[spec][2]
    model = timm.create_model(arch, num_classes=1000)
    counts = load_pretrained(model, spec)
    assert counts["loaded"] == counts["total"]
    src = [v for k, v in read_state_dict(resolve(spec)).items() if not k.endswith("num_batches_tracked")]
    dst = [v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")]
    assert all(torch.equal(a, b) for a, b in zip(src, dst))


def test_grayscale_stem_and_new_classifier():
    model = timm.create_model("mobilenetv2_100", num_classes=7, in_chans=1)
    counts = load_pretrained(model, "mobilenetv2_100.imagenet")
    assert counts["total"] - counts["loaded"] == 2  # classifier weight and bias keep their fresh init
    src = read_state_dict(resolve("mobilenetv2_100.imagenet"))
    rgb_stem = next(v for v in src.values() if v.ndim == 4)
    assert torch.allclose(model.conv_stem.weight, rgb_stem.sum(dim=1, keepdim=True))


def test_state_dict_file_round_trip(tmp_path):
    a = timm.create_model("test_resnet", num_classes=4, in_chans=1)
    torch.save({"state_dict": {f"net.backbone.{k}": v for k, v in a.state_dict().items()}}, tmp_path / "w.ckpt")
    b = timm.create_model("test_resnet", num_classes=4, in_chans=1)
    load_pretrained(b, str(tmp_path / "w.ckpt"))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_wrong_architecture_and_missing_file_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="different architecture"):
        load_pretrained(timm.create_model("test_resnet", num_classes=4), "efficientnet_lite0.imagenet")
    with pytest.raises(ConfigError, match="neither a file"):
        load_pretrained(timm.create_model("test_resnet"), str(tmp_path / "missing.pth"))
