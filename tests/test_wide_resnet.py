"""The WRN-28-2 of AdaMatch: size, norm sites, placements, shapes, contexts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import contextnorm as cn
from contextnorm.models.wide_resnet import WideResNet


def group_norm(num_features: int) -> nn.Module:
    return nn.GroupNorm(1, num_features)


def tiny(**kwargs) -> WideResNet:
    return WideResNet(depth=10, widen_factor=1, **kwargs)


def test_the_default_is_wrn28_2_with_the_published_size_and_norm_sites() -> None:
    model = WideResNet(num_classes=10)
    # 1,467,610 is the WRN-28-2 of AdaMatch/FixMatch with BatchNorm and 10 classes.
    assert sum(p.numel() for p in model.parameters()) == 1_467_610
    assert model.num_norm_sites == 4 * 3 * 2 + 1
    assert [m.num_features for m in model.norm_sites()][:3] == [16, 32, 32]
    assert model.norm_sites()[-1].num_features == 128


def test_depth_and_width_shape_the_groups() -> None:
    model = WideResNet(depth=16, widen_factor=3, num_classes=7)
    assert model.num_norm_sites == 2 * 3 * 2 + 1
    assert model.classifier.in_features == 64 * 3
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 7)


@pytest.mark.parametrize("depth", [8, 12, 27])
def test_depth_must_be_6n_plus_4(depth: int) -> None:
    with pytest.raises(ValueError, match="6 n \\+ 4"):
        WideResNet(depth=depth)


def test_all_placement_replaces_every_norm_site() -> None:
    model = tiny(norm_layer=group_norm, placement="all")
    assert isinstance(model.input_norm, nn.Identity)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert all(isinstance(m, nn.GroupNorm) for m in model.norm_sites())
    assert model(torch.randn(3, 3, 8, 8)).shape == (3, 10)


def test_input_placement_adds_one_norm_on_the_image_and_keeps_batchnorm() -> None:
    model = tiny(norm_layer=group_norm, placement="input")
    assert isinstance(model.input_norm, nn.GroupNorm) and model.input_norm.num_channels == 3
    assert all(isinstance(m, nn.BatchNorm2d) for m in model.norm_sites())
    assert model(torch.randn(3, 3, 8, 8)).shape == (3, 10)


def test_index_placement_and_its_range_check() -> None:
    model = tiny(norm_layer=group_norm, placement="index:0,6")
    kinds = [type(m) for m in model.norm_sites()]
    assert kinds[0] is nn.GroupNorm and kinds[6] is nn.GroupNorm
    assert kinds.count(nn.GroupNorm) == 2
    with pytest.raises(ValueError, match="out of range: WideResNet has 7 norm sites"):
        tiny(norm_layer=group_norm, placement="index:7")


def test_patch_placement_is_refused() -> None:
    with pytest.raises(ValueError, match="does not support placement mode 'patch'"):
        tiny(norm_layer=group_norm, placement="patch")


@pytest.mark.parametrize("placement", ["all", "input"])
def test_each_domain_is_normalised_with_its_own_statistics(placement: str) -> None:
    torch.manual_seed(0)
    images = torch.randn(8, 3, 8, 8)
    domains = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    rescaled = images.clone()
    rescaled[4:] *= 3.0  # a brighter-contrast target domain

    def logits(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        with cn.use_context(domains):
            return model(batch)

    # The first tested norm sees the target activations scaled by 3 (convs without bias are
    # linear, zero padding included); per-domain statistics undo that, so no logit moves.
    # (widen_factor 2: the first block widens, so its shortcut too starts from the normalised
    # input; with equal widths it would carry the raw stem output past the norm.)
    model = WideResNet(
        depth=10,
        widen_factor=2,
        norm_layer=lambda c: cn.ContextNorm(c, num_contexts=2),
        placement=placement,
    )
    torch.testing.assert_close(logits(model, rescaled), logits(model, images), atol=1e-3, rtol=1e-3)
    # BatchNorm pools both domains: rescaling the target moves the source logits too.
    model = WideResNet(depth=10, widen_factor=2, norm_layer=nn.BatchNorm2d, placement=placement)
    assert not torch.allclose(logits(model, rescaled)[:4], logits(model, images)[:4], atol=1e-2)


def test_gradient_reaches_every_parameter() -> None:
    model = tiny(num_classes=4)
    model(torch.randn(4, 3, 8, 8)).square().sum().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert missing == []
