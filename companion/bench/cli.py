"""``python -m companion.bench``: the command line, the three run sizes and the run."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field

from companion.bench import attention, conv, decoding, gpt_step, longctx, report, timing
from companion.bench import moe as moe_bench
from companion.bench import paged as paged_bench


@dataclass(frozen=True)
class Config:
    """What one run measures.

    ``full`` is the benchmark; ``quick`` about a minute; ``tiny`` a smoke test.
    """

    sizes: tuple[int, ...]  # attention timings
    memory_sizes: tuple[int, ...]  # attention peak memory (numpy)
    # attention peak memory (torch, tf; fresh process)
    framework_memory_sizes: tuple[int, ...]
    equal_thread_sizes: tuple[int, ...]
    # the textbook line holds n x n float64 matrices: not above this n
    textbook_up_to: int
    numpy_memory_up_to: int  # above this n only the tiled kernel's memory is measured
    rounds: dict = field(default_factory=dict)  # n -> rounds (largest key <= n)
    # torch tiled, tf tiled and keras are timed up to this n in the main table
    others_up_to: int = 1 << 30
    compile_sizes: tuple[int, ...] = ()  # torch.compile, at equal threads only
    conv_cases: dict = field(default_factory=lambda: dict(conv.CASES))
    conv_rounds: int = 5
    decode_steps: int = 256
    decode_model: dict = field(default_factory=lambda: dict(decoding.MODEL))
    decode_rounds: int = 3
    longctx: dict = field(default_factory=lambda: dict(longctx.FULL))
    paged: dict = field(default_factory=lambda: dict(paged_bench.FULL))
    moe: dict = field(default_factory=lambda: dict(moe_bench.FULL))
    gpt: dict = field(default_factory=lambda: dict(gpt_step.FULL))

    def rounds_for(self, n: int) -> int:
        return self.rounds[max(k for k in self.rounds if k <= n)]


CONFIGS = {
    "full": Config(
        sizes=(512, 1024, 2048, 4096, 8192, 16384),
        memory_sizes=(512, 1024, 2048, 4096, 8192, 16384, 32768),
        framework_memory_sizes=(512, 1024, 2048, 4096, 8192, 16384),
        equal_thread_sizes=(1024, 2048, 4096),
        textbook_up_to=16384,
        numpy_memory_up_to=16384,
        rounds={0: 7, 2048: 5, 8192: 2, 16384: 1},
        others_up_to=8192,
        compile_sizes=(4096,),
    ),
    "quick": Config(
        sizes=(512, 1024, 2048, 4096),
        memory_sizes=(1024, 4096, 16384),
        framework_memory_sizes=(),
        equal_thread_sizes=(4096,),
        textbook_up_to=4096,
        numpy_memory_up_to=4096,
        rounds={0: 3, 4096: 2},
        compile_sizes=(4096,),
        conv_rounds=3,
        decode_rounds=1,
        longctx=dict(longctx.QUICK),
        paged=dict(paged_bench.QUICK),
        moe=dict(moe_bench.QUICK),
        gpt=dict(gpt_step.QUICK),
    ),
    "tiny": Config(
        sizes=(128, 256),
        memory_sizes=(256,),
        framework_memory_sizes=(256,),
        equal_thread_sizes=(256,),
        textbook_up_to=256,
        numpy_memory_up_to=256,
        rounds={0: 1},
        compile_sizes=(256,),
        conv_cases=dict(conv.TINY_CASES),
        conv_rounds=1,
        decode_steps=8,
        decode_model=dict(decoding.TINY_MODEL),
        decode_rounds=1,
        longctx=dict(longctx.TINY),
        paged=dict(paged_bench.TINY),
        moe=dict(moe_bench.TINY),
        gpt=dict(gpt_step.TINY),
    ),
}
SECTIONS = (
    "attention",
    "memory",
    "conv",
    "decoding",
    "longctx",
    "paged",
    "moe",
    "gpt",
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m companion.bench",
        description="Attention, convolution and decoding, measured side by side in "
        "one run; prints ratios "
        "and the targets of the book chapter 'Making it fast'. Subcommands: "
        "'python -m companion.bench crossover --help' (the implementation='auto' "
        "threshold for this machine).",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a run of about a minute (same as --size quick)",
    )
    parser.add_argument(
        "--size", choices=sorted(CONFIGS), default=None, help="run size (default: full)"
    )
    parser.add_argument("--json", metavar="PATH", help="write the raw numbers to PATH")
    parser.add_argument("--plot", metavar="DIR", help="write PNG figures into DIR")
    parser.add_argument(
        "--only",
        metavar="SECTION",
        action="append",
        choices=SECTIONS,
        help="measure only this section (repeatable)",
    )
    parser.add_argument(
        "--without",
        metavar="FRAMEWORK",
        action="append",
        choices=("torch", "tensorflow"),
        default=[],
        help="leave a framework out as if it were not installed (repeatable)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="threads for the main tables (default: all cores)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    args = parser.parse_args(argv)
    if args.quick and args.size not in (None, "quick"):
        parser.error("--quick and --size disagree")
    args.size = "quick" if args.quick else (args.size or "full")
    return args


def run(config: Config, *, threads: int, sections, without, progress) -> dict:
    """Measure the chosen sections; the raw numbers as a JSON-ready dict."""
    notes = []
    modules = {}
    for name in ("torch", "tensorflow"):
        module = None if name in without else timing.framework(name)
        modules[name] = module
        if module is None:
            notes.append(f"{name} is not available: its columns are skipped")
    if modules["torch"] is not None:
        notes.append(
            f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')} (idle torch threads "
            "do not spin on the cores the next contender needs), "
            "TORCHINDUCTOR_COMPILE_THREADS="
            f"{os.environ.get('TORCHINDUCTOR_COMPILE_THREADS')} (no compile workers "
            "left running)"
        )
    framework_threads = None
    if modules["tensorflow"] is not None:
        framework_threads = _tensorflow_threads(modules["tensorflow"], threads)
        notes.append(
            f"TensorFlow runs at {framework_threads} thread(s) (fixed when it starts): "
            "tf.nn.conv2d, tf tiled and keras appear only in that row; "
            "TF_ENABLE_ONEDNN_OPTS=" + os.environ.get("TF_ENABLE_ONEDNN_OPTS", "unset")
        )
    thread_counts = sorted({1, threads})
    results = {
        "config": asdict(config),
        "threads": threads,
        "notes": notes,
        "machine": {
            "cores": timing.cores(),
            "platform": platform.platform(),
            "processor": platform.processor(),
            "python": platform.python_version(),
            "versions": _versions(modules),
            **timing.cpu_record(),
        },
        "load_average_start": timing.load_average(),
    }
    if "attention" in sections:
        progress("checking every attention contender against the float64 reference")
        diffs = attention.check_outputs(modules)
        progress("recording the kernels each torch peer ran (profiler)")
        kernels = attention.kernels_used(modules)
        refused = dict(modules.get("refused", {}))
        for name, why in refused.items():
            notes.append(f"peer refused, not reported: {name}: {why}")
        att = {
            "threads": threads,
            "framework_threads": framework_threads,
            "max_abs_diff": diffs,
            "kernels": kernels,
            "refused": refused,
        }
        att["times"] = attention.time_all(
            config.sizes,
            threads,
            config.rounds_for,
            modules,
            progress,
            config.textbook_up_to,
            config.others_up_to,
        )
        if modules["torch"] is not None:
            att["equal_threads"] = attention.equal_threads(
                config.equal_thread_sizes,
                thread_counts,
                config.rounds_for,
                modules,
                progress,
                framework_threads,
                config.compile_sizes,
            )
        att["memory"] = {"full": {}, "causal": {}}
        results["attention"] = att
    if "memory" in sections:
        att = results.setdefault(
            "attention", {"threads": threads, "times": {"full": {}, "causal": {}}}
        )
        memory = attention.numpy_memory(
            config.memory_sizes,
            threads,
            progress,
            config.textbook_up_to,
            config.numpy_memory_up_to,
        )
        names = [m for m in attention.available(modules) if m not in attention.NUMPY]
        framework = attention.framework_memory(
            config.framework_memory_sizes, names, threads, progress
        )
        for kind in ("full", "causal"):
            memory[kind].update(framework[kind])
        att["memory"] = memory
    if "conv" in sections:
        results["conv"] = conv.run_all(
            config.conv_cases,
            thread_counts,
            threads,
            config.conv_rounds,
            modules,
            progress,
        )
    if "decoding" in sections:
        results["decoding"] = decoding.run_all(
            config.decode_steps, config.decode_model, config.decode_rounds, progress
        )
    if "longctx" in sections and modules["torch"] is None:
        notes.append("the long-context section needs torch: skipped")
    elif "longctx" in sections:
        results["longctx"] = longctx.run_all(config.longctx, progress, threads)
    if "paged" in sections:
        # one thread: decoding steps are small, and the ratio is what is compared
        results["paged"] = paged_bench.run_all(
            config.paged, progress, 1, torch_ok=modules["torch"] is not None
        )
    if "moe" in sections and modules["torch"] is None:
        notes.append("the mixture-of-experts section needs torch: skipped")
        results["moe"] = None
    elif "moe" in sections:
        results["moe"] = moe_bench.run_all(config.moe, progress, 1)
    if "gpt" in sections and modules["torch"] is None:
        notes.append("the GPT training-step section needs torch: skipped")
        results["gpt"] = None
    elif "gpt" in sections:
        results["gpt"] = gpt_step.run_all(config.gpt, progress, threads)
    results["load_average_end"] = timing.load_average()
    results["targets"] = report.targets(results)
    return results


def _tensorflow_threads(tf, threads: int) -> int:
    """Ask TensorFlow for ``threads`` intra-op threads (only before it starts)."""
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
    except RuntimeError:
        pass  # already started: it keeps its own count
    return tf.config.threading.get_intra_op_parallelism_threads() or timing.cores()


def _versions(modules: dict) -> dict:
    import numpy

    versions = {"numpy": numpy.__version__}
    if modules.get("torch") is not None:
        versions["torch"] = modules["torch"].__version__
    if modules.get("tensorflow") is not None:
        import keras

        versions["tensorflow"] = modules["tensorflow"].__version__
        versions["keras"] = keras.__version__
    return versions


def render(results: dict) -> str:
    machine = results["machine"]
    parts = [
        f"companion.bench: {machine.get('cpu_model', '?')} ({machine.get('isa', '?')}, "
        f"L2 {machine.get('l2_bytes', 0) // 1024} KiB), {machine['cores']} core(s), "
        f"{machine['platform']}; load average "
        f"{results['load_average_start']} (start), {results['load_average_end']} (end)"
    ]
    parts += [f"note: {note}" for note in results["notes"]]
    att = results.get("attention")
    if att and att["times"]["full"]:
        parts.append(report.attention_tables(att))
        diffs = ", ".join(
            f"{m} {d:.1e}" for m, d in att.get("max_abs_diff", {}).items()
        )
        parts.append(
            "attention outputs, max |difference| from the float64 reference at "
            f"n = 256: {diffs}"
        )
        parts.append(
            "bound = 4 n^2 d / rate (causal: 2 n (n + 1) d / rate), the rate measured "
            "on Q K^T and P V "
            "themselves in this run; bound (peak) uses a 1024^3 square product's rate"
        )
    elif att:
        parts.append(report.attention_tables({**att, "equal_threads": {}}))
    if "conv" in results:
        parts.append(
            report.conv_tables(results["conv"], results["config"]["conv_cases"])
        )
    if "decoding" in results:
        parts.append(report.decoding_table(results["decoding"]))
    if "longctx" in results:
        parts.append(longctx.table(results["longctx"]))
    if "paged" in results:
        parts.append(paged_bench.table(results["paged"]))
    if results.get("moe"):
        parts.append(moe_bench.table(results["moe"]))
    if results.get("gpt"):
        parts.append(gpt_step.table(results["gpt"]))
    parts.append(report.targets_table(results["targets"]))
    return "\n\n".join(parts)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["crossover"]:
        from companion.bench import crossover

        return crossover.main(argv[1:])
    args = parse_args(argv)
    progress = timing.Progress(quiet=args.quiet)
    threads = args.threads or timing.cores()
    sections = tuple(args.only or SECTIONS)
    started = time.perf_counter()
    progress(
        f"companion.bench --size {args.size}, {threads} thread(s), "
        f"sections: {', '.join(sections)}; "
        f"load average {timing.load_average()}"
    )
    results = run(
        CONFIGS[args.size],
        threads=threads,
        sections=sections,
        without=set(args.without),
        progress=progress,
    )
    results["seconds"] = time.perf_counter() - started
    print(render(results))
    print(f"\n(run took {results['seconds']:.0f} s)")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(results, out, indent=1, default=float)
        progress(f"raw numbers written to {args.json}")
    if args.plot:
        for path in report.plot(results, args.plot):
            progress(f"figure written: {path}")
    sys.stdout.flush()
    return 0
