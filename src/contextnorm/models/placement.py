"""Where the normalization under test goes in a model, and the helper that builds each norm site.

A *norm factory* is any callable ``norm_layer(num_features) -> nn.Module`` whose module maps a
channel-first tensor, (N, C, H, W), (N, C) or (N, C, L), to a tensor of the same shape, as
``nn.BatchNorm2d`` does. Models call every norm with the activation alone; contexts reach context
layers through the library's own routing, so models never see them.

A *norm site* is a place where a model normalizes by design (each BatchNorm of the original
architecture), numbered from 0 in forward order. A :class:`Placement` says which sites, or which
extra position, get the norm under test.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Literal, Union, get_args

from torch import nn

from ._checks import as_integer

NormFactory = Callable[[int], nn.Module]
PlacementMode = Literal["all", "index", "input", "patch"]
PlacementSpec = Union[str, int, Sequence[int], "Placement"]

PLACEMENT_MODES: tuple[str, ...] = get_args(PlacementMode)
_ACCEPTED_SPECS = (
    "'all', 'input', 'patch', 'index:I' or 'index:I,J,...', an int site index, "
    "a sequence of int site indices, or a Placement"
)


@dataclass(frozen=True)
class Placement:
    """Where the normalization under test goes.

    Attributes:
        mode: ``"all"``: every norm site uses the tested norm. ``"index"``: only the sites in
            ``indices`` do, the others use the base norm. ``"input"``: every site uses the base
            norm and one extra tested norm is applied to the model input. ``"patch"`` (vision
            transformers): one extra tested norm is applied to the patch embeddings.
        indices: for ``"index"``, the 0-based site numbers (forward order) that get the tested
            norm; stored sorted and without repeats. Empty for the other modes.
    """

    mode: PlacementMode = "all"
    indices: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.mode not in PLACEMENT_MODES:
            raise ValueError(f"placement mode must be one of {PLACEMENT_MODES}, got {self.mode!r}")
        indices = tuple(sorted(set(_as_site_index(index) for index in self.indices)))
        if self.mode == "index" and not indices:
            raise ValueError(
                "placement mode 'index' needs at least one site index, "
                "e.g. Placement('index', (2,))"
            )
        if self.mode != "index" and indices:
            raise ValueError(
                f"placement indices only apply to mode 'index'; mode {self.mode!r} got {indices}"
            )
        # Frozen dataclass: normalising a field in place has to bypass the generated __setattr__.
        object.__setattr__(self, "indices", indices)

    @classmethod
    def parse(cls, spec: PlacementSpec) -> Placement:
        """Read a placement from a config value.

        Accepts ``"all"``, ``"input"``, ``"patch"``, ``"index:2"``, ``"index:1,2"``, an int
        (``2``), a sequence of ints (``[1, 2]``) or a :class:`Placement` (returned unchanged).

        Raises:
            ValueError: for anything else, naming the accepted forms.
        """
        if isinstance(spec, Placement):
            return spec
        if isinstance(spec, str):
            return cls._parse_string(spec)
        if isinstance(spec, Sequence) or as_integer(spec) is not None:
            indices = spec if isinstance(spec, Sequence) else (spec,)
            if not indices or any(as_integer(index) is None for index in indices):
                raise ValueError(f"placement must be {_ACCEPTED_SPECS}; got {spec!r}")
            return cls("index", tuple(indices))
        raise ValueError(f"placement must be {_ACCEPTED_SPECS}; got {spec!r}")

    @classmethod
    def _parse_string(cls, spec: str) -> Placement:
        mode, separator, index_list = spec.strip().lower().partition(":")
        if mode == "index" and separator:
            try:
                indices = tuple(int(item) for item in index_list.split(","))
            except ValueError:
                raise ValueError(
                    f"placement {spec!r}: the site indices after 'index:' must be integers "
                    "separated by commas, e.g. 'index:1,2'"
                ) from None
            return cls("index", indices)
        if mode in ("all", "input", "patch") and not separator:
            return cls(mode)
        raise ValueError(f"placement must be {_ACCEPTED_SPECS}; got {spec!r}")

    def __str__(self) -> str:
        """The spec string :meth:`parse` reads back into this placement."""
        if self.mode == "index":
            return "index:" + ",".join(str(index) for index in self.indices)
        return self.mode


def _as_site_index(value: object) -> int:
    index = as_integer(value)
    if index is None or index < 0:
        raise ValueError(f"placement site indices must be non-negative integers, got {value!r}")
    return index


def check_norm_factory(name: str, factory: object) -> None:
    """Raise a clear error unless ``factory`` can be a norm factory (a callable, not a module)."""
    if isinstance(factory, nn.Module):
        raise TypeError(
            f"{name} must build a new norm for each site, got the module instance {factory!r}; "
            f"pass its class or a function num_features -> nn.Module instead"
        )
    if not callable(factory):
        raise TypeError(
            f"{name} must be a callable num_features -> nn.Module, got {type(factory).__name__}"
        )


class NormSites:
    """Hands out the normalization module of each norm site of a model, so that every model
    applies a :class:`Placement` the same way.

    A model creates one ``NormSites``, calls :meth:`site` once per norm site in forward order,
    :meth:`input_norm` / :meth:`patch_norm` for the extra positions it supports, then
    :meth:`finish`, which checks the placement's indices against the number of sites.

    Args:
        norm_layer: factory of the norm under test; ``None`` builds the baseline model (base
            norm at every site, no extra norm).
        placement: where the tested norm goes (anything :meth:`Placement.parse` accepts).
        owner: the model's name, used in error messages.
        supported_modes: the placement modes the model implements.
        base_norm_layer: factory for the sites that do not get the tested norm; defaults to
            ``nn.BatchNorm2d``, the norm of the original architectures.
    """

    def __init__(
        self,
        norm_layer: NormFactory | None,
        placement: PlacementSpec,
        *,
        owner: str,
        supported_modes: Collection[PlacementMode],
        base_norm_layer: NormFactory | None = None,
    ) -> None:
        self.placement = Placement.parse(placement)
        if self.placement.mode not in supported_modes:
            raise ValueError(
                f"{owner} does not support placement mode {self.placement.mode!r}; "
                f"supported modes: {', '.join(repr(mode) for mode in supported_modes)}"
            )
        if norm_layer is not None:
            check_norm_factory("norm_layer", norm_layer)
        if base_norm_layer is not None:
            check_norm_factory("base_norm_layer", base_norm_layer)
        self._owner = owner
        self._norm_layer = norm_layer
        self._base_norm_layer: NormFactory = base_norm_layer or nn.BatchNorm2d
        self._sites: list[nn.Module] = []

    def site(self, num_features: int) -> nn.Module:
        """The norm module for the next site in forward order."""
        mode, index = self.placement.mode, len(self._sites)
        tested = mode == "all" or (mode == "index" and index in self.placement.indices)
        if tested and self._norm_layer is not None:
            module = _build(self._norm_layer, "norm_layer", num_features)
        else:
            module = _build(self._base_norm_layer, "base_norm_layer", num_features)
        self._sites.append(module)
        return module

    def input_norm(self, num_channels: int) -> nn.Module:
        """The tested norm for the model input under placement ``"input"``, else identity."""
        return self._extra_norm("input", num_channels)

    def patch_norm(self, embed_dim: int) -> nn.Module:
        """The tested norm for the patch embeddings under placement ``"patch"``, else identity."""
        return self._extra_norm("patch", embed_dim)

    def _extra_norm(self, mode: PlacementMode, num_features: int) -> nn.Module:
        if self.placement.mode != mode or self._norm_layer is None:
            return nn.Identity()
        return _build(self._norm_layer, "norm_layer", num_features)

    def finish(self) -> tuple[nn.Module, ...]:
        """The site modules in forward order, after checking every placement index exists."""
        out_of_range = [index for index in self.placement.indices if index >= len(self._sites)]
        if out_of_range:
            raise ValueError(
                f"placement site index {out_of_range[0]} is out of range: {self._owner} has "
                f"{len(self._sites)} norm sites (valid indices 0..{len(self._sites) - 1})"
            )
        return tuple(self._sites)


def _build(factory: NormFactory, name: str, num_features: int) -> nn.Module:
    module = factory(num_features)
    if not isinstance(module, nn.Module):
        raise TypeError(
            f"{name}({num_features}) returned {type(module).__name__}; a norm factory must "
            "return an nn.Module"
        )
    return module


class NormSiteModel(nn.Module):
    """Base of the models built with :class:`NormSites`: exposes their norm sites."""

    def _norm_sites(
        self,
        norm_layer: NormFactory | None,
        placement: PlacementSpec,
        supported_modes: Collection[PlacementMode],
        base_norm_layer: NormFactory | None = None,
    ) -> NormSites:
        """The :class:`NormSites` of this model, named after its class in error messages."""
        return NormSites(
            norm_layer,
            placement,
            owner=type(self).__name__,
            supported_modes=supported_modes,
            base_norm_layer=base_norm_layer,
        )

    def _set_norm_sites(self, sites: NormSites) -> None:
        self.placement = sites.placement
        # A plain tuple, not an nn.ModuleList: the modules are already registered where the
        # architecture uses them, and registering them twice would duplicate state-dict keys.
        self._norm_site_modules = sites.finish()

    @property
    def num_norm_sites(self) -> int:
        """How many norm sites the model has (valid ``"index"`` placements are 0..n-1)."""
        return len(self._norm_site_modules)

    def norm_sites(self) -> list[nn.Module]:
        """The norm module of every site in forward order (e.g. to hook activations)."""
        return list(self._norm_site_modules)

    def _he_initialise(self, classifier: nn.Linear, mode: str) -> None:
        """He-normal convs (``mode``: ``"fan_in"`` or ``"fan_out"``) and a zero ``classifier``
        bias; the norm modules keep their own initialisation."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode=mode, nonlinearity="relu")
        nn.init.zeros_(classifier.bias)
