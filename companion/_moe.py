"""Backend-free pieces of the mixture of experts: the router conventions, the checks
shared by the numpy, torch and TensorFlow namespaces, and expert capacity.

Each backend passes shapes (tuples) and Python values only; the checks raise
``ValueError`` naming the argument and what was seen, so the three namespaces reject
bad input with the same words.

Router conventions (the ``router=`` keyword, named after the model that uses it):

===============  ========  ===================================  =====================
router           affinity  chosen weights                       ``normalize`` default
===============  ========  ===================================  =====================
``switch``       softmax   the chosen probability (top-1 only)  ``False``
``mixtral``      softmax   renormalised over the chosen         ``True``
``qwen3_moe``    softmax   renormalised if ``norm_topk_prob``   ``True``
``deepseek_v3``  sigmoid   renormalised, times the scaling      ``True``
===============  ========  ===================================  =====================
"""

from __future__ import annotations

import math
from typing import NamedTuple

from companion import _checks

__all__ = [
    "ROUTERS",
    "RouterSettings",
    "check_router",
    "check_experts",
    "check_shared",
    "expert_capacity",
    "check_capacity_factor",
    "check_implementation",
]

#: The affinity function of each router convention.
ROUTERS = {
    "switch": "softmax",
    "mixtral": "softmax",
    "qwen3_moe": "softmax",
    "deepseek_v3": "sigmoid",
}

IMPLEMENTATIONS = ("loop", "grouped")


class RouterSettings(NamedTuple):
    """The resolved router settings (defaults filled in, checked)."""

    affinity: str
    top_k: int
    normalize: bool
    num_groups: int
    topk_groups: int
    routed_scaling_factor: float
    router_dtype: str | None


def check_router(
    num_experts: int,
    top_k,
    router: str,
    *,
    num_groups=1,
    topk_groups=1,
    routed_scaling_factor=1.0,
    normalize=None,
    router_dtype=None,
    bias_shape: tuple[int, ...] | None = None,
) -> RouterSettings:
    """Check the router's keywords against ``num_experts`` (the logits' last axis)."""
    if router not in ROUTERS:
        raise ValueError(f"router must be one of {sorted(ROUTERS)}, got {router!r}")
    top_k = _checks.check_int("top_k", top_k)
    if top_k > num_experts:
        raise ValueError(
            f"top_k={top_k} is larger than the number of experts {num_experts}"
        )
    if router == "switch" and top_k != 1:
        raise ValueError(f"top_k must be 1 for router='switch', got {top_k}")
    num_groups = _checks.check_int("num_groups", num_groups)
    topk_groups = _checks.check_int("topk_groups", topk_groups)
    if num_experts % num_groups:
        raise ValueError(
            f"num_groups={num_groups} must divide the number of experts {num_experts}"
        )
    if topk_groups > num_groups:
        raise ValueError(
            f"topk_groups={topk_groups} is larger than num_groups={num_groups}"
        )
    if num_groups > 1:
        if router != "deepseek_v3":
            raise ValueError(
                f"num_groups={num_groups} (node-limited routing) needs "
                f"router='deepseek_v3', got router={router!r}"
            )
        if num_experts // num_groups < 2:
            raise ValueError(
                f"num_groups={num_groups} leaves fewer than 2 experts per group "
                f"({num_experts} experts); a group's score is its top-2 sum"
            )
        if top_k > topk_groups * (num_experts // num_groups):
            raise ValueError(
                f"top_k={top_k} is larger than the experts in topk_groups="
                f"{topk_groups} groups of {num_experts // num_groups}"
            )
    if isinstance(routed_scaling_factor, bool) or not isinstance(
        routed_scaling_factor, (int, float)
    ):
        raise ValueError(
            "routed_scaling_factor must be a positive number, got "
            f"{routed_scaling_factor!r}"
        )
    if not routed_scaling_factor > 0:
        raise ValueError(
            "routed_scaling_factor must be a positive number, got "
            f"{routed_scaling_factor!r}"
        )
    if normalize is None:
        normalize = router != "switch"
    if router == "mixtral" and not normalize:
        raise ValueError("router='mixtral' always renormalises; normalize must be True")
    if router_dtype is not None and router_dtype not in ("float32", "float64"):
        raise ValueError(
            f"router_dtype must be None, 'float32' or 'float64', got {router_dtype!r}"
        )
    if bias_shape is not None and tuple(bias_shape) != (num_experts,):
        raise ValueError(
            f"bias must have shape ({num_experts},) (one per expert), got "
            f"{tuple(bias_shape)}"
        )
    return RouterSettings(
        ROUTERS[router],
        top_k,
        bool(normalize),
        num_groups,
        topk_groups,
        float(routed_scaling_factor),
        router_dtype,
    )


def check_experts(
    x_shape: tuple[int, ...],
    gate_up_shape: tuple[int, ...],
    down_shape: tuple[int, ...],
) -> tuple[int, int, int]:
    """Experts stored as Hugging Face stores them: ``gate_up (N, 2 I, E)`` (the gate's
    rows, then the up projection's) and ``down (N, E, I)``. Return ``(N, E, I)``."""
    if len(gate_up_shape) != 3:
        raise ValueError(
            f"gate_up must be 3-D (num_experts, 2 * intermediate, E), got shape "
            f"{tuple(gate_up_shape)}"
        )
    if len(down_shape) != 3:
        raise ValueError(
            f"down must be 3-D (num_experts, E, intermediate), got shape "
            f"{tuple(down_shape)}"
        )
    N, two_i, E = gate_up_shape
    if two_i % 2:
        raise ValueError(
            f"gate_up's second axis holds gate and up rows and must be even, got "
            f"shape {tuple(gate_up_shape)}"
        )
    if tuple(down_shape) != (N, E, two_i // 2):
        raise ValueError(
            f"down must have shape {(N, E, two_i // 2)} to match gate_up "
            f"{tuple(gate_up_shape)}, got {tuple(down_shape)}"
        )
    if not x_shape or x_shape[-1] != E:
        raise ValueError(
            f"x must end in the experts' width E={E}, got shape {tuple(x_shape)}"
        )
    return N, E, two_i // 2


def check_shared(
    num_shared_experts,
    E: int,
    shared_gate_up_shape: tuple[int, ...] | None,
    shared_down_shape: tuple[int, ...] | None,
) -> bool:
    """The shared experts (DeepSeekMoE): one dense gated MLP whose width is the sum of
    ``num_shared_experts`` experts' widths, ``gate_up (2 I_s, E)``, ``down (E, I_s)``.
    Return whether there are any."""
    num_shared_experts = _checks.check_int(
        "num_shared_experts", num_shared_experts, minimum=0
    )
    given = shared_gate_up_shape is not None or shared_down_shape is not None
    if num_shared_experts == 0:
        if given:
            raise ValueError(
                "shared_gate_up / shared_down were given but num_shared_experts=0"
            )
        return False
    if shared_gate_up_shape is None or shared_down_shape is None:
        raise ValueError(
            f"num_shared_experts={num_shared_experts} needs shared_gate_up and "
            "shared_down (the shared experts' weights), got None"
        )
    if len(shared_gate_up_shape) != 2 or shared_gate_up_shape[1] != E:
        raise ValueError(
            f"shared_gate_up must have shape (2 * I_s, {E}), got "
            f"{tuple(shared_gate_up_shape)}"
        )
    two_i = shared_gate_up_shape[0]
    if two_i % (2 * num_shared_experts):
        raise ValueError(
            f"shared_gate_up's first axis {two_i} must be 2 * I_s with I_s a multiple "
            f"of num_shared_experts={num_shared_experts}"
        )
    if tuple(shared_down_shape) != (E, two_i // 2):
        raise ValueError(
            f"shared_down must have shape {(E, two_i // 2)}, got "
            f"{tuple(shared_down_shape)}"
        )
    return True


def check_capacity_factor(capacity_factor) -> float | None:
    """``None`` (no capacity, nothing dropped) or a positive number."""
    if capacity_factor is None:
        return None
    if isinstance(capacity_factor, bool) or not isinstance(
        capacity_factor, (int, float)
    ):
        raise ValueError(
            f"capacity_factor must be None or a positive number, got "
            f"{capacity_factor!r}"
        )
    if not capacity_factor > 0 or math.isinf(capacity_factor):
        raise ValueError(
            f"capacity_factor must be a finite number > 0, got {capacity_factor!r}"
        )
    return float(capacity_factor)


def expert_capacity(num_tokens, num_experts, top_k=1, capacity_factor=1.0) -> int:
    r"""Slots per expert: :math:`\lceil c\, T k / N \rceil` (Switch Transformer, with
    GShard's ``k`` assignments per token).

    ``capacity_factor`` ``c = 1`` gives each expert exactly its fair share of the
    ``T k`` assignments; a token routed to a full expert is dropped there. The product
    is rounded to 9 decimals before the ceiling, so that ``c = 1.1``, ``T = 100``,
    ``N = 10`` gives 11 slots, not the 12 of the binary ``1.1``'s excess.
    """
    T = _checks.check_int("num_tokens", num_tokens, minimum=0)
    N = _checks.check_int("num_experts", num_experts)
    k = _checks.check_int("top_k", top_k)
    if k > N:
        raise ValueError(f"top_k={k} is larger than the number of experts {N}")
    c = check_capacity_factor(capacity_factor)
    if c is None:
        raise ValueError("capacity_factor must be a finite number > 0, got None")
    return math.ceil(round(c * T * k / N, 9))


def check_implementation(implementation: str) -> str:
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}"
        )
    return implementation


def check_gamma(gamma) -> float:
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not gamma > 0:
        raise ValueError(f"gamma must be a positive number, got {gamma!r}")
    return float(gamma)


def check_indices(indices_shape: tuple[int, ...], name: str = "indices") -> None:
    if len(indices_shape) != 2:
        raise ValueError(
            f"{name} must be 2-D (tokens, top_k), got shape {tuple(indices_shape)}"
        )
