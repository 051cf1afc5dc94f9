"""Helpers shared by the distributed tests: the one-process run that a tensor-parallel
launch is compared with, and the slice of its weight gradients that one rank holds."""

from companion.torch.distributed.examples import (
    attention_module,
    tensor_parallel_inputs,
)


def one_process_attention(case):
    """The full attention module of ``case`` run forward and backward in one process:
    ``(module, output, input gradient)``; the module's parameters hold their
    gradients."""
    module = attention_module(case["E"], case["H"], case["H_kv"], seed=case["seed"])
    x, grad_out = tensor_parallel_inputs(
        case["E"], case["B"], case["L"], seed=case["seed"]
    )
    x.requires_grad_()
    y = module(x, causal=case["causal"])
    y.backward(grad_out)
    return module, y.detach(), x.grad


def head_gradients(module, heads, kv_heads):
    """The gradients of ``module`` that a rank holding query heads ``heads`` and
    key/value heads ``kv_heads`` (slices of head indices) must hold, by name."""
    D = module.head_dim
    q = slice(heads.start * D, heads.stop * D)
    kv = slice(kv_heads.start * D, kv_heads.stop * D)
    return {
        "q_proj.weight": module.q_proj.weight.grad[q],
        "q_proj.bias": module.q_proj.bias.grad[q],
        "k_proj.weight": module.k_proj.weight.grad[kv],
        "k_proj.bias": module.k_proj.bias.grad[kv],
        "v_proj.weight": module.v_proj.weight.grad[kv],
        "v_proj.bias": module.v_proj.bias.grad[kv],
        "out_proj.weight": module.out_proj.weight.grad[:, q],
        "out_bias": module.out_proj.bias.grad,
    }
