r"""Pipeline parallelism with ``torch.distributed.pipelining``: a
:class:`~companion.torch.models.TinyTransformerLM` cut into stages, the tied embedding
on the first and the last stage.

Rank ``s`` of ``P`` holds stage ``s``: the first stage the embedding (and the position
table) and the first ``L / P`` blocks, the middle stages their blocks, the last stage
its blocks, the final norm and the output layer ``h W_E^T``. The output layer is tied
to the embedding, which lives on the first stage: the last stage holds a *copy* of
``W_E``. Both copies start equal; after each backward pass :func:`sum_tied_gradients`
all-reduces their gradients between the first and the last rank (``V E`` numbers,
counted), so that each copy receives the gradient of the one shared parameter (the
sum of both uses) and an optimiser step keeps them equal: two copies, one parameter.
With ``P = 1`` there is nothing to tie.

The schedules are PyTorch's (``ScheduleGPipe``, ``Schedule1F1B``): the batch is cut
into ``m`` microbatches; the loss of each is ``sum of token losses / (B T)``, so the
microbatches' gradients add up to the gradient of the whole batch's mean loss.

Explained in the book chapter *Scaling out*.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from companion import _checks
from companion.torch.distributed.comm import all_reduce
from companion.torch.models import TinyTransformerLM

__all__ = [
    "stage_layers",
    "PipelineStageModule",
    "sum_tied_gradients",
    "tied_group_ranks",
]


def stage_layers(num_layers: int, stage: int, num_stages: int) -> range:
    """The blocks of ``stage``; ``ValueError`` unless ``num_stages`` divides
    ``num_layers``."""
    L = _checks.check_int("num_layers", num_layers)
    P = _checks.check_int("num_stages", num_stages)
    stage = _checks.check_int("stage", stage, minimum=0)
    if stage >= P:
        raise ValueError(f"stage must be < num_stages={P}, got {stage}")
    if L % P:
        raise ValueError(
            f"num_layers={L} does not split into num_stages={P} equal stages; "
            f"choose a number of stages that divides {L}"
        )
    return range(stage * L // P, (stage + 1) * L // P)


class PipelineStageModule(nn.Module):
    """Stage ``stage`` of ``num_stages`` of a tied ``TinyTransformerLM`` (copies).

    First stage: ``ids (B, T)`` -> ``h (B, T, E)``; middle: ``h`` -> ``h``; last:
    ``h`` -> ``logits (B, T, V)`` with its copy ``tied_weight`` of ``W_E``.
    """

    def __init__(self, model: TinyTransformerLM, stage: int, num_stages: int):
        super().__init__()
        if not isinstance(model, TinyTransformerLM) or not model.tied:
            raise TypeError("model must be a tied TinyTransformerLM")
        if model.positions not in ("learned", None):
            raise ValueError(
                f"PipelineStageModule supports positions 'learned' or None, got "
                f"{model.positions!r}"
            )
        layers = stage_layers(len(model.blocks), stage, num_stages)
        self.first, self.last = stage == 0, stage == num_stages - 1
        self.embedding = copy.deepcopy(model.embedding) if self.first else None
        self.position_embedding = (
            copy.deepcopy(model.position_embedding) if self.first else None
        )
        self.blocks = nn.ModuleList(copy.deepcopy(model.blocks[i]) for i in layers)
        self.norm = copy.deepcopy(model.norm) if self.last else None
        self.tied_weight = (
            nn.Parameter(model.embedding.weight.detach().clone())
            if self.last and not self.first
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.first:
            ids = x
            x = self.embedding(ids)  # (B, T, E)
            if self.position_embedding is not None:
                positions = torch.arange(ids.shape[1], device=ids.device)
                x = x + self.position_embedding(positions)
        for block in self.blocks:
            x, _ = block(x)
        if not self.last:
            return x
        weight = self.embedding.weight if self.first else self.tied_weight
        return nn.functional.linear(self.norm(x), weight)  # (B, T, V)

    def tied(self) -> nn.Parameter | None:
        """This stage's copy of the tied weight (first and last stage), else None."""
        if self.first:
            return self.embedding.weight
        return self.tied_weight


def sum_tied_gradients(stage: PipelineStageModule, tied_group) -> None:
    """Sum the two copies' gradients (first and last rank) in place; counted.

    ``tied_group``: a process group of exactly the first and the last rank (every
    rank creates it with ``dist.new_group``; the others pass it too and do nothing).
    """
    weight = stage.tied()
    if weight is None or (stage.first and stage.last):
        return
    if weight.grad is None:
        raise ValueError("sum_tied_gradients needs a backward pass first")
    weight.grad.copy_(all_reduce(weight.grad.clone(), group=tied_group))


def tied_group_ranks(num_stages: int) -> list[int]:
    """The ranks of the first and the last stage."""
    return [0, num_stages - 1]
