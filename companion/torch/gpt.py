r"""A small GPT built from the package's
:class:`~companion.torch.models.TransformerBlock`.

.. code-block:: text

    ids (B, T) -> W_E[ids] (+ learned positions) -> L blocks -> norm -> h W_out^T

Every choice is a keyword (Llama's choices are the defaults): ``positions``
(``"rope"``, ``"learned"``, ``"alibi"``, ``None``), ``norm`` (``"rms"``, ``"layer"``),
``mlp`` (``"swiglu"``, ``"gelu"``, ``"gelu_tanh"``), ``num_kv_heads`` (grouped-query
heads; 1 is multi-query), ``tied`` (the output layer is the embedding),
``shared_blocks`` (ALBERT: one block applied ``num_layers`` times) and
``implementation``:

* ``"sdpa"`` (default): ``torch.nn.functional.scaled_dot_product_attention`` on 4-D
  ``(B, H, T, D)`` tensors with ``is_causal=True`` and ``enable_gqa`` (the key/value
  heads are not copied), so that torch may pick its fused flash kernel;
* ``"reference"``, ``"tiled"``, ``"auto"``: the package's own kernels.

Each is an ``implementation`` of :class:`~companion.torch.multihead.MultiHeadAttention`,
the attention of every block.

All four compute the same function (tested); ``"sdpa"`` is the fast one.
:func:`generate` draws tokens with :func:`companion.torch.sampling.sample`, with or
without a :class:`~companion.torch.multihead.KVCache` per layer (the same tokens).
:meth:`GPT.checkpoint` and :meth:`GPT.load_checkpoint` store the configuration beside
the weights; a checkpoint of another configuration is a ``ValueError`` naming what
differs.
"""

from __future__ import annotations

import torch
from torch import nn

from companion.torch.models import TransformerBlock, make_norm
from companion.torch.multihead import KVCache, MultiHeadAttention
from companion.torch.positions import alibi_bias
from companion.torch.sampling import sample
from companion.torch.sharing import TiedLMHead

__all__ = ["GPT", "IMPLEMENTATIONS", "generate"]

IMPLEMENTATIONS = ("sdpa", "reference", "tiled", "auto")
POSITIONS = ("rope", "learned", "alibi", None)


def _check_implementation(implementation) -> str:
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}"
        )
    return implementation


class GPT(nn.Module):
    r"""A decoder-only language model: ``ids (B, T)`` -> ``logits (B, T, V)``.

    ``vocab_size`` tokens, at most ``context`` positions; ``embed_dim`` ``E``,
    ``num_heads`` query heads and ``num_kv_heads`` key/value heads (default: as many),
    ``num_layers`` blocks (``shared_blocks=True``: one block's parameters used at every
    layer), ``mlp_hidden`` (default: the MLP's own, ``8E/3`` for SwiGLU),
    ``attention_bias`` (biases in the four projections; Llama has none).
    Embeddings, the learned position table and the untied head start from
    ``N(0, 0.02^2)``. ``config`` holds every keyword, for checkpoints.
    """

    def __init__(
        self,
        vocab_size: int,
        context: int,
        *,
        embed_dim: int = 128,
        num_heads: int = 4,
        num_kv_heads: int | None = None,
        num_layers: int = 4,
        positions: str | None = "rope",
        rope_base: float = 10000.0,
        norm: str = "rms",
        norm_eps: float = 1e-5,
        mlp: str = "swiglu",
        mlp_hidden: int | None = None,
        attention_bias: bool = False,
        tied: bool = True,
        shared_blocks: bool = False,
        implementation: str = "sdpa",
    ):
        super().__init__()
        for name, value in (
            ("vocab_size", vocab_size),
            ("context", context),
            ("embed_dim", embed_dim),
            ("num_heads", num_heads),
            ("num_layers", num_layers),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
        _check_implementation(implementation)
        self.config = dict(
            vocab_size=vocab_size,
            context=context,
            embed_dim=embed_dim,
            num_heads=num_heads,
            num_kv_heads=num_heads if num_kv_heads is None else num_kv_heads,
            num_layers=num_layers,
            positions=positions,
            rope_base=float(rope_base),
            norm=norm,
            norm_eps=float(norm_eps),
            mlp=mlp,
            mlp_hidden=mlp_hidden,
            attention_bias=bool(attention_bias),
            tied=bool(tied),
            shared_blocks=bool(shared_blocks),
        )
        self.implementation = implementation
        self.embedding = nn.Embedding(vocab_size, embed_dim)  # W_E (V, E)
        self.position_embedding = (
            nn.Embedding(context, embed_dim) if positions == "learned" else None
        )
        rope = {"base": float(rope_base)} if positions == "rope" else None
        distinct = 1 if shared_blocks else num_layers
        self.blocks = nn.ModuleList()
        for _ in range(distinct):
            block = TransformerBlock(
                embed_dim,
                num_heads,
                num_kv_heads=num_kv_heads,
                norm=norm,
                norm_eps=norm_eps,
                mlp=mlp,
                mlp_hidden=mlp_hidden,
                rope=rope,
            )
            # the block's attention, with the kernel and projection biases chosen here
            block.attention = MultiHeadAttention(
                embed_dim,
                num_heads,
                num_kv_heads,
                bias=attention_bias,
                rope=rope,
                implementation=implementation,
            )
            self.blocks.append(block)
        self.norm = make_norm(norm, embed_dim, eps=norm_eps)
        if tied:
            self.head = TiedLMHead(self.embedding)  # W_out is W_E
        else:
            self.head = nn.Linear(embed_dim, vocab_size, bias=False)  # W_out (V, E)
        for table in (self.embedding, self.position_embedding, self.head):
            if table is not None:
                nn.init.normal_(table.weight, std=0.02)

    @property
    def layers(self) -> list[nn.Module]:
        """The block applied at each of the ``num_layers`` layers (the same object
        every time with ``shared_blocks=True``)."""
        n = self.config["num_layers"]
        return [self.blocks[0]] * n if len(self.blocks) == 1 else list(self.blocks)

    def set_implementation(self, implementation: str) -> None:
        """Switch every block's attention kernel (the weights stay)."""
        self.implementation = _check_implementation(implementation)
        for block in self.blocks:
            block.attention.implementation = implementation

    def new_caches(self) -> list[KVCache]:
        """One empty :class:`KVCache` per layer (shared blocks still need one each)."""
        return [KVCache() for _ in range(self.config["num_layers"])]

    def forward(self, ids: torch.Tensor, *, caches: list[KVCache] | None = None):
        """``ids (B, T)`` -> ``logits (B, T, V)``; with ``caches``, ``ids`` continue the
        cached sequence."""
        if (
            not isinstance(ids, torch.Tensor)
            or ids.dim() != 2
            or ids.dtype.is_floating_point
        ):
            raise ValueError(
                f"ids must be an integer tensor of shape (B, T), got "
                f"{getattr(ids, 'shape', type(ids).__name__)}"
            )
        layers = self.layers
        if caches is not None and len(caches) != len(layers):
            raise ValueError(
                f"caches must hold one KVCache per layer ({len(layers)}), "
                f"got {len(caches)}"
            )
        start = 0 if caches is None else caches[0].seen
        T = ids.shape[1]
        if start + T > self.config["context"]:
            raise ValueError(
                f"positions {start}..{start + T - 1} exceed "
                f"context={self.config['context']}"
            )
        x = self.embedding(ids)  # (B, T, E)
        if self.position_embedding is not None:
            positions = torch.arange(start, start + T, device=ids.device)  # (T,)
            x = x + self.position_embedding(positions)  # (B, T, E)
        mask = None
        if self.config["positions"] == "alibi":
            # (H, T, S): -m_h |i - j|, added to the scores
            mask = alibi_bias(self.config["num_heads"], T, start + T, dtype=x.dtype)
            mask = mask.to(x.device)
        for i, block in enumerate(layers):
            x, _ = block(x, cache=None if caches is None else caches[i], mask=mask)
        return self.head(self.norm(x))  # (B, T, V)

    def num_parameters(self) -> int:
        """Distinct parameters (a tied or shared tensor counted once)."""
        return sum(p.numel() for p in self.parameters())

    # --- checkpoints ------------------------------------------------------------------

    def checkpoint(self) -> dict:
        """``{"config": ..., "model": state_dict}``, for ``torch.save``."""
        return {"config": dict(self.config), "model": self.state_dict()}

    def load_checkpoint(self, checkpoint: dict) -> None:
        """Load the weights of :meth:`checkpoint`; a checkpoint of another
        configuration is a ``ValueError`` naming the differences."""
        if not isinstance(checkpoint, dict) or not {"config", "model"} <= set(
            checkpoint
        ):
            raise ValueError(
                "checkpoint must be a dict with 'config' and 'model' (GPT.checkpoint())"
            )
        theirs = checkpoint["config"]
        differ = {
            key: (theirs.get(key), value)
            for key, value in self.config.items()
            if theirs.get(key) != value
        }
        differ.update({k: (v, None) for k, v in theirs.items() if k not in self.config})
        if differ:
            detail = ", ".join(
                f"{k}: checkpoint {a!r}, model {b!r}" for k, (a, b) in differ.items()
            )
            raise ValueError(f"checkpoint is of another configuration ({detail})")
        self.load_state_dict(checkpoint["model"])

    @classmethod
    def from_checkpoint(cls, checkpoint: dict, **kwargs) -> "GPT":
        """A model of the checkpoint's configuration with its weights
        (``implementation`` and other non-configuration keywords from ``kwargs``)."""
        model = cls(**checkpoint["config"], **kwargs)
        model.load_checkpoint(checkpoint)
        return model


@torch.no_grad()
def generate(
    model: GPT,
    prompt: torch.Tensor,
    steps: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> torch.Tensor:
    """``prompt (B, T_0)`` -> ``(B, T_0 + steps)``: each new token drawn by
    :func:`~companion.torch.sampling.sample` from the last logits.

    With ``use_cache=True`` the prompt is read once into one :class:`KVCache` per layer
    and every step reads one position; with ``use_cache=False`` the whole sequence is
    run again. Both give the same logits (up to rounding), so the same tokens for the
    same ``generator`` seed. Needs ``T_0 + steps - 1 <= context``.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    if not isinstance(prompt, torch.Tensor) or prompt.dim() != 2 or prompt.shape[1] < 1:
        raise ValueError(
            f"prompt must be a tensor of shape (B, T_0) with T_0 >= 1, got "
            f"{getattr(prompt, 'shape', type(prompt).__name__)}"
        )
    if prompt.shape[1] + steps - 1 > model.config["context"]:
        raise ValueError(
            f"prompt length {prompt.shape[1]} + steps {steps} - 1 exceeds "
            f"context={model.config['context']}"
        )
    # checked once, before any work
    sample(torch.zeros(1, 1), temperature=temperature, top_k=top_k, top_p=top_p)
    was_training = model.training
    model.eval()
    tokens, new = prompt, prompt
    caches = model.new_caches() if use_cache else None
    try:
        for _ in range(steps):
            logits = model(new, caches=caches) if use_cache else model(tokens)
            new = sample(
                logits[:, -1],
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                generator=generator,
            )[:, None]  # (B, 1)
            tokens = torch.cat([tokens, new], dim=1)  # (B, T + 1)
    finally:
        model.train(was_training)
    return tokens
