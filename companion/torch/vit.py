r"""A small vision transformer (Dosovitskiy et al. 2021) from the package's blocks.

.. math::

    z_0 = [\,x_{cls};\; p_1 W_P^\top + b;\; \dots;\; p_N W_P^\top + b\,] + P,
    \qquad z_\ell = \text{block}_\ell(z_{\ell-1}),
    \qquad y = \mathrm{LN}(z_L)_{cls \text{ or mean}}\, W_{head}^\top

* :class:`PatchEmbedding`: cuts ``(B, C, H, W)`` images into ``N`` non-overlapping
  ``p x p`` patches and applies **one** linear map ``W_P (E, C p p)`` to every patch:
  the weight sharing of a convolution, with kernel = stride = ``p``
  (:meth:`PatchEmbedding.forward_conv` computes the same tokens with ``conv2d`` and
  the same parameters).
* :class:`EncoderBlock`: :class:`companion.torch.models.TransformerBlock` with
  bidirectional (non-causal) attention, as in ViT and BERT.
* :class:`VisionTransformer`: patch embedding, positions (``"learned"`` or 2-D
  ``"sinusoidal"``, :func:`sinusoidal_positions_2d`), encoder blocks, a final norm, and
  a classifier reading the class token (``pooling="cls"``) or the mean of the patch
  tokens (``pooling="mean"``, no class token).

With ``norm_eps=1e-12``, ``pooling="cls"`` and ``positions="learned"`` the encoder is
Hugging Face's ``ViTModel`` (without its pooler), weight for weight.

Explained in the book chapter *Applications: vision*.
"""

from __future__ import annotations

import torch
from torch import nn

from companion.torch.models import TransformerBlock
from companion.torch.positions import sinusoidal_positions

__all__ = [
    "PatchEmbedding",
    "EncoderBlock",
    "VisionTransformer",
    "sinusoidal_positions_2d",
]

POOLINGS = ("cls", "mean")
VIT_POSITIONS = ("learned", "sinusoidal")


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


def _check_divides(patch_size: int, image_size: int, what: str) -> None:
    if image_size % patch_size:
        raise ValueError(
            f"patch_size={patch_size} must divide the image {what} {image_size}"
        )


def sinusoidal_positions_2d(rows: int, columns: int, dim: int, *, dtype=None):
    """A fixed 2-D table ``(rows * columns, dim)`` for a grid of patches, row-major.

    The first ``dim / 2`` features are the 1-D sinusoidal table
    (:func:`companion.torch.sinusoidal_positions`) of the patch's row, the last
    ``dim / 2`` that of its column, so a patch's position is two 1-D positions side
    by side: the construction of MAE and MoCo v3, whose tables differ in layout (all
    sines before all cosines in each half; MAE puts the column's half first).
    ``dim`` must be a multiple of 4.
    """
    rows = _check_positive_int("rows", rows)
    columns = _check_positive_int("columns", columns)
    dim = _check_positive_int("dim", dim)
    if dim % 4:
        raise ValueError(f"dim must be a multiple of 4, got {dim}")
    half = dim // 2
    # computed in float64, rounded once at the end
    row_table = sinusoidal_positions(rows, half, dtype=torch.float64)  # (rows, E/2)
    col_table = sinusoidal_positions(columns, half, dtype=torch.float64)  # (cols, E/2)
    table = torch.cat(
        [
            row_table[:, None, :].expand(rows, columns, half),  # (rows, cols, E/2)
            col_table[None, :, :].expand(rows, columns, half),  # (rows, cols, E/2)
        ],
        dim=-1,
    )  # (rows, cols, E)
    table = table.reshape(rows * columns, dim)  # (N, E)
    return table if dtype is None else table.to(dtype)


class PatchEmbedding(nn.Module):
    r"""One linear map applied to every ``p x p`` patch: ``(B, C, H, W) -> (B, N, E)``.

    ``weight (E, C p p)`` and ``bias (E,)`` are shared by all ``N = (H/p)(W/p)``
    patches, exactly as a convolution shares its kernel across positions; the two
    computations are the same function:

    * :meth:`forward`: :meth:`patches` ``(B, N, C p p)`` times ``weight^T`` plus
      ``bias`` (a dense layer applied patch by patch);
    * :meth:`forward_conv`: ``conv2d`` with ``weight`` viewed as ``(E, C, p, p)``,
      kernel = stride = ``p``, flattened row-major (what Hugging Face's ``ViTModel``
      computes).

    Patches are read row-major (left to right, then down); inside a patch the features
    are ordered ``(channel, row, column)``, the layout of a ``Conv2d`` kernel.
    Initialised like ``nn.Conv2d(C, E, p, stride=p)``.
    """

    def __init__(self, in_channels: int, embed_dim: int, patch_size: int):
        super().__init__()
        self.in_channels = _check_positive_int("in_channels", in_channels)
        self.embed_dim = _check_positive_int("embed_dim", embed_dim)
        self.patch_size = _check_positive_int("patch_size", patch_size)
        p = self.patch_size
        # [book: patch embedding parameters]
        self.weight = nn.Parameter(torch.empty(embed_dim, in_channels * p * p))
        self.bias = nn.Parameter(torch.empty(embed_dim))
        # [/book: patch embedding parameters]
        conv = nn.Conv2d(in_channels, embed_dim, p, stride=p)  # for its initialisation
        with torch.no_grad():
            self.weight.copy_(conv.weight.reshape(embed_dim, -1))
            self.bias.copy_(conv.bias)

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, embed_dim={self.embed_dim}, "
            f"patch_size={self.patch_size}"
        )

    def _check_images(self, images) -> None:
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            raise ValueError(
                "images must be a tensor of shape (B, C, H, W), got "
                f"{getattr(images, 'shape', type(images).__name__)}"
            )
        if images.shape[1] != self.in_channels:
            raise ValueError(
                f"images must have {self.in_channels} channels, got shape "
                f"{tuple(images.shape)}"
            )
        _check_divides(self.patch_size, images.shape[2], "height")
        _check_divides(self.patch_size, images.shape[3], "width")

    def patches(self, images: torch.Tensor) -> torch.Tensor:
        """``images (B, C, H, W)`` -> ``(B, N, C p p)``: the flattened patches."""
        self._check_images(images)
        B, C, H, W = images.shape
        p = self.patch_size
        # [book: cut into patches]
        x = images.reshape(B, C, H // p, p, W // p, p)  # (B, C, H/p, p, W/p, p)
        x = x.permute(0, 2, 4, 1, 3, 5)  # (B, H/p, W/p, C, p, p)
        return x.reshape(B, (H // p) * (W // p), C * p * p)  # (B, N, C p p)
        # [/book: cut into patches]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``images (B, C, H, W)`` -> tokens ``(B, N, E)``: every patch times the same
        ``weight``."""
        # [book: one map for every patch]
        patches = self.patches(images)  # (B, N, C p p)
        return patches @ self.weight.T + self.bias  # (B, N, E)
        # [/book: one map for every patch]

    def forward_conv(self, images: torch.Tensor) -> torch.Tensor:
        """The same tokens ``(B, N, E)`` as a convolution with kernel = stride = ``p``,
        using the same parameters (``weight`` viewed as ``(E, C, p, p)``)."""
        self._check_images(images)
        p = self.patch_size
        kernel = self.weight.reshape(self.embed_dim, self.in_channels, p, p)
        # [book: patches as a convolution]
        # (B, E, H/p, W/p)
        maps = nn.functional.conv2d(images, kernel, self.bias, stride=p)
        return maps.flatten(2).transpose(1, 2)  # (B, N, E), row-major
        # [/book: patches as a convolution]


class EncoderBlock(TransformerBlock):
    """:class:`companion.torch.models.TransformerBlock` with bidirectional attention:
    every token attends to every token (ViT, BERT). Same parameters and keywords."""

    def forward(self, x: torch.Tensor, *, return_weights: bool = False, mask=None):
        """``x (B, T, E)`` -> ``(B, T, E)``, and weights ``(B, H, T, T)`` or ``None``.

        ``mask`` (boolean, ``True`` = attend, or additive) as in
        :class:`companion.torch.multihead.MultiHeadAttention`.
        """
        h = self.norm1(x) if self.norm_first else x  # (B, T, E)
        if return_weights:
            # (B, T, E), (B, H, T, T)
            attended, weights = self.attention(h, mask=mask, return_weights=True)
        else:
            attended, weights = self.attention(h, mask=mask), None  # (B, T, E)
        if self.norm_first:
            x = x + attended  # (B, T, E)
            return x + self.mlp(self.norm2(x)), weights  # (B, T, E)
        x = self.norm1(x + attended)  # (B, T, E)
        return self.norm2(x + self.mlp(x)), weights  # (B, T, E)


class VisionTransformer(nn.Module):
    r"""A small ViT classifier: ``images (B, C, H, W)`` -> ``logits (B, num_classes)``.

    * ``pooling="cls"``: a learned class token is prepended to the ``N`` patch tokens
      and the classifier reads its final state (ViT, BERT); ``pooling="mean"``: no class
      token, the classifier reads the mean of the ``N`` final patch states.
    * ``positions="learned"``: a table ``(T, E)`` of parameters added to the tokens
      (``T = N`` or ``N + 1``); ``positions="sinusoidal"``: the fixed 2-D table of
      :func:`sinusoidal_positions_2d` (no parameters; the class token gets position 0,
      a row of zeros, as in MAE).

    ``embed_dim``, ``num_heads``, ``num_layers``, ``mlp_hidden`` (default ``4E``),
    ``norm_eps`` and ``mlp`` shape the pre-norm :class:`EncoderBlock` stack. The class
    token and learned positions start from ``N(0, 0.02^2)``.
    """

    def __init__(
        self,
        image_size: int,
        patch_size: int,
        num_classes: int,
        *,
        in_channels: int = 1,
        embed_dim: int = 32,
        num_heads: int = 4,
        num_layers: int = 2,
        mlp_hidden: int | None = None,
        mlp: str = "gelu",
        norm_eps: float = 1e-5,
        pooling: str = "cls",
        positions: str = "learned",
    ):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if positions not in VIT_POSITIONS:
            raise ValueError(
                f"positions must be one of {VIT_POSITIONS}, got {positions!r}"
            )
        image_size = _check_positive_int("image_size", image_size)
        patch_size = _check_positive_int("patch_size", patch_size)
        _check_divides(patch_size, image_size, "size")
        num_classes = _check_positive_int("num_classes", num_classes)
        self.image_size, self.patch_size = image_size, patch_size
        self.grid = image_size // patch_size  # patches per side
        self.num_patches = self.grid * self.grid
        self.pooling, self.positions = pooling, positions
        num_tokens = self.num_patches + (1 if pooling == "cls" else 0)
        # [book: vit parts]
        self.patch_embedding = PatchEmbedding(in_channels, embed_dim, patch_size)
        self.class_token = (
            nn.Parameter(torch.empty(1, 1, embed_dim)) if pooling == "cls" else None
        )
        self.position_embedding = (
            nn.Parameter(torch.empty(1, num_tokens, embed_dim))
            if positions == "learned"
            else None
        )
        self.blocks = nn.ModuleList(
            EncoderBlock(
                embed_dim, num_heads, norm_eps=norm_eps, mlp=mlp, mlp_hidden=mlp_hidden
            )
            for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)
        self.head = nn.Linear(embed_dim, num_classes)
        # [/book: vit parts]
        for table in (self.class_token, self.position_embedding):
            if table is not None:
                nn.init.trunc_normal_(table, std=0.02)

    @property
    def position_table(self) -> torch.Tensor:
        """The positions added to the tokens, ``(T, E)``: the learned table, or the
        fixed 2-D sinusoidal one in float64 (a zero row first for the class token)."""
        if self.position_embedding is not None:
            return self.position_embedding[0]
        E = self.patch_embedding.embed_dim
        table = sinusoidal_positions_2d(self.grid, self.grid, E, dtype=torch.float64)
        if self.class_token is not None:
            table = torch.cat([table.new_zeros(1, E), table])  # (N + 1, E)
        return table

    def encode(self, images: torch.Tensor, *, return_weights: bool = False):
        """``images (B, C, H, W)`` -> the normed final states ``(B, T, E)`` (class token
        first with ``pooling="cls"``); with ``return_weights``, also each block's
        attention weights ``(B, heads, T, T)`` in a list."""
        if (
            isinstance(images, torch.Tensor)
            and images.dim() == 4
            and tuple(images.shape[2:]) != (self.image_size, self.image_size)
        ):
            raise ValueError(
                f"images must be {self.image_size} x {self.image_size}, got shape "
                f"{tuple(images.shape)}"
            )
        # [book: vit forward]
        x = self.patch_embedding(images)  # (B, N, E)
        if self.class_token is not None:
            cls = self.class_token.expand(x.shape[0], -1, -1)  # (B, 1, E)
            x = torch.cat([cls, x], dim=1)  # (B, N + 1, E)
        x = x + self.position_table.to(dtype=x.dtype, device=x.device)  # (B, T, E)
        all_weights = []
        for block in self.blocks:
            x, weights = block(x, return_weights=return_weights)  # (B, T, E)
            all_weights.append(weights)
        x = self.norm(x)  # (B, T, E)
        # [/book: vit forward]
        return (x, all_weights) if return_weights else x

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``images (B, C, H, W)`` -> ``logits (B, num_classes)``."""
        states = self.encode(images)  # (B, T, E)
        # [book: vit pooling]
        if self.pooling == "cls":
            pooled = states[:, 0]  # (B, E): the class token
        else:
            pooled = states.mean(dim=1)  # (B, E): the mean over patches
        return self.head(pooled)  # (B, num_classes)
        # [/book: vit pooling]
