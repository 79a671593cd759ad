"""The benchmark scripts still run against the library they measure, at toy sizes.

Their figures live in BENCHMARKS.md and `benchmarks/gpu.sh` has never met a GPU in CI: a script
that rots with the library would fail only on the machine that can least afford a rerun. These
runs take seconds; they check what the scripts report holds together, not how fast anything is.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def run(script: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


def test_bench_speed_reports_a_consistent_step_at_150_classes_in_bf16(tmp_path):
    # gpu.sh's flags less --device cuda, --compile and the size: many classes, bf16 autocast
    out = tmp_path / "speed.json"
    done = run("bench_speed.py", "--precision", "bf16", "--classes", "150", "--batch-size", "32",
               "--repeats", "2", "--warmup", "1", "--threads", "1", "--json", str(out))  # fmt: skip
    assert done.returncode == 0, done.stderr
    r = json.loads(out.read_text())
    assert r["classes"] == 150 and r["precision"] == "bf16" and r["compile"] is False
    step = r["train_step_s"]
    assert step["kind"] > 0 and step["dense"] > 0
    assert r["train_step_ratio"] == pytest.approx(step["kind"] / step["dense"])
    assert r["params"]["kind"] > 0 and r["params"]["dense"] > 0
    for k in ("kind", "dense"):  # the step was counted: floating-point work and operations
        assert r["train_step_flops"][k] > 0 and r["train_step_ops"][k] > 0
    assert r["merged_inference_ratio"] > 0
    assert "| training step (fwd+bwd+AdamW) |" in done.stdout


def test_bench_scale_keeps_the_tailor_tensor_target_at_a_toy_size(tmp_path):
    out = tmp_path / "scale.json"
    done = run("bench_scale.py", "--cases", "tiny/4:40", "--repeats", "1", "--step-repeats", "2",
               "--json", str(out))  # fmt: skip
    assert done.returncode == 0, done.stderr
    (r,) = json.loads(out.read_text())
    kind, dense = r["kind"], r["dense"]
    assert r["case"] == "tiny/4:40"
    assert kind["tailor_tensors_per_layer"] <= 4 and dense["tailor_tensors_per_layer"] == 0
    for k in (kind, dense):
        assert k["fwd_bwd_s"] > 0 and k["optimizer_s"] > 0 and k["ema_s"] > 0 and k["peak_gib"] > 0
    assert "| tiny/4:40 |" in done.stdout


@pytest.mark.parametrize(
    ("script", "args", "says"),
    [
        ("bench_scale.py", ["--cases", "DiT-S/4"], "at least 16 classes"),
        ("bench_scale.py", ["--cases", "DiT-Q/4:150"], "unknown model size"),
        ("bench_speed.py", ["--size", "DiT-S/4", "--image-size", "30"], "not divisible by patch"),
        ("bench_speed.py", ["--device", "gpu0"], "give cpu, cuda or cuda:N"),
        ("bench_host_memory.py", ["--size", "DiT-Q/4"], "unknown model size"),
        ("bench_gather.py", ["--ranks", "1"], "--ranks >= 2"),
    ],
)
def test_bench_scripts_refuse_bad_input_with_a_usage_error(script, args, says):
    done = run(script, *args, timeout=120)
    assert done.returncode == 2 and says in done.stderr and "Traceback" not in done.stderr
