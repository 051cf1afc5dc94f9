"""Positions against an independent client: Hugging Face ``transformers``.

Llama's ``apply_rotary_pos_emb`` (the half layout), GPT-J's (interleaved, partial
``rotary_dim``) and BLOOM's ALiBi slopes and bias. ``transformers`` computes its angles
in float32 (ours are float64), so the comparisons are made in float32 with positions
below 16, where its angle errors stay below float32's default tolerance. Skipped where
``transformers`` is not installed.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from companion import torch as ct  # noqa: E402
from companion.testing import assert_close  # noqa: E402


@pytest.mark.parametrize("base", [10000.0, 500.0])
def test_rotary_equals_llama_apply_rotary_pos_emb(base):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import (
        LlamaRotaryEmbedding,
        apply_rotary_pos_emb,
    )

    config = LlamaConfig(hidden_size=64, num_attention_heads=4, rope_theta=base)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 2, 4, 9, 16, generator=g)  # (B, H, L, D) each
    position_ids = torch.arange(3, 12)[None].expand(2, -1)  # (B, L)
    cos, sin = LlamaRotaryEmbedding(config)(q, position_ids)
    hf_q, hf_k = apply_rotary_pos_emb(q, k, cos, sin)
    assert_close(ct.rotary_embedding(q, position_ids[:, None], base=base), hf_q)
    assert_close(ct.rotary_embedding(k, torch.arange(3, 12), base=base), hf_k)


@pytest.mark.parametrize("rotary_dim", [16, 8], ids=["full", "partial"])
def test_rotary_interleaved_equals_gptj(rotary_dim):
    from transformers.models.gptj.modeling_gptj import (
        apply_rotary_pos_emb,
        create_sinusoidal_positions,
    )

    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 11, 3, 16, generator=g)  # GPT-J's layout (B, L, H, D)
    positions = torch.arange(4, 15)  # (L,)
    sincos = create_sinusoidal_positions(16, rotary_dim)[positions][None]  # (1, L, d)
    sin, cos = torch.split(sincos, rotary_dim // 2, dim=-1)
    rotated = apply_rotary_pos_emb(x[..., :rotary_dim], sin, cos)
    expected = torch.cat([rotated, x[..., rotary_dim:]], dim=-1)  # (B, L, H, D)
    ours = ct.rotary_embedding(
        x.transpose(1, 2), positions, interleaved=True, rotary_dim=rotary_dim
    )  # (B, H, L, D)
    assert_close(ours.transpose(1, 2), expected)


@pytest.mark.parametrize("H", [8, 12, 6])
def test_alibi_slopes_equal_bloom(H):
    from transformers.models.bloom.modeling_bloom import _get_alibi_slopes

    assert_close(ct.alibi_slopes(H), _get_alibi_slopes(H, "cpu"))


def test_alibi_bias_gives_bloom_attention():
    """BLOOM adds ``m_h * j`` (one row for every query); ours adds ``-m_h (i - j)``.

    They differ by ``-m_h i``, a constant per row, so with the causal mask the softmax
    weights are the same."""
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    H, L = 6, 10
    g = torch.Generator().manual_seed(2)
    scores = torch.randn(1, H, L, L, generator=g, dtype=torch.float64)
    bloom = build_alibi_tensor(torch.ones(1, L), H, torch.float64).view(1, H, 1, L)
    causal = ct.causal_mask(L, L)
    expected = ct.softmax(scores + bloom, mask=causal)
    ours = ct.softmax(scores + ct.alibi_bias(H, L, L, dtype=torch.float64), mask=causal)
    assert_close(ours, expected)
    assert not np.allclose(
        (scores + bloom).numpy(), (scores + ct.alibi_bias(H, L, L)).numpy()
    )
    assert math.isclose(float(bloom[0, 0, 0, 1]), 0.25)  # head 0, key 1: m_0 = 2^-2
