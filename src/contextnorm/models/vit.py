"""The Vision Transformer of the Keras example "Image classification with Vision Transformer",
trained from scratch on CIFAR-100 by Faye et al. 2024b (Table V), 2024c (Table 1) and 2024a
(Table VII)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import require_positive_int, require_probability
from .placement import NormFactory, NormSiteModel, PlacementSpec

# The Keras example's LayerNormalization epsilon.
_LAYER_NORM_EPS = 1e-6


def _mlp(in_features: int, hidden_units: Sequence[int], dropout: float) -> nn.Sequential:
    """Dense + GELU + dropout for each width, as the Keras example's ``mlp`` (both in the
    transformer blocks and in the head, so the blocks' second dense layer has a GELU too)."""
    layers: list[nn.Module] = []
    for units in hidden_units:
        layers += [nn.Linear(in_features, units), nn.GELU(), nn.Dropout(dropout)]
        in_features = units
    return nn.Sequential(*layers)


class _SelfAttention(nn.Module):
    """Multi-head self-attention whose per-head width is independent of the model width, as in
    Keras ``MultiHeadAttention(key_dim=...)`` (the example uses ``key_dim = embed_dim``)."""

    def __init__(self, embed_dim: int, num_heads: int, head_dim: int, dropout: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.dropout = dropout
        self.query_key_value = nn.Linear(embed_dim, 3 * num_heads * head_dim)
        self.output = nn.Linear(num_heads * head_dim, embed_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, length, _ = tokens.shape
        query, key, value = (
            self.query_key_value(tokens)
            .view(batch, length, 3, self.num_heads, self.head_dim)
            .permute(2, 0, 3, 1, 4)
        )
        attended = F.scaled_dot_product_attention(
            query, key, value, dropout_p=self.dropout if self.training else 0.0
        )
        return self.output(attended.transpose(1, 2).reshape(batch, length, -1))


class _TransformerBlock(nn.Module):
    """Pre-norm block: x + attention(LN(x)), then x + MLP(LN(x))."""

    def __init__(
        self, embed_dim: int, num_heads: int, head_dim: int, mlp_hidden: int, dropout: float
    ) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(embed_dim, eps=_LAYER_NORM_EPS)
        self.attention = _SelfAttention(embed_dim, num_heads, head_dim, dropout)
        self.mlp_norm = nn.LayerNorm(embed_dim, eps=_LAYER_NORM_EPS)
        self.mlp = _mlp(embed_dim, (mlp_hidden, embed_dim), dropout)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = tokens + self.attention(self.attention_norm(tokens))
        return tokens + self.mlp(self.mlp_norm(tokens))


class VisionTransformer(NormSiteModel):
    """ViT of the Keras example, with an optional norm under test on the input or the patches.

    Images are cut into non-overlapping ``patch_size`` patches (a remainder is cropped, as
    Keras' ``extract_patches`` does), each flattened and linearly projected to ``embed_dim``
    with a learned position embedding added; ``depth`` pre-norm transformer blocks follow; the
    final LayerNorm output of all tokens is flattened (no class token), passed through dropout
    and an MLP head. The transformer's LayerNorms are part of the architecture and stay
    LayerNorm; the model has no norm sites. The norm under test is one extra module:

    * ``placement="input"``: ``norm_layer(in_channels)`` on the images ("CN-Channels", and the
      papers' "ViT+BN" with ``nn.BatchNorm2d``);
    * ``placement="patch"``: ``norm_layer(embed_dim)`` on the patch embeddings ("CN-Patches"),
      called on the channel-first tokens (N, embed_dim, num_patches), so a factory that handles
      (N, C, L) tensors is needed (``nn.BatchNorm1d``, not ``nn.BatchNorm2d``).

    The defaults are the example's sizes except the input: the example resizes CIFAR to 72x72
    and uses 6x6 patches; here 32x32 images and 4x4 patches (pass ``image_size=72,
    patch_size=6`` for the original).

    Args:
        num_classes: number of output logits.
        in_channels: channels of the input images.
        image_size: height and width of the (square) input images.
        patch_size: side of the square patches.
        embed_dim: token width (the example's ``projection_dim``).
        depth: number of transformer blocks.
        num_heads: attention heads.
        head_dim: width of each attention head; ``None`` uses ``embed_dim`` as the example's
            ``key_dim=projection_dim`` does.
        mlp_ratio: hidden width of the block MLPs relative to ``embed_dim``.
        head_hidden: hidden widths of the classification head.
        dropout: dropout in attention and in the block MLPs.
        head_dropout: dropout before and inside the classification head.
        norm_layer: factory of the norm under test; ``None`` gives the example's model.
        placement: ``"input"`` or ``"patch"``.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        image_size: int = 32,
        patch_size: int = 4,
        embed_dim: int = 64,
        depth: int = 8,
        num_heads: int = 4,
        head_dim: int | None = None,
        mlp_ratio: float = 2.0,
        head_hidden: Sequence[int] = (2048, 1024),
        dropout: float = 0.1,
        head_dropout: float = 0.5,
        norm_layer: NormFactory | None = None,
        placement: PlacementSpec = "patch",
    ) -> None:
        super().__init__()
        num_classes = require_positive_int("num_classes", num_classes)
        in_channels = require_positive_int("in_channels", in_channels)
        self.image_size = require_positive_int("image_size", image_size)
        self.patch_size = require_positive_int("patch_size", patch_size)
        embed_dim = require_positive_int("embed_dim", embed_dim)
        depth = require_positive_int("depth", depth)
        num_heads = require_positive_int("num_heads", num_heads)
        head_dim = embed_dim if head_dim is None else require_positive_int("head_dim", head_dim)
        mlp_hidden = require_positive_int("embed_dim * mlp_ratio", round(embed_dim * mlp_ratio))
        if isinstance(head_hidden, str) or not isinstance(head_hidden, Sequence):
            raise ValueError(f"head_hidden must be a sequence of widths, got {head_hidden!r}")
        head_hidden = [
            require_positive_int(f"head_hidden[{i}]", units) for i, units in enumerate(head_hidden)
        ]
        require_probability("dropout", dropout)
        require_probability("head_dropout", head_dropout)
        if patch_size > image_size:
            raise ValueError(f"patch_size ({patch_size}) must not exceed image_size ({image_size})")
        self.patches_per_side = image_size // patch_size
        num_patches = self.patches_per_side**2
        sites = self._norm_sites(norm_layer, placement, ("input", "patch"))

        self.input_norm = sites.input_norm(in_channels)
        self.patch_projection = nn.Linear(patch_size * patch_size * in_channels, embed_dim)
        self.position_embedding = nn.Parameter(torch.empty(1, num_patches, embed_dim))
        self.patch_norm = sites.patch_norm(embed_dim)
        self.blocks = nn.Sequential(
            *(
                _TransformerBlock(embed_dim, num_heads, head_dim, mlp_hidden, dropout)
                for _ in range(depth)
            )
        )
        self.final_norm = nn.LayerNorm(embed_dim, eps=_LAYER_NORM_EPS)
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(head_dropout),
            _mlp(num_patches * embed_dim, head_hidden, head_dropout),
            nn.Linear(head_hidden[-1] if head_hidden else num_patches * embed_dim, num_classes),
        )
        self._set_norm_sites(sites)
        self._init_weights()

    def _init_weights(self) -> None:
        # Keras' initialisation (Glorot-uniform dense kernels, zero biases, U(-0.05, 0.05)
        # embeddings), so that training from scratch starts where the reference example does.
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.uniform_(self.position_embedding, -0.05, 0.05)

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """Flattened patches (N, num_patches, patch_size**2 * C) in row-major patch order, each
        patch flattened row by row with channels last (Keras' ``extract_patches`` layout)."""
        batch, channels, height, width = images.shape
        if (height, width) != (self.image_size, self.image_size):
            raise ValueError(
                f"{type(self).__name__} was built for {self.image_size}x{self.image_size} "
                f"images (image_size), got {height}x{width}"
            )
        side, patch = self.patches_per_side, self.patch_size
        cropped = images[:, :, : side * patch, : side * patch]
        return (
            cropped.reshape(batch, channels, side, patch, side, patch)
            .permute(0, 2, 4, 3, 5, 1)
            .reshape(batch, side * side, patch * patch * channels)
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits (N, num_classes) for images (N, in_channels, image_size, image_size)."""
        tokens = self.patch_projection(self.patchify(self.input_norm(images)))
        tokens = tokens + self.position_embedding
        # Norm factories are channel-first: normalise (N, D, L), then return to (N, L, D).
        tokens = self.patch_norm(tokens.transpose(1, 2)).transpose(1, 2)
        return self.head(self.final_norm(self.blocks(tokens)))
