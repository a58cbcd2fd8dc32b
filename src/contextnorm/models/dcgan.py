"""The DCGAN of the papers' image-generation experiment: a generator with the norm under test,
and a standard DCGAN discriminator.

The papers (Faye et al. 2024a, §IV-D; 2024b, §IV-B) describe the generator as "a linear layer
followed by four deconvolutional layers, the first three followed by a normalization layer and
a LeakyReLU" and give no channel counts, kernel sizes or latent size. What they leave open is
filled in here with the usual CIFAR DCGAN (Radford et al. 2016), and said where it is chosen.

Generated samples get contexts like real ones: a context layer in the generator (CN, CN-X,
CN-E) normalises each sample with the statistics of the context id it is generated for, put in
scope with :func:`contextnorm.use_context` around the generator call. The generator's
``forward`` never sees the ids; see ``contextnorm.tasks.generation`` for how ids are drawn.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from ._checks import require_positive_int
from .placement import NormFactory, NormSiteModel, PlacementSpec

# Three stride-2 stages separate the first feature map from the image, in both networks.
UPSAMPLING_FACTOR = 8
LEAKY_SLOPE = 0.2
# Radford et al. initialise every weight from N(0, 0.02).
INIT_STD = 0.02
DISCRIMINATOR_NORMS = ("spectral", "batch")


def check_image_size(image_size: object) -> int:
    """``image_size`` as an int, or a ValueError naming the sizes the DCGAN supports."""
    size = require_positive_int("image_size", image_size)
    if size % UPSAMPLING_FACTOR:
        raise ValueError(
            f"image_size={size} is not supported: the DCGAN needs a multiple of "
            f"{UPSAMPLING_FACTOR} (three stride-2 stages), e.g. 32 as in the papers; load the "
            "data resized (data.image_size: 32 in a config)"
        )
    return size


def _channels(name: str, values: Sequence[int], count: int) -> list[int]:
    if isinstance(values, str) or not isinstance(values, Sequence) or len(values) != count:
        raise ValueError(f"{name} must be a sequence of {count} channel counts, got {values!r}")
    return [require_positive_int(f"{name}[{i}]", value) for i, value in enumerate(values)]


def _init_weights(module: nn.Module) -> None:
    """N(0, 0.02) weights and zero biases for every convolution and linear layer; norms keep
    their own initialisation (a context layer's statistics and affines have theirs)."""
    for layer in module.modules():
        if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(layer.weight, 0.0, INIT_STD)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


class DCGANGenerator(NormSiteModel):
    """The papers' generator: latent -> linear -> four transposed convolutions -> tanh.

    With the defaults (32x32 images)::

        z (N, 128) -> linear -> (512, 4, 4)
          -> deconv 4x4 /2 -> (256, 8, 8)   -> norm -> LeakyReLU(0.2)     site 0
          -> deconv 4x4 /2 -> (128, 16, 16) -> norm -> LeakyReLU(0.2)     site 1
          -> deconv 4x4 /2 -> (64, 32, 32)  -> norm -> LeakyReLU(0.2)     site 2
          -> deconv 3x3 /1 -> (C, 32, 32)   -> tanh

    The papers fix the layer sequence; the rest is chosen here: the channel counts halve from
    512 as in Radford et al.'s generator; the last transposed convolution keeps the size, so that
    three stride-2 stages reach 32x32 from a 4x4 map; the latent has 128 dimensions (the papers
    do not say); LeakyReLU's slope is 0.2, Radford et al.'s. As in the papers' description,
    nothing but a reshape sits between the linear layer and the first transposed convolution.

    Norm sites: the three norms, in forward order. Faye et al. 2024b replaces all three
    (``placement="all"``), Faye et al. 2024a only the first two (``placement="index:0,1"``).

    Args:
        latent_dim: size of the latent vectors.
        out_channels: image channels (3 for CIFAR, 1 for MNIST).
        image_size: side of the square output; a multiple of 8 (32 in the papers).
        widths: channels of the linear layer's map and of the three normalised feature maps.
        norm_layer: factory of the norm under test (``None``: BatchNorm everywhere).
        placement: which sites get it: ``"all"`` or site indices (see ``Placement``).
        base_norm_layer: factory for the other sites (default ``nn.BatchNorm2d``).

    Raises:
        ValueError: an image size that is not a multiple of 8, or a size argument that is not a
            positive integer.
    """

    def __init__(
        self,
        latent_dim: int = 128,
        out_channels: int = 3,
        image_size: int = 32,
        widths: Sequence[int] = (512, 256, 128, 64),
        norm_layer: NormFactory | None = nn.BatchNorm2d,
        placement: PlacementSpec = "all",
        base_norm_layer: NormFactory | None = None,
    ) -> None:
        super().__init__()
        self.latent_dim = require_positive_int("latent_dim", latent_dim)
        self.out_channels = require_positive_int("out_channels", out_channels)
        self.image_size = check_image_size(image_size)
        channels = _channels("widths", widths, 4)
        sites = self._norm_sites(norm_layer, placement, ("all", "index"), base_norm_layer)
        self.initial_size = self.image_size // UPSAMPLING_FACTOR
        self.project = nn.Linear(self.latent_dim, channels[0] * self.initial_size**2)
        blocks: list[nn.Module] = []
        for in_width, out_width in pairwise(channels):
            blocks += [
                # No bias: the norm that follows subtracts a mean, which cancels it.
                nn.ConvTranspose2d(in_width, out_width, 4, stride=2, padding=1, bias=False),
                sites.site(out_width),
                nn.LeakyReLU(LEAKY_SLOPE),
            ]
        blocks += [nn.ConvTranspose2d(channels[-1], self.out_channels, 3, padding=1), nn.Tanh()]
        self.blocks = nn.Sequential(*blocks)
        self._set_norm_sites(sites)
        _init_weights(self)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        """Images (N, out_channels, image_size, image_size) in [-1, 1] for latents (N, latent_dim).

        Context layers among the norms take each sample's context from the scope
        (``with contextnorm.use_context(ids): generator(latents)``).
        """
        if latents.dim() != 2 or latents.shape[1] != self.latent_dim:
            raise ValueError(
                f"latents must have shape (N, {self.latent_dim}) for this generator "
                f"(latent_dim={self.latent_dim}); got {tuple(latents.shape)}. Draw them with "
                f"torch.randn(N, {self.latent_dim}), or build the generator with the latent size "
                "you use"
            )
        features = self.project(latents)
        features = features.view(len(latents), -1, self.initial_size, self.initial_size)
        return self.blocks(features)


class DCGANDiscriminator(nn.Module):
    """A standard DCGAN discriminator (Radford et al. 2016): strided 4x4 convolutions with
    LeakyReLU(0.2), then one linear logit.

    With the defaults (32x32 images)::

        x (C, 32, 32) -> conv 4x4 /2 -> (64, 16, 16)  -> LeakyReLU
                      -> conv 4x4 /2 -> (128, 8, 8)   -> [BN] -> LeakyReLU
                      -> conv 4x4 /2 -> (256, 4, 4)   -> [BN] -> LeakyReLU -> linear -> logit

    ``norm="spectral"`` (the default) puts spectral normalization (Miyato et al. 2018) on every
    weight and no BatchNorm anywhere; ``norm="batch"`` is Radford et al.'s discriminator, BatchNorm
    after every convolution but the first. Spectral is the default because the experiment
    compares normalizations of the *generator*: a BatchNorm discriminator scores each image
    with statistics of the batch it comes in, and real and generated images come in separate
    batches, so its statistics would differ with the generator's norm and confound the
    comparison. A spectrally normalised discriminator scores every image on its own, whatever
    the generator does, and keeps the Lipschitz constant in check at the papers' Adam settings
    (beta1 = 0).

    Args:
        in_channels: image channels.
        image_size: side of the square input; a multiple of 8.
        widths: channels of the three convolutions.
        norm: ``"spectral"`` or ``"batch"``.

    Raises:
        ValueError: an unsupported image size or norm, or a size argument that is not a positive
            integer.
    """

    def __init__(
        self,
        in_channels: int = 3,
        image_size: int = 32,
        widths: Sequence[int] = (64, 128, 256),
        norm: str = "spectral",
    ) -> None:
        super().__init__()
        self.in_channels = require_positive_int("in_channels", in_channels)
        self.image_size = check_image_size(image_size)
        if norm not in DISCRIMINATOR_NORMS:
            raise ValueError(f"norm must be one of {DISCRIMINATOR_NORMS}, got {norm!r}")
        self.norm = norm
        channels = [self.in_channels, *_channels("widths", widths, 3)]
        layers: list[nn.Module] = []
        for index, (in_width, out_width) in enumerate(pairwise(channels)):
            batch_norm = norm == "batch" and index > 0
            layers.append(
                nn.Conv2d(in_width, out_width, 4, stride=2, padding=1, bias=not batch_norm)
            )
            if batch_norm:
                layers.append(nn.BatchNorm2d(out_width))
            layers.append(nn.LeakyReLU(LEAKY_SLOPE))
        self.features = nn.Sequential(*layers)
        final_size = self.image_size // UPSAMPLING_FACTOR
        self.classifier = nn.Linear(channels[-1] * final_size**2, 1)
        _init_weights(self)
        if norm == "spectral":
            for layer in self.modules():
                if isinstance(layer, (nn.Conv2d, nn.Linear)):
                    spectral_norm(layer)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Real-vs-generated logits (N,) for images (N, in_channels, image_size, image_size)."""
        expected = (self.in_channels, self.image_size, self.image_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"images must have shape (N, {', '.join(map(str, expected))}) for this "
                f"discriminator; got {tuple(images.shape)}"
            )
        return self.classifier(self.features(images).flatten(1)).squeeze(1)
