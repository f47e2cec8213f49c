"""``minipaged bench``: its GPU measurements run end to end in the CUDA simulator on tiny sizes
(timings there mean nothing; what is checked is that every figure is produced and that the
versions compared agree), and its command line answers bad input clearly."""

from __future__ import annotations

import json

import numpy as np
import pytest

from minipaged import cli
from minipaged.bench import cli as bench_cli
from minipaged.bench import gpu

TINY = gpu.Timing(warmup=0, reps=1, samples=1)  # each simulated launch takes seconds


def test_time_ms_runs_the_launch_warmup_plus_reps_times_samples() -> None:
    calls: list[int] = []
    ms = gpu.time_ms(lambda: calls.append(1), gpu.Timing(warmup=2, reps=3, samples=4))
    assert len(calls) == 2 + 3 * 4
    assert ms >= 0


def test_device_random_fills_every_element_with_values_in_range() -> None:
    a = gpu.device_random((3, 5), np.float16, seed=1).copy_to_host()
    assert a.dtype == np.float16 and np.all((a >= -1) & (a < 1)) and np.all(a != 0)
    b = gpu.device_random((3, 5), np.float16, seed=2).copy_to_host()
    assert not np.array_equal(a, b)


def test_batch_shape_reads_seqs_context_and_heads() -> None:
    assert gpu.batch_shape("64x4096/8") == gpu.AttentionShape(64, 4096, 32, 8)
    assert gpu.batch_shape("1x32768/32").kv_heads == 32
    assert gpu.batch_shape("64x4096/8:8") == gpu.AttentionShape(64, 4096, 8, 8)
    for bad in ("64x4096", "64/8", "ax4096/8", "64x4096/8/1", "64x4096/a:8", "64x4096/8:8:8"):
        with pytest.raises(ValueError, match="SEQSxCONTEXT/KV"):
            gpu.batch_shape(bad)


def test_kv_bytes_counts_each_kv_byte_once_however_many_heads_share_it() -> None:
    shape = gpu.AttentionShape(seqs=2, context=10, heads=8, kv_heads=2, head_dim=4)
    kv = 2 * 2 * 10 * 2 * 4 * 2  # K and V, seqs, tokens, kv heads, dims, bytes
    assert shape.kv_bytes() == kv + 2 * 2 * 8 * 4 * 2  # plus query and output


def test_bench_attention_measures_v2_to_v6_and_they_agree() -> None:
    shapes = [gpu.AttentionShape(1, 20, 2, 1, 64, 16)]  # (version 6 wants head_dim 64)
    rows = gpu.bench_attention(shapes, copy_gbs=1.0, timing=TINY, partition_size=16)
    (row,) = rows
    assert all(row[f"{v}_ms"] > 0 for v in ("v2", "v3", "v4", "v5", "v6"))
    assert all(row[f"{v}_vs_v2"] < 1e-2 for v in ("v3", "v4", "v5", "v6"))
    if gpu.SIMULATED:
        assert row["sdpa_ms"] is None  # no GPU: no torch comparison
    assert row["v3_share"] == pytest.approx(row["bytes"] / row["v3_ms"] / 1e6)


def test_bench_copy_and_cache_report_every_count_and_thread_setting() -> None:
    shape = gpu.CacheShape(num_blocks=8, block_size=2, kv_heads=1, head_dim=8, counts=(1, 3))
    copies = gpu.bench_copy_blocks(shape, 1.0, TINY, threads=(8, 16))
    assert [r["blocks"] for r in copies] == [1, 3]
    assert all(r["ms@8"] > 0 and r["ms@16"] > 0 for r in copies)
    assert copies[1]["bytes"] == 2 * 2 * 3 * shape.block_bytes
    writes = gpu.bench_reshape_and_cache(shape, 1.0, TINY, threads=(8,))
    assert [r["tokens"] for r in writes] == [2, 6]


def test_bench_copy_counts_the_bytes_of_every_layer() -> None:
    shape = gpu.CacheShape(8, 2, 1, 8, counts=(3,), layers=4)
    (row,) = gpu.bench_copy_blocks(shape, 1.0, TINY, threads=(8,))
    assert row["layers"] == 4 and row["bytes"] == 4 * 2 * 2 * 3 * shape.block_bytes


def test_help_lists_the_sections_and_goals(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        cli.main(["bench", "--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    assert all(s in text for s in bench_cli.SECTIONS) and "goals" in text


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["bench", "gpu"], "unknown section 'gpu'"),
        (["bench", "--threads", "128,x"], "expected numbers separated by commas"),
        (["bench", "--threads", "2048"], "thread counts must be in 1..1024"),
        (["bench", "--samples", "0"], "must be at least 1"),
        (["bench", "copy", "--layers", "0"], "must be at least 1"),
    ],
)
def test_bad_arguments_are_refused_with_a_message(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as stop:
        cli.main(argv)
    assert stop.value.code == 2
    assert message in capsys.readouterr().err


def test_without_a_gpu_only_the_cpu_section_runs(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path
) -> None:
    monkeypatch.setattr(bench_cli, "_gpu_available", lambda: False)
    out = tmp_path / "bench.json"
    assert (
        cli.main(["bench", "attention", "block-manager", "--sequences", "40", "--json", str(out)])
        == 0
    )
    text = capsys.readouterr().out
    assert "no CUDA GPU found: skipping attention" in text
    assert "block manager" in text
    saved = json.loads(out.read_text())
    assert "block_manager" in saved and "attention" not in saved
