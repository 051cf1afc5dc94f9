r"""Small models for the application chapters, built from the package's pieces.

Vision, three networks of the same depth (two feature layers and a classifier) for
``(B, 1, H, W)`` images, which differ in how they share weights across positions:

* :class:`MLPClassifier`: dense layers on the flattened image, one weight per pixel
  per unit;
* :class:`LocallyConnectedNet`: the convolutional network's receptive fields with a
  kernel of its own at every position (:class:`LocallyConnected2d`, built on
  :func:`companion.torch.conv.locally_connected2d`);
* :class:`SmallCNN`: the same network with one kernel shared by every position.

Both image networks end with a global max over positions, so the classifier itself sees
no position: the only difference between them is weight sharing.

Language: :class:`TinyTransformerLM`, a decoder-only transformer (blocks of
:class:`companion.torch.multihead.MultiHeadAttention` and an MLP, with swappable norms,
MLPs and position schemes) whose output layer is the token embedding itself
(:class:`companion.torch.sharing.TiedLMHead`) or, with ``tied=False``, a matrix of its
own; :func:`generate` decodes greedily, with or without a
:class:`companion.torch.multihead.KVCache` per layer.

Explained in the book chapters *Applications: vision*, *Applications: language* and
(the block, its parts and the positions) *Positions and the transformer block*.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from companion._tiling import check_window
from companion.numpy.conv import conv2d_output_size
from companion.torch.conv import locally_connected2d
from companion.torch.multihead import KVCache, MultiHeadAttention
from companion.torch.positions import alibi_bias, sinusoidal_positions
from companion.torch.sharing import TiedLMHead

__all__ = [
    "LocallyConnected2d",
    "MLPClassifier",
    "LocallyConnectedNet",
    "SmallCNN",
    "make_norm",
    "make_mlp",
    "SwiGLU",
    "GeGLU",
    "TransformerBlock",
    "TinyTransformerLM",
    "generate",
]


def attention_options(
    norm: str,
    norm_eps: float,
    head_dim: int | None = None,
    qk_norm: bool = False,
    attention_scale: float | None = None,
    attn_softcap: float | None = None,
) -> dict:
    """The keywords of :class:`MultiHeadAttention` for a block's options (empty for
    the defaults, so a default block builds the attention it always built)."""
    options = {}
    if head_dim is not None:
        options["head_dim"] = head_dim
    if qk_norm:
        options.update(qk_norm=norm, qk_norm_eps=norm_eps)
    if attention_scale is not None:
        options["scale"] = attention_scale
    if attn_softcap is not None:
        options["softcap"] = attn_softcap
    return options


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


# --- vision ---------------------------------------------------------------------------


class LocallyConnected2d(nn.Module):
    r"""A convolution's receptive fields without sharing: a kernel per output position.

    ``weight (H_out, W_out, C_out, C_in, kH, kW)`` and ``bias (H_out, W_out, C_out)``:
    the parameters of a ``Conv2d(C_in, C_out, kernel_size)`` times ``H_out * W_out``.
    The input size must be fixed at construction, since the number of kernels depends
    on it.
    Initialised like ``nn.Conv2d`` (uniform in :math:`\pm 1/\sqrt{C_{in} k_H k_W}`).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        input_size,
        *,
        padding=0,
        bias: bool = True,
    ):
        super().__init__()
        kH, kW = _pair(kernel_size)
        self.padding = padding
        # (H_out, W_out)
        self.output_size = conv2d_output_size(input_size, (kH, kW), padding=padding)
        H_out, W_out = self.output_size
        # [book: locally connected weights]
        self.weight = nn.Parameter(
            torch.empty(H_out, W_out, out_channels, in_channels, kH, kW)
        )
        self.bias = (
            nn.Parameter(torch.empty(H_out, W_out, out_channels)) if bias else None
        )
        # [/book: locally connected weights]
        bound = 1.0 / math.sqrt(in_channels * kH * kW)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (B, C_in, H, W)`` -> ``(B, C_out, H_out, W_out)``."""
        # (B, C_out, H_out, W_out)
        return locally_connected2d(x, self.weight, self.bias, padding=self.padding)


class MLPClassifier(nn.Module):
    """Dense layers on the flattened image: ``(B, C, H, W)`` -> ``(B, num_classes)``.

    ``hidden`` gives the widths of the hidden layers (ReLU after each); every
    first-layer weight belongs to one pixel, so nothing learned at one position
    transfers to another.
    """

    def __init__(
        self, image_size: int, num_classes: int, hidden=(64, 64), in_channels: int = 1
    ):
        super().__init__()
        # [book: mlp layers]
        widths = [in_channels * image_size * image_size, *hidden]
        layers = []
        for width_in, width_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(width_in, width_out), nn.ReLU()]
        self.features = nn.Sequential(nn.Flatten(), *layers)
        # [/book: mlp layers]
        self.classifier = nn.Linear(widths[-1], num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # (B, C H W) -> (B, hidden) -> (B, num_classes)
        return self.classifier(self.features(images))


class _PositionPooledNet(nn.Module):
    """Two feature layers (ReLU), a global max over positions, a linear classifier."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # [book: position-pooled forward]
        x = torch.relu(self.layer1(images))  # (B, C_1, H, W)
        x = torch.relu(self.layer2(x))  # (B, C_2, H, W)
        x = x.amax(dim=(2, 3))  # (B, C_2): the strongest response anywhere
        return self.classifier(x)  # (B, num_classes)
        # [/book: position-pooled forward]


class SmallCNN(_PositionPooledNet):
    """Two ``kernel_size`` convolutions ('same' size), a global max, a linear layer.

    ``(B, in_channels, H, W)`` -> logits ``(B, num_classes)``; works for any image size,
    since no parameter belongs to a position.
    """

    def __init__(
        self,
        num_classes: int,
        channels=(8, 16),
        kernel_size: int = 3,
        in_channels: int = 1,
    ):
        super().__init__()
        c1, c2 = channels
        # [book: cnn layers]
        # one kernel, every position
        self.layer1 = nn.Conv2d(in_channels, c1, kernel_size, padding=kernel_size // 2)
        self.layer2 = nn.Conv2d(c1, c2, kernel_size, padding=kernel_size // 2)
        # [/book: cnn layers]
        self.classifier = nn.Linear(c2, num_classes)


class LocallyConnectedNet(_PositionPooledNet):
    """:class:`SmallCNN` with :class:`LocallyConnected2d` layers: a kernel per position.

    ``(B, in_channels, image_size, image_size)`` -> logits ``(B, num_classes)``; the
    layers have ``image_size ** 2`` times the convolution's parameters.
    """

    def __init__(
        self,
        image_size: int,
        num_classes: int,
        channels=(8, 16),
        kernel_size: int = 3,
        in_channels: int = 1,
    ):
        super().__init__()
        c1, c2 = channels
        pad = kernel_size // 2
        # [book: locally connected layers]
        self.layer1 = LocallyConnected2d(
            in_channels, c1, kernel_size, image_size, padding=pad
        )
        self.layer2 = LocallyConnected2d(c1, c2, kernel_size, image_size, padding=pad)
        # [/book: locally connected layers]
        self.classifier = nn.Linear(c2, num_classes)


# --- language -------------------------------------------------------------------------


NORMS = ("layer", "rms")
MLPS = ("gelu", "gelu_tanh", "swiglu", "geglu", "geglu_tanh")
POSITIONS = ("learned", "sinusoidal", "rope", "alibi", None)


def make_norm(kind: str, embed_dim: int, *, eps: float = 1e-5) -> nn.Module:
    r"""``"layer"``: ``nn.LayerNorm`` (centre, scale, shift); ``"rms"``: ``nn.RMSNorm``.

    .. math::

        \mathrm{LN}(x) = \gamma \odot \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}}
        + \beta, \qquad
        \mathrm{RMS}(x) = \gamma \odot \frac{x}{\sqrt{\overline{x^2} + \epsilon}}

    RMSNorm (Zhang and Sennrich 2019) drops the mean and the shift: one reduction
    instead of two, ``E`` parameters instead of ``2E``.
    """
    if kind == "layer":
        return nn.LayerNorm(embed_dim, eps=eps)
    if kind == "rms":
        return nn.RMSNorm(embed_dim, eps=eps)
    raise ValueError(f"norm must be one of {NORMS}, got {kind!r}")


class SwiGLU(nn.Module):
    r"""The gated MLP of PaLM and Llama (Shazeer 2020): ``(silu(x W_g) * x W_u) W_d``.

    Three ``E x hidden`` matrices instead of two, so ``hidden`` defaults to ``8E/3``
    (rounded down): about the ``8 E^2`` weights of a ``4E`` GELU MLP. No biases, as in
    Llama.
    """

    def __init__(self, embed_dim: int, hidden_dim: int, *, bias: bool = False):
        super().__init__()
        self.gate = nn.Linear(embed_dim, hidden_dim, bias=bias)
        self.up = nn.Linear(embed_dim, hidden_dim, bias=bias)
        self.down = nn.Linear(hidden_dim, embed_dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, T, hidden): silu(x W_gate) * (x W_up)
        gated = nn.functional.silu(self.gate(x)) * self.up(x)
        return self.down(gated)  # (B, T, E)


class GeGLU(SwiGLU):
    r"""The gated MLP with GELU for SiLU (Shazeer 2020; Gemma):
    ``(gelu(x W_g) * x W_u) W_d``, the parameters of :class:`SwiGLU`.

    ``approximate="tanh"`` is GELU's tanh approximation, what Gemma calls
    ``gelu_pytorch_tanh``.
    """

    def __init__(
        self,
        embed_dim: int,
        hidden_dim: int,
        *,
        bias: bool = False,
        approximate: str = "none",
    ):
        super().__init__(embed_dim, hidden_dim, bias=bias)
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, T, hidden): gelu(x W_gate) * (x W_up)
        act = nn.functional.gelu(self.gate(x), approximate=self.approximate)
        return self.down(act * self.up(x))  # (B, T, E)


def make_mlp(kind: str, embed_dim: int, hidden_dim: int | None = None) -> nn.Module:
    """The position-wise MLP: ``"gelu"`` (exact erf GELU, ``E -> 4E -> E``),
    ``"gelu_tanh"`` (GPT-2's tanh approximation), ``"swiglu"`` (:class:`SwiGLU`),
    ``"geglu"`` or ``"geglu_tanh"`` (:class:`GeGLU`, exact or tanh GELU; Gemma's is
    ``"geglu_tanh"``). The gated ones default to ``8E/3`` hidden units."""
    if kind in ("gelu", "gelu_tanh"):
        hidden = 4 * embed_dim if hidden_dim is None else hidden_dim
        return nn.Sequential(
            nn.Linear(embed_dim, hidden),
            nn.GELU(approximate="tanh" if kind == "gelu_tanh" else "none"),
            nn.Linear(hidden, embed_dim),
        )
    if kind in ("swiglu", "geglu", "geglu_tanh"):
        hidden = 8 * embed_dim // 3 if hidden_dim is None else hidden_dim
        if kind == "swiglu":
            return SwiGLU(embed_dim, hidden)
        return GeGLU(
            embed_dim, hidden, approximate="tanh" if kind == "geglu_tanh" else "none"
        )
    raise ValueError(f"mlp must be one of {MLPS}, got {kind!r}")


class TransformerBlock(nn.Module):
    r"""A decoder block with named, swappable parts; causal self-attention.

    .. code-block:: text

        pre-norm (norm_first=True, GPT-2, Llama)    post-norm (norm_first=False, 2017)
        x = x + attention(norm1(x))                 x = norm1(x + attention(x))
        x = x + mlp(norm2(x))                       x = norm2(x + mlp(x))

    ``attention`` is :class:`companion.torch.multihead.MultiHeadAttention` with
    ``causal=True`` (bottom-right aligned, so new tokens fed after a :class:`KVCache`
    see every cached position), ``num_kv_heads`` for grouped-query heads and ``rope``
    for rotary embeddings; ``norm`` is ``"layer"`` or ``"rms"`` (:func:`make_norm`, eps
    ``norm_eps``); ``mlp`` is ``"gelu"``, ``"gelu_tanh"`` or ``"swiglu"``
    (:func:`make_mlp`). The defaults are a GPT-style pre-norm block with an exact-GELU
    ``E -> 4E -> E`` MLP.

    Options of today's blocks (the defaults leave the block as above):

    * ``head_dim``: ``D`` independent of ``E // H`` (Qwen3, Gemma 3);
    * ``qk_norm=True``: queries and keys normalised per head over ``D`` (a ``norm``
      of ``D`` features shared by the heads, before the rotation; Qwen3, Gemma 3);
    * ``attention_scale``: the scores' scale instead of ``1/sqrt(D)`` (Gemma 3:
      ``query_pre_attn_scalar ** -0.5``);
    * ``attn_softcap=c``: scores ``c tanh(s / c)``, so ``|s| < c`` (Gemma 2). Torch's
      fused kernel and the tiled one never form the scores, so this block computes
      the reference attention (an ``implementation`` of ``"sdpa"`` or ``"tiled"``
      is a ``ValueError``);
    * ``window=W``: sliding-window attention, each position seeing itself and the
      ``W - 1`` before it (Mistral's ``sliding_window``); a rolling
      ``KVCache(max_length=W)`` holds all such a layer needs;
    * ``post_norms=True``: "sandwich" norms (Gemma 2 and 3), a norm on the output of
      the attention and of the MLP before each is added to the residual stream::

          x = x + post_attention_norm(attention(norm1(x)))
          x = x + post_mlp_norm(mlp(norm2(x)))
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        num_kv_heads: int | None = None,
        norm: str = "layer",
        norm_eps: float = 1e-5,
        norm_first: bool = True,
        mlp: str = "gelu",
        mlp_hidden: int | None = None,
        rope=None,
        head_dim: int | None = None,
        qk_norm: bool = False,
        attention_scale: float | None = None,
        attn_softcap: float | None = None,
        window: int | None = None,
        post_norms: bool = False,
    ):
        super().__init__()
        for name, flag in (
            ("norm_first", norm_first),
            ("qk_norm", qk_norm),
            ("post_norms", post_norms),
        ):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be True or False, got {flag!r}")
        if post_norms and not norm_first:
            raise ValueError(
                "post_norms=True adds norms to a pre-norm block: it needs "
                "norm_first=True"
            )
        # [book: block parts]
        self.window = check_window(window)
        # head_dim, qk_norm, scale, softcap (none of them by default)
        options = attention_options(
            norm, norm_eps, head_dim, qk_norm, attention_scale, attn_softcap
        )
        self.norm_first = norm_first
        self.norm1 = make_norm(norm, embed_dim, eps=norm_eps)
        self.attention = MultiHeadAttention(
            embed_dim, num_heads, num_kv_heads, rope=rope, **options
        )
        self.norm2 = make_norm(norm, embed_dim, eps=norm_eps)
        self.mlp = make_mlp(mlp, embed_dim, mlp_hidden)
        self.post_attention_norm = self.post_mlp_norm = None
        if post_norms:
            self.post_attention_norm = make_norm(norm, embed_dim, eps=norm_eps)
            self.post_mlp_norm = make_norm(norm, embed_dim, eps=norm_eps)
        # [/book: block parts]

    def forward(
        self,
        x: torch.Tensor,
        *,
        cache: KVCache | None = None,
        return_weights: bool = False,
        mask=None,
    ):
        """``x (B, T, E)`` -> ``(B, T, E)``, and weights ``(B, H, T, S)`` or ``None``.

        ``mask`` (e.g. an ALiBi bias ``(H, T, S)``) is added to the scores, with the
        causal mask.
        """
        # [book: block forward]
        h = self.norm1(x) if self.norm_first else x  # (B, T, E)
        kwargs = dict(causal=True, cache=cache, mask=mask, window=self.window)
        if return_weights:
            # (B, T, E), (B, H, T, S)
            attended, weights = self.attention(h, return_weights=True, **kwargs)
        else:
            attended, weights = self.attention(h, **kwargs), None  # (B, T, E)
        if self.post_attention_norm is not None:  # sandwich norms (Gemma)
            return self._sandwich(x, attended), weights
        if self.norm_first:
            x = x + attended  # (B, T, E): the residual stream
            return x + self.mlp(self.norm2(x)), weights  # (B, T, E)
        x = self.norm1(x + attended)  # (B, T, E)
        return self.norm2(x + self.mlp(x)), weights  # (B, T, E)
        # [/book: block forward]

    def _sandwich(self, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """The rest of a block with ``post_norms=True``: ``(B, T, E)`` -> same."""
        x = x + self.post_attention_norm(attended)  # (B, T, E)
        return x + self.post_mlp_norm(self.mlp(self.norm2(x)))  # (B, T, E)


class TinyTransformerLM(nn.Module):
    r"""A small decoder-only transformer language model, tied (or untied) embeddings.

    .. math::

        h_0 = W_E[\text{ids}] + P[\text{positions}], \quad
        h_\ell = \text{block}_\ell(h_{\ell-1}), \quad
        \text{logits} = \mathrm{LN}(h_n)\, W_{out}^\top, \qquad
        W_{out} = W_E \text{ if tied}

    ``ids (B, T)`` -> ``logits (B, T, V)``. With ``tied=True`` the output layer is a
    :class:`companion.torch.sharing.TiedLMHead` holding the embedding's own
    ``nn.Parameter`` (``model.head.weight is model.embedding.weight``); with
    ``tied=False`` it is an ``nn.Linear(E, V, bias=False)`` of its own, exactly
    ``V * E`` more parameters. Embeddings and the untied head start from
    ``N(0, 0.02^2)`` as in GPT-2.

    ``positions`` says where the model learns order from:

    * ``"learned"``: a table ``P (max_length, E)`` added to the embeddings (GPT-2);
    * ``"sinusoidal"``: Vaswani et al.'s fixed table, added (no parameters);
    * ``"rope"``: rotary embeddings of the queries and keys in every block;
    * ``"alibi"``: ALiBi's distance penalty added to the scores in every block;
    * ``None``: nothing; only the causal mask breaks the symmetry.

    ``norm``, ``norm_eps``, ``norm_first``, ``mlp`` and ``num_kv_heads`` are passed to
    every :class:`TransformerBlock`; the final norm is ``norm`` too. The defaults are
    the learned-position, pre-LayerNorm, exact-GELU model of the language chapter.
    """

    def __init__(
        self,
        vocab_size: int,
        max_length: int,
        *,
        embed_dim: int = 64,
        num_heads: int = 4,
        num_layers: int = 2,
        tied: bool = True,
        positions: str | None = "learned",
        num_kv_heads: int | None = None,
        norm: str = "layer",
        norm_eps: float = 1e-5,
        norm_first: bool = True,
        mlp: str = "gelu",
    ):
        super().__init__()
        if positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
        self.vocab_size, self.max_length, self.tied = vocab_size, max_length, bool(tied)
        self.positions, self.num_heads = positions, num_heads
        # [book: lm parts]
        self.embedding = nn.Embedding(vocab_size, embed_dim)  # W_E (V, E)
        self.position_embedding = None
        if positions == "learned":
            # P (max_length, E)
            self.position_embedding = nn.Embedding(max_length, embed_dim)
        block = dict(
            num_kv_heads=num_kv_heads,
            norm=norm,
            norm_eps=norm_eps,
            norm_first=norm_first,
            mlp=mlp,
            rope=True if positions == "rope" else None,
        )
        self.blocks = nn.ModuleList(
            TransformerBlock(embed_dim, num_heads, **block) for _ in range(num_layers)
        )
        self.norm = make_norm(norm, embed_dim, eps=norm_eps)
        if self.tied:
            self.head = TiedLMHead(self.embedding)  # W_out is W_E: one (V, E) parameter
        else:
            # W_out (V, E), a second matrix
            self.head = nn.Linear(embed_dim, vocab_size, bias=False)
        # [/book: lm parts]
        for weight in (
            self.embedding.weight,
            *(
                ()
                if self.position_embedding is None
                else (self.position_embedding.weight,)
            ),
            self.head.weight,
        ):
            nn.init.normal_(weight, std=0.02)

    @property
    def position_table(self) -> torch.Tensor | None:
        """The sinusoidal table ``(max_length, E)`` in float64, or ``None``.

        Fixed, so not a parameter and not in the state dict; it is computed in float64
        and rounded once to the model's dtype in :meth:`forward` (as in
        :class:`companion.torch.seq2seq.Seq2SeqTransformer`), so a model converted
        with ``.double()`` adds the exact float64 table, not a float32 one widened.
        """
        if self.positions != "sinusoidal":
            return None
        # (max_length, E)
        E = self.embedding.embedding_dim
        return sinusoidal_positions(self.max_length, E, dtype=torch.float64)

    def new_caches(self) -> list[KVCache]:
        """One empty :class:`KVCache` per block, for ``forward(ids, caches=...)``."""
        return [KVCache() for _ in self.blocks]

    def forward(
        self,
        ids: torch.Tensor,
        *,
        caches: list[KVCache] | None = None,
        return_weights: bool = False,
    ):
        """``ids (B, T)`` -> ``logits (B, T, V)`` (and the weights ``(B, H, T, S)``).

        With ``caches`` (from :meth:`new_caches`), ``ids`` continue the cached sequence:
        their positions start at the positions seen, and each block appends their keys
        and values to its cache.
        """
        if (
            not isinstance(ids, torch.Tensor)
            or ids.dim() != 2
            or ids.dtype.is_floating_point
        ):
            raise ValueError(
                f"ids must be an integer tensor of shape (B, T), got "
                f"{getattr(ids, 'shape', type(ids).__name__)}"
            )
        if caches is not None and len(caches) != len(self.blocks):
            raise ValueError(
                f"caches must hold one KVCache per block ({len(self.blocks)}), "
                f"got {len(caches)}"
            )
        start = 0 if caches is None else caches[0].seen
        T = ids.shape[1]
        if start + T > self.max_length:
            raise ValueError(
                f"positions {start}..{start + T - 1} exceed "
                f"max_length={self.max_length}"
            )
        # [book: lm forward]
        x = self.embedding(ids)  # (B, T, E): W_E[ids]
        if self.positions == "learned":
            positions = torch.arange(start, start + T, device=ids.device)  # (T,)
            x = x + self.position_embedding(positions)  # (B, T, E): + P[positions]
        elif self.positions == "sinusoidal":
            # computed in float64, rounded once to the embedding's dtype: (T, E)
            table = sinusoidal_positions(start + T, x.shape[-1], dtype=torch.float64)
            x = x + table[start:].to(dtype=x.dtype, device=x.device)  # (B, T, E)
        mask = None
        if self.positions == "alibi":
            S = T + (0 if caches is None else _visible_cached(caches[0]))
            # (H, T, S): -m_h |i - j|, added to the scores
            mask = alibi_bias(self.num_heads, T, S, dtype=x.dtype).to(x.device)
        all_weights = []
        for i, block in enumerate(self.blocks):
            x, weights = block(
                x,
                cache=None if caches is None else caches[i],
                return_weights=return_weights,
                mask=mask,
            )
            all_weights.append(weights)
        logits = self.head(self.norm(x))  # (B, T, V): LN(h) W_out^T
        # [/book: lm forward]
        return (logits, all_weights) if return_weights else logits


def _visible_cached(cache: KVCache) -> int:
    """Cached positions the next tokens attend to: all of them, or for a rolling cache
    (``max_length=W``) the last ``W - 1`` (what its ``append`` returns)."""
    W = cache.max_length
    return cache.length if W is None else min(cache.length, W - 1)


@torch.no_grad()
def generate(
    model: TinyTransformerLM,
    prompt: torch.Tensor,
    steps: int,
    *,
    use_cache: bool = True,
) -> torch.Tensor:
    """Greedy decoding: append ``steps`` tokens, each the argmax of the next logits.

    ``prompt (B, T_0)`` -> ``(B, T_0 + steps)``. With ``use_cache=True`` the prompt is
    read once into one :class:`KVCache` per block and each new token costs one
    position; with ``use_cache=False`` the whole sequence is run again at every step.
    Both compute the same logits (up to rounding), so they pick the same tokens. Needs
    ``T_0 + steps - 1 <= model.max_length`` (the last token is produced, not read).
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    if not isinstance(prompt, torch.Tensor) or prompt.dim() != 2 or prompt.shape[1] < 1:
        raise ValueError(
            f"prompt must be a tensor of shape (B, T_0) with T_0 >= 1, got "
            f"{getattr(prompt, 'shape', type(prompt).__name__)}"
        )
    if prompt.shape[1] + steps - 1 > model.max_length:
        raise ValueError(
            f"prompt length {prompt.shape[1]} + steps {steps} - 1 exceeds "
            f"max_length={model.max_length}"
        )
    # [book: greedy loop]
    tokens = prompt
    caches = model.new_caches() if use_cache else None
    new_tokens = prompt  # what the model has not read yet
    for _ in range(steps):
        if use_cache:
            # (B, T_new, V): only the unread positions
            logits = model(new_tokens, caches=caches)
        else:
            logits = model(tokens)  # (B, T, V): everything again
        new_tokens = logits[:, -1].argmax(dim=-1, keepdim=True)  # (B, 1)
        tokens = torch.cat([tokens, new_tokens], dim=1)  # (B, T + 1)
    # [/book: greedy loop]
    return tokens
