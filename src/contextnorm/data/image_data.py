"""The in-memory container every loader returns."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch


@dataclass
class ImageData:
    """One split of an image classification data set, held in memory.

    Attributes:
        images: uint8 tensor of shape (N, C, H, W), channel-first.
        labels: int64 tensor of shape (N,), class ids in ``[0, len(classes))``.
        classes: class names, indexed by label.
        coarse_labels: int64 (N,) superclass ids where the format has them (CIFAR-100 coarse
            labels, Oxford-IIIT Pet species), else ``None``.
        coarse_classes: superclass names, indexed by coarse label; set exactly when
            ``coarse_labels`` is.
        domains: int64 (N,) visual-domain ids where the data set has domains, else ``None``.
        domain_names: domain names, indexed by domain id; set exactly when ``domains`` is.
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    coarse_labels: torch.Tensor | None = None
    coarse_classes: list[str] | None = None
    domains: torch.Tensor | None = None
    domain_names: list[str] | None = None

    def __post_init__(self) -> None:
        if (
            not isinstance(self.images, torch.Tensor)
            or self.images.dtype != torch.uint8
            or self.images.dim() != 4
        ):
            raise ValueError(
                "images must be a uint8 tensor of shape (N, C, H, W); got "
                f"{_describe(self.images)}. Convert with images.to(torch.uint8) and add a channel "
                "axis if needed."
            )
        self._check_ids("labels", self.labels, "classes", self.classes)
        self._check_ids("coarse_labels", self.coarse_labels, "coarse_classes", self.coarse_classes)
        self._check_ids("domains", self.domains, "domain_names", self.domain_names)

    def _check_ids(
        self, ids_name: str, ids: torch.Tensor | None, names_name: str, names: list[str] | None
    ) -> None:
        if (ids is None) != (names is None):
            raise ValueError(
                f"{ids_name} and {names_name} must be given together (both or neither)."
            )
        if ids is None or names is None:
            return
        if not isinstance(ids, torch.Tensor) or ids.dtype != torch.int64 or ids.dim() != 1:
            raise ValueError(
                f"{ids_name} must be an int64 tensor of shape (N,); got {_describe(ids)}."
            )
        if len(ids) != len(self.images):
            raise ValueError(
                f"{ids_name} has {len(ids)} entries but images has {len(self.images)}; "
                "they must match."
            )
        if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= len(names)):
            raise ValueError(
                f"{ids_name} must lie in [0, {len(names)}) because {names_name} has {len(names)} "
                f"names; got values in [{int(ids.min())}, {int(ids.max())}]."
            )

    def __len__(self) -> int:
        return len(self.images)

    @property
    def num_classes(self) -> int:
        """Number of classes: the length of ``classes``, whether or not each is in this split."""
        return len(self.classes)

    @property
    def num_channels(self) -> int:
        """Number of image channels C."""
        return self.images.shape[1]

    @property
    def image_size(self) -> int:
        """Side length of the square images.

        Raises:
            ValueError: the images are not square (load them with ``image_size=...`` to resize).
        """
        height, width = self.images.shape[-2:]
        if height != width:
            raise ValueError(
                f"images are {height}x{width}, not square; set an image_size (data.image_size in a "
                "config) to resize them."
            )
        return height

    def subset(self, indices: torch.Tensor | Sequence[int]) -> ImageData:
        """The samples at ``indices`` (int positions or a boolean mask of length N), names kept."""
        index = torch.as_tensor(indices)
        # An empty Python list arrives as float32; it is still a valid (empty) selection.
        if index.dtype.is_floating_point and index.numel():
            raise ValueError(
                f"indices must be integer positions or a boolean mask; got dtype {index.dtype}."
            )
        if index.dtype != torch.bool:
            index = index.to(torch.int64)
        if index.dim() != 1:
            raise ValueError(f"indices must be one-dimensional; got shape {tuple(index.shape)}.")

        def pick(values: torch.Tensor | None) -> torch.Tensor | None:
            return None if values is None else values[index]

        return replace(
            self,
            images=self.images[index],
            labels=self.labels[index],
            coarse_labels=pick(self.coarse_labels),
            domains=pick(self.domains),
        )


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor of dtype {value.dtype} and shape {tuple(value.shape)}"
    return type(value).__name__
