"""The package's torch modules trace whole: torch.export, torch.compile(fullgraph=True).

TorchScript, the API the sources name, is deprecated; these are its replacements
(``torch.export`` for deployment, ``torch.compile`` for speed). Tracing fails on a
caught exception or an unsupported builtin call anywhere in the forward pass, input
checks included, so this guards the whole path. ``aot_eager`` captures and runs the
graph without generating code (the default backend, inductor, compiles C++ for tens of
seconds).
"""

import pytest

torch = pytest.importorskip("torch")

import companion.torch as ct  # noqa: E402
from companion.testing import assert_close  # noqa: E402


@pytest.fixture
def module_and_input():
    torch.manual_seed(0)
    module = ct.MultiHeadAttention(16, 4, 2).eval()
    return module, torch.randn(2, 5, 16)  # (B, L, E)


def test_export_multi_head_attention(module_and_input):
    module, x = module_and_input
    program = torch.export.export(module, (x,), kwargs={"causal": True})
    with torch.no_grad():
        assert_close(program.module()(x, causal=True), module(x, causal=True))


def test_compile_multi_head_attention_in_one_graph(module_and_input):
    module, x = module_and_input
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert_close(compiled(x, causal=True), module(x, causal=True))
