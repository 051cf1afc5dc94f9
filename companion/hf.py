r"""Hugging Face Transformers, built from configurations and read into the package.

The source documents name Hugging Face Transformers (BERT, GPT) as the library a reader
will use next. This module checks the book against it, with **no download**: models are
built from a configuration with random weights (``from_pretrained`` is never called, and
:func:`offline` sets ``HF_HUB_OFFLINE=1`` and ``TRANSFORMERS_OFFLINE=1`` before
``transformers`` is imported).

* :func:`attention_params` (also ``MultiHeadParams.from_hf``): the attention of a
  GPT-2, BERT, ALBERT or Llama-style layer (grouped-query heads) as
  :class:`~companion.numpy.multihead.MultiHeadParams`;
* :func:`hf_config` / :func:`hf_model` and :func:`transformer_config`: between
  :class:`companion.params.TransformerConfig` and ``GPT2Config``, ``BertConfig``,
  ``AlbertConfig``, so that the package's parameter counts meet ``num_parameters()``;
* :func:`tiny_lm_from_gpt2`: a ``GPT2LMHeadModel``'s weights in a
  :class:`~companion.torch.models.TinyTransformerLM`;
* :func:`albert_encoder_from_hf`: an ``AlbertModel``'s weights in the ALBERT encoder
  :class:`companion.torch.sharing.TransformerEncoder`;
* :func:`gpt_from_hf`: a Qwen3, Gemma 3, Gemma 2, Llama or Mistral causal LM's
  weights in the package's :class:`~companion.torch.gpt.GPT` (QK-norm, sandwich
  norms, soft-capping, sliding-window layers and all).

Weight layouts. GPT-2 keeps its projections in ``Conv1D`` modules whose weight is
``(in, out)``, applied as ``x @ W + b``: exactly the layout of
:class:`~companion.numpy.multihead.MultiHeadParams`, with
``c_attn.weight (E, 3E) = [W_q | W_k | W_v]`` side by side. BERT, ALBERT and Llama use
``nn.Linear`` (weight ``(out, in)``, applied ``x @ W.T``), so ``w_q = query.weight.T``.
In every one, head ``h`` is the slice ``h*D:(h+1)*D`` of the projected width, and a
Llama layer's query head ``h`` reads key/value head ``h // (H / H_kv)``
(``repeat_kv``), the grouped-query convention of :mod:`companion.conventions`.

This module imports numpy only; ``torch`` and ``transformers`` are imported inside the
functions that need them.

Explained in the book chapter *Tools and resources*.
"""

from __future__ import annotations

import math
import os
import warnings

import numpy as np

from companion.params import TransformerConfig

__all__ = [
    "offline",
    "attention_params",
    "rope",
    "hf_config",
    "hf_model",
    "transformer_config",
    "tiny_lm_from_gpt2",
    "albert_encoder_from_hf",
    "gpt_from_hf",
]


def offline():
    """Set ``HF_HUB_OFFLINE=1`` and ``TRANSFORMERS_OFFLINE=1``, import ``transformers``.

    Returns the ``transformers`` module (imported without tqdm's notebook warning).
    Nothing in this package downloads: models are built from configurations with
    random weights.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    with warnings.catch_warnings():
        # tqdm.auto, imported by transformers, warns in a notebook without ipywidgets
        warnings.filterwarnings("ignore", message="IProgress not found")
        import transformers

    return transformers


def _numpy(t) -> np.ndarray:
    """A numpy copy of a torch tensor (duck-typed: torch is not imported here)."""
    return t.detach().cpu().numpy().copy()


def _linear(layer) -> tuple[np.ndarray, np.ndarray | None]:
    """``nn.Linear`` ``(out, in)`` as ``(w (in, out), b (out,))`` for ``x @ w + b``."""
    w = np.ascontiguousarray(_numpy(layer.weight).T)  # (in, out)
    b = None if layer.bias is None else _numpy(layer.bias)
    return w, b


def _check_scale(module, head_dim: int) -> None:
    """Raise unless the module scales its scores by ``1 / sqrt(D)``, as ours do."""
    scaling = getattr(module, "scaling", None)
    if scaling is not None and not math.isclose(scaling, head_dim**-0.5, rel_tol=1e-12):
        raise ValueError(
            f"{type(module).__name__} scales its scores by {scaling}, not 1/sqrt(D) = "
            f"{head_dim**-0.5} (e.g. GPT-2's scale_attn_by_inverse_layer_idx): "
            "MultiHeadParams always uses 1/sqrt(D)"
        )


def attention_params(module):
    r"""The weights of a Hugging Face attention module as ``MultiHeadParams``.

    Recognised by their submodules (no class is imported):

    =====================  ==========================  ==============================
    module                 projections                 heads ``H``, ``H_kv``
    =====================  ==========================  ==============================
    ``GPT2Attention``      ``c_attn (E, 3E)``,         ``num_heads``
                           ``c_proj``
    ``BertAttention``      ``self.query/key/value``,   ``num_attention_heads``
                           ``output.dense``
    ``AlbertAttention``    ``query/key/value``,        ``num_attention_heads``
                           ``dense``
    ``LlamaAttention``     ``q_proj/k_proj/v_proj``,   ``num_attention_heads``,
    (Mistral, Qwen2, GLM)  ``o_proj``                  ``num_key_value_heads``
    =====================  ==========================  ==============================

    Returns a :class:`~companion.numpy.multihead.MultiHeadParams`. What these modules
    do around the projections is not part of it: BERT's and ALBERT's residual
    connection and LayerNorm after ``dense``, and Llama's (or GLM's) rotary embedding
    of queries and keys (pass ``rope=hf.rope(config)`` to
    :func:`~companion.numpy.multihead.multi_head_attention`). Refused: GPT-2 with
    ``scale_attn_by_inverse_layer_idx`` (another scale) or cross-attention, any other
    scale than ``1/sqrt(D)``, queries or keys normalised before the scores (Qwen3's
    ``q_norm``/``k_norm``: ``ValueError``) and DeepSeek's latent attention
    (``TypeError``); anything else not in the table is a ``TypeError`` naming its
    class.
    """
    from companion.numpy.multihead import MultiHeadParams

    if hasattr(module, "c_attn") and hasattr(module, "c_proj"):  # GPT-2, Conv1D
        if getattr(module, "is_cross_attention", False):
            raise ValueError("GPT-2 cross-attention (q_attn) is not supported")
        H = module.num_heads
        E = module.embed_dim
        _check_scale(module, E // H)
        if not getattr(module, "scale_attn_weights", True):
            raise ValueError(
                "GPT-2 with scale_attn_weights=False does not scale by 1/sqrt(D)"
            )
        w = _numpy(module.c_attn.weight)  # (E, 3E): x @ w + b
        b = _numpy(module.c_attn.bias)  # (3E,)
        return MultiHeadParams(
            np.ascontiguousarray(w[:, :E]),
            b[:E],
            np.ascontiguousarray(w[:, E : 2 * E]),
            b[E : 2 * E],
            np.ascontiguousarray(w[:, 2 * E :]),
            b[2 * E :],
            _numpy(module.c_proj.weight),  # (E, E), already (in, out)
            _numpy(module.c_proj.bias),
            num_heads=H,
            num_kv_heads=H,
        )
    name = type(module).__name__
    if hasattr(module, "kv_a_proj_with_mqa") or hasattr(module, "kv_b_proj"):
        raise TypeError(
            f"{name} is multi-head latent attention (DeepSeek: low-rank kv_a_proj / "
            "kv_b_proj, a rotary part and a plain part per head): not expressible as "
            "MultiHeadParams; see companion.numpy.latent_attention"
        )
    if hasattr(module, "q_proj") and hasattr(module, "o_proj"):  # Llama-style
        missing = [n for n in ("k_proj", "v_proj") if not hasattr(module, n)]
        if missing or not hasattr(module, "config"):
            raise TypeError(
                f"{name} has q_proj and o_proj but no {', '.join(missing) or 'config'}"
                ": not a Llama-style attention module attention_params can convert"
            )
        for norm in ("q_norm", "k_norm", "q_layernorm", "k_layernorm"):
            if getattr(module, norm, None) is not None:
                raise ValueError(
                    f"{name} normalises its queries or keys ({norm}) before the "
                    "scores: MultiHeadParams has no place for it"
                )
        config = module.config
        H = config.num_attention_heads
        H_kv = getattr(config, "num_key_value_heads", None) or H
        _check_scale(module, module.head_dim)
        parts = [_linear(getattr(module, n)) for n in ("q_proj", "k_proj", "v_proj")]
        w_o, b_o = _linear(module.o_proj)
        (w_q, b_q), (w_k, b_k), (w_v, b_v) = parts
        return MultiHeadParams(
            w_q, b_q, w_k, b_k, w_v, b_v, w_o, b_o, num_heads=H, num_kv_heads=H_kv
        )
    if hasattr(module, "self") and hasattr(module, "output"):  # BertAttention
        inner, dense = module.self, module.output.dense
    elif hasattr(module, "query") and hasattr(module, "dense"):  # AlbertAttention
        inner, dense = module, module.dense
    else:
        raise TypeError(
            "module must be a Hugging Face GPT-2, BERT, ALBERT or Llama-style "
            f"attention module, got {name}"
        )
    H = inner.num_attention_heads
    _check_scale(inner, inner.attention_head_size)
    (w_q, b_q), (w_k, b_k), (w_v, b_v) = (
        _linear(getattr(inner, n)) for n in ("query", "key", "value")
    )
    w_o, b_o = _linear(dense)
    return MultiHeadParams(
        w_q, b_q, w_k, b_k, w_v, b_v, w_o, b_o, num_heads=H, num_kv_heads=H
    )


#: How each architecture applies its rotary embedding, as Transformers 5 does it:
#: ``model_type -> (interleaved, honours partial_rotary_factor)``. Llama and its kin
#: pair the halves and rotate the whole head, whatever ``partial_rotary_factor`` says;
#: GPT-NeoX (``rotary_pct``), StableLM and GLM rotate the first features only; GLM and
#: DeepSeek-V2/V3 pair neighbours ``(2i, 2i + 1)`` (DeepSeek-V3: ``rope_interleave``,
#: default True). DeepSeek's ``head_dim`` is ``qk_rope_head_dim``, the rotated part.
_ROPE_ARCHITECTURES = {
    "llama": (False, False),
    "mistral": (False, False),
    "mixtral": (False, False),
    "qwen2": (False, False),
    "qwen2_moe": (False, False),
    "qwen3": (False, False),
    "qwen3_moe": (False, False),
    "gemma2": (False, False),
    "gemma3_text": (False, False),
    "gemma4_text": (False, False),
    "gpt_neox": (False, True),
    "stablelm": (False, True),
    "glm": (True, True),
    "glm4": (True, True),
    "deepseek_v2": (True, False),
    "deepseek_v3": (None, False),  # None: config.rope_interleave
}


def rope(config, *, layer_type: str | None = None) -> dict:
    r"""The ``rope=`` of ``multi_head_attention`` for a Hugging Face configuration.

    For :func:`companion.numpy.multihead.multi_head_attention` and the torch and Keras
    layers. Each architecture as Transformers applies it (``model_type``):

    * Llama, Mistral, Mixtral, Qwen2, Qwen3 (and their MoE variants), Gemma 2,
      Gemma 3 and Gemma 4 (text): pairs of halves, the whole head rotated
      (``partial_rotary_factor`` is ignored, as Llama does, except by the
      ``"proportional"`` type below);
    * GPT-NeoX (``rotary_pct``) and StableLM: pairs of halves, the first
      ``partial_rotary_factor * D`` features rotated;
    * GLM and GLM-4: neighbouring pairs, the first ``partial_rotary_factor * D``
      features rotated;
    * DeepSeek-V2 and DeepSeek-V3: neighbouring pairs (V3: ``rope_interleave``,
      default True) over the whole rope part of the head (``qk_rope_head_dim``).

    "Halves" is ``rotate_half``, feature ``i`` with ``i + D/2`` (``interleaved=False``);
    "neighbours" pairs ``(2i, 2i + 1)`` (``interleaved=True``). Pair ``i`` at position
    ``p`` turns by :math:`p\,\theta^{-2i/d}` with ``theta =
    rope_parameters["rope_theta"]`` and ``d`` the rotated width. A scaled
    ``rope_type`` (linear, dynamic, YaRN, Llama 3, LongRoPE, proportional) adds
    ``"scaling"``, the fields of :class:`companion.numpy.RopeScaling` (frequencies and
    attention factor equal to Transformers' ``ROPE_INIT_FUNCTIONS``). Other
    architectures and rope types are refused with ``ValueError``; a ``config`` that
    is not a Transformers configuration with ``TypeError``.

    Gemma 4's ``"proportional"`` (its ``"full_attention"`` layers) converts with the
    weights as they are: Transformers applies its ``head_dim / 2`` frequencies with
    ``rotate_half`` over the whole head, the first ``int(p * head_dim // 2)`` of them
    :math:`\theta^{-2i/\text{head\_dim}} / \text{factor}` and the rest 0, so pair
    ``i`` is features ``(i, i + head_dim/2)`` and the pairs of frequency 0 are left
    as they are. That is our halves' layout over the whole head (no ``rotary_dim``)
    with ``scaling={"rope_type": "proportional", "partial_rotary_factor": p, ...}``;
    no rows of ``W_q`` or ``W_k`` are permuted. (Writing it as ``rotary_dim = 2r``
    instead would pair features ``(i, i + r)``; only that form would need the rows
    ``0..r-1`` and ``head_dim/2 .. head_dim/2 + r - 1`` of each head moved to the
    front.) The returned dict holds no head size, so it fits Gemma 4's larger
    ``global_head_dim`` of the full-attention layers as well.

    Gemma 3 keeps one ``rope_parameters`` per layer type (a base of 10 000 for
    ``"sliding_attention"``, 1 000 000 and perhaps a linear factor for
    ``"full_attention"``): ``layer_type`` names the one wanted (``ValueError`` when
    missing or unknown); other configurations take ``layer_type=None``.
    """
    model_type = getattr(config, "model_type", None)
    if not isinstance(model_type, str) or not hasattr(config, "to_dict"):
        raise TypeError(
            "config must be a Hugging Face configuration (e.g. LlamaConfig), got "
            f"{type(config).__name__}"
        )
    if model_type not in _ROPE_ARCHITECTURES:
        raise ValueError(
            f"rope does not know how {type(config).__name__} (model_type "
            f"{model_type!r}) applies its rotary embedding; known: "
            f"{', '.join(sorted(_ROPE_ARCHITECTURES))}"
        )
    interleaved, partial = _ROPE_ARCHITECTURES[model_type]
    if interleaved is None:
        interleaved = bool(getattr(config, "rope_interleave", True))
    parameters = dict(getattr(config, "rope_parameters", None) or {})
    per_type = sorted(k for k, v in parameters.items() if isinstance(v, dict))
    if per_type or layer_type is not None:
        if layer_type not in per_type:
            raise ValueError(
                f"layer_type must name one of the configuration's rope_parameters "
                f"{per_type or '(one for every layer: pass None)'}, got {layer_type!r}"
            )
        parameters = dict(parameters[layer_type])
    kind = parameters.get("rope_type", "default")
    scaling = None if kind == "default" else _rope_scaling(config, parameters, kind)
    rotary_dim = None  # the whole head, whatever its size
    if partial and kind != "proportional":
        # read only here: Gemma 4 has a head size per layer type, and no global one
        head_dim = getattr(config, "head_dim", None) or (
            config.hidden_size // config.num_attention_heads
        )
        factor = parameters.get(
            "partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)
        )
        rotary_dim = int(head_dim * factor)
        rotary_dim = None if rotary_dim == head_dim else rotary_dim
    converted = {
        "base": float(parameters.get("rope_theta", 10000.0)),
        "interleaved": interleaved,
        "rotary_dim": rotary_dim,
    }
    if scaling is not None:
        converted["scaling"] = scaling
    return converted


def _rope_scaling(config, parameters: dict, kind: str) -> dict:
    """The ``scaling`` of :func:`rope` (fields of
    :class:`companion.numpy.RopeScaling`) for ``rope_parameters`` of type ``kind``.

    Transformers' dynamic NTK takes ``max_position_embeddings`` as the trained
    length; YaRN, Llama 3 and LongRoPE read ``original_max_position_embeddings``
    (Phi-3's top-level attribute first, then ``max_position_embeddings``) and scale
    towards ``max_position_embeddings``."""
    if kind not in ("linear", "dynamic", "yarn", "llama3", "longrope", "proportional"):
        raise ValueError(
            f"rope_type {kind!r} is not converted; known: default, linear, dynamic, "
            "yarn, llama3, longrope, proportional"
        )
    target = getattr(config, "max_position_embeddings", None)
    scaling = {"rope_type": kind, "factor": parameters.get("factor")}
    if kind == "linear":
        return scaling
    if kind == "proportional":  # factor and fraction optional, as in Transformers
        fraction = parameters.get(
            "partial_rotary_factor", getattr(config, "partial_rotary_factor", None)
        )
        scaling["partial_rotary_factor"] = fraction
        return {name: value for name, value in scaling.items() if value is not None}
    if kind == "dynamic":
        return {**scaling, "original_max_positions": target}
    original = getattr(config, "original_max_position_embeddings", None) or (
        parameters.get("original_max_position_embeddings") or target
    )
    scaling.update(original_max_positions=original, max_positions=target)
    if kind == "llama3":
        for name in ("low_freq_factor", "high_freq_factor"):
            scaling[name] = parameters.get(name)
    elif kind == "yarn":
        for name in ("attention_factor", "mscale", "mscale_all_dim"):
            scaling[name] = parameters.get(name)
        scaling["beta_fast"] = parameters.get("beta_fast") or 32.0
        scaling["beta_slow"] = parameters.get("beta_slow") or 1.0
        scaling["truncate"] = bool(parameters.get("truncate", True))
    else:  # longrope
        for name in ("short_factor", "long_factor"):
            scaling[name] = parameters.get(name)
        scaling["attention_factor"] = parameters.get("attention_factor")
    # what the configuration leaves out takes RopeScaling's defaults (or its error)
    return {name: value for name, value in scaling.items() if value is not None}


# --- configurations and counts -------------------------------------------------------


def _family(config: TransformerConfig) -> str:
    """``"albert"``, ``"bert"`` or ``"gpt2"``: the model family ``config`` describes."""
    if config.share_layers or config.embedding_size not in (None, config.hidden_size):
        return "albert"
    if config.lm_head and config.final_norm and not config.pooler:
        return "gpt2"
    if config.pooler and config.embedding_norm and not config.lm_head:
        return "bert"
    raise ValueError(
        f"config describes none of GPT-2 (tied LM head, final norm), BERT (pooler, "
        f"embedding norm) or ALBERT (shared layers, factorised embeddings): {config}"
    )


def hf_config(config: TransformerConfig, **overrides):
    """The ``GPT2Config``, ``BertConfig`` or ``AlbertConfig`` of ``config``'s sizes.

    ``overrides`` go to the Hugging Face configuration (e.g. ``attn_implementation``,
    ``layer_norm_eps``). Only what :class:`~companion.params.TransformerConfig` can
    express is supported: grouped-query heads and bias-free layers raise
    ``ValueError`` for these families.
    """
    if not isinstance(config, TransformerConfig):
        raise TypeError(
            f"config must be a TransformerConfig, got {type(config).__name__}"
        )
    if config.num_kv_heads not in (None, config.num_heads):
        raise ValueError("GPT-2, BERT and ALBERT have no grouped-query heads")
    if not (config.attention_bias and config.mlp_bias):
        raise ValueError("GPT-2, BERT and ALBERT have biases in every projection")
    transformers = offline()
    family = _family(config)
    if family == "gpt2":
        if config.type_vocab_size or not config.tie_embeddings:
            raise ValueError("GPT-2 has no segment embeddings and a tied head")
        kwargs = dict(
            vocab_size=config.vocab_size,
            n_positions=config.max_positions,
            n_embd=config.hidden_size,
            n_layer=config.num_layers,
            n_head=config.num_heads,
            n_inner=config.intermediate_size,
            tie_word_embeddings=True,
        )
        return transformers.GPT2Config(**{**kwargs, **overrides})
    kwargs = dict(
        vocab_size=config.vocab_size,
        max_position_embeddings=config.max_positions,
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        intermediate_size=config.intermediate_size,
        type_vocab_size=config.type_vocab_size,
    )
    if family == "bert":
        return transformers.BertConfig(**{**kwargs, **overrides})
    if not config.share_layers:
        raise ValueError("ALBERT shares its layers (share_layers=True)")
    kwargs["embedding_size"] = config.embedding_size or config.hidden_size
    return transformers.AlbertConfig(**{**kwargs, **overrides})


def hf_model(config: TransformerConfig, **overrides):
    """``GPT2LMHeadModel``, ``BertModel`` or ``AlbertModel`` (pooler) for ``config``.

    Random weights, nothing downloaded. Built on the current default device: inside
    ``with torch.device("meta"):`` a model of any size costs no memory, and
    ``num_parameters()`` still counts it.
    """
    transformers = offline()
    hf = hf_config(config, **overrides)
    model_class = {
        "gpt2": transformers.GPT2LMHeadModel,
        "bert": transformers.BertModel,
        "albert": transformers.AlbertModel,
    }[hf.model_type]
    return model_class(hf)


def transformer_config(hf) -> TransformerConfig:
    """The ``TransformerConfig`` of a GPT-2, BERT or ALBERT configuration.

    Returns a :class:`~companion.params.TransformerConfig`.

    The inverse of :func:`hf_config`, counted by
    :func:`companion.params.transformer_parameter_count` as ``num_parameters()`` counts
    ``GPT2LMHeadModel`` (tied head), ``BertModel`` and ``AlbertModel`` (with pooler).
    ALBERT with more than one hidden group or inner group is refused.
    """
    model_type = getattr(hf, "model_type", None)
    if model_type == "gpt2":
        return TransformerConfig(
            vocab_size=hf.vocab_size,
            max_positions=hf.n_positions,
            hidden_size=hf.n_embd,
            num_layers=hf.n_layer,
            num_heads=hf.n_head,
            intermediate_size=hf.n_inner or 4 * hf.n_embd,
            tie_embeddings=bool(hf.tie_word_embeddings),
            lm_head=True,
            final_norm=True,
        )
    if model_type not in ("bert", "albert"):
        raise TypeError(
            f"hf must be a GPT2Config, BertConfig or AlbertConfig, got "
            f"{type(hf).__name__} (model_type {model_type!r})"
        )
    common = dict(
        vocab_size=hf.vocab_size,
        max_positions=hf.max_position_embeddings,
        hidden_size=hf.hidden_size,
        num_layers=hf.num_hidden_layers,
        num_heads=hf.num_attention_heads,
        intermediate_size=hf.intermediate_size,
        type_vocab_size=hf.type_vocab_size,
        pooler=True,
        embedding_norm=True,
    )
    if model_type == "bert":
        return TransformerConfig(**common)
    if hf.num_hidden_groups != 1 or hf.inner_group_num != 1:
        raise ValueError(
            "only ALBERT with num_hidden_groups=1 and inner_group_num=1 (one shared "
            f"layer) is supported, got {hf.num_hidden_groups} and {hf.inner_group_num}"
        )
    return TransformerConfig(
        **common, embedding_size=hf.embedding_size, share_layers=True
    )


# --- whole models --------------------------------------------------------------------


_TANH_GELU = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


def _activation(name: str):
    """``torch.nn.GELU`` for a Hugging Face activation name (exact or tanh)."""
    from torch import nn

    if name == "gelu":
        return nn.GELU()
    if name in _TANH_GELU:
        return nn.GELU(approximate="tanh")
    raise ValueError(f"activation {name!r} is neither GELU nor its tanh approximation")


def _torch_dtype(dtype, default):
    """``dtype`` as a floating ``torch.dtype``: a ``torch.dtype`` or its name."""
    import torch

    if dtype is None:
        return default
    if isinstance(dtype, str):
        named = getattr(torch, dtype.removeprefix("torch."), None)
        if not isinstance(named, torch.dtype):
            raise ValueError(f"dtype {dtype!r} names no torch dtype (e.g. 'float64')")
        dtype = named
    if not isinstance(dtype, torch.dtype):
        raise TypeError(
            f"dtype must be a torch.dtype or its name, got {type(dtype).__name__}"
        )
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating dtype, got {dtype}")
    return dtype


def tiny_lm_from_gpt2(model, *, dtype=None):
    r"""A ``GPT2LMHeadModel``'s weights in the package's ``TinyTransformerLM``.

    Returns a :class:`companion.torch.models.TinyTransformerLM`. The two are the same
    network: learned positions, pre-norm blocks
    ``x + attn(LN(x))``, ``x + MLP(LN(x))``, a final LayerNorm, the head tied to the
    token embedding. What GPT-2 sets becomes the model's knobs: ``norm_eps`` (GPT-2's
    ``layer_norm_epsilon``, 1e-5) and ``mlp="gelu_tanh"`` (``gelu_new`` is the tanh
    approximation of GELU); the MLP's width ``n_inner`` must be ``4E``. ``Conv1D``
    weights ``(in, out)`` become ``nn.Linear`` weights ``(out, in)``. Dropout is not
    copied (evaluation only). ``dtype`` (a ``torch.dtype`` or its name, e.g.
    ``"float64"``) defaults to the model's. The result is in evaluation mode.

    A ``GPT2Model`` (the network without its head) is accepted too: its tied head is
    its token embedding, so the result is what ``GPT2LMHeadModel`` computes on it.
    """
    import torch

    from companion.torch.models import TinyTransformerLM

    config = getattr(model, "config", None)
    name = type(model).__name__
    if getattr(config, "model_type", None) != "gpt2":
        raise TypeError(f"model must be a GPT2LMHeadModel or GPT2Model, got {name}")
    if hasattr(model, "wte") and hasattr(model, "h"):  # GPT2Model: the base itself
        gpt = model
    elif hasattr(model, "transformer") and hasattr(model, "lm_head"):
        gpt = model.transformer
        if model.lm_head.weight is not gpt.wte.weight:
            raise ValueError(
                f"{name}'s lm_head is not tied to its token embedding "
                "(TinyTransformerLM(tied=True) needs one matrix)"
            )
    else:
        raise TypeError(
            f"model must be a GPT2LMHeadModel or GPT2Model, got {name} (a GPT-2 with "
            "another head; pass its .transformer, the GPT2Model)"
        )
    if not config.tie_word_embeddings:
        raise ValueError("TinyTransformerLM(tied=True) needs tie_word_embeddings=True")
    if config.scale_attn_by_inverse_layer_idx or not config.scale_attn_weights:
        raise ValueError("the package's attention scales by 1/sqrt(D) in every layer")
    E, n_inner = config.n_embd, config.n_inner or 4 * config.n_embd
    if n_inner != 4 * E:
        raise ValueError(
            f"TinyTransformerLM's MLP is E -> 4E -> E, got n_inner={n_inner}"
        )
    dtype = _torch_dtype(dtype, gpt.wte.weight.dtype)
    tanh = _activation(config.activation_function).approximate == "tanh"
    tiny = TinyTransformerLM(
        config.vocab_size,
        config.n_positions,
        embed_dim=E,
        num_heads=config.n_head,
        num_layers=config.n_layer,
        tied=True,
        positions="learned",
        norm="layer",
        norm_eps=config.layer_norm_epsilon,
        norm_first=True,
        mlp="gelu_tanh" if tanh else "gelu",
    ).to(dtype)

    def copy_norm(ours, theirs):
        ours.weight.copy_(theirs.weight)
        ours.bias.copy_(theirs.bias)

    def copy_conv1d(linear, conv):
        linear.weight.copy_(conv.weight.T)  # Conv1D (in, out) -> Linear (out, in)
        linear.bias.copy_(conv.bias)

    with torch.no_grad():
        tiny.embedding.weight.copy_(gpt.wte.weight)
        tiny.position_embedding.weight.copy_(gpt.wpe.weight)
        for block, theirs in zip(tiny.blocks, gpt.h):
            copy_norm(block.norm1, theirs.ln_1)
            copy_norm(block.norm2, theirs.ln_2)
            attn, w = block.attention, theirs.attn.c_attn.weight  # (E, 3E)
            b = theirs.attn.c_attn.bias
            for i, proj in enumerate((attn.q_proj, attn.k_proj, attn.v_proj)):
                proj.weight.copy_(w[:, i * E : (i + 1) * E].T)
                proj.bias.copy_(b[i * E : (i + 1) * E])
            copy_conv1d(attn.out_proj, theirs.attn.c_proj)
            copy_conv1d(block.mlp[0], theirs.mlp.c_fc)
            copy_conv1d(block.mlp[2], theirs.mlp.c_proj)
        copy_norm(tiny.norm, gpt.ln_f)
    return tiny.eval()


def albert_encoder_from_hf(model, *, dtype=None):
    r"""An ``AlbertModel``'s weights in the ALBERT encoder of the package.

    The encoder is :class:`companion.torch.sharing.TransformerEncoder`.

    Returns ``(encoder, pooler)``: ``encoder(ids, mask)`` equals
    ``model(ids, attention_mask=...).last_hidden_state`` and ``pooler(hidden[:, 0])``
    (an ``nn.Sequential(Linear, Tanh)`` of the first token) its ``pooler_output``;
    ``pooler`` is ``None`` when the model has none (``add_pooling_layer=False``).
    ``model`` is an ``AlbertModel`` or a model with one inside as ``.albert``
    (``AlbertForMaskedLM``, ``AlbertForSequenceClassification``, ...), whose heads are
    not copied. ``dtype``: a ``torch.dtype`` or its name; default the model's.

    Copied: the token and position tables, the embedding LayerNorm and projection, the
    one shared layer (attention, its LayerNorm, the MLP, its LayerNorm), every
    LayerNorm's ``eps`` (``layer_norm_eps``, 1e-12 in ALBERT against torch's 1e-5).
    What the encoder has no place for, and how it is handled:

    * **token-type (segment) embeddings**: the encoder has none. With every token in
      segment 0 (``token_type_ids`` left out, Hugging Face's default), the segment-0
      row is the same vector added at every position, so it is added to the
      position table; inputs with two segments are not representable.
    * **pooler**: returned beside the encoder, built from ``model.pooler``.
    * **activation**: the encoder's MLP calls exact GELU (``F.gelu``) and has no knob;
      ALBERT's default ``hidden_act="gelu_new"`` is the tanh approximation, so the
      configuration must say ``hidden_act="gelu"`` (``ValueError`` otherwise).
    * dropout: evaluation only.
    """
    import torch
    from torch import nn

    from companion.torch.sharing import TransformerEncoder

    config = getattr(model, "config", None)
    name = type(model).__name__
    if getattr(config, "model_type", None) != "albert":
        raise TypeError(f"model must be an AlbertModel, got {name}")
    if hasattr(model, "albert"):  # AlbertForMaskedLM and the other heads
        model = model.albert
    if not (hasattr(model, "embeddings") and hasattr(model, "encoder")):
        raise TypeError(
            f"model must be an AlbertModel or hold one as .albert, got {name}"
        )
    transformer_config(config)  # ValueError unless one group of one shared layer
    E = config.hidden_size
    theirs_emb = model.embeddings
    dtype = _torch_dtype(dtype, theirs_emb.word_embeddings.weight.dtype)
    encoder = TransformerEncoder(
        config.vocab_size,
        config.embedding_size,
        E,
        config.num_hidden_layers,
        config.num_attention_heads,
        config.intermediate_size,
        share_layers=True,
        max_positions=config.max_position_embeddings,
    ).to(dtype)
    layer = model.encoder.albert_layer_groups[0].albert_layers[0]
    ours = encoder.layers[0]  # the one shared EncoderLayer
    if _activation(config.hidden_act).approximate != "none":
        raise ValueError(
            "the ALBERT encoder's MLP uses exact GELU (F.gelu); build the AlbertConfig "
            f"with hidden_act='gelu', got {config.hidden_act!r}"
        )
    eps = config.layer_norm_eps

    def copy_linear(a, b):
        a.weight.copy_(b.weight)
        a.bias.copy_(b.bias)

    def copy_norm(a, b):
        a.eps = eps
        copy_linear(a, b)

    with torch.no_grad():
        encoder.token_embedding.weight.copy_(theirs_emb.word_embeddings.weight)
        segment0 = theirs_emb.token_type_embeddings.weight[0]  # (E_emb,)
        encoder.position_embedding.weight.copy_(
            theirs_emb.position_embeddings.weight + segment0
        )
        copy_norm(encoder.embedding_norm, theirs_emb.LayerNorm)
        copy_linear(
            encoder.embedding_projection, model.encoder.embedding_hidden_mapping_in
        )
        attn = layer.attention
        for a, b in (
            (ours.attention.q_proj, attn.query),
            (ours.attention.k_proj, attn.key),
            (ours.attention.v_proj, attn.value),
            (ours.attention.out_proj, attn.dense),
        ):
            copy_linear(a, b)
        copy_norm(ours.attention_norm, attn.LayerNorm)
        copy_linear(ours.ffn_in, layer.ffn)
        copy_linear(ours.ffn_out, layer.ffn_output)
        copy_norm(ours.ffn_norm, layer.full_layer_layer_norm)
        if getattr(model, "pooler", None) is None:
            return encoder.eval(), None
        pooler = nn.Sequential(nn.Linear(E, E), nn.Tanh()).to(dtype)
        copy_linear(pooler[0], model.pooler)
    return encoder.eval(), pooler.eval()


#: Causal LMs :func:`gpt_from_hf` reads: ``model_type -> (QK-norm, Gemma-style)``.
#: Gemma-style: norms ``(1 + w)``, sandwich norms, embeddings times ``sqrt(E)``, a
#: gated tanh-GELU MLP, ``query_pre_attn_scalar`` and soft-capping.
_GPT_FAMILIES = {
    "llama": (False, False),
    "mistral": (False, False),
    "qwen3": (True, False),
    "gemma2": (False, True),
    "gemma3_text": (True, True),
}

_LAYER_TYPES = {"sliding_attention": "local", "full_attention": "global"}


def _gpt_rope(config, layer_type=None) -> tuple[float, dict | None]:
    """The RoPE base and scaling of a GPT layer; ``ValueError`` for a layout the GPT
    does not have (interleaved pairs, a partial rotation)."""
    converted = rope(config, layer_type=layer_type)
    if converted["interleaved"] or converted["rotary_dim"]:
        raise ValueError(
            f"the GPT rotates halves of whole heads; {type(config).__name__} has "
            f"{converted} (layer_type {layer_type!r}): build its attention with "
            "rope=hf.rope(...)"
        )
    return converted["base"], converted.get("scaling")


def _gpt_options(config, family: str) -> dict:
    """The :class:`~companion.torch.gpt.GPT` keywords of a Hugging Face config."""
    qk_norm, gemma = _GPT_FAMILIES[family]
    E, H = config.hidden_size, config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or E // H
    activation = getattr(config, "hidden_activation", None) or config.hidden_act
    if gemma:
        mlp = {"gelu_pytorch_tanh": "geglu_tanh", "gelu": "geglu"}.get(activation)
    else:
        mlp = "swiglu" if activation == "silu" else None
    if mlp is None:
        raise ValueError(
            f"{type(config).__name__}'s activation {activation!r} is not one the GPT "
            "has (SwiGLU for silu; Gemma: GeGLU, tanh or exact)"
        )
    if getattr(config, "mlp_bias", False):
        raise ValueError("the GPT's MLP has no biases, got mlp_bias=True")
    if getattr(config, "use_bidirectional_attention", False):
        raise ValueError("the GPT is causal, got use_bidirectional_attention=True")
    options = dict(
        vocab_size=config.vocab_size,
        context=config.max_position_embeddings,
        embed_dim=E,
        num_heads=H,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or H,
        num_layers=config.num_hidden_layers,
        positions="rope",
        norm="rms",
        norm_eps=config.rms_norm_eps,
        mlp=mlp,
        mlp_hidden=config.intermediate_size,
        attention_bias=bool(getattr(config, "attention_bias", False)),
        tied=bool(config.tie_word_embeddings),
        qk_norm=qk_norm,
        head_dim=None if head_dim * H == E else head_dim,
    )
    types = getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None)
    if family == "mistral" and window is not None:
        types = ["sliding_attention"] * config.num_hidden_layers
    if types is not None and "sliding_attention" in types:
        unknown = sorted(set(types) - set(_LAYER_TYPES))
        if unknown:
            raise ValueError(f"layer types {unknown} are not converted")
        options.update(window=window, layer_types=[_LAYER_TYPES[t] for t in types])
    if family == "gemma3_text":
        base, scaling = _gpt_rope(config, "full_attention")
        local, local_scaling = _gpt_rope(config, "sliding_attention")
        if local_scaling is not None:
            raise ValueError(
                "the GPT scales the RoPE of its global layers only; this Gemma 3 "
                f"scales its sliding layers too ({local_scaling})"
            )
        if "window" in options and (local != base or scaling is not None):
            options["local_rope_base"] = local
    else:
        base, scaling = _gpt_rope(config)
    options.update(rope_base=base, rope_scaling=scaling)
    if gemma:
        scale = config.query_pre_attn_scalar**-0.5
        if scale != head_dim**-0.5:
            options["attention_scale"] = scale
        options.update(post_norms=True, logit_softcap=config.final_logit_softcapping)
        # Gemma 3 keeps attn_logit_softcapping in its configuration but never
        # applies it (its attention passes no softcap); Gemma 2 does
        if family == "gemma2":
            options["attn_softcap"] = config.attn_logit_softcapping
    return options


def gpt_from_hf(model, *, dtype=None, implementation: str | None = None):
    r"""A Hugging Face causal LM's weights in the package's ``GPT``.

    Returns a :class:`companion.torch.gpt.GPT` in evaluation mode whose logits equal
    ``model(ids).logits`` (and its greedy tokens ``model.generate``'s, cached or
    not). ``model`` is a ``Qwen3ForCausalLM``, ``Gemma3ForCausalLM`` (text only),
    ``Gemma2ForCausalLM``, ``LlamaForCausalLM`` or ``MistralForCausalLM`` (or the
    base model without the head: then the head is the tied embedding). Every choice
    of the configuration becomes a GPT keyword:

    * ``rms_norm_eps``, ``intermediate_size``: ``norm="rms"``, ``norm_eps``,
      ``mlp_hidden``;
    * activation ``silu`` / ``gelu_pytorch_tanh``: ``mlp="swiglu"`` / ``"geglu_tanh"``;
    * ``num_key_value_heads``, ``head_dim``: ``num_kv_heads``, ``head_dim``;
    * ``q_norm``, ``k_norm`` (Qwen3, Gemma 3): ``qk_norm=True``;
    * ``sliding_window``, ``layer_types``: ``window``, ``layer_types`` (``"local"`` for
      ``"sliding_attention"``);
    * ``rope_parameters`` (per layer type in Gemma 3): ``rope_base``, ``rope_scaling``,
      ``local_rope_base``;
    * Gemma's embeddings ``* sqrt(E)``: ``embedding_scale`` (the value of
      ``embed_scale`` Transformers multiplies by);
    * Gemma's ``query_pre_attn_scalar``: ``attention_scale`` (its ``** -0.5``);
    * Gemma's four norms per layer: ``post_norms=True``;
    * Gemma 2's ``attn_logit_softcapping``: ``attn_softcap``;
    * ``final_logit_softcapping``: ``logit_softcap``;
    * ``tie_word_embeddings``: ``tied``.

    Gemma's RMSNorm multiplies by ``1 + w`` (its weights start at 0): the package's
    ``nn.RMSNorm`` gets the weight ``1 + w``, the same function. Gemma 3 keeps an
    ``attn_logit_softcapping`` in its configuration that its attention never applies;
    the GPT follows the computation and does not cap. An interleaved or partial RoPE,
    biases in the MLP and bidirectional attention are ``ValueError``; other models
    ``TypeError``. ``dtype`` (a ``torch.dtype`` or its name) defaults to the model's;
    ``implementation`` defaults to ``"sdpa"``, or ``"reference"`` where the scores
    are capped (Gemma 2).
    """
    import torch

    from companion.torch.gpt import GPT

    config = getattr(model, "config", None)
    name = type(model).__name__
    family = getattr(config, "model_type", None)
    if family not in _GPT_FAMILIES:
        raise TypeError(
            "model must be a Qwen3, Gemma 3 (text), Gemma 2, Llama or Mistral causal "
            f"LM, got {name} (model_type {family!r})"
        )
    base = getattr(model, "model", model)
    if not (hasattr(base, "embed_tokens") and hasattr(base, "layers")):
        raise TypeError(f"{name} holds no decoder (embed_tokens, layers)")
    head = getattr(model, "lm_head", None)
    options = _gpt_options(config, family)
    if head is not None and options["tied"] != (
        head.weight is base.embed_tokens.weight
    ):
        raise ValueError(
            f"{name}'s lm_head is {'not ' if options['tied'] else ''}its token "
            f"embedding, but tie_word_embeddings={config.tie_word_embeddings}"
        )
    if head is None and not options["tied"]:
        raise ValueError(
            f"{name} has no lm_head and tie_word_embeddings=False: pass the causal LM"
        )
    if family.startswith("gemma"):
        scale = getattr(base.embed_tokens, "embed_scale", None)
        scale = config.hidden_size**0.5 if scale is None else float(scale)
        options["embedding_scale"] = scale
    if implementation is None:
        implementation = "reference" if options.get("attn_softcap") else "sdpa"
    dtype = _torch_dtype(dtype, base.embed_tokens.weight.dtype)
    gpt = GPT(**options, implementation=implementation).to(dtype)
    gemma = _GPT_FAMILIES[family][1]

    def copy_norm(ours, theirs):
        ours.eps = getattr(theirs, "eps", getattr(theirs, "variance_epsilon", ours.eps))
        # Gemma's norms multiply by (1 + w)
        ours.weight.copy_(1.0 + theirs.weight if gemma else theirs.weight)

    with torch.no_grad():
        gpt.embedding.weight.copy_(base.embed_tokens.weight)
        for block, layer in zip(gpt.blocks, base.layers):
            attn, theirs = block.attention, layer.self_attn
            for ours_proj, theirs_proj in (
                (attn.q_proj, theirs.q_proj),
                (attn.k_proj, theirs.k_proj),
                (attn.v_proj, theirs.v_proj),
                (attn.out_proj, theirs.o_proj),
            ):
                ours_proj.weight.copy_(theirs_proj.weight)  # both nn.Linear (out, in)
                if ours_proj.bias is not None:
                    ours_proj.bias.copy_(theirs_proj.bias)
            if attn.q_norm is not None:
                copy_norm(attn.q_norm, theirs.q_norm)
                copy_norm(attn.k_norm, theirs.k_norm)
            copy_norm(block.norm1, layer.input_layernorm)
            if gemma:
                copy_norm(block.post_attention_norm, layer.post_attention_layernorm)
                copy_norm(block.norm2, layer.pre_feedforward_layernorm)
                copy_norm(block.post_mlp_norm, layer.post_feedforward_layernorm)
            else:  # Llama's name for the norm before the MLP
                copy_norm(block.norm2, layer.post_attention_layernorm)
            block.mlp.gate.weight.copy_(layer.mlp.gate_proj.weight)
            block.mlp.up.weight.copy_(layer.mlp.up_proj.weight)
            block.mlp.down.weight.copy_(layer.mlp.down_proj.weight)
        copy_norm(gpt.norm, base.norm)
        if not options["tied"]:
            gpt.head.weight.copy_(head.weight)
    return gpt.eval()
