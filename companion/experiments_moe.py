r"""The mixture-of-experts experiment of the book: MoE against dense at equal active
parameters on the capstone corpus, and the expert loads with and without balancing.

``python -m companion.experiments_moe`` (or :func:`moe_experiments`) trains tiny
:class:`~companion.torch.gpt.GPT` models on Tiny Shakespeare at the budget of
:mod:`companion.experiments` (same tokenizer, context, batch, steps, schedule and base
model), one thread per run, several seeds, and stores the validation **bits per byte**
of each run with the loads of its experts:

* ``dense``: the base model, a SwiGLU MLP of width ``h = 8E/3`` in every block;
* ``moe``, ``moe_aux``, ``moe_bias``: every block's MLP replaced by a
  :class:`~companion.torch.moe.MoELayer` of ``num_experts`` SwiGLU experts of width
  ``h / top_k``, ``top_k`` per token, so a token uses as many MLP weights as in the
  dense model (the router's ``N E`` per layer is the only active addition). ``moe``
  has no balancing; ``moe_aux`` adds Switch's auxiliary loss (``alpha``) of every layer
  to the loss; ``moe_bias`` routes with DeepSeek-V3's sigmoid router and nudges its
  selection bias by ``gamma`` after every step (no auxiliary loss).

After training, each run reads ``eval_batches`` fixed validation batches and records,
per layer, how many of the ``T k`` assignments each expert received, and the share of
assignments that a capacity factor ``c`` would drop
(:func:`~companion.torch.moe.capacity_keep`, batch by batch). The chapter
``book/moe.ipynb`` reads the JSON this writes.
"""

from __future__ import annotations

import argparse
import math
import time

from companion.experiments import (
    BASE_MODEL,
    BUDGET,
    _machine,
    _tokenizer,
    _write_record,
)

__all__ = [
    "MOE",
    "MOE_BUDGET",
    "MOE_RUNS",
    "CAPACITY_FACTORS",
    "moe_gpt",
    "active_parameters",
    "moe_experiments",
    "main",
]

#: Every run uses the capstone's budget, :data:`companion.experiments.BUDGET` (so
#: ``dense`` is the capstone's ``base`` run, step for step).
MOE_BUDGET = dict(BUDGET)
#: Experts per layer, experts per token and the balance settings of the mixture.
MOE = dict(num_experts=8, top_k=2, alpha=0.01, gamma=0.01)
#: Run name -> (router, Switch auxiliary loss on, bias update on); ``dense`` has none.
MOE_RUNS = {
    "dense": None,
    "moe": ("mixtral", False, False),
    "moe_aux": ("mixtral", True, False),
    "moe_bias": ("deepseek_v3", False, True),
}
CAPACITY_FACTORS = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0)


def moe_gpt(
    vocab_size: int,
    context: int,
    *,
    num_experts: int,
    top_k: int,
    router: str = "mixtral",
    expert_hidden: int | None = None,
    **model,
):
    """A :class:`~companion.torch.gpt.GPT` in which every block's MLP is a
    :class:`~companion.torch.moe.MoELayer` of ``num_experts`` experts, ``top_k`` per
    token, routed by ``router`` (the attention, norms and embeddings unchanged).

    ``expert_hidden`` defaults to the dense SwiGLU width ``8E/3`` divided by
    ``top_k`` (equal active MLP weights). The experts start as the dense MLP's
    ``nn.Linear`` layers do (uniform in :math:`\\pm 1/\\sqrt{\\text{fan-in}}`), the
    router from :math:`N(0, 0.02^2)`.
    """
    import torch

    from companion.torch.gpt import GPT
    from companion.torch.moe import MoELayer

    gpt = GPT(vocab_size, context, **model)
    E = gpt.config["embed_dim"]
    dense_hidden = gpt.config["mlp_hidden"] or 8 * E // 3
    hidden = dense_hidden // top_k if expert_hidden is None else expert_hidden
    for block in gpt.blocks:
        layer = MoELayer(E, hidden, num_experts, top_k, router=router)
        with torch.no_grad():
            layer.gate_up.uniform_(-(E**-0.5), E**-0.5)
            layer.down.uniform_(-(hidden**-0.5), hidden**-0.5)
        block.mlp = layer
    return gpt


def active_parameters(model) -> int:
    """Parameters one token uses: the total less the ``N - k`` routed experts it skips
    in every MoE layer."""
    from companion.torch.moe import MoELayer

    total = model.num_parameters()
    for module in model.modules():
        if isinstance(module, MoELayer):
            N, k = module.gate_up.shape[0], module.settings.top_k
            per_expert = (module.gate_up.numel() + module.down.numel()) // N
            total -= (N - k) * per_expert
    return total


def _moe_layers(model):
    from companion.torch.moe import MoELayer

    return [m for m in model.modules() if isinstance(m, MoELayer)]


def _run(job: tuple) -> dict:
    """One run (one thread): train, evaluate, read the experts' loads."""
    name, seed, budget, base, moe = job
    import torch

    torch.set_num_threads(1)
    from companion.corpora import corpus
    from companion.torch import moe as tm
    from companion.torch.gpt import GPT
    from companion.train import (
        TrainConfig,
        _encode,
        _parameter_groups,
        _windows,
        evaluate,
        learning_rate_at,
    )

    config = TrainConfig(
        **budget, eval_every=budget["steps"], seed=seed, model=dict(base)
    )
    tokenizer = _tokenizer(budget["corpus"], budget["vocab_size"], None)
    data = corpus(budget["corpus"])
    train_tokens = _encode(tokenizer, data.train, (budget["corpus"], "train"))
    val_tokens = _encode(tokenizer, data.validation)
    tokens_per_byte = len(val_tokens) / len(data.validation.encode("utf-8"))

    torch.manual_seed(seed)
    setting = MOE_RUNS[name]
    V, T = budget["vocab_size"], budget["context"]
    if setting is None:
        model = GPT(V, T, **base)
        router, use_aux, use_bias = None, False, False
    else:
        router, use_aux, use_bias = setting
        model = moe_gpt(
            V, T, num_experts=moe["num_experts"], top_k=moe["top_k"], router=router,
            **base,
        )  # fmt: skip
    layers = _moe_layers(model)
    optimizer = torch.optim.AdamW(
        _parameter_groups(model, config.weight_decay),
        lr=config.learning_rate,
        betas=config.betas,
    )
    losses, aux_losses = [], []
    started = time.perf_counter()
    model.train()
    for step in range(config.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(step, config)
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
        optimizer.zero_grad(set_to_none=True)
        x, y = _windows(train_tokens, config.batch_size, config.context, generator)
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
        total = loss
        if layers:
            aux = sum(
                tm.load_balancing_loss(r.logits, r.indices, alpha=moe["alpha"])
                for r in (layer.last_routing for layer in layers)
            )
            aux_losses.append(aux.item())
            if use_aux:
                total = loss + aux
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip)
        optimizer.step()
        if use_bias:
            for layer in layers:
                layer.update_bias(gamma=moe["gamma"])
        losses.append(loss.item())
    seconds = time.perf_counter() - started
    val = evaluate(model, val_tokens, config)
    record = dict(
        name=name,
        seed=seed,
        router=router,
        parameters=model.num_parameters(),
        active_parameters=active_parameters(model),
        validation_loss=val,
        bits_per_byte=val * tokens_per_byte / math.log(2),
        first_train_loss=losses[0],
        final_train_loss=losses[-1],
        seconds=seconds,
    )
    if layers:
        record.update(_loads(model, layers, val_tokens, config, moe))
        record["aux_loss_first"] = aux_losses[0]
        record["aux_loss_last"] = aux_losses[-1]
    return record


def _loads(model, layers, tokens, config, moe) -> dict:
    """Per-layer assignments per expert and dropped shares over the validation
    batches (the batches :func:`companion.train.evaluate` reads)."""
    import torch

    from companion.torch import moe as tm
    from companion.train import _windows

    N, k = moe["num_experts"], moe["top_k"]
    loads = torch.zeros(len(layers), N, dtype=torch.int64)
    dropped = torch.zeros(len(layers), len(CAPACITY_FACTORS), dtype=torch.int64)
    assignments = 0
    generator = torch.Generator().manual_seed(config.seed + 10_007)
    model.eval()
    with torch.no_grad():
        for _ in range(config.eval_batches):
            x, _ = _windows(tokens, config.batch_size, config.context, generator)
            model(x)
            for i, layer in enumerate(layers):
                indices = layer.last_routing.indices  # (B T, k)
                loads[i] += tm.expert_load(indices, N)
                for j, c in enumerate(CAPACITY_FACTORS):
                    C = tm.expert_capacity(indices.shape[0], N, k, c)
                    kept = tm.capacity_keep(indices, N, C)
                    dropped[i, j] += int((~kept).sum())
            assignments += indices.numel()
    biases = [layer.bias.tolist() for layer in layers]
    return dict(
        expert_load=loads.tolist(),
        assignments_per_layer=assignments,
        dropped_assignments=dropped.tolist(),
        bias=biases,
    )


def moe_experiments(
    *,
    seeds=(0, 1, 2),
    runs=tuple(MOE_RUNS),
    budget: dict | None = None,
    base_model: dict | None = None,
    moe: dict | None = None,
) -> dict:
    """Every run of ``runs`` for each seed, one after another; the JSON-ready record
    (the module's docstring says what is measured). A smaller ``budget`` and
    ``base_model`` make a quick check; the defaults are what the book stores."""
    budget = {**MOE_BUDGET, **(budget or {})}
    base = dict(BASE_MODEL if base_model is None else base_model)
    moe = {**MOE, **(moe or {})}
    if not seeds:
        raise ValueError(f"seeds must name at least one seed, got {seeds!r}")
    unknown = [r for r in runs if r not in MOE_RUNS]
    if unknown or not runs:
        raise ValueError(f"runs must be names from {list(MOE_RUNS)}, got {runs!r}")
    started = time.perf_counter()
    records = [_run((name, s, budget, base, moe)) for s in seeds for name in runs]
    return dict(
        command="python -m companion.experiments_moe",
        budget=budget,
        base_model=base,
        moe=moe,
        capacity_factors=list(CAPACITY_FACTORS),
        seeds=list(seeds),
        runs=records,
        machine=_machine(),
        seconds=time.perf_counter() - started,
    )


def main(argv: list[str] | None = None) -> int:
    """``python -m companion.experiments_moe [--out PATH] [--seeds 0 1 2]
    [--steps S] [--runs dense moe ...]``."""
    parser = argparse.ArgumentParser(prog="python -m companion.experiments_moe")
    parser.add_argument("--out", default="book/_data/moe_experiments.json")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--runs", nargs="+", default=list(MOE_RUNS))
    args = parser.parse_args(argv)
    budget = {} if args.steps is None else {"steps": args.steps}
    record = moe_experiments(
        seeds=tuple(args.seeds), runs=tuple(args.runs), budget=budget
    )
    _write_record(record, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
