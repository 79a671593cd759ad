"""The CPU training step keeps its freed memory: no page faults to refill the heap every step."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"

# Identical KIND training steps of the default tiny model in a fresh interpreter that calls
# keep_freed_memory first, as a command or a job's process does (the setting is per process, and
# other tests' training runs set it in this one): the median page faults of steps 15-24, once the
# heap has grown to what a step needs. Without the call such steps take hundreds to thousands each
# (benchmarks/bench_host_memory.py).
STEPS = """
import json, resource, torch
from kind.core.diffusion import Diffusion, DiffusionConfig
from kind.core.model import DiT, ModelConfig
from kind.core.host_memory import keep_freed_memory
from kind.training.optim import masked_adamw

torch.manual_seed(0)
torch.set_num_threads(1)
model = DiT(ModelConfig(size="tiny", image_size=28, in_channels=1, class_names=list("abcdef")))
opt = masked_adamw(model, 1e-4)[0]
diffusion, g = Diffusion(DiffusionConfig()), torch.Generator().manual_seed(0)
x, y = torch.randn(128, 1, 28, 28, generator=g), torch.arange(128) % 7
t, noise = torch.randint(0, 1000, (128,), generator=g), torch.randn(128, 1, 28, 28, generator=g)

kept = keep_freed_memory()
def faults_per_step():
    faults = []
    for _ in range(24):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        opt.set_rows(model.present_rows(y))
        diffusion.loss(model, x, y, t, noise, model.route(y)).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return sorted(faults[14:])[5]  # the median step of the last ten

print(json.dumps({"kept": kept, "faults": faults_per_step()}))
"""


@pytest.mark.skipif(not GLIBC, reason="the thresholds are glibc's malloc's")
def test_training_steps_stop_page_faulting():
    out = subprocess.run(
        [sys.executable, "-c", STEPS], capture_output=True, text=True, timeout=300, check=True
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["kept"] is True
    assert result["faults"] < 20, result  # the steps reuse the memory the process holds
