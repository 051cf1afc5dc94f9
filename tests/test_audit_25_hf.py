"""Audit of issue 25's parity item: "Mixtral's and Qwen3-MoE's sparse blocks and
DeepSeek-V3's MoE from tiny configs, weights copied, outputs to 1e-10 in float64
(router logits, choices, outputs)", for the float64 numpy oracle itself.

Hugging Face computes these routers' softmax (Mixtral, Qwen3-MoE) and DeepSeek-V3's
whole router in float32 even in a float64 model, so ``tests/test_moe_hf.py`` checks
the oracle's gates only to float32 precision (and the torch layer with
``router_dtype="float32"`` to 1e-10). Here each HF router's own ``forward`` is
retargeted to float64, as ``tests/test_rope_scaling.py`` retargets HF's RoPE
functions: its source with every float32 dtype replaced by float64 (the replacements
are counted, so a changed HF fails loudly), bound to the block's router. The HF block
is then float64 end to end, and the numpy oracle (``router_dtype=None``, both
dispatch paths) equals it to 1e-10: router logits, the experts chosen, their weights,
and the block's output (shared experts included for DeepSeek-V3).
"""

from __future__ import annotations

import inspect
import os
import sys
import textwrap
import types
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).parent))
import test_moe_hf as hf_blocks  # noqa: E402

from companion.numpy import moe as nm  # noqa: E402
from companion.testing import assert_close  # noqa: E402

F64 = {"rtol": 1e-10, "atol": 1e-10}
RETARGET = (
    (".float()", ".double()"),
    ("dtype=torch.float,", "dtype=torch.float64,"),
    ("torch.float32", "torch.float64"),
)


def _float64_router(block):
    """Bind a float64 copy of the router's ``forward`` to ``block.gate``."""
    gate = block.gate
    cls = type(gate)
    source = textwrap.dedent(inspect.getsource(cls.forward))
    replaced = 0
    for old, new in RETARGET:
        replaced += source.count(old)
        source = source.replace(old, new)
    assert replaced >= 1, cls.__name__  # HF's router casts to float32 somewhere
    assert "float32" not in source and ".float()" not in source, cls.__name__
    assert "torch.float," not in source and "torch.float)" not in source
    namespace = dict(vars(sys.modules[cls.__module__]))
    exec(compile(source, f"<float64 {cls.__name__}.forward>", "exec"), namespace)
    gate.forward = types.MethodType(namespace["forward"], gate)
    if hasattr(gate, "e_score_correction_bias"):
        gate.e_score_correction_bias.data = gate.e_score_correction_bias.double()
    return block


@pytest.mark.parametrize("implementation", ["loop", "grouped"])
@pytest.mark.parametrize("name", list(hf_blocks.BLOCKS))
def test_float64_oracle_equals_hf_in_float64(name, implementation):
    block, kw, _ = hf_blocks.BLOCKS[name]()
    block = _float64_router(block)
    x = hf_blocks._x(5)
    flat = x.reshape(-1, x.shape[-1])
    with torch.no_grad():
        logits, weights, indices = block.gate(flat)
        expected = block(x)
    assert logits.dtype == weights.dtype == expected.dtype == torch.float64
    np_kw = {k: (v.numpy() if torch.is_tensor(v) else v) for k, v in kw.items()}
    top_k = np_kw.pop("top_k")
    ours = nm.moe_layer(
        x.numpy(),
        block.gate.weight.detach().numpy(),
        block.experts.gate_up_proj.detach().numpy(),
        block.experts.down_proj.detach().numpy(),
        top_k,
        implementation=implementation,
        **np_kw,
    )
    assert_close(ours.logits, logits, name=f"{name} router logits", **F64)
    i_ours, w_ours = hf_blocks._sorted(
        torch.from_numpy(ours.indices), torch.from_numpy(ours.weights)
    )
    i_hf, w_hf = hf_blocks._sorted(indices, weights)
    assert torch.equal(i_ours, i_hf), f"{name}: different experts chosen"
    assert_close(w_ours, w_hf, name=f"{name} gates", **F64)
    assert_close(ours.output, expected, name=f"{name} output", **F64)
    # the float32 router HF ships is not float64: the retargeting changed something
    plain, _, _ = hf_blocks.BLOCKS[name]()
    with torch.no_grad():
        assert not torch.equal(plain(x), expected)
