"""Mixture of experts against Hugging Face transformers (issue 25): the sparse blocks of
Mixtral, Qwen3-MoE and DeepSeek-V3 built from tiny configs in float64 with our weights
copied in, and the parameter counts of the published models on the meta device.

Hugging Face computes the router's softmax (Mixtral, Qwen3-MoE) and DeepSeek-V3's whole
router in float32 even in a float64 model. Our torch layer with
``router_dtype="float32"`` follows the same arithmetic and must agree to 1e-10; the
float64 oracle (``router_dtype=None``) agrees with the router's weights only to float32
precision, and with HF's experts, given the same routing, to 1e-10.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from companion.moe_counts import (  # noqa: E402
    MOE_PRESETS,
    moe_parameter_breakdown,
    moe_parameter_count,
)
from companion.numpy import moe as nm  # noqa: E402
from companion.testing import assert_close  # noqa: E402
from companion.torch import moe as tm  # noqa: E402

F64 = {"rtol": 1e-10, "atol": 1e-10}
# HF's float32 softmax / sigmoid: weights within a few float32 ulps of float64 ones
F32 = {"rtol": 1e-6, "atol": 1e-7}


def _randomise(block, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    return block


def _mixtral():
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = transformers.MixtralConfig(
        hidden_size=16, intermediate_size=24, num_local_experts=6, num_experts_per_tok=2
    )
    cfg._experts_implementation = "eager"
    block = _randomise(MixtralSparseMoeBlock(cfg).double().eval(), 1)
    kw = {"router": "mixtral", "top_k": 2}
    return block, kw, None


def _qwen3():
    from transformers.models.qwen3_moe.modeling_qwen3_moe import (
        Qwen3MoeSparseMoeBlock,
    )

    cfg = transformers.Qwen3MoeConfig(
        hidden_size=16,
        moe_intermediate_size=12,
        num_experts=8,
        num_experts_per_tok=3,
        norm_topk_prob=True,
    )
    cfg._experts_implementation = "eager"
    block = _randomise(Qwen3MoeSparseMoeBlock(cfg).double().eval(), 2)
    kw = {"router": "qwen3_moe", "top_k": 3, "normalize": True}
    return block, kw, None


def _deepseek():
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    cfg = transformers.DeepseekV3Config(
        hidden_size=16,
        moe_intermediate_size=8,
        n_routed_experts=8,
        num_experts_per_tok=3,
        n_group=4,
        topk_group=2,
        n_shared_experts=2,
        routed_scaling_factor=2.5,
    )
    cfg._experts_implementation = "eager"
    block = _randomise(DeepseekV3MoE(cfg).double().eval(), 3)
    g = torch.Generator().manual_seed(4)
    bias = torch.randn(8, generator=g, dtype=torch.float64) * 0.1
    block.gate.e_score_correction_bias.copy_(bias)
    shared = block.shared_experts
    kw = {
        "router": "deepseek_v3",
        "top_k": 3,
        "num_groups": 4,
        "topk_groups": 2,
        "routed_scaling_factor": 2.5,
        "bias": block.gate.e_score_correction_bias,
        "num_shared_experts": 2,
        "shared_gate_up": torch.cat(
            [shared.gate_proj.weight, shared.up_proj.weight]
        ).detach(),
        "shared_down": shared.down_proj.weight.detach(),
    }
    return block, kw, shared


BLOCKS = {"mixtral": _mixtral, "qwen3_moe": _qwen3, "deepseek_v3": _deepseek}


def _x(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 7, 16, generator=g, dtype=torch.float64)


def _ours(block, kw, x, implementation, router_dtype):
    kw = dict(kw)
    top_k = kw.pop("top_k")
    with torch.no_grad():
        return tm.moe_layer(
            x,
            block.gate.weight,
            block.experts.gate_up_proj,
            block.experts.down_proj,
            top_k,
            router_dtype=router_dtype,
            implementation=implementation,
            **kw,
        )


def _sorted(indices, weights):
    """HF's DeepSeek router returns its top-k unsorted: compare as sets."""
    order = torch.argsort(indices, dim=-1)
    return indices.gather(1, order), weights.gather(1, order)


@pytest.mark.parametrize("implementation", ["loop", "grouped"])
@pytest.mark.parametrize("name", list(BLOCKS))
def test_block_equals_hf(name, implementation):
    block, kw, _ = BLOCKS[name]()
    x = _x()
    with torch.no_grad():
        expected = block(x)
        logits, weights, indices = block.gate(x.reshape(-1, 16))
    ours = _ours(block, kw, x, implementation, "float32")
    assert_close(ours.logits, logits, **F64)
    i_ours, w_ours = _sorted(ours.indices, ours.weights)
    i_hf, w_hf = _sorted(indices, weights.to(torch.float64))
    assert torch.equal(i_ours, i_hf)
    assert_close(w_ours, w_hf, **F64)
    assert_close(ours.output, expected, **F64)


@pytest.mark.parametrize("name", list(BLOCKS))
def test_float64_oracle_against_hf(name):
    """The numpy oracle routes in float64: the same experts as HF, weights within
    float32 rounding of HF's, and HF's experts given our routing equal ours to
    1e-10."""
    block, kw, shared = BLOCKS[name]()
    x = _x(5)
    flat = x.reshape(-1, 16)
    with torch.no_grad():
        logits, weights, indices = block.gate(flat)
    np_kw = {k: (v.numpy() if torch.is_tensor(v) else v) for k, v in kw.items()}
    top_k = np_kw.pop("top_k")
    ours = nm.moe_layer(
        x.numpy(),
        block.gate.weight.detach().numpy(),
        block.experts.gate_up_proj.detach().numpy(),
        block.experts.down_proj.detach().numpy(),
        top_k,
        **np_kw,
    )
    assert_close(ours.logits, logits.to(torch.float64), **F32)
    i_ours, w_ours = _sorted(
        torch.from_numpy(ours.indices), torch.from_numpy(ours.weights)
    )
    i_hf, w_hf = _sorted(indices, weights.to(torch.float64))
    assert torch.equal(i_ours, i_hf)
    assert_close(w_ours, w_hf, **F32)
    with torch.no_grad():
        routed = block.experts(
            flat, torch.from_numpy(ours.indices), torch.from_numpy(ours.weights)
        )
        if shared is not None:
            routed = routed + shared(flat)
    assert_close(ours.output.reshape(-1, 16), routed, **F64)


def test_switch_loss_equals_hf_load_balancing_loss():
    """Our auxiliary loss with alpha = 1 is HF's ``load_balancing_loss_func`` (which
    counts a token's k assignments, so balanced routing gives k)."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    g = torch.Generator().manual_seed(6)
    logits = torch.randn(40, 8, generator=g, dtype=torch.float64) * 2
    for k in (1, 2):
        _, indices = nm.route(
            logits.numpy(), k, router="mixtral" if k > 1 else "switch"
        )
        expected = load_balancing_loss_func((logits,), 8, k)
        ours = nm.load_balancing_loss(logits.numpy(), indices)
        # HF accumulates its sums in float32
        assert_close(ours, expected.to(torch.float64), rtol=1e-6, atol=1e-7)


# --- counts -----------------------------------------------------------------------

PUBLISHED = {
    "mixtral-8x7b": 46_702_792_704,
    "qwen3-30b-a3b": 30_532_122_624,
    "deepseek-v3": 671_026_404_352,
}


def _hf_config(name, **changes):
    if name == "mixtral-8x7b":
        kw = dict(
            vocab_size=32000,
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            num_local_experts=8,
            num_experts_per_tok=2,
            tie_word_embeddings=False,
        )
        kw.update(changes)
        return transformers.MixtralConfig(**kw), transformers.MixtralForCausalLM
    if name == "qwen3-30b-a3b":
        kw = dict(
            vocab_size=151936,
            hidden_size=2048,
            intermediate_size=6144,
            num_hidden_layers=48,
            num_attention_heads=32,
            num_key_value_heads=4,
            head_dim=128,
            moe_intermediate_size=768,
            num_experts=128,
            num_experts_per_tok=8,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            tie_word_embeddings=False,
        )
        kw.update(changes)
        return transformers.Qwen3MoeConfig(**kw), transformers.Qwen3MoeForCausalLM
    kw = dict(
        vocab_size=129280,
        hidden_size=7168,
        intermediate_size=18432,
        moe_intermediate_size=2048,
        num_hidden_layers=61,
        num_attention_heads=128,
        num_key_value_heads=128,
        n_shared_experts=1,
        n_routed_experts=256,
        num_experts_per_tok=8,
        n_group=8,
        topk_group=4,
        first_k_dense_replace=3,
        q_lora_rank=1536,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        routed_scaling_factor=2.5,
        tie_word_embeddings=False,
    )
    kw.update(changes)
    return transformers.DeepseekV3Config(**kw), transformers.DeepseekV3ForCausalLM


def _hf_count(name, **changes):
    cfg, cls = _hf_config(name, **changes)
    with torch.device("meta"):
        model = cls(cfg)
    return model.num_parameters()


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_total_count_equals_hf_and_published(name):
    ours = moe_parameter_count(MOE_PRESETS[name])
    assert ours == PUBLISHED[name]
    assert ours == _hf_count(name)


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_active_count_equals_hf_with_k_experts(name):
    """Active = the same model holding only the k experts a token uses, plus the
    routers' rows for the experts it does not (the router scores all N)."""
    c = MOE_PRESETS[name]
    key = {
        "mixtral-8x7b": "num_local_experts",
        "qwen3-30b-a3b": "num_experts",
        "deepseek-v3": "n_routed_experts",
    }[name]
    changes = {key: c.top_k}
    if name == "deepseek-v3":
        changes.update(n_group=1, topk_group=1)
    moe_layers = c.num_layers - c.first_dense_layers
    skipped_router_rows = moe_layers * (c.num_experts - c.top_k) * c.hidden_size
    expected = _hf_count(name, **changes) + skipped_router_rows
    assert moe_parameter_count(c, active=True) == expected


def test_breakdown_sums_and_published_active_sizes():
    """The breakdown sums to the count, and the active sizes are the ones the model
    cards state, cut to the digits they print: Mixtral 12.9B (rounded from 12.88),
    Qwen3 3.3B ("A3B", 3.35 cut), DeepSeek-V3 37B (37.55 cut)."""
    stated = {"mixtral-8x7b": (129, 1e8), "qwen3-30b-a3b": (33, 1e8)}
    stated["deepseek-v3"] = (37, 1e9)
    for name, c in MOE_PRESETS.items():
        parts = moe_parameter_breakdown(c)
        assert sum(parts.values()) == moe_parameter_count(c)
        value, unit = stated[name]
        active = moe_parameter_count(c, active=True) / unit
        assert value in (math.floor(active), round(active)), (name, active)
        assert moe_parameter_count(c, active=True) < moe_parameter_count(c)


def test_count_rejects_bad_config():
    c = MOE_PRESETS["mixtral-8x7b"]
    with pytest.raises(ValueError, match="top_k"):
        moe_parameter_count(c.replace(top_k=9))
    with pytest.raises(ValueError, match="intermediate_size"):
        moe_parameter_count(c.replace(first_dense_layers=1))
    with pytest.raises(ValueError, match="attention"):
        moe_parameter_count(c.replace(attention="mha"))
    assert np.isscalar(moe_parameter_count(c))


def test_switch_router_capacity_and_losses_equal_hf():
    """Hugging Face's Switch Transformers top-1 router (its routing dtype set to
    float64 on the module: the config's validator allows only float32 and narrower,
    the forward reads ``router.dtype``; one sequence, so one capacity group): the same
    expert per token, the same tokens dropped at its ``expert_capacity``, the same
    gate; its z-loss and its auxiliary loss equal ours."""
    from transformers.models.switch_transformers import (
        modeling_switch_transformers as st,
    )

    cfg = transformers.SwitchTransformersConfig(
        d_model=16, num_experts=4, expert_capacity=3
    )
    router = st.SwitchTransformersTop1Router(cfg).double().eval()
    router.dtype = torch.float64
    _randomise(router, 8)
    x = _x(9)[:1]  # (1, 7, 16)
    x = torch.cat([x, x + 0.01], dim=1)  # 14 tokens, 4 experts of 3 slots: drops
    with torch.no_grad():
        mask, gate, logits = router(x)
    flat_logits = logits[0].numpy()
    weights, indices = nm.route(flat_logits, 1, router="switch")
    kept = nm.capacity_keep(indices, 4, 3)
    assert np.array_equal(mask[0].argmax(-1).numpy()[kept[:, 0]], indices[kept])
    assert np.array_equal(mask[0].sum(-1).numpy().astype(bool), kept[:, 0])
    assert not kept.all()  # the test drops something
    assert_close(weights, gate[0], **F64)
    assert_close(nm.router_z_loss(flat_logits), st.router_z_loss_func(logits), **F64)
    probs = torch.softmax(logits, dim=-1)
    expected = st.load_balancing_loss_func(probs, torch.from_numpy(indices.T))
    # HF averages its 0/1 dispatch mask in float32
    assert_close(
        nm.load_balancing_loss(flat_logits, indices), expected, rtol=1e-6, atol=1e-7
    )
