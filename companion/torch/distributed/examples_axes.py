"""Worker functions for Ulysses, vocabulary and expert parallelism, for the tests and
the chapter, run in the processes of :func:`~companion.torch.distributed.launch.launch`.

As in :mod:`companion.torch.distributed.examples`: each builds its inputs from a seed
(the same full tensors on every rank), runs the distributed computation on this rank's
part and returns what the caller checks; the comparisons with one process are made by
the caller, in the parent process.

Explained in the book chapter *Scaling out*.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from companion.torch.distributed.comm import counting
from companion.torch.distributed.examples import attention_inputs
from companion.torch.distributed.expert_parallel import ExpertParallelMoE
from companion.torch.distributed.ring import (
    gather_sequence,
    ring_attention,
    shard_sequence,
)
from companion.torch.distributed.ulysses import ulysses_attention
from companion.torch.distributed.vocab_parallel import (
    VocabParallelEmbedding,
    vocab_parallel_cross_entropy,
)

__all__ = [
    "run_ulysses",
    "ulysses_refusals",
    "vocab_model",
    "vocab_batch",
    "run_vocab_parallel",
    "moe_module",
    "moe_tokens",
    "run_expert_parallel",
    "pipeline_model",
    "run_pipeline",
    "pipeline_timeline",
    "bubble_fraction",
    "run_pipeline_checks",
    "run_axes",
    "run_ring_and_ulysses",
]


def _numpy(x):
    return x.detach().cpu().numpy()


def run_ulysses(cases, refusals=False):
    """Ulysses and ring attention, forward and backward, on the same shards.

    A case: ``B, H, H_kv, length, D, D_v, causal, layout, seed`` (and ``scale``).
    Returns one dict
    per case with, for ``"ulysses"`` and ``"ring"``: the gathered ``output``,
    ``grad_query``, ``grad_key``, ``grad_value`` (rank 0 only) and this rank's
    ``forward``/``backward`` counts, and this rank's shard bytes ``q, k, v, o``.
    With ``refusals``, returns ``{"cases": ..., "refusals": ulysses_refusals()}``.
    """
    rank, world_size = dist.get_rank(), dist.get_world_size()
    results = []
    for case in cases:
        case = dict(case)
        causal, layout = case.pop("causal"), case.pop("layout")
        options = dict(causal=causal, layout=layout, scale=case.pop("scale", None))
        q, k, v, grad_out = attention_inputs(**case)
        result = {}
        for name, fn in (("ulysses", ulysses_attention), ("ring", ring_attention)):
            shards = [
                shard_sequence(t, rank, world_size, layout=layout) for t in (q, k, v)
            ]
            q_s, k_s, v_s = (t.requires_grad_() for t in shards)
            with counting() as forward:
                out = fn(q_s, k_s, v_s, **options)
            with counting() as backward:
                out.backward(shard_sequence(grad_out, rank, world_size, layout=layout))
            gathered = [
                gather_sequence(t.detach(), layout=layout)
                for t in (out, q_s.grad, k_s.grad, v_s.grad)
            ]
            part = {"forward": forward.as_dict(), "backward": backward.as_dict()}
            if rank == 0:
                names = ("output", "grad_query", "grad_key", "grad_value")
                part.update(zip(names, map(_numpy, gathered)))
            result[name] = part
            result["shard_bytes"] = {
                n: t.numel() * t.element_size()
                for n, t in (("q", q_s), ("k", k_s), ("v", v_s), ("o", out))
            }
        results.append(result)
    if refusals:
        return {"cases": results, "refusals": ulysses_refusals()}
    return results


def ulysses_refusals():
    """The messages of the errors ``ulysses_attention`` raises on bad input."""
    world_size = dist.get_world_size()
    messages = []
    x = torch.zeros(1, world_size + 1, 4, 2, dtype=torch.float64)  # H not split
    try:
        ulysses_attention(x, x, x)
    except ValueError as exc:
        messages.append(str(exc))
    y = torch.zeros(1, 2, 3, 2, dtype=torch.float64)  # odd zigzag shard
    try:
        ulysses_attention(y, y, y, layout="zigzag")
    except ValueError as exc:
        messages.append(str(exc))
    return messages


# --------------------------------------------------------------------------------------
# vocabulary parallelism
# --------------------------------------------------------------------------------------


def vocab_model(V, E, *, seed=0):
    """A float64 tied language model's parts: ``(embedding, layer)``; the model is
    ``logits = tanh(layer(embedding(ids))) W^T`` with ``W`` the embedding's weight."""
    torch.manual_seed(seed)
    embedding = torch.nn.Embedding(V, E, dtype=torch.float64)
    layer = torch.nn.Linear(E, E, dtype=torch.float64)
    return embedding, layer


def vocab_batch(V, B, T, *, seed=0):
    """Token ids ``(B, T)`` and targets ``(B, T)`` from ``seed``."""
    g = torch.Generator().manual_seed(seed + 5)
    return torch.randint(0, V, (B, T), generator=g), torch.randint(
        0, V, (B, T), generator=g
    )


def run_vocab_parallel(cases):
    """The tied model's mean loss and gradients with the vocabulary split.

    A case: ``V, E, B, T, seed``. Returns per case: ``loss``, ``grad_weight`` (this
    rank's rows), ``grad_layer_weight``, ``grad_layer_bias``, ``vocab`` (this rank's
    range), ``logits_shape`` and this rank's ``forward``/``backward`` counts; or, for
    a vocabulary that does not split, ``error``: the ``ValueError``'s message.
    """
    results = []
    for case in cases:
        embedding, layer = vocab_model(case["V"], case["E"], seed=case["seed"])
        try:
            parallel = VocabParallelEmbedding(embedding)
        except ValueError as exc:
            results.append({"error": str(exc)})
            continue
        ids, targets = vocab_batch(case["V"], case["B"], case["T"], seed=case["seed"])
        with counting() as forward:
            hidden = torch.tanh(layer(parallel(ids)))  # (B, T, E)
            logits = parallel.logits(hidden)  # (B, T, V/W)
            loss = vocab_parallel_cross_entropy(logits, targets).mean()
        with counting() as backward:
            loss.backward()
        results.append(
            {
                "loss": loss.item(),
                "grad_weight": _numpy(parallel.weight.grad),
                "grad_layer_weight": _numpy(layer.weight.grad),
                "grad_layer_bias": _numpy(layer.bias.grad),
                "vocab": (parallel.vocab.start, parallel.vocab.stop),
                "logits_shape": tuple(logits.shape),
                "forward": forward.as_dict(),
                "backward": backward.as_dict(),
            }
        )
    return results


# --------------------------------------------------------------------------------------
# expert parallelism
# --------------------------------------------------------------------------------------


def moe_module(E, I, N, top_k, *, seed=0, capacity_factor=None, shared=0):
    """A float64 ``MoELayer`` with weights of a visible size, from ``seed``."""
    from companion.torch.moe import MoELayer

    module = MoELayer(
        E,
        I,
        N,
        top_k,
        num_shared_experts=shared,
        capacity_factor=capacity_factor,
        dtype=torch.float64,
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def moe_tokens(world_size, T, E, *, seed=0):
    """Every rank's tokens ``(W, T, E)`` and output gradients, from ``seed``."""
    g = torch.Generator().manual_seed(seed + 7)
    x = torch.randn(world_size, T, E, generator=g, dtype=torch.float64)
    return x, torch.randn(world_size, T, E, generator=g, dtype=torch.float64)


def run_expert_parallel(cases):
    """Expert-parallel MoE forward and backward on this rank's tokens, per case.

    A case: ``E, I, N, top_k, T, seed, capacity_factor, shared``. Returns per case:
    this rank's ``output`` and ``grad_x``, the gradients of its experts (``gate_up``,
    ``down``), of its router copy and shared experts, ``experts`` (its range),
    ``received`` (rows per source and expert) and its ``forward``/``backward`` counts;
    or ``error``: a ``ValueError``'s message.
    """
    rank, world_size = dist.get_rank(), dist.get_world_size()
    results = []
    for case in cases:
        case = dict(case)
        T = case.pop("T")
        module = moe_module(**case)
        try:
            parallel = ExpertParallelMoE(module)
        except ValueError as exc:
            results.append({"error": str(exc)})
            continue
        x, grad_out = moe_tokens(world_size, T, case["E"], seed=case["seed"])
        x = x[rank].clone().requires_grad_()
        with counting() as forward:
            y = parallel(x)
        with counting() as backward:
            y.backward(grad_out[rank])
        results.append(
            {
                "output": _numpy(y),
                "grad_x": _numpy(x.grad),
                "grads": {n: _numpy(p.grad) for n, p in parallel.named_parameters()},
                "experts": (parallel.experts.start, parallel.experts.stop),
                "received": _numpy(parallel.last_received),
                "forward": forward.as_dict(),
                "backward": backward.as_dict(),
            }
        )
    return results


# --------------------------------------------------------------------------------------
# pipeline parallelism
# --------------------------------------------------------------------------------------


def pipeline_model(num_layers, *, seed=0, vocab_size=13, length=8, embed_dim=8):
    """A float64 tied ``TinyTransformerLM`` (two heads) from ``seed``."""
    from companion.torch.models import TinyTransformerLM

    torch.manual_seed(seed)
    model = TinyTransformerLM(
        vocab_size, length, embed_dim=embed_dim, num_heads=2, num_layers=num_layers
    )
    return model.double()


def run_pipeline(cases):
    """One training step's loss and gradients with the model cut into stages.

    A case: ``schedule`` (``"gpipe"`` or ``"1f1b"``), ``microbatches``, ``layers``,
    ``batch``, ``seed``. Every rank is one stage. Returns per case: ``loss`` (the
    last stage's sum over microbatches; ``None`` elsewhere), this stage's gradients
    under the whole model's parameter names (the tied copy of the last stage as
    ``embedding.weight``) and the bytes of the tied all-reduce.
    """
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    from companion.torch.distributed.examples import language_batch
    from companion.torch.distributed.pipeline import (
        PipelineStageModule,
        stage_layers,
        sum_tied_gradients,
        tied_group_ranks,
    )

    rank, P = dist.get_rank(), dist.get_world_size()
    tied_group = dist.new_group(tied_group_ranks(P))
    schedules = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}
    results = []
    for case in cases:
        model = pipeline_model(case["layers"], seed=case["seed"])
        ids, targets = language_batch(case["batch"], seed=case["seed"], length=8)
        V, n = model.vocab_size, ids.numel()

        def loss_fn(logits, target, V=V, n=n):  # a microbatch's share of the mean
            return (
                torch.nn.functional.cross_entropy(
                    logits.reshape(-1, V), target.reshape(-1), reduction="sum"
                )
                / n
            )

        module = PipelineStageModule(model, rank, P)
        stage = PipelineStage(module, rank, P, torch.device("cpu"))
        schedule = schedules[case["schedule"]](
            stage,
            n_microbatches=case["microbatches"],
            loss_fn=loss_fn,
            scale_grads=False,  # the loss is already the batch mean's share
        )
        losses = []
        if rank == 0:
            schedule.step(ids)
        elif rank == P - 1:
            schedule.step(target=targets, losses=losses)
        else:
            schedule.step()
        with counting() as tied:
            sum_tied_gradients(module, tied_group)
        first = stage_layers(case["layers"], rank, P).start
        grads = {}
        for name, p in module.named_parameters():
            if name == "tied_weight":
                name = "embedding.weight"
            elif name.startswith("blocks."):
                _, i, rest = name.split(".", 2)
                name = f"blocks.{first + int(i)}.{rest}"
            grads[name] = _numpy(p.grad)
        results.append(
            {
                "loss": float(sum(loss.detach() for loss in losses))
                if losses
                else None,
                "grads": grads,
                "tied_bytes": tied.bytes.get("all_reduce", 0),
            }
        )
    return results


class _Mark(torch.autograd.Function):
    """Identity; its backward notes the wall time in ``marks`` under ``key``."""

    @staticmethod
    def forward(ctx, x, marks, key):
        ctx.marks, ctx.key = marks, key
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.marks.setdefault(ctx.key, time.time())
        return grad, None, None


class _TimedStage(torch.nn.Module):
    """A stage whose forward and backward spans are noted, per microbatch."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.spans, self.marks, self.count = inner, [], {}, 0
        tied = inner.tied() if inner.first else None
        if tied is not None:  # the embedding is the first stage's last backward op
            tied.register_post_accumulate_grad_hook(self._embedding_done)

    def _embedding_done(self, _):
        self.marks[("end", self.count_backward)] = time.time()
        self.count_backward += 1

    def forward(self, x):
        i = self.count
        self.count += 1
        if i == 0:
            self.count_backward = 0
        start = time.time()
        if x.is_floating_point():
            x = _Mark.apply(x, self.marks, ("end", i))
        y = self.inner(x)
        self.spans.append(("forward", i, start, time.time()))
        return _Mark.apply(y, self.marks, ("start", i))


def pipeline_timeline(
    schedule, microbatches, layers=4, batch=32, *, seed=0, embed_dim=128
):
    """One step of ``schedule`` with each stage's forward and backward spans.

    Returns this stage's spans ``[(kind, microbatch, start, end), ...]`` in wall
    seconds (``time.time()``, one clock for the processes of one machine). The
    backward span of a microbatch runs from its output gradient's arrival to its
    input gradient's (first stage: the embedding's gradient).
    """
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    from companion.torch.distributed.examples import language_batch
    from companion.torch.distributed.pipeline import PipelineStageModule

    rank, P = dist.get_rank(), dist.get_world_size()
    model = pipeline_model(layers, seed=seed, embed_dim=embed_dim)
    ids, targets = language_batch(batch, seed=seed, length=8)
    V = model.vocab_size
    timed = _TimedStage(PipelineStageModule(model, rank, P))
    stage = PipelineStage(timed, rank, P, torch.device("cpu"))
    cls = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[schedule]
    step = cls(
        stage,
        n_microbatches=microbatches,
        loss_fn=lambda logits, target: torch.nn.functional.cross_entropy(
            logits.reshape(-1, V), target.reshape(-1)
        ),
    )
    for _ in range(2):  # the first step also infers shapes: measure the second
        dist.barrier()
        timed.spans.clear()
        timed.marks.clear()
        timed.count = 0
        if rank == 0:
            step.step(ids)
        elif rank == P - 1:
            step.step(target=targets)
        else:
            step.step()
    spans = list(timed.spans)
    for i in range(microbatches):
        start = timed.marks.get(("start", i))
        end = timed.marks.get(("end", i))
        if start is not None and end is not None:
            spans.append(("backward", i, start, end))
    return spans


def bubble_fraction(timelines) -> float:
    """Idle share of the stages' time: ``1 - busy / (P x (last end - first start))``."""
    starts = [s for spans in timelines for _, _, s, _ in spans]
    ends = [e for spans in timelines for _, _, _, e in spans]
    total = (max(ends) - min(starts)) * len(timelines)
    busy = sum(e - s for spans in timelines for _, _, s, e in spans)
    return 1.0 - busy / total


def run_pipeline_checks(cases, timelines):
    """:func:`run_pipeline` of ``cases`` and :func:`pipeline_timeline` of each
    ``(schedule, microbatches)`` of ``timelines`` (a small model), in one launch."""
    return {
        "cases": run_pipeline(cases),
        "timelines": [
            pipeline_timeline(schedule, m, layers=2, batch=4, embed_dim=8)
            for schedule, m in timelines
        ],
    }


# --------------------------------------------------------------------------------------
# the chapter's launches: several axes per launch (starting processes costs seconds)
# --------------------------------------------------------------------------------------


def run_axes(
    ulysses_cases,
    vocab_cases,
    expert_cases,
    pipeline_cases,
    timelines,
    tensor_parallel_cases=None,
):
    """:func:`run_ulysses`, :func:`run_vocab_parallel`, :func:`run_expert_parallel`
    and :func:`run_pipeline_checks` in one launch; a dict of their results. With
    ``tensor_parallel_cases``, also
    :func:`~companion.torch.distributed.examples.run_parallel` of them (tensor and
    data parallelism) as ``"parallel"``."""
    from companion.torch.distributed.examples import run_parallel

    parallel = (
        None if tensor_parallel_cases is None else run_parallel(tensor_parallel_cases)
    )
    return {
        "parallel": parallel,
        "ulysses": run_ulysses(ulysses_cases),
        "vocab": run_vocab_parallel(vocab_cases),
        "expert": run_expert_parallel(expert_cases),
        **run_pipeline_checks(pipeline_cases, timelines),
    }


def run_ring_and_ulysses(ring_cases, ulysses_cases):
    """:func:`~companion.torch.distributed.examples.run_ring_attention` and
    :func:`run_ulysses` in one launch: ``{"ring": ..., "ulysses": ...}``."""
    from companion.torch.distributed.examples import run_ring_attention

    return {
        "ring": run_ring_attention(ring_cases),
        "ulysses": run_ulysses(ulysses_cases),
    }


def run_together(*calls):
    """Several workers in one launch (starting processes costs seconds): each call is
    ``(function, args)``, run in order on every rank; a list of their results."""
    return [function(*args) for function, args in calls]
