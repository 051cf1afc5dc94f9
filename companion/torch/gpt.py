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

Today's options (Qwen3, Gemma 2 and 3), each off by default: ``head_dim``,
``qk_norm``, ``attention_scale``, ``attn_softcap``, ``post_norms`` (passed to every
:class:`~companion.torch.models.TransformerBlock`), ``window`` with ``local_global`` or
``layer_types`` (which layers slide), ``local_rope_base``, ``embedding_scale`` and
``logit_softcap`` (see :class:`GPT`). :mod:`companion.hf` builds a GPT from Hugging
Face's Qwen3 and Gemma 3 models.
:func:`generate` draws tokens with :func:`companion.torch.sampling.sample`, with or
without a :class:`~companion.torch.multihead.KVCache` per layer (the same tokens).
:meth:`GPT.checkpoint` and :meth:`GPT.load_checkpoint` store the configuration beside
the weights; a checkpoint of another configuration is a ``ValueError`` naming what
differs.
"""

from __future__ import annotations

import torch
from torch import nn

from companion._positions import as_rotary
from companion.torch.models import TransformerBlock, attention_options, make_norm
from companion.torch.multihead import KVCache, MultiHeadAttention, _check_softcap
from companion.torch.positions import alibi_bias
from companion.torch.sampling import sample
from companion.torch.sharing import TiedLMHead

__all__ = ["GPT", "IMPLEMENTATIONS", "generate"]

IMPLEMENTATIONS = ("sdpa", "reference", "tiled", "auto")
POSITIONS = ("rope", "learned", "alibi", None)
LAYER_TYPES = ("local", "global")

# today's options: (keyword, default); stored in ``config`` only when not the default,
# so that the configuration (and every checkpoint) of a model without them is as before
_OPTIONS = (
    ("head_dim", None),
    ("qk_norm", False),
    ("attention_scale", None),
    ("attn_softcap", None),
    ("post_norms", False),
    ("window", None),
    ("layer_types", None),
    ("local_rope_base", None),
    ("rope_scaling", None),
    ("embedding_scale", None),
    ("logit_softcap", None),
)


def _layer_types(num_layers: int, window, local_global, layer_types) -> list | None:
    """Which layers slide: ``"local"`` (window ``W``) or ``"global"``, per layer;
    ``None`` when no layer does."""
    if local_global is not None and layer_types is not None:
        raise ValueError(
            "give local_global or layer_types, not both: got "
            f"local_global={local_global!r} and layer_types={layer_types!r}"
        )
    if window is None:
        if local_global is not None or layer_types is not None:
            name = "local_global" if local_global is not None else "layer_types"
            raise ValueError(f"{name} says which layers slide: it needs window=W")
        return None
    if local_global is not None:
        if (
            not isinstance(local_global, (tuple, list))
            or len(local_global) != 2
            or any(isinstance(n, bool) or not isinstance(n, int) for n in local_global)
            or min(local_global) < 0
            or sum(local_global) < 1
        ):
            raise ValueError(
                "local_global must be two ints (local, global) >= 0, e.g. (5, 1) for "
                f"five sliding-window layers to one global, got {local_global!r}"
            )
        n_local, n_global = local_global
        pattern = ["local"] * n_local + ["global"] * n_global
        return [pattern[i % len(pattern)] for i in range(num_layers)]
    if layer_types is None:  # every layer slides (Mistral)
        return ["local"] * num_layers
    if isinstance(layer_types, str) or len(layer_types) != num_layers:
        raise ValueError(
            f"layer_types must be a sequence of num_layers={num_layers} entries, "
            f"got {layer_types!r}"
        )
    wrong = [t for t in layer_types if t not in LAYER_TYPES]
    if wrong:
        raise ValueError(f"layer_types entries must be in {LAYER_TYPES}, got {wrong}")
    return list(layer_types)


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

    Today's options (off by default; ``config`` holds those that are set):

    * ``head_dim``, ``qk_norm``, ``attention_scale``, ``attn_softcap``,
      ``post_norms``: as in :class:`~companion.torch.models.TransformerBlock`.
      ``attn_softcap`` needs the scores, so ``implementation`` ``"reference"`` or
      ``"auto"`` (``ValueError`` for ``"sdpa"`` and ``"tiled"``);
    * ``window=W`` with a layer pattern: ``local_global=(5, 1)`` is five
      sliding-window layers, then one global, repeated (Gemma 3; the last group may
      be cut short); ``layer_types`` names each layer ``"local"`` or ``"global"``;
      neither: every layer slides (Mistral). ``config["layer_types"]`` holds the
      list; :meth:`new_caches` gives local layers a rolling ``KVCache(max_length=W)``;
    * ``local_rope_base``: the local layers' RoPE base (Gemma 3: 10 000, the
      global ones 1 000 000);
    * ``rope_scaling``: a RoPE scaling rule (a dict of the fields of
      :class:`companion.numpy.RopeScaling`: linear, NTK-aware, dynamic, YaRN,
      Llama 3, LongRoPE) for the layers of ``rope_base``; with ``local_rope_base``
      the local layers are not scaled (Gemma 3 scales its global layers only);
    * ``embedding_scale``: the token embeddings times this number (Gemma:
      ``sqrt(E)``);
    * ``logit_softcap=c``: logits ``c tanh(z / c)`` (Gemma 2, Gemma 3 when set).

    With ``shared_blocks=True`` every layer is one block, so its layers must all be
    of one type and one RoPE base.
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
        head_dim: int | None = None,
        qk_norm: bool = False,
        attention_scale: float | None = None,
        attn_softcap: float | None = None,
        post_norms: bool = False,
        window: int | None = None,
        local_global=None,
        layer_types=None,
        local_rope_base: float | None = None,
        rope_scaling: dict | None = None,
        embedding_scale: float | None = None,
        logit_softcap: float | None = None,
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
        types = _layer_types(num_layers, window, local_global, layer_types)
        attn_softcap = _check_softcap("attn_softcap", attn_softcap)
        if attn_softcap is not None and implementation in ("sdpa", "tiled"):
            raise ValueError(
                f"attn_softcap={attn_softcap} bends the scores with tanh and "
                f"implementation={implementation!r} never forms them: use "
                "implementation='reference' or 'auto'"
            )
        if positions == "alibi" and window is not None:
            raise ValueError(
                "window with positions='alibi' is not supported: the ALiBi bias is "
                "one (H, T, S) table for every layer, and sliding layers see fewer keys"
            )
        if local_rope_base is not None and (positions != "rope" or types is None):
            raise ValueError(
                "local_rope_base is the RoPE base of the sliding-window layers: it "
                f"needs positions='rope' and window=W, got positions={positions!r}, "
                f"window={window!r}"
            )
        if rope_scaling is not None:
            if positions != "rope":
                raise ValueError(
                    f"rope_scaling needs positions='rope', got positions={positions!r}"
                )
            if not isinstance(rope_scaling, dict):
                raise TypeError(
                    "rope_scaling must be a dict of RopeScaling fields, e.g. "
                    f"{{'rope_type': 'linear', 'factor': 2.0}}, got {rope_scaling!r}"
                )
            as_rotary({"base": float(rope_base), "scaling": rope_scaling})  # checks
        if shared_blocks and (
            (types is not None and len(set(types)) > 1)
            or (local_rope_base is not None and "global" in types)
        ):
            raise ValueError(
                "shared_blocks=True applies one block at every layer: its layers "
                f"cannot mix local and global attention, got layer_types={types}"
            )
        for name, value in (
            ("embedding_scale", embedding_scale),
            ("attention_scale", attention_scale),
        ):
            _check_softcap(name, value)  # a finite number > 0, or None
        options = dict(
            head_dim=head_dim,
            qk_norm=qk_norm,
            attention_scale=None if attention_scale is None else float(attention_scale),
            attn_softcap=attn_softcap,
            post_norms=post_norms,
            window=window,
            layer_types=types,
            local_rope_base=None if local_rope_base is None else float(local_rope_base),
            rope_scaling=None if rope_scaling is None else dict(rope_scaling),
            embedding_scale=None if embedding_scale is None else float(embedding_scale),
            logit_softcap=_check_softcap("logit_softcap", logit_softcap),
        )
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
        self.config.update(
            (name, options[name]) for name, off in _OPTIONS if options[name] != off
        )
        self.implementation = implementation
        self.embedding = nn.Embedding(vocab_size, embed_dim)  # W_E (V, E)
        self.position_embedding = (
            nn.Embedding(context, embed_dim) if positions == "learned" else None
        )
        distinct = 1 if shared_blocks else num_layers
        block_options = dict(
            head_dim=head_dim,
            qk_norm=qk_norm,
            attention_scale=options["attention_scale"],
            attn_softcap=attn_softcap,
        )
        self.blocks = nn.ModuleList()
        for i in range(distinct):
            local = types is not None and types[i] == "local"
            rope = {"base": float(rope_base), "scaling": rope_scaling}
            if local and local_rope_base is not None:  # unscaled, its own base
                rope = {"base": float(local_rope_base)}
            rope = rope if positions == "rope" else None
            block = TransformerBlock(
                embed_dim,
                num_heads,
                num_kv_heads=num_kv_heads,
                norm=norm,
                norm_eps=norm_eps,
                mlp=mlp,
                mlp_hidden=mlp_hidden,
                rope=rope,
                window=window if local else None,
                post_norms=post_norms,
                **block_options,
            )
            # the block's attention, with the kernel and projection biases chosen here
            block.attention = MultiHeadAttention(
                embed_dim,
                num_heads,
                num_kv_heads,
                bias=attention_bias,
                rope=rope,
                implementation=implementation,
                **attention_options(norm, norm_eps, **block_options),
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
        """Switch every block's attention kernel (the weights stay); with
        ``attn_softcap`` only ``"reference"`` and ``"auto"``."""
        _check_implementation(implementation)
        cap = self.config.get("attn_softcap")
        if cap is not None and implementation in ("sdpa", "tiled"):
            raise ValueError(
                f"attn_softcap={cap} bends the scores with tanh and implementation="
                f"{implementation!r} never forms them: use 'reference' or 'auto'"
            )
        self.implementation = implementation
        for block in self.blocks:
            block.attention.implementation = implementation

    def new_caches(self, *, rolling: bool = True) -> list[KVCache]:
        """One empty :class:`KVCache` per layer (shared blocks still need one each).

        A sliding-window layer (``window=W``) gets a rolling ``KVCache(max_length=W)``,
        which holds the last ``W`` positions only; ``rolling=False`` gives it one that
        keeps everything (the same tokens, more memory)."""
        if not isinstance(rolling, bool):
            raise TypeError(f"rolling must be True or False, got {rolling!r}")
        return [
            KVCache(max_length=block.window if rolling else None)
            for block in self.layers
        ]

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
        if "embedding_scale" in self.config:  # Gemma: sqrt(E)
            x = x * self.config["embedding_scale"]  # (B, T, E)
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
        logits = self.head(self.norm(x))  # (B, T, V)
        cap = self.config.get("logit_softcap")
        if cap is not None:
            logits = cap * torch.tanh(logits / cap)  # (B, T, V): |z| < c
        return logits

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
