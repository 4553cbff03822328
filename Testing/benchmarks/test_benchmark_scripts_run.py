"""The benchmark scripts stay runnable: each one's smallest CPU configuration, end to end, in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def run(script: str, *args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), *args], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_gpu_fullsize_runs_on_cpu_with_the_tiny_config():
    out = run("gpu_fullsize.py", "--tiny", "--device", "cpu", "--slices", "4", "--gen-batch", "4", "--tokens", "8",
              "--repeats", "1")
    assert "config tiny" in out and "perceiver attention sdpa" in out
    assert "4-slice throughput" in out and "one-slice latency" in out
    assert "auto batches" in out


def test_speed_levers_runs_on_the_demo_perceiver():
    out = run("speed_levers.py", "--presets", "demo", "--slices", "2", "--repeats", "1")
    for lever in ("eager, PE recomputed (official)", "eager + PE cache", "sdpa + PE cache", "region_tokens",
                  "sdpa + shared grid features"):
        assert lever in out
    # The exact levers are exact: zero difference from the path they replace.
    encode_row = next(line for line in out.splitlines() if line.strip().startswith("region_tokens"))
    assert encode_row.endswith("max|diff| 0.00e+00")
    assert "sdpa + shared grid features 0.00e+00" in out


def test_official_style_runs_with_the_real_qwen3_tokenizer():
    out = run("official_style.py", "--models", "tiny", "--slices", "2", "--tokens", "4", "--repeats", "1")
    assert "of which tokenizer copy + ids" in out
    assert "ratio Engine batched" in out and "ratio Engine one at a time" in out


def test_plain_vs_stream_runs_with_the_tiny_model():
    out = run("plain_vs_stream.py", "--slices", "2", "--tokens", "4", "--repeats", "1", "--threads", "1")
    assert "plain / streamed wall time" in out and "streamed  wall" in out


def test_onnx_vs_torch_gives_both_sides_the_same_threads():
    """onnxruntime's default is a thread per core whatever torch was given: the script sets both to one count
    (OMP_NUM_THREADS=1 here, on a machine with more cores than that) and prints a row per stage."""
    out = run("onnx_vs_torch.py", "--models", "tiny", "--batch", "1", "--codes", "1", "--repeats", "1")
    assert "threads: torch 1, onnxruntime 1" in out
    rows = [line.split() for line in out.splitlines() if line.startswith("tiny ")]
    assert [row[1] for row in rows] == ["encode", "decode"]
    assert all(row[4].endswith("x") for row in rows)


def test_upload_memory_runs_on_a_small_volume():
    out = run("upload_memory.py", "--shape", "4x64x64")
    assert "volume 4 x 64 x 64 int16" in out
    assert "Slicer side peak:" in out and "engine side peak:" in out and "upload time:" in out


def test_eval_report_scale_compares_equal_rows_and_paths():
    """Its "before" path resolver stands in for the readers' own; it must take what the readers hand it (a
    standalone class broke when `--images` handling added arguments: a TypeError before any row was printed)."""
    items = 400
    out = run("eval_report_scale.py", "--items", str(items), "--read-items", str(items), "--n-boot", "20")
    assert f"same CI rows: True; same image paths: True ({items} items)" in out
    assert "before/now" in out


def test_engine_throughput_prints_both_rates_and_their_ratio():
    out = run("engine_throughput.py", "--model", "tiny", "--slices", "2", "--tokens", "2")
    assert "one by one:" in out and "batched:" in out
    assert "ratio (batched / one by one):" in out


def test_slicer_chat_stream_replays_a_live_answer_into_both_panels():
    out = run("slicer_chat_stream.py", "--slices", "2")
    assert "2 slices answered" in out and "old/new" in out
    assert "same final document: True" in out
    new = next(line for line in out.splitlines() if line.strip().startswith("new ("))
    assert new.endswith("whole HTML set 1 times")
