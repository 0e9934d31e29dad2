"""Encoder stages (spec baselines §2 gap F): composing the stages is the encoder's forward, bit for
bit; StagedMultimodalModel keeps the MultimodalModel contract; clear errors without stages."""
import copy

import pytest
import torch
from torch import nn

from mmbalance.errors import ModelSetupError
from mmbalance.models.encoders import (
    FrameEncoder,
    GRUEncoder,
    MLPEncoder,
    SmallCNN,
    TextEncoder,
    TransformerEncoder,
)
from mmbalance.models.multimodal import MultimodalModel
from mmbalance.models.resnet import ResNet18Encoder
from mmbalance.models.stages import (
    StagedMultimodalModel,
    encoder_stages,
    run_stages,
    stage_channel_dim,
    stage_channels,
)

torch.manual_seed(0)
CASES = {
    "resnet18": (lambda: ResNet18Encoder(3, small_input=True), (3, 3, 16, 16)),
    "resnet18_big_stem": (lambda: ResNet18Encoder(1), (2, 1, 40, 40)),
    "cnn": (lambda: SmallCNN(2, 8), (3, 2, 9, 11)),
    "mlp": (lambda: MLPEncoder(5, 7, 4, dropout=0.3), (4, 5)),
    "transformer": (lambda: TransformerEncoder(3, 6, 8, 4, dropout=0.1), (2, 6, 3)),
    "gru": (lambda: GRUEncoder(3, 8, 4), (2, 6, 3)),
    "text": (lambda: TextEncoder(11, 7, 8, 4), None),
    "frames_cnn": (lambda: FrameEncoder(SmallCNN(3, 8)), (2, 3, 3, 8, 8)),
    "frames_resnet": (lambda: FrameEncoder(ResNet18Encoder(3, small_input=True)), (2, 2, 3, 8, 8)),
}


def _input(name, shape):
    g = torch.Generator().manual_seed(1)
    if name == "text":
        return torch.randint(0, 11, (3, 7), generator=g)
    return torch.randn(*shape, generator=g)


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("train", [False, True])
def test_composed_stages_equal_forward_bit_for_bit(name, train):
    make, shape = CASES[name]
    enc = make()
    enc.train(train)
    twin = copy.deepcopy(enc)  # train mode updates BN statistics: run each path on its own copy
    x = _input(name, shape)
    torch.manual_seed(5)
    ref = enc(x)
    torch.manual_seed(5)
    got = run_stages(encoder_stages(twin, name), x)
    assert got.shape == ref.shape
    assert torch.equal(got, ref)
    # the BN running statistics moved identically (same modules, same order)
    for (n, a), b in zip(enc.state_dict().items(), twin.state_dict().values()):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("name", sorted(CASES))
def test_stage_channels_match_the_stage_outputs(name):
    make, shape = CASES[name]
    enc = make().eval()
    x = _input(name, shape)
    chans = stage_channels(enc, name)
    assert chans
    cd = stage_channel_dim(enc)
    with torch.no_grad():
        for stage_name, stage in encoder_stages(enc, name):
            x = stage(x)
            if stage_name in chans:
                assert x.shape[cd] == chans[stage_name], (stage_name, list(x.shape))


def test_named_splits():
    assert [n for n, _ in ResNet18Encoder(3).stages()] == ["stem", "layer1", "layer2", "layer3", "layer4", "pool"]
    assert list(ResNet18Encoder(3).stage_channels()) == ["layer1", "layer2", "layer3", "layer4"]
    assert [n for n, _ in SmallCNN(3, 8).stages()] == ["block1", "block2", "block3", "pool"]
    assert [n for n, _ in MLPEncoder(3, 4, 5).stages()] == ["hidden", "out"]
    assert [n for n, _ in GRUEncoder(3, 4, 5).stages()] == ["encode"]
    assert [n for n, _ in FrameEncoder(SmallCNN(3, 8)).stages()][-1] == "frame_mean"
    assert stage_channel_dim(FrameEncoder(SmallCNN(3, 8))) == 2
    # the stages hold the encoder's own modules, not copies
    enc = ResNet18Encoder(3)
    assert dict(enc.stages())["layer3"] is enc.trunk.layer3


class _NoStages(nn.Module):
    out_dim = 2

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        return self.lin(x)


def test_encoder_without_stages_is_a_clear_error():
    with pytest.raises(ModelSetupError, match=r"modality 'a' \(_NoStages\) does not expose them.*stages\(\)"):
        encoder_stages(_NoStages(), "a")


def _two_mlp_model():
    torch.manual_seed(0)
    return MultimodalModel.from_encoders({"a": MLPEncoder(3, 4, 5), "b": MLPEncoder(2, 4, 6)}, 3, "late", heads=True)


class _Swap(nn.Module):
    """A toy cross-modal block: adds the mean of the other modality to each (to see the flow)."""

    def forward(self, xs):
        a, b = xs["a"], xs["b"]
        return {"a": a + b.mean(1, keepdim=True), "b": b + a.mean(1, keepdim=True)}


def test_staged_model_keeps_the_multimodal_contract():
    base = _two_mlp_model()
    keys = set(base.state_dict())
    x = {"a": torch.randn(4, 3), "b": torch.randn(4, 2)}
    ident = StagedMultimodalModel(copy.deepcopy(base), [{"a": "hidden", "b": "hidden"}], [nn.Identity()])
    assert torch.equal(ident(x).logits, base(x).logits)  # identity block: the plain model
    staged = StagedMultimodalModel(base, [{"a": "hidden", "b": "out"}], [_Swap()])
    assert set(staged.state_dict()) == keys  # the toy block has no state: same checkpoint keys
    out = staged(x)
    assert set(out.features) == {"a", "b"} and set(out.unimodal_logits) == {"a", "b"}
    assert set(staged.zero_out_logits(out.features)) == {"a", "b"}
    # cross-modal flow: b's input changes a's feature
    x2 = dict(x, b=x["b"] + 1)
    assert not torch.equal(staged.encode(x2, ["a"])["a"], staged.encode(x, ["a"])["a"])
    with pytest.raises(KeyError, match="every modality's input"):
        staged.encode({"a": x["a"]}, ["a"])
    assert staged.subset_logits(x, [{"a"}], level="input")[frozenset({"a"})].shape == (4, 3)


def test_staged_model_checks_its_points():
    with pytest.raises(ModelSetupError, match="no stage 'layer2'"):
        StagedMultimodalModel(_two_mlp_model(), [{"a": "layer2", "b": "out"}], [nn.Identity()])
    with pytest.raises(ModelSetupError, match="stage order"):
        StagedMultimodalModel(_two_mlp_model(), [{"a": "out", "b": "out"}, {"a": "hidden", "b": "out"}],
                              [nn.Identity(), nn.Identity()])
    plain = MultimodalModel.from_encoders({"a": _NoStages(), "b": MLPEncoder(2, 4, 2)}, 3, "late")
    with pytest.raises(ModelSetupError, match="does not expose them"):
        StagedMultimodalModel(plain, [{"a": "x", "b": "out"}], [nn.Identity()])
