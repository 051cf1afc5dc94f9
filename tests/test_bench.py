"""``python -m companion.bench`` end to end, in its smallest size (``--size tiny``).

No timing is asserted (the machines are shared and noisy): these tests prove that the
benchmark runs, writes its JSON and figures, reports every target, checks the outputs
it compares (every attention contender against the float64 reference, conv2d against
the loops, cached decoding against recomputation), and still runs without torch and
TensorFlow, skipping their columns with a note.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from companion.bench import attention as bench_attention
from companion.bench import cli, crossover, decoding, timing

FLASH = "aten::_scaled_dot_product_flash_attention_for_cpu"
TARGET_COUNT = (
    32  # rows of the target table: every ratio at 1 and 2 threads, full and causal;
    # paged / contiguous per backend, context and forks; grouped decoding vs SDPA;
    # MoE grouped vs loop and vs dense; the GPT training step, tiled / sdpa;
    # TensorFlow tiled fwd+bwd / torch SDPA fwd+bwd, full and causal
)


def _run(tmp_path, capsys, *extra, plot=True):
    out_json, out_plots = tmp_path / "bench.json", tmp_path / "figures"
    status = cli.main(
        [
            "--size",
            "tiny",
            "--quiet",
            "--threads",
            "2",
            "--json",
            str(out_json),
            *(["--plot", str(out_plots)] if plot else []),
            *extra,
        ]
    )
    printed = capsys.readouterr().out
    return status, json.loads(out_json.read_text()), printed, out_plots


def test_tiny_run_end_to_end_with_torch(tmp_path, capsys):
    pytest.importorskip("torch")
    status, results, printed, plots = _run(tmp_path, capsys, "--without", "tensorflow")
    assert status == 0
    diffs = results["attention"]["max_abs_diff"]
    for name in (
        "textbook",
        "reference",
        "tiled",
        "torch tiled",
        "torch SDPA",
        "torch SDPA fwd+bwd",
        "torch tiled fwd+bwd",
        "torch.compile",
    ):
        for kind in ("", " causal"):
            assert diffs[name + kind] <= 1e-5, (
                f"{name}{kind} differs from the float64 reference by "
                f"{diffs[name + kind]}"
            )
    for kind in ("full", "causal"):
        times = results["attention"]["times"][kind]
        assert set(times["torch SDPA"]) == {"128", "256"}
        memory = results["attention"]["memory"][kind]
        # Linux >= 4.0: the resident high-water mark can be reset
        if timing._reset_high_water_mark():
            assert memory["torch SDPA"]["256"] is not None, (
                "the fresh-process probe measured nothing"
            )
        assert memory["tiled"]["256"] > 0
    assert set(results["attention"]["equal_threads"]) == {"1", "2"}
    for threads in ("1", "2"):
        for kind in ("full", "causal"):
            equal = results["attention"]["equal_threads"][threads][kind]
            assert {
                "tiled",
                "torch SDPA",
                "torch tiled fwd+bwd",
                "torch.compile",
            } <= set(equal)
    # the fair peer ran torch's flash kernel, forward and backward, and nothing refused
    kernels = results["attention"]["kernels"]
    for kind in ("full", "causal"):
        assert FLASH in kernels["torch SDPA"][kind]
        assert FLASH + "_backward" in kernels["torch SDPA fwd+bwd"][kind]
        assert not any("math" in k for k in kernels["torch SDPA"][kind])
    assert results["attention"]["refused"] == {}
    assert {"torch", "numpy"} <= set(results["machine"]["versions"])
    conv_diffs = results["conv"]["max_abs_diff"]
    assert (
        max(conv_diffs["small"].values()) <= 1e-5
        and max(conv_diffs["resnet"].values()) <= 1e-5
    )
    for label, heads in results["decoding"]["heads"].items():
        assert heads["identical_tokens"], label
        assert heads["max_abs_logit_diff"] <= 1e-12, label
        assert heads["cache_filled_bytes"] == heads["cache_formula_bytes"], label
    assert len(results["targets"]) == TARGET_COUNT
    assert {row["status"] for row in results["targets"]} <= {"PASS", "FAIL", "n/a"}
    assert "Targets" in printed and ("PASS" in printed or "FAIL" in printed)
    assert sorted(p.name for p in plots.iterdir()) == [
        "attention_memory.png",
        "attention_time.png",
        "decoding_per_token.png",
    ]


def test_runs_without_torch_and_tensorflow(tmp_path, capsys, monkeypatch):
    for name in ("torch", "tensorflow", "companion.tensorflow"):
        # `import torch` now raises ImportError
        monkeypatch.setitem(sys.modules, name, None)
    status, results, printed, _ = _run(tmp_path, capsys, plot=False)
    assert status == 0
    assert any("torch is not available" in note for note in results["notes"])
    assert any("tensorflow is not available" in note for note in results["notes"])
    assert "torch SDPA" not in results["attention"]["times"]["full"]
    assert set(results["attention"]["times"]["full"]) >= {
        "textbook",
        "reference",
        "tiled",
        "bound",
    }
    assert "torch" not in results["conv"]["times"]["resnet"]["1"]
    torch_rows = [
        row
        for row in results["targets"]
        if "SDPA" in row["target"] or "torch conv2d" in row["target"]
    ]
    assert all(row["status"] == "n/a" for row in torch_rows)
    assert "torch is not available" in printed


def test_textbook_line_is_the_tutorial_formula_in_float64(rng):
    q, k, v = (rng.standard_normal((1, 7, 4)).astype(np.float32) for _ in range(3))
    from companion.numpy import scaled_dot_product_attention_reference
    from companion.testing import assert_close

    out = bench_attention.textbook(q, k, v, causal=True)
    assert out.dtype == np.float64  # np.sqrt(d) promotes the float32 scores
    oracle = scaled_dot_product_attention_reference(
        *(a.astype(np.float64) for a in (q, k, v)), causal=True
    )
    # Q @ K.T runs in float32 before the promotion: float32 rounding, not float64's.
    assert_close(out, oracle[0], rtol=1e-5, atol=1e-6, name="textbook causal")


def test_cached_decoding_equals_recomputation_token_by_token():
    model = decoding.TinyDecoder(
        vocab=16, embed_dim=8, num_heads=4, layers=2, num_kv_heads=2
    )
    prompt = np.array([[3, 1, 4]])
    cached, logits_c, caches, _ = decoding.generate(model, prompt, 6, cached=True)
    recomputed, logits_r, _, _ = decoding.generate(model, prompt, 6, cached=False)
    assert np.array_equal(cached, recomputed)
    from companion.testing import assert_close

    assert_close(logits_c, logits_r, name="cached logits")
    assert all(c.length == 3 + 6 - 1 for c in caches)


def test_quick_and_size_must_agree():
    with pytest.raises(SystemExit):
        cli.parse_args(["--quick", "--size", "full"])
    assert cli.parse_args(["--quick"]).size == "quick"
    assert cli.parse_args([]).size == "full"


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch explains the refusal
def test_sdpa_is_called_on_4d_inputs_under_the_flash_restriction():
    torch = pytest.importorskip("torch")
    modules = {"torch": torch}
    run = bench_attention.contender("torch SDPA", 64, True, 1, modules)
    out = run()
    assert tuple(out.shape) == (1, 1, 64, bench_attention.D)  # (B, H, L, D)
    # the restriction is real: a 3-D call, which has no flash kernel, raises
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.zeros(1, 64, bench_attention.D)
    with pytest.raises(RuntimeError), sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        torch.nn.functional.scaled_dot_product_attention(q, q, q)


def test_a_peer_that_cannot_run_its_best_path_is_refused(monkeypatch):
    torch = pytest.importorskip("torch")
    original = bench_attention.contender

    def broken(name, *args):
        if name == "torch.compile":

            def fail():
                raise RuntimeError("no C++ compiler")

            return fail
        return original(name, *args)

    monkeypatch.setattr(bench_attention, "contender", broken)
    monkeypatch.setattr(bench_attention, "TENSORFLOW", ())
    modules = {"torch": torch, "tensorflow": None}
    bench_attention.check_outputs(modules, n=32)
    assert "no C++ compiler" in modules["refused"]["torch.compile"]
    assert "torch.compile" not in bench_attention.available(modules)
    assert "torch SDPA" in bench_attention.available(modules)


def test_sdpa_on_the_math_path_is_refused(monkeypatch):
    torch = pytest.importorskip("torch")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    original = bench_attention.contender

    def math_path(name, n, causal, threads, modules):
        run = original(name, n, causal, threads, modules)
        if name != "torch SDPA":
            return run

        def on_math():
            q = torch.zeros(1, 1, n, bench_attention.D)
            with sdpa_kernel([SDPBackend.MATH]):
                return torch.nn.functional.scaled_dot_product_attention(q, q, q)

        return on_math

    monkeypatch.setattr(bench_attention, "contender", math_path)
    modules = {"torch": torch, "tensorflow": None, "refused": {}}
    kernels = bench_attention.kernels_used(modules, n=32)
    assert not any("flash" in k for k in kernels["torch SDPA"]["full"])
    assert "did not run the flash kernel" in modules["refused"]["torch SDPA"]
    assert "torch SDPA fwd+bwd" not in modules["refused"]


def test_crossover_is_the_first_size_from_which_tiled_always_wins():
    # n -> (reference seconds, tiled seconds)
    times = {64: (1.0, 2.0), 128: (1.0, 0.9), 256: (1.0, 1.1), 512: (2.0, 1.0)}
    assert crossover.crossover_n(times) == 512  # 128 wins, but 256 loses again
    times[256] = (1.0, 1.0)  # a tie counts as a win
    assert crossover.crossover_n(times) == 128
    times[512] = (1.0, 3.0)  # the reference wins at the largest size: no crossover
    assert crossover.crossover_n(times) is None


def test_crossover_subcommand_runs_at_tiny_size(tmp_path, capsys):
    out_json = tmp_path / "crossover.json"
    status = cli.main(
        [
            "crossover",
            "--size",
            "tiny",
            "--quiet",
            "--without",
            "tensorflow",
            "--json",
            str(out_json),
        ]
    )
    printed = capsys.readouterr().out
    assert status == 0
    result = json.loads(out_json.read_text())
    expected = {"numpy"} | ({"torch"} if timing.framework("torch") else set())
    assert set(result["backends"]) == expected
    sizes = set(crossover.SIZES["tiny"])
    for backend, r in result["backends"].items():
        for kind in ("full", "causal"):
            assert {int(n) for n in r["times"][kind]} == sizes
            assert r["crossover"][kind] in sizes | {None}
        if r["n"] is not None:
            assert r["tiled_from_scores"] == r["n"] ** 2
        # the value to use is printed for every backend
        assert f"{backend}: " in printed
    assert result["machine"]["cpu_model"] and result["date"]


def test_gpt_training_step_section(tmp_path, capsys):
    pytest.importorskip("torch")
    status, results, printed, _ = _run(
        tmp_path, capsys, "--only", "gpt", "--without", "tensorflow", plot=False
    )
    assert status == 0
    gpt = results["gpt"]
    assert set(gpt["seconds"]) == {"sdpa", "tiled"}
    assert gpt["ratio"] == gpt["seconds"]["tiled"] / gpt["seconds"]["sdpa"]
    assert gpt["max_abs_diff"]["grad"] < 1e-3
    (row,) = [r for r in results["targets"] if r["target"].startswith("GPT training")]
    assert row["status"] in ("PASS", "FAIL") and row["limit"] == 1.5
    assert "tiled / sdpa" in printed
