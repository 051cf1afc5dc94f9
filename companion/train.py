r"""Train the small GPT (:class:`companion.torch.gpt.GPT`) on a shipped corpus.

``python -m companion.train --corpus shakespeare --steps 300`` from a shell, or
:func:`train` from Python (what the book calls). One step:

1. ``accumulation`` micro-batches of ``batch_size`` windows of ``context + 1`` tokens,
   at offsets drawn from a generator seeded by ``(seed, step)`` (so a resumed run
   draws the same batches without saving any sampler state);
2. cross-entropy of the next token, divided by ``accumulation``, gradients summed;
3. gradient clipping to the global norm ``clip``;
4. AdamW at the learning rate of the schedule: linear warm-up over ``warmup`` steps to
   ``learning_rate``, then a cosine to ``min_lr_ratio * learning_rate`` at ``steps``;
   weight decay only on matrices (embeddings and projections), never on norm gains or
   biases.

Every ``eval_every`` steps (and at the end) the loss on fixed validation windows is
measured, in nats per token and in **bits per byte** (comparable across tokenizers).
With ``log_dir``, TensorBoard event files record the curves; with ``checkpoint``, the
model, the optimizer, the step and the curves so far are saved every
``checkpoint_every`` steps, and ``resume=True`` continues from there to the same
losses, bit for bit, as the run that was never interrupted. Throughput is measured
in tokens per second and, from the usual ``6 N + 12 L T E`` FLOPs per token, in
FLOP/s (compare :func:`matmul_peak`).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
import types
from dataclasses import dataclass, field

import torch

from companion.bpe import ByteBPE
from companion.corpora import corpus as load_corpus
from companion.torch.gpt import GPT

__all__ = [
    "RUNS_ENV",
    "TrainConfig",
    "TrainResult",
    "learning_rate_at",
    "make_tokenizer",
    "matmul_peak",
    "runs_dir",
    "train",
]


#: Where the chapters' TensorBoard runs go, if set (``make test``'s second-machine run
#: sets it, so that its notebooks do not overwrite the first run's event files while
#: that run reads them back).
RUNS_ENV = "COMPANION_RUNS_DIR"


def runs_dir(chapter: str, start=None):
    """The folder of a chapter's TensorBoard runs: ``_build/runs/<chapter>`` of the
    project that holds ``start`` (default: the working directory), or
    ``$COMPANION_RUNS_DIR/<chapter>``. Open them with
    ``tensorboard --logdir _build/runs``."""
    import pathlib

    if not isinstance(chapter, str) or not chapter or "/" in chapter:
        raise ValueError(f"chapter must be a folder name, got {chapter!r}")
    override = os.environ.get(RUNS_ENV)
    if override:
        return pathlib.Path(override) / chapter
    here = pathlib.Path(start or pathlib.Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "pyproject.toml").exists():
            return folder / "_build" / "runs" / chapter
    raise ValueError(
        f"no project (a folder with pyproject.toml) above {here}; set {RUNS_ENV}"
    )


@dataclass
class TrainConfig:
    """Everything that decides a run; saved in every checkpoint."""

    corpus: str = "shakespeare"
    vocab_size: int = 512  # 256: bytes only
    context: int = 128
    batch_size: int = 16
    accumulation: int = 1
    steps: int = 300
    learning_rate: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 30
    weight_decay: float = 0.1
    betas: tuple = (0.9, 0.95)
    clip: float = 1.0
    eval_every: int = 100
    eval_batches: int = 8
    seed: int = 0
    model: dict = field(
        default_factory=lambda: dict(embed_dim=128, num_heads=4, num_layers=4)
    )

    def __post_init__(self):
        for name in (
            "vocab_size",
            "context",
            "batch_size",
            "accumulation",
            "steps",
            "eval_every",
            "eval_batches",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.vocab_size < 256:
            raise ValueError(f"vocab_size must be >= 256, got {self.vocab_size}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int):
            raise ValueError(f"warmup must be an int >= 0, got {self.warmup!r}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be an int >= 0, got {self.warmup!r}")
        if not self.clip > 0:
            raise ValueError(f"clip must be > 0, got {self.clip}")
        self.betas = tuple(self.betas)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class TrainResult:
    """What a run leaves: the model, its tokenizer and the curves.

    ``losses[i]`` is the training loss of step ``i`` (nats per token, before the
    update); ``evaluations`` holds ``(step, validation loss, bits per byte)``.
    """

    model: GPT
    tokenizer: ByteBPE
    config: TrainConfig
    losses: list = field(default_factory=list)
    learning_rates: list = field(default_factory=list)
    grad_norms: list = field(default_factory=list)
    evaluations: list = field(default_factory=list)
    tokens_per_second: float = float("nan")
    flops_per_token: float = float("nan")
    flops_per_second: float = float("nan")
    seconds: float = 0.0


def learning_rate_at(step: int, config: TrainConfig) -> float:
    """Linear warm-up to ``learning_rate`` over ``warmup`` steps, then a cosine down to
    ``min_lr_ratio * learning_rate`` at the last step."""
    peak = config.learning_rate
    if step < config.warmup:
        return peak * (step + 1) / config.warmup
    span = max(1, config.steps - 1 - config.warmup)
    progress = min(1.0, (step - config.warmup) / span)
    low = config.min_lr_ratio * peak
    return low + 0.5 * (peak - low) * (1 + math.cos(math.pi * progress))


def make_tokenizer(text: str, vocab_size: int) -> ByteBPE:
    """A byte-level BPE of ``vocab_size`` trained on ``text`` (through
    ``tokenizers`` when it is installed); 256 is the bytes alone."""
    if vocab_size == 256:
        return ByteBPE([bytes([i]) for i in range(256)], [])
    try:
        import tokenizers  # noqa: F401
    except ImportError:  # pragma: no cover - tokenizers ships with transformers
        return ByteBPE.train(text, vocab_size)
    return ByteBPE.train(text, vocab_size, fast=True)


_ENCODED: dict = {}  # (corpus, split, merges) -> token ids, so repeated runs reuse them


def _encode(tokenizer: ByteBPE, text: str, key=None) -> torch.Tensor:
    """Token ids of ``text`` (int64); the bytes themselves when there are no merges.
    The readable encoder is used: with its per-word cache it is faster here than
    ``tokenizers`` on one long string."""
    key = None if key is None else (*key, tuple(tokenizer.merges))
    if key is not None and key in _ENCODED:
        return _ENCODED[key]
    if not tokenizer.merges:
        data = bytearray(text.encode("utf-8"))
        ids = torch.frombuffer(data, dtype=torch.uint8).to(torch.int64)
    else:
        ids = torch.tensor(tokenizer.encode(text), dtype=torch.int64)
    if key is not None:
        _ENCODED.clear()  # keep one corpus's ids at most
        _ENCODED[key] = ids
    return ids


def _windows(tokens: torch.Tensor, batch: int, context: int, generator):
    """``batch`` random windows: inputs and next-token targets, ``(batch, context)``."""
    starts = torch.randint(0, len(tokens) - context - 1, (batch,), generator=generator)
    rows = starts[:, None] + torch.arange(context + 1)  # (batch, context + 1)
    window = tokens[rows.to(tokens.device)]
    return window[:, :-1], window[:, 1:]


def _parameter_groups(model: GPT, weight_decay: float) -> list[dict]:
    """Decay on matrices (``dim >= 2``: embeddings, projections), none on vectors
    (norm gains, biases). A tied parameter is listed once."""
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    return [
        {"params": matrices, "weight_decay": weight_decay},
        {"params": vectors, "weight_decay": 0.0},
    ]


def flops_per_token(model: GPT, context: int) -> float:
    """Training FLOPs per token: ``6 N`` for the ``N`` distinct parameters (a tied
    embedding counted once: the head's product is the one that costs) plus
    ``12 L T E`` for the attention scores and their mixing (Kaplan et al. 2020, PaLM
    appendix B). With shared blocks each layer still computes, so ``N`` counts the
    block once per layer."""
    cfg = model.config
    n = model.num_parameters()
    if cfg["shared_blocks"]:
        block = sum(p.numel() for p in model.blocks[0].parameters())
        n += (cfg["num_layers"] - 1) * block
    return 6.0 * n + 12.0 * cfg["num_layers"] * context * cfg["embed_dim"]


def matmul_peak(size: int = 1024, repeats: int = 5) -> float:
    """The machine's float32 matmul rate (FLOP/s): the best of ``repeats`` products of
    two ``size x size`` matrices on the current torch threads."""
    a = torch.randn(size, size, generator=torch.Generator().manual_seed(0))
    best = math.inf
    for _ in range(repeats + 1):
        start = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best


@torch.no_grad()
def evaluate(model: GPT, tokens: torch.Tensor, config: TrainConfig) -> float:
    """Mean next-token loss (nats) over ``eval_batches`` fixed validation batches."""
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(config.seed + 10_007)
    total = 0.0
    for _ in range(config.eval_batches):
        x, y = _windows(tokens, config.batch_size, config.context, generator)
        logits = model(x)
        total += torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), y.flatten()
        ).item()
    model.train(was_training)
    return total / config.eval_batches


def train(
    config: TrainConfig | None = None,
    *,
    tokenizer: ByteBPE | None = None,
    log_dir: str | None = None,
    checkpoint: str | None = None,
    checkpoint_every: int | None = None,
    resume: bool = False,
    stop_after: int | None = None,
    implementation: str = "sdpa",
    device: str | torch.device = "cpu",
    progress: bool = False,
    model_class: type[GPT] = GPT,
) -> TrainResult:
    """Train a :class:`GPT` as ``config`` says (see the module's docstring).

    ``tokenizer`` defaults to :func:`make_tokenizer` on the training split.
    ``checkpoint`` (a path) is written every ``checkpoint_every`` steps and at the end;
    ``resume=True`` loads it first, and a checkpoint of another configuration is a
    ``ValueError``. ``stop_after`` ends the run after that many steps in all (to test
    resuming). ``implementation`` picks the attention kernel (not part of the
    configuration: every kernel computes the same function). ``device`` is where the
    model and the batches live (batch offsets are drawn on the CPU, so every device
    reads the same windows). ``progress`` shows a tqdm bar. ``model_class`` is the
    class built from ``config.model``: ``GPT`` or a subclass (the cross-layer sharing
    of :class:`companion.torch.cross_layer.CrossLayerGPT`, say).

    Side effect: with ``log_dir``, when TensorFlow is not imported yet, an empty module
    ``tensorboard.compat.notf`` is put into ``sys.modules`` (for the whole process).
    It is TensorBoard's own switch to its TensorFlow-free event writer, so that writing
    events does not import TensorFlow (seconds); a later ``import tensorflow`` still
    works, but TensorBoard's ``tensorboard.compat.tf`` then stays the stub.
    """
    config = TrainConfig() if config is None else config
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    if resume and checkpoint is None:
        raise ValueError("resume=True needs checkpoint (a path)")
    if not (isinstance(model_class, type) and issubclass(model_class, GPT)):
        raise TypeError(f"model_class must be GPT or a subclass, got {model_class!r}")
    data = load_corpus(config.corpus)
    tokenizer = (
        make_tokenizer(data.train, config.vocab_size)
        if tokenizer is None
        else tokenizer
    )
    if tokenizer.vocab_size != config.vocab_size:
        raise ValueError(
            f"tokenizer has {tokenizer.vocab_size} tokens, config.vocab_size is "
            f"{config.vocab_size}"
        )
    train_tokens = _encode(tokenizer, data.train, (config.corpus, "train"))
    val_tokens = _encode(tokenizer, data.validation)
    train_tokens, val_tokens = train_tokens.to(device), val_tokens.to(device)
    # bits per byte = nats per token * tokens / bytes / ln 2
    tokens_per_byte = len(val_tokens) / len(data.validation.encode("utf-8"))

    torch.manual_seed(config.seed)
    model = model_class(
        config.vocab_size, config.context, implementation=implementation, **config.model
    ).to(device)
    optimizer = torch.optim.AdamW(
        _parameter_groups(model, config.weight_decay),
        lr=config.learning_rate,
        betas=config.betas,
    )
    result = TrainResult(model, tokenizer, config)
    start_step = 0
    if resume and os.path.exists(checkpoint):
        state = torch.load(checkpoint, weights_only=False, map_location=device)
        if state["config"] != config.as_dict():
            differ = sorted(
                k for k, v in config.as_dict().items() if state["config"].get(k) != v
            )
            raise ValueError(
                f"checkpoint {checkpoint} is of another configuration (differs in "
                f"{', '.join(differ)})"
            )
        model.load_checkpoint(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_step = state["step"]
        for name in ("losses", "learning_rates", "grad_norms", "evaluations"):
            setattr(result, name, list(state[name]))
        torch.set_rng_state(state["rng"].cpu())
    end = config.steps if stop_after is None else min(config.steps, stop_after)

    writer = None
    if log_dir is not None:
        if "tensorflow" not in sys.modules:
            # tensorboard's own switch to its TF-free file layer: writing events
            # needs no TensorFlow, and importing it would take seconds
            sys.modules.setdefault(
                "tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf")
            )
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir, purge_step=start_step)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=end, initial=start_step, unit="step")

    result.flops_per_token = flops_per_token(model, config.context)
    model.train()
    seen, busy = 0, 0.0
    for step in range(start_step, end):
        tick = time.perf_counter()
        lr = learning_rate_at(step, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
        optimizer.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for _ in range(config.accumulation):
            x, y = _windows(train_tokens, config.batch_size, config.context, generator)
            logits = model(x)
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
            (loss / config.accumulation).backward()
            loss_sum += loss.item()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip)
        optimizer.step()
        busy += time.perf_counter() - tick
        seen += config.accumulation * config.batch_size * config.context
        loss_value = loss_sum / config.accumulation
        result.losses.append(loss_value)
        result.learning_rates.append(lr)
        result.grad_norms.append(float(norm))
        if writer is not None:
            writer.add_scalar("train/loss", loss_value, step)
            writer.add_scalar("train/learning_rate", lr, step)
            writer.add_scalar("train/grad_norm", float(norm), step)
        done = step + 1
        if done % config.eval_every == 0 or done == config.steps:
            val = evaluate(model, val_tokens, config)
            bpb = val * tokens_per_byte / math.log(2)
            result.evaluations.append((done, val, bpb))
            if writer is not None:
                writer.add_scalar("val/loss", val, done)
                writer.add_scalar("val/bits_per_byte", bpb, done)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.3f}")
        if checkpoint is not None and (
            done == end or (checkpoint_every and done % checkpoint_every == 0)
        ):
            _save(checkpoint, model, optimizer, config, done, result)
    if bar is not None:
        bar.close()
    if seen:
        result.seconds = busy
        result.tokens_per_second = seen / busy
        result.flops_per_second = result.tokens_per_second * result.flops_per_token
        if writer is not None:
            writer.add_scalar(
                "throughput/tokens_per_second", result.tokens_per_second, end
            )
    if writer is not None:
        writer.close()
    model.eval()
    return result


def _save(path, model, optimizer, config, step, result) -> None:
    state = {
        "config": config.as_dict(),
        "model": model.checkpoint(),
        "optimizer": optimizer.state_dict(),
        "step": step,
        "losses": result.losses,
        "learning_rates": result.learning_rates,
        "grad_norms": result.grad_norms,
        "evaluations": result.evaluations,
        "rng": torch.get_rng_state(),
    }
    tmp = f"{path}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)  # never a half-written checkpoint


def main(argv: list[str] | None = None) -> int:
    """The command line: ``python -m companion.train --help``."""
    parser = argparse.ArgumentParser(
        prog="python -m companion.train", description=__doc__.split("\n\n")[0]
    )
    defaults = TrainConfig()
    parser.add_argument("--corpus", default=defaults.corpus)
    for name in (
        "vocab_size",
        "context",
        "batch_size",
        "accumulation",
        "steps",
        "warmup",
        "eval_every",
        "eval_batches",
        "seed",
    ):
        parser.add_argument(
            f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name)
        )
    for name in ("learning_rate", "min_lr_ratio", "weight_decay", "clip"):
        parser.add_argument(
            f"--{name.replace('_', '-')}", type=float, default=getattr(defaults, name)
        )
    parser.add_argument("--embed-dim", type=int, default=128)
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument("--num-kv-heads", type=int, default=None)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument(
        "--positions", default="rope", choices=["rope", "learned", "alibi"]
    )
    parser.add_argument(
        "--untied", action="store_true", help="an output layer of its own"
    )
    parser.add_argument(
        "--shared-blocks", action="store_true", help="one block, reused"
    )
    parser.add_argument("--implementation", default="sdpa")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    parser.add_argument("--log-dir", default=None, help="TensorBoard event files here")
    parser.add_argument("--checkpoint", default=None, help="save (and resume) here")
    parser.add_argument("--checkpoint-every", type=int, default=None)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    config = TrainConfig(
        corpus=args.corpus,
        vocab_size=args.vocab_size,
        context=args.context,
        batch_size=args.batch_size,
        accumulation=args.accumulation,
        steps=args.steps,
        learning_rate=args.learning_rate,
        min_lr_ratio=args.min_lr_ratio,
        warmup=args.warmup,
        weight_decay=args.weight_decay,
        clip=args.clip,
        eval_every=args.eval_every,
        eval_batches=args.eval_batches,
        seed=args.seed,
        model=dict(
            embed_dim=args.embed_dim,
            num_heads=args.num_heads,
            num_kv_heads=args.num_kv_heads,
            num_layers=args.num_layers,
            positions=args.positions,
            tied=not args.untied,
            shared_blocks=args.shared_blocks,
        ),
    )
    result = train(
        config,
        log_dir=args.log_dir,
        checkpoint=args.checkpoint,
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
        implementation=args.implementation,
        device=args.device,
        progress=not args.no_progress,
    )
    out = sys.stdout
    out.write(f"parameters: {result.model.num_parameters():,}\n")
    for step, val, bpb in result.evaluations:
        out.write(
            f"step {step}: validation loss {val:.4f} nats/token, {bpb:.4f} bits/byte\n"
        )
    out.write(
        f"throughput: {result.tokens_per_second:,.0f} tokens/s, "
        f"{result.flops_per_second / 1e9:.2f} GFLOP/s "
        f"({result.flops_per_token / 1e6:.2f} MFLOP/token)\n"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
