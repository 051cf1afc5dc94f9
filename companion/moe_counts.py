r"""Counting the parameters of mixture-of-experts transformers, total and active.

A token uses only ``k`` of a layer's ``N`` routed experts, so a mixture of experts has
two sizes: its **total** parameters (what memory holds) and its **active** parameters
per token (what a token's forward pass multiplies by). The active count is the total
less the ``N - k`` experts a token skips in each MoE layer; embeddings, attention,
norms, routers and shared experts are active for every token.

Counted exactly as Hugging Face transformers builds the models (``num_parameters()``
of ``MixtralForCausalLM``, ``Qwen3MoeForCausalLM``, ``DeepseekV3ForCausalLM``; buffers
such as DeepSeek-V3's balancing bias are not parameters), from the published
configurations:

=================  =================  ===================
preset             total              active per token
=================  =================  ===================
``mixtral-8x7b``   46,702,792,704     12,879,925,248
``qwen3-30b-a3b``  30,532,122,624     3,353,032,704
``deepseek-v3``    671,026,404,352    37,552,282,624
=================  =================  ===================

DeepSeek-V3 is counted without its multi-token-prediction module (Hugging Face builds
none; the released checkpoint's 685B include it). This module imports nothing but the
standard library.

Explained in the book chapter *Mixture of experts*.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

__all__ = [
    "MoEConfig",
    "MOE_PRESETS",
    "moe_parameter_breakdown",
    "moe_parameter_count",
]


@dataclass(frozen=True)
class MoEConfig:
    """The sizes of a decoder-only mixture-of-experts transformer.

    Attributes
    ----------
    vocab_size
        ``V``, rows of the token embedding
    hidden_size
        ``E``, the width of every layer
    num_layers
        the number of transformer layers
    num_heads
        query heads
    num_experts
        routed experts per MoE layer, ``N``
    top_k
        experts per token, ``k``
    moe_intermediate_size
        an expert's inner width ``I_m`` (a gated MLP: ``3 E I_m`` parameters)
    num_kv_heads
        key/value heads of grouped-query attention (``None``: ``num_heads``)
    head_dim
        the width of a head (``None``: ``E / H``)
    intermediate_size
        the dense MLP's inner width (the first ``first_dense_layers`` layers)
    num_shared_experts
        DeepSeekMoE's shared experts: one gated MLP of width ``num_shared * I_m``
    first_dense_layers
        layers with a dense MLP instead of experts (DeepSeek-V3: 3)
    qk_norm
        an RMS norm over ``head_dim`` on queries and keys (Qwen3)
    attention
        ``"gqa"`` or ``"mla"`` (multi-head latent attention, DeepSeek-V2/V3, with
        ``q_lora_rank``, ``kv_lora_rank``, ``qk_nope_head_dim``,
        ``qk_rope_head_dim``, ``v_head_dim``)
    tie_embeddings
        the LM head reuses the token embedding
    """

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_experts: int
    top_k: int
    moe_intermediate_size: int
    num_kv_heads: int | None = None
    head_dim: int | None = None
    intermediate_size: int | None = None
    num_shared_experts: int = 0
    first_dense_layers: int = 0
    qk_norm: bool = False
    attention: str = "gqa"
    q_lora_rank: int | None = None
    kv_lora_rank: int | None = None
    qk_nope_head_dim: int | None = None
    qk_rope_head_dim: int | None = None
    v_head_dim: int | None = None
    tie_embeddings: bool = False

    def replace(self, **changes) -> "MoEConfig":
        """A copy with some fields changed (``dataclasses.replace``)."""
        return replace(self, **changes)


#: The published configurations (the ``config.json`` of each checkpoint).
MOE_PRESETS: dict[str, MoEConfig] = {
    "mixtral-8x7b": MoEConfig(
        vocab_size=32000,
        hidden_size=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        num_experts=8,
        top_k=2,
        moe_intermediate_size=14336,
    ),
    "qwen3-30b-a3b": MoEConfig(
        vocab_size=151936,
        hidden_size=2048,
        num_layers=48,
        num_heads=32,
        num_kv_heads=4,
        head_dim=128,
        num_experts=128,
        top_k=8,
        moe_intermediate_size=768,
        qk_norm=True,
    ),
    "deepseek-v3": MoEConfig(
        vocab_size=129280,
        hidden_size=7168,
        num_layers=61,
        num_heads=128,
        num_experts=256,
        top_k=8,
        moe_intermediate_size=2048,
        intermediate_size=18432,
        num_shared_experts=1,
        first_dense_layers=3,
        attention="mla",
        q_lora_rank=1536,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
    ),
}


def _check(c: MoEConfig) -> None:
    for name in (
        "vocab_size",
        "hidden_size",
        "num_layers",
        "num_heads",
        "num_experts",
        "top_k",
        "moe_intermediate_size",
    ):
        value = getattr(c, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if c.top_k > c.num_experts:
        raise ValueError(
            f"top_k={c.top_k} is larger than the number of experts {c.num_experts}"
        )
    if not 0 <= c.first_dense_layers <= c.num_layers:
        raise ValueError(
            f"first_dense_layers must lie in [0, {c.num_layers}], got "
            f"{c.first_dense_layers}"
        )
    if c.first_dense_layers and not c.intermediate_size:
        raise ValueError(
            f"first_dense_layers={c.first_dense_layers} needs intermediate_size "
            "(the dense MLP's width), got None"
        )
    if c.attention not in ("gqa", "mla"):
        raise ValueError(f"attention must be 'gqa' or 'mla', got {c.attention!r}")
    if c.attention == "mla":
        for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim"):
            if not getattr(c, name):
                raise ValueError(f"attention='mla' needs {name}, got None")
        if not c.v_head_dim:
            raise ValueError("attention='mla' needs v_head_dim, got None")


def _attention(c: MoEConfig) -> tuple[int, int]:
    """(attention weights, attention norms) of one layer."""
    E, H = c.hidden_size, c.num_heads
    if c.attention == "mla":
        qk = c.qk_nope_head_dim + c.qk_rope_head_dim
        if c.q_lora_rank:
            q = E * c.q_lora_rank + c.q_lora_rank * H * qk  # W^DQ, W^UQ;W^QR
            norms = c.q_lora_rank
        else:
            q, norms = E * H * qk, 0
        kv = E * (c.kv_lora_rank + c.qk_rope_head_dim)  # W^DKV and W^KR together
        kv += c.kv_lora_rank * H * (c.qk_nope_head_dim + c.v_head_dim)  # W^UK, W^UV
        out = H * c.v_head_dim * E
        return q + kv + out, norms + c.kv_lora_rank
    D = c.head_dim or E // H
    H_kv = c.num_kv_heads or H
    weights = E * H * D + 2 * E * H_kv * D + H * D * E
    return weights, (2 * D if c.qk_norm else 0)


def moe_parameter_breakdown(config: MoEConfig, *, active: bool = False) -> dict:
    """The parameters by component; the values sum to :func:`moe_parameter_count`.

    Keys: ``embeddings`` (``V E``), ``head`` (``V E``, 0 when tied), ``attention``,
    ``norms`` (two per layer, the final one, Qwen3's q/k norms, MLA's latent norms),
    ``dense_mlp`` (``3 E I`` per dense layer), ``routers`` (``N E`` per MoE layer),
    ``shared_experts`` and ``routed_experts`` (``3 E I_m`` each). With ``active``,
    ``routed_experts`` counts the ``k`` experts a token uses.
    """
    c = config
    _check(c)
    E, V = c.hidden_size, c.vocab_size
    moe_layers = c.num_layers - c.first_dense_layers
    attention, attention_norms = _attention(c)
    expert = 3 * E * c.moe_intermediate_size
    routed = c.top_k if active else c.num_experts
    return {
        "embeddings": V * E,
        "head": 0 if c.tie_embeddings else V * E,
        "attention": c.num_layers * attention,
        "norms": c.num_layers * (2 * E + attention_norms) + E,
        "dense_mlp": c.first_dense_layers * 3 * E * (c.intermediate_size or 0),
        "routers": moe_layers * c.num_experts * E,
        "shared_experts": moe_layers * c.num_shared_experts * expert,
        "routed_experts": moe_layers * routed * expert,
    }


def moe_parameter_count(config: MoEConfig, *, active: bool = False) -> int:
    """Total parameters, or (``active=True``) the parameters one token uses."""
    return sum(moe_parameter_breakdown(config, active=active).values())
