import pytest
import torch

from mmbalance.config import ModelConfig
from mmbalance.errors import ConfigError
from mmbalance.models import build_model
from mmbalance.models.encoders import (FrameEncoder, GRUEncoder, MLPEncoder, SmallCNN, TCNEncoder, TransformerEncoder,
                                       build_encoder)
from mmbalance.models.resnet import ResNet18Encoder, ResNet18Trunk


@pytest.mark.parametrize("shape,kind,cls", [
    ((7,), "auto", MLPEncoder), ((5, 7), "auto", TCNEncoder), ((5, 17), "auto", TransformerEncoder),
    ((5, 7), "transformer", TransformerEncoder), ((5, 7), "gru", GRUEncoder), ((5, 40), "tcn", TCNEncoder),
    ((1, 16, 16), "auto", SmallCNN), ((2, 3, 16, 16), "auto", FrameEncoder),
])
def test_encoder_from_shape(shape, kind, cls):
    enc = build_encoder(shape, kind, feature_dim=12, hidden_dim=16)
    assert isinstance(enc, cls)
    assert enc(torch.randn(3, *shape)).shape == (3, 12)


def test_encoder_shape_errors():
    with pytest.raises(ConfigError, match=r"does not fit input shape \[7\]"):
        build_encoder((7,), "resnet18", modality="audio")
    with pytest.raises(ConfigError, match="not supported"):
        build_encoder((1, 2, 3, 4, 5), modality="x")
    with pytest.raises(ConfigError, match="Did you mean 'resnet18'"):
        build_encoder((3, 8, 8), "resnet17")
    with pytest.raises(ConfigError, match="1, 2 or 3 channels"):
        build_encoder((5, 32, 32), "resnet18")


@pytest.mark.parametrize("channels", [1, 2, 3])
def test_resnet18(channels):
    enc = ResNet18Encoder(channels)
    assert sum(p.numel() for p in enc.parameters()) == pytest.approx(11_170_000 + (channels - 3) * 64 * 49, rel=2e-3)
    enc.eval()
    assert enc(torch.randn(2, channels, 64, 64)).shape == (2, 512)
    assert ResNet18Encoder(channels, small_input=True)(torch.randn(2, channels, 28, 28)).shape == (2, 512)


def test_resnet_ogm_init():
    t = ResNet18Trunk(3)
    w = t.layer3[0].conv1.weight  # kaiming normal, fan_out: std = sqrt(2 / (out * k * k))
    assert float(w.detach().std()) == pytest.approx((2 / (256 * 9)) ** 0.5, rel=0.05)
    assert torch.all(t.bn1.weight == 1) and torch.all(t.bn1.bias == 0)


def test_frames_encoder_pools_over_time():
    enc = build_encoder((3, 1, 8, 8), "cnn", feature_dim=4)
    enc.eval()
    x = torch.randn(2, 3, 1, 8, 8)
    per_frame = torch.stack([enc.frame(x[:, t]) for t in range(3)], 1).mean(1)
    assert torch.allclose(enc(x), per_frame, atol=1e-6)


def test_model_forward_stores_nothing_and_refuses_unknown_encoder_keys():
    cfg = ModelConfig(feature_dim=6, hidden_dim=8, unimodal_heads=True)
    model = build_model(["a", "b"], {"a": (4,), "b": (2, 3)}, 3, cfg)
    before = set(vars(model))
    out = model({"a": torch.randn(5, 4), "b": torch.randn(5, 2, 3)})
    assert set(vars(model)) == before
    assert out.logits.shape == (5, 3) and set(out.unimodal_logits) == {"a", "b"}
    assert torch.allclose(model.fuse(out.features), out.logits)
    assert {id(p) for p in model.encoder_parameters("a")} == {id(p) for p in model.encoders["a"].parameters()}
