r"""The book's sharing experiments on real text, and the capstone's stored samples.

``python -m companion.experiments gpt`` (or :func:`gpt_experiments`) trains tiny
:class:`~companion.torch.gpt.GPT` models on Tiny Shakespeare, every run at the same
budget (steps, batch, context, schedule, tokenizer), with several seeds, and measures
the validation **bits per byte** of each:

* ``tied`` vs ``untied`` embeddings at equal parameters: the tied model spends the
  ``V x E`` parameters it saves on a wider MLP (``tied_wide``);
* one block reused ``L`` times (``shared``, ALBERT) against ``L`` distinct blocks
  (``base``: equal compute) and against one block used once (``one_layer``: equal
  parameters);
* multi-head (``base``), grouped-query (``gqa``, two key/value heads) and multi-query
  (``mqa``, one) attention beside the KV-cache bytes per token each needs;
* RoPE (``base``), learned (``learned``) and ALiBi (``alibi``) positions, evaluated on
  windows twice the training context (a learned table has no rows there);
* sharing across layers, with :class:`~companion.torch.cross_layer.CrossLayerGPT`:
  ALBERT's factorised embedding (``factorized``: ``V x E + E x H`` with ``E = 16``
  instead of ``V x H``), cross-layer attention (``cla``: each pair of adjacent layers
  shares one KV cache, half the bytes per token) and the Universal Transformer
  (``universal``: one block applied four times with a step embedding before each).

Then it trains one longer run per corpus (English; Tang poems with a tokenizer that
knows Chinese), draws samples from each, measures the share of regular five- or
seven-character lines among the generated poems and among an untrained model's, and
times the attention implementations. Everything goes into one JSON file with the
machine, the thread count and the versions: the chapter ``book/gpt.ipynb`` reads it,
as ``fast`` reads its benchmark file. Training is float32 on the CPU, one thread per
run; ``workers`` runs go side by side (the numbers do not depend on it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor

__all__ = ["BUDGET", "RUNS", "gpt_experiments", "kv_cache_bytes_per_token", "main"]

#: The shared budget of every ablation run (corpus, vocabulary, context, batch, steps,
#: learning-rate schedule, validation batches).
BUDGET = dict(
    corpus="shakespeare",
    vocab_size=512,
    context=64,
    batch_size=16,
    steps=200,
    warmup=20,
    learning_rate=3e-3,
    eval_batches=16,
)
BASE_MODEL = dict(embed_dim=64, num_heads=4, num_layers=4)  # tied, RoPE, MHA

#: Run name -> what it changes in BASE_MODEL (tied_wide's MLP width is computed).
RUNS = {
    "base": {},
    "untied": {"tied": False},
    "tied_wide": {"tied": True, "mlp_hidden": "match untied"},
    "shared": {"shared_blocks": True},
    "one_layer": {"num_layers": 1},
    "gqa": {"num_kv_heads": 2},
    "mqa": {"num_kv_heads": 1},
    "learned": {"positions": "learned"},
    "alibi": {"positions": "alibi"},
    "factorized": {"embedding_size": 16},
    "cla": {"kv_sharing": 2},
    "universal": {"shared_blocks": True, "step_embeddings": True},
}
#: The keywords that only :class:`~companion.torch.cross_layer.CrossLayerGPT` has.
CROSS_LAYER_KEYWORDS = ("embedding_size", "kv_sharing", "step_embeddings")
POSITION_RUNS = {"base": "rope", "learned": "learned", "alibi": "alibi"}

# the longer runs whose samples the chapter prints
SHOWCASE = {
    "shakespeare": dict(vocab_size=512, steps=600, tokenizer_chars=None),
    "tang": dict(vocab_size=1024, steps=600, tokenizer_chars=100_000),
}


def kv_cache_bytes_per_token(model_config: dict, bytes_per_number: int = 4) -> int:
    """Bytes a KV cache holds per token: keys and values, every layer (every group of
    ``kv_sharing`` layers, with cross-layer attention), ``H_kv`` heads of ``D = E / H``
    numbers (float32 by default). A shared block still caches each layer's keys: the
    layers see different inputs."""
    head_dim = model_config["embed_dim"] // model_config["num_heads"]
    kv_heads = model_config.get("num_kv_heads") or model_config["num_heads"]
    caches = model_config["num_layers"] // model_config.get("kv_sharing", 1)
    return 2 * caches * kv_heads * head_dim * bytes_per_number


def _model_class(model_config: dict):
    """``GPT``, or ``CrossLayerGPT`` for a configuration that shares across layers."""
    if any(key in model_config for key in CROSS_LAYER_KEYWORDS):
        from companion.torch.cross_layer import CrossLayerGPT

        return CrossLayerGPT
    from companion.torch.gpt import GPT

    return GPT


def _model_config(name: str, budget: dict, base: dict) -> dict:
    from companion.torch.gpt import GPT

    change = dict(RUNS[name])
    config = {**base, **change}
    if config.get("mlp_hidden") == "match untied":
        # the widest SwiGLU hidden size that keeps the tied model within the untied
        # model's parameters
        V, T = budget["vocab_size"], budget["context"]
        target = GPT(V, T, **{**base, "tied": False}).num_parameters()
        hidden = int(8 * base["embed_dim"] / 3)
        while GPT(V, T, **{**config, "mlp_hidden": hidden + 1}).num_parameters() <= (
            target
        ):
            hidden += 1
        config["mlp_hidden"] = hidden
    return config


def _train_config(budget: dict, model: dict, seed: int, steps: int | None = None):
    from companion.train import TrainConfig

    fields = {k: v for k, v in budget.items() if k != "tokenizer_chars"}
    if steps is not None:
        fields["steps"] = steps
    return TrainConfig(
        **fields, eval_every=fields["steps"], seed=seed, model=dict(model)
    )


def _tokenizer(corpus_name: str, vocab_size: int, chars: int | None):
    from companion.corpora import corpus
    from companion.train import make_tokenizer

    text = corpus(corpus_name).train
    return make_tokenizer(text if chars is None else text[:chars], vocab_size)


def _loss_by_segment(model, tokens, length: int, split: int, budget: dict) -> tuple:
    """Mean next-token loss (nats) on fixed validation windows of ``length`` tokens,
    over the positions before ``split`` and from ``split`` on."""
    import torch

    from companion.train import _windows

    generator = torch.Generator().manual_seed(10_007)
    sums, count = torch.zeros(2, dtype=torch.float64), 0
    with torch.no_grad():
        for _ in range(budget["eval_batches"]):
            x, y = _windows(tokens, budget["batch_size"], length, generator)
            logits = model(x)
            loss = torch.nn.functional.cross_entropy(
                logits.transpose(1, 2), y, reduction="none"
            )  # (B, length)
            after = loss[:, split:].mean() if split < length else loss.new_zeros(())
            sums += torch.stack([loss[:, :split].mean(), after]).double()
            count += 1
    before, after = (sums / count).tolist()
    return before, (after if split < length else None)


def _run(job: tuple) -> dict:
    """One ablation run (in a worker process, one thread)."""
    name, seed, budget, base = job
    import torch

    torch.set_num_threads(1)
    from companion.corpora import corpus
    from companion.torch.gpt import GPT
    from companion.train import _encode, flops_per_token, train

    model_config = _model_config(name, budget, base)
    tokenizer = _tokenizer(budget["corpus"], budget["vocab_size"], None)
    result = train(
        _train_config(budget, model_config, seed),
        tokenizer=tokenizer,
        model_class=_model_class(model_config),
    )
    model = result.model
    (step, val, bpb) = result.evaluations[-1]
    record = dict(
        name=name,
        seed=seed,
        model=model_config,
        parameters=model.num_parameters(),
        flops_per_token=flops_per_token(model, budget["context"]),
        kv_cache_bytes_per_token=kv_cache_bytes_per_token(model_config),
        validation_loss=val,
        bits_per_byte=bpb,
        final_train_loss=result.losses[-1],
        first_train_loss=result.losses[0],
        tokens_per_second=result.tokens_per_second,
        seconds=result.seconds,
    )
    if name in POSITION_RUNS:
        data = corpus(budget["corpus"])
        val_tokens = _encode(tokenizer, data.validation)
        per_byte = len(val_tokens) / len(data.validation.encode("utf-8"))
        T = budget["context"]
        if model_config.get("positions", "rope") == "learned":
            within, past = _loss_by_segment(model, val_tokens, T, T, budget)
        else:  # the same weights, positions up to 2T
            longer = GPT(budget["vocab_size"], 2 * T, **model_config).eval()
            longer.load_state_dict(model.state_dict())
            within, past = _loss_by_segment(longer, val_tokens, 2 * T, T, budget)
        to_bits = per_byte / math.log(2)  # nats per token -> bits per byte
        record["bits_per_byte_within_context"] = within * to_bits
        record["bits_per_byte_past_context"] = None if past is None else past * to_bits
    return record


def _showcase(job: tuple) -> dict:
    """A longer run on one corpus, and samples from it and from its untrained twin."""
    corpus_name, settings, budget, base, samples, seed = job
    import torch

    torch.set_num_threads(1)
    from companion.corpora import regular_line_share
    from companion.torch.gpt import GPT, generate
    from companion.train import train

    budget = {**budget, "corpus": corpus_name, "vocab_size": settings["vocab_size"]}
    tokenizer = _tokenizer(
        corpus_name, settings["vocab_size"], settings["tokenizer_chars"]
    )
    config = _train_config(budget, base, seed, steps=settings["steps"])
    result = train(config, tokenizer=tokenizer)
    torch.manual_seed(seed)
    untrained = GPT(budget["vocab_size"], budget["context"], **base).eval()
    start = tokenizer.encode("\n")
    prompt = torch.tensor([start] * samples["count"])  # (count, 1)
    texts = {}
    for label, model in (("trained", result.model), ("untrained", untrained)):
        generator = torch.Generator().manual_seed(seed)
        ids = generate(
            model,
            prompt,
            budget["context"] - len(start),
            temperature=samples["temperature"],
            top_k=samples["top_k"],
            generator=generator,
        )
        texts[label] = [tokenizer.decode(row.tolist()).strip("\n") for row in ids]
    record = dict(
        corpus=corpus_name,
        model=dict(base),
        parameters=result.model.num_parameters(),
        config=config.as_dict(),
        tokenizer_chars=settings["tokenizer_chars"],
        evaluations=[list(e) for e in result.evaluations],
        losses=result.losses[:: max(1, len(result.losses) // 100)],
        tokens_per_second=result.tokens_per_second,
        flops_per_token=result.flops_per_token,
        seconds=result.seconds,
        samples=texts,
        sampling=dict(samples),
    )
    if corpus_name == "tang":
        # complete lines only: each sample's last line may be cut by the context
        for label, rows in texts.items():
            lines = [line for row in rows for line in row.split("\n")[:-1]]
            record[f"regular_line_share_{label}"] = regular_line_share("\n".join(lines))
            record[f"lines_{label}"] = sum(bool(x.strip()) for x in lines)
    return record


def _throughput(budget: dict, base: dict, steps: int, rounds: int = 3) -> dict:
    """Training tokens/s of the base model with each attention implementation: the
    best of ``rounds`` rounds, the implementations taking turns within each round (so
    that a change of load on a shared machine does not fall on one of them)."""
    import torch

    torch.set_num_threads(1)
    from companion.train import train

    tokenizer = _tokenizer(budget["corpus"], budget["vocab_size"], None)
    rates = {}
    for _ in range(rounds):
        for implementation in ("sdpa", "tiled", "reference"):
            config = _train_config(budget, base, 0, steps=steps)
            result = train(config, tokenizer=tokenizer, implementation=implementation)
            rate = result.tokens_per_second
            rates[implementation] = max(rate, rates.get(implementation, 0.0))
    return rates


def _reusable(reuse: dict | None, jobs: list, show_jobs: list) -> tuple[dict, dict]:
    """The runs ``{(name, seed): record}`` and showcases ``{corpus: record}`` of an
    earlier record ``reuse`` that these jobs would train again, identically: the same
    budget, base model, model configuration (and training configuration and sampling
    for a showcase)."""
    if reuse is None:
        return {}, {}
    runs, shows = {}, {}
    old_runs = {(r["name"], r["seed"]): r for r in reuse.get("runs", [])}
    for name, seed, budget, base in jobs:
        old = old_runs.get((name, seed))
        if (
            old is not None
            and reuse.get("budget") == budget
            and reuse.get("base_model") == base
            and old["model"] == _model_config(name, budget, base)
        ):
            runs[(name, seed)] = old
    for name, settings, budget, base, samples, seed in show_jobs:
        old = reuse.get("showcase", {}).get(name)
        shown = {**budget, "corpus": name, "vocab_size": settings["vocab_size"]}
        config = _train_config(shown, base, seed, steps=settings["steps"]).as_dict()
        if (
            old is not None
            and json.dumps(config) == json.dumps(old["config"])  # tuples as lists
            and old["tokenizer_chars"] == settings["tokenizer_chars"]
            and old["sampling"] == samples
        ):
            shows[name] = old
    return runs, shows


def gpt_experiments(
    *,
    seeds=(0, 1),
    budget: dict | None = None,
    base_model: dict | None = None,
    showcase: dict | None = None,
    samples: dict | None = None,
    throughput_steps: int = 20,
    workers: int = 2,
    reuse: dict | None = None,
) -> dict:
    """Run every ablation of ``RUNS`` for each seed at ``budget``, the showcase
    runs and the throughput measurement; return the JSON-ready record (the module's
    docstring says what is measured). Smaller ``budget``/``showcase`` make a quick
    check; the defaults are what the book stores.

    ``reuse`` (an earlier record) keeps its runs and showcases that were made at the
    same budget, base model and configuration instead of training them again (a run is
    deterministic on one machine: float32, one thread, seeded); the record lists them
    under ``reused``. The throughput is always measured again."""
    budget = {**BUDGET, **(budget or {})}
    base = dict(BASE_MODEL if base_model is None else base_model)
    showcase = SHOWCASE if showcase is None else showcase
    samples = {"count": 8, "temperature": 0.8, "top_k": 40, **(samples or {})}
    if not seeds or workers < 1:
        raise ValueError(f"need seeds and workers >= 1, got {seeds!r}, {workers!r}")
    started = time.perf_counter()
    jobs = [(name, seed, budget, base) for seed in seeds for name in RUNS]
    show_jobs = [
        (name, settings, budget, base, samples, 0)
        for name, settings in showcase.items()
    ]
    kept_runs, kept_shows = _reusable(reuse, jobs, show_jobs)
    jobs = [job for job in jobs if job[:2] not in kept_runs]
    show_jobs = [job for job in show_jobs if job[0] not in kept_shows]
    if workers == 1:
        runs = [_run(job) for job in jobs]
        shows = [_showcase(job) for job in show_jobs]
    else:
        with ProcessPoolExecutor(workers) as pool:
            shows_future = [pool.submit(_showcase, job) for job in show_jobs]
            runs = list(pool.map(_run, jobs))
            shows = [f.result() for f in shows_future]
    done = {(r["name"], r["seed"]): r for r in [*runs, *kept_runs.values()]}
    runs = [done[(name, seed)] for seed in seeds for name in RUNS]  # seed order
    shows = [*kept_shows.values(), *shows]
    rates = _throughput(budget, base, throughput_steps)
    return dict(
        command="python -m companion.experiments gpt",
        budget=budget,
        base_model=base,
        seeds=list(seeds),
        runs=runs,
        showcase={s["corpus"]: s for s in shows},
        tokens_per_second_by_implementation=rates,
        reused=dict(runs=[list(key) for key in kept_runs], showcase=list(kept_shows)),
        machine=_machine(workers),
        seconds=time.perf_counter() - started,
    )


def _machine(workers: int | None = None) -> dict:
    """The machine a record was made on (every experiment command stores it):
    processor, cores, one thread per run, ``workers`` where runs ran in parallel,
    versions and the CPU capability torch dispatched to."""
    import torch

    workers_entry = {} if workers is None else {"workers": workers}
    return dict(
        processor=platform.processor() or platform.machine(),
        cpu_count=os.cpu_count(),
        threads_per_run=1,
        **workers_entry,
        python=platform.python_version(),
        torch=torch.__version__,
        cpu_capability=torch.backends.cpu.get_cpu_capability(),
    )


def _write_record(record: dict, path: str, *, ensure_ascii: bool = True) -> None:
    """Write an experiment command's ``record`` to ``path`` as indented JSON and say
    so on stdout (the commands are scripts, not library calls)."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1, ensure_ascii=ensure_ascii)
        f.write("\n")
    sys.stdout.write(f"wrote {path} in {record['seconds']:.0f} s\n")


def main(argv: list[str] | None = None) -> int:
    """``python -m companion.experiments gpt [--out PATH] [--seeds 0 1 2]``."""
    parser = argparse.ArgumentParser(prog="python -m companion.experiments")
    parser.add_argument("experiment", choices=["gpt"])
    parser.add_argument("--out", default="book/_data/gpt_experiments.json")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=None, help="ablation steps")
    parser.add_argument("--showcase-steps", type=int, default=None)
    parser.add_argument(
        "--reuse",
        default=None,
        help="an earlier JSON record: keep its runs made at the same settings",
    )
    args = parser.parse_args(argv)
    budget = {} if args.steps is None else {"steps": args.steps}
    showcase = None
    if args.showcase_steps is not None:
        showcase = {
            name: {**settings, "steps": args.showcase_steps}
            for name, settings in SHOWCASE.items()
        }
    reuse = None
    if args.reuse is not None:
        with open(args.reuse, encoding="utf-8") as f:
            reuse = json.load(f)
    record = gpt_experiments(
        seeds=tuple(args.seeds),
        budget=budget,
        showcase=showcase,
        workers=args.workers,
        reuse=reuse,
    )
    _write_record(record, args.out, ensure_ascii=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
