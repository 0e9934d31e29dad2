import pytest
import torch

from mmbalance.models.fusion import FUSIONS, build_fusion, zero_out


def feats(dims, b=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {m: torch.randn(b, d, generator=g) for m, d in dims.items()}


@pytest.mark.parametrize("m", [2, 3])
@pytest.mark.parametrize("name", ["concat", "sum"])
def test_additive_fusions_modality_logits_sum_to_fused(name, m):
    dims = {f"m{i}": 3 + i for i in range(m)}
    torch.manual_seed(0)
    f = build_fusion(name, dims, 4)
    torch.nn.init.normal_(f.fc.bias if name == "concat" else f.branches["m0"].bias)
    x = feats(dims)
    parts = f.modality_logits(x)
    assert torch.allclose(sum(parts.values()), f(x), atol=1e-6)


def test_late_fusion_is_mean_of_branches():
    dims = {"a": 3, "b": 2, "c": 4}
    f = build_fusion("late", dims, 4)
    x = feats(dims)
    parts = f.modality_logits(x)
    assert torch.allclose(torch.stack(list(parts.values())).mean(0), f(x), atol=1e-6)


def test_concat_wsplit_equals_zeroing_minus_shared_bias():
    """W-split logits z_m W_m^T + b/M equal the fused logits with the other features zeroed,
    less the (M-1)/M part of the bias."""
    dims = {"a": 3, "v": 2}
    torch.manual_seed(1)
    f = build_fusion("concat", dims, 4)
    torch.nn.init.normal_(f.fc.bias)
    x = feats(dims)
    split = f.modality_logits(x)
    for m in dims:
        zeroed = f(zero_out(x, m))
        assert torch.allclose(split[m], zeroed - f.fc.bias / 2, atol=1e-6)


def test_concat_wsplit_hand_values():
    f = build_fusion("concat", {"a": 1, "v": 1}, 2)
    with torch.no_grad():
        f.fc.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, -1.0]]))
        f.fc.bias.copy_(torch.tensor([0.5, -1.0]))
    x = {"a": torch.tensor([[2.0]]), "v": torch.tensor([[1.0]])}
    split = f.modality_logits(x)
    assert torch.allclose(split["a"], torch.tensor([[2.25, 5.5]]))  # [1*2+0.25, 3*2-0.5]
    assert torch.allclose(split["v"], torch.tensor([[2.25, -1.5]]))  # [2*1+0.25, -1*1-0.5]


@pytest.mark.parametrize("name", ["film", "gated"])
def test_nonadditive_fusions_use_zero_out(name):
    dims = {"a": 3, "v": 3, "t": 2}
    f = build_fusion(name, dims, 4)
    x = feats(dims)
    parts = f.modality_logits(x)
    for m in dims:
        assert torch.allclose(parts[m], f(zero_out(x, m)))
    assert f(x).shape == (5, 4)


@pytest.mark.parametrize("name", FUSIONS.names())
def test_fuse_accepts_permuted_features_and_gradients_flow(name):
    dims = {"a": 3, "v": 4}
    f = build_fusion(name, dims, 3)
    x = {m: z.requires_grad_() for m, z in feats(dims).items()}
    perm = torch.tensor([4, 3, 2, 1, 0])
    out = f({m: z[perm] for m, z in x.items()})
    out.sum().backward()
    assert all(z.grad is not None for z in x.values())
    with torch.no_grad():
        assert torch.allclose(out, f(x)[perm], atol=1e-6)
