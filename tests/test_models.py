"""Tests of contextnorm.models: placements, norm sites, shapes, sizes and gradients."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from contextnorm.models import (
    MODELS,
    DenseNet,
    NormSiteModel,
    Placement,
    ShallowCNN,
    VisionTransformer,
    build_model,
    densenet40,
    densenet100,
)

# Tiny versions of every architecture (CPU-fast), keyed by a readable id.
TINY_CNNS: dict[str, Callable[..., NormSiteModel]] = {
    "shallow_cnn": lambda **kw: ShallowCNN(widths=(4, 8, 8, 16), **kw),
    "densenet": lambda **kw: DenseNet(depth=10, growth_rate=4, **kw),
    "densenet_bc": lambda **kw: DenseNet(
        depth=16, growth_rate=4, bottleneck=True, compression=0.5, **kw
    ),
}
TINY_VIT_SIZES: dict[str, Any] = dict(
    patch_size=4, embed_dim=16, depth=2, num_heads=2, head_hidden=(32,)
)
TINY_MODEL_NAMES = [*TINY_CNNS, "vit"]


def build_tiny(name: str, image_size: int = 8, **kwargs: Any) -> NormSiteModel:
    """The tiny model ``name``; the ViT is built for ``image_size``, the CNNs take any size."""
    if name == "vit":
        return VisionTransformer(image_size=image_size, **TINY_VIT_SIZES, **kwargs)
    return TINY_CNNS[name](**kwargs)


class RecordingNorm(nn.Module):
    """Identity norm that logs (tag, num_features, input shape) each time it is called."""

    def __init__(self, tag: str, num_features: int, log: list[tuple[str, int, torch.Size]]):
        super().__init__()
        self.tag, self.num_features, self.log = tag, num_features, log

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.log.append((self.tag, self.num_features, x.shape))
        return x


class Recorder:
    """A tested and a base norm factory sharing one forward log."""

    def __init__(self) -> None:
        self.forward_log: list[tuple[str, int, torch.Size]] = []
        self.built: dict[str, list[int]] = {"tested": [], "base": []}

    def factory(self, tag: str) -> Callable[[int], nn.Module]:
        def build(num_features: int) -> nn.Module:
            self.built[tag].append(num_features)
            return RecordingNorm(tag, num_features, self.forward_log)

        return build


def group_norm(num_features: int) -> nn.Module:
    return nn.GroupNorm(1, num_features)


# --- Placement -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("all", Placement("all")),
        ("input", Placement("input")),
        (" Patch ", Placement("patch")),
        ("index:2", Placement("index", (2,))),
        ("index:2,1", Placement("index", (1, 2))),
        (2, Placement("index", (2,))),
        ([1, 2], Placement("index", (1, 2))),
        ((2, 1, 2), Placement("index", (1, 2))),
        (Placement("input"), Placement("input")),
    ],
)
def test_placement_parse_accepts_every_documented_form(spec: Any, expected: Placement) -> None:
    placement = Placement.parse(spec)
    assert placement == expected
    assert Placement.parse(str(placement)) == placement


@pytest.mark.parametrize(
    "spec",
    [
        "everywhere",
        "index",
        "index:",
        "index:a",
        "index:-1",
        "all:1",
        -1,
        [],
        [1, "2"],
        True,
        None,
        1.5,
    ],
)
def test_placement_parse_rejects_bad_specs(spec: Any) -> None:
    with pytest.raises(ValueError, match="placement"):
        Placement.parse(spec)


def test_placement_rejects_inconsistent_fields() -> None:
    with pytest.raises(ValueError, match="at least one site index"):
        Placement("index")
    with pytest.raises(ValueError, match="only apply to mode 'index'"):
        Placement("all", (1,))
    with pytest.raises(ValueError, match="mode must be one of"):
        Placement("everywhere")  # type: ignore[arg-type]


# --- Where the factories are called ---------------------------------------------------------


def run_with_recorder(
    build: Callable[..., NormSiteModel], placement: Any, in_channels: int = 3, size: int = 8
) -> tuple[NormSiteModel, Recorder]:
    recorder = Recorder()
    model = build(
        num_classes=5,
        in_channels=in_channels,
        norm_layer=recorder.factory("tested"),
        base_norm_layer=recorder.factory("base"),
        placement=placement,
    )
    model(torch.randn(2, in_channels, size, size))
    return model, recorder


@pytest.mark.parametrize("name", TINY_CNNS)
def test_each_site_is_built_for_the_channels_it_receives(name: str) -> None:
    model, recorder = run_with_recorder(TINY_CNNS[name], "all")
    assert recorder.built["base"] == []
    assert len(recorder.forward_log) == model.num_norm_sites > 0
    for _, num_features, shape in recorder.forward_log:
        assert shape[1] == num_features
    # norm_sites() lists the modules in the order forward calls them.
    assert [module.num_features for module in model.norm_sites()] == [
        num_features for _, num_features, _ in recorder.forward_log
    ]


def test_shallow_cnn_sites_follow_the_widths() -> None:
    _, recorder = run_with_recorder(TINY_CNNS["shallow_cnn"], "all")
    assert recorder.built["tested"] == [4, 8, 8, 16]


@pytest.mark.parametrize("name", TINY_CNNS)
@pytest.mark.parametrize("indices", [(0,), (1, 2), (2,)])
def test_index_placement_puts_the_tested_norm_only_at_those_sites(
    name: str, indices: tuple[int, ...]
) -> None:
    model, recorder = run_with_recorder(TINY_CNNS[name], list(indices))
    tags = [tag for tag, _, _ in recorder.forward_log]
    assert len(tags) == model.num_norm_sites
    assert [i for i, tag in enumerate(tags) if tag == "tested"] == list(indices)


@pytest.mark.parametrize("name", TINY_CNNS)
def test_input_placement_adds_one_tested_norm_before_base_sites(name: str) -> None:
    model, recorder = run_with_recorder(TINY_CNNS[name], "input", in_channels=1)
    assert recorder.built["tested"] == [1]
    first_tag, _, first_shape = recorder.forward_log[0]
    assert (first_tag, first_shape) == ("tested", torch.Size([2, 1, 8, 8]))
    assert [tag for tag, _, _ in recorder.forward_log[1:]] == ["base"] * model.num_norm_sites


@pytest.mark.parametrize(("placement", "image_size"), [("input", 8), ("patch", 8), ("patch", 32)])
def test_vit_extra_norm_position_and_layout(placement: str, image_size: int) -> None:
    recorder = Recorder()
    model = build_tiny(
        "vit", image_size, num_classes=5, norm_layer=recorder.factory("tested"), placement=placement
    )
    model(torch.randn(2, 3, image_size, image_size))
    num_patches = (image_size // 4) ** 2
    expected = {
        "input": (3, torch.Size([2, 3, image_size, image_size])),
        # Tokens reach the factory's module channel-first: (N, embed_dim, num_patches).
        "patch": (16, torch.Size([2, 16, num_patches])),
    }[placement]
    assert [(num, shape) for _, num, shape in recorder.forward_log] == [expected]
    assert model.num_norm_sites == 0


def test_baseline_models_use_only_the_base_norm() -> None:
    cnn = ShallowCNN(10, widths=(4, 8), norm_layer=None, placement="input")
    assert isinstance(cnn.input_norm, nn.Identity)
    assert all(isinstance(site, nn.BatchNorm2d) for site in cnn.norm_sites())
    vit = build_tiny("vit", num_classes=10)
    assert isinstance(vit.patch_norm, nn.Identity) and isinstance(vit.input_norm, nn.Identity)


@pytest.mark.parametrize("name", TINY_CNNS)
def test_all_placement_leaves_no_batchnorm(name: str) -> None:
    model = TINY_CNNS[name](num_classes=3, norm_layer=group_norm, placement="all")
    modules = list(model.modules())
    assert not any(isinstance(module, nn.modules.batchnorm._BatchNorm) for module in modules)
    assert sum(isinstance(module, nn.GroupNorm) for module in modules) == model.num_norm_sites


# --- Errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TINY_CNNS)
def test_index_out_of_range_names_the_number_of_sites(name: str) -> None:
    sites = TINY_CNNS[name](num_classes=3).num_norm_sites
    message = rf"index {sites} is out of range.* has {sites} norm sites"
    with pytest.raises(ValueError, match=message):
        TINY_CNNS[name](num_classes=3, placement=[0, sites])


@pytest.mark.parametrize(
    ("name", "mode"),
    [("shallow_cnn", "patch"), ("densenet", "patch"), ("vit", "all"), ("vit", "index:0")],
)
def test_unsupported_mode_is_a_clear_error(name: str, mode: str) -> None:
    with pytest.raises(ValueError, match="does not support placement mode"):
        build_tiny(name, num_classes=3, norm_layer=group_norm, placement=mode)


def test_bad_factories_and_sizes_are_clear_errors() -> None:
    with pytest.raises(TypeError, match="pass its class or a function"):
        ShallowCNN(10, norm_layer=nn.BatchNorm2d(64))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="must return an nn.Module"):
        ShallowCNN(10, norm_layer=lambda c: c)  # type: ignore[arg-type,return-value]
    with pytest.raises(ValueError, match="depth must be 4 \\+ 3 \\* n"):
        DenseNet(depth=41)
    with pytest.raises(ValueError, match="widths"):
        ShallowCNN(10, widths=())
    with pytest.raises(ValueError, match="num_classes"):
        ShallowCNN(0)
    with pytest.raises(ValueError, match="image_size"):
        build_tiny("vit", num_classes=3)(torch.randn(1, 3, 16, 16))


# --- Shapes, sizes, gradients ----------------------------------------------------------------


@pytest.mark.parametrize("name", TINY_MODEL_NAMES)
@pytest.mark.parametrize(("channels", "size"), [(1, 8), (3, 32), (1, 28)])
def test_forward_shapes(name: str, channels: int, size: int) -> None:
    model = build_tiny(name, size, num_classes=7, in_channels=channels)
    assert model(torch.randn(2, channels, size, size)).shape == (2, 7)


def test_shallow_cnn_pools_32_to_16_8_4_as_in_the_table() -> None:
    model = ShallowCNN(10, widths=(4, 8, 8, 16))
    sizes: list[int] = []
    for module in model.features:
        if isinstance(module, nn.MaxPool2d):
            module.register_forward_hook(lambda _m, _i, out: sizes.append(out.shape[-1]))
    model(torch.randn(1, 3, 32, 32))
    assert sizes == [16, 8, 4]


@pytest.mark.parametrize(
    ("build", "millions", "sites"), [(densenet40, 1.0, 39), (densenet100, 7.0, 99)]
)
def test_densenet_parameter_counts_match_the_paper(
    build: Callable[..., DenseNet], millions: float, sites: int
) -> None:
    model = build(num_classes=10)
    count = sum(parameter.numel() for parameter in model.parameters())
    assert count == pytest.approx(millions * 1e6, rel=0.03)
    assert model.num_norm_sites == sites


def test_vit_patches_keep_the_keras_layout() -> None:
    model = build_tiny("vit", num_classes=3, in_channels=2)
    images = torch.arange(2 * 2 * 8 * 8, dtype=torch.float32).reshape(2, 2, 8, 8)
    patches = model.patchify(images)
    assert patches.shape == (2, 4, 4 * 4 * 2)
    row, column = 1, 0  # patch number 2 in row-major order
    expected = images[:, :, 4 * row : 4 * row + 4, 4 * column : 4 * column + 4]
    assert torch.equal(patches[:, 2], expected.permute(0, 2, 3, 1).reshape(2, -1))


@pytest.mark.parametrize(
    ("name", "placement", "norm_layer"),
    [
        ("shallow_cnn", "input", group_norm),
        ("densenet", "index:1", group_norm),
        ("densenet_bc", "all", group_norm),
        ("vit", "patch", nn.BatchNorm1d),
        ("vit", "input", nn.BatchNorm2d),
    ],
)
def test_gradient_reaches_every_parameter(
    name: str, placement: str, norm_layer: Callable[[int], nn.Module]
) -> None:
    torch.manual_seed(0)
    model = build_tiny(name, num_classes=4, norm_layer=norm_layer, placement=placement)
    nn.functional.cross_entropy(model(torch.randn(6, 3, 8, 8)), torch.arange(6) % 4).backward()
    for parameter_name, parameter in model.named_parameters():
        assert parameter.grad is not None, parameter_name
        assert parameter.grad.abs().sum() > 0, parameter_name


# --- Registry --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "model_class", "sizes"),
    [
        ("shallow_cnn", ShallowCNN, {"widths": (4, 8)}),
        ("densenet", DenseNet, {"depth": 10, "growth_rate": 4}),
        ("densenet40", DenseNet, {"growth_rate": 2}),
        ("vit", VisionTransformer, TINY_VIT_SIZES),
    ],
)
def test_build_model_builds_the_named_model_with_its_default_placement(
    name: str, model_class: type, sizes: dict[str, Any]
) -> None:
    model = build_model(
        name, num_classes=4, in_channels=1, image_size=8, norm_layer=group_norm, **sizes
    )
    assert isinstance(model, model_class)
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 4)
    assert model.placement == Placement("patch" if name == "vit" else "all")


def test_build_model_rejects_unknown_names_and_arguments() -> None:
    common: dict[str, Any] = dict(num_classes=4, in_channels=3, image_size=8, norm_layer=None)
    with pytest.raises(ValueError, match="unknown model 'resnet'.*densenet40"):
        build_model("resnet", **common)
    with pytest.raises(ValueError, match="does not take depth.*growth_rate"):
        build_model("densenet40", depth=100, **common)
    with pytest.raises(ValueError, match="does not take widht.*widths"):
        build_model("shallow_cnn", widht=(4, 8), **common)
    with pytest.raises(ValueError, match="base_norm_layer does not apply"):
        build_model("vit", base_norm_layer=nn.BatchNorm2d, **common)
    assert set(MODELS) == {"shallow_cnn", "densenet40", "densenet100", "densenet", "vit"}
