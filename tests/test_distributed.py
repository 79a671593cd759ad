"""torchrun with two gloo ranks: N ranks with batch B each equal one process with batch N*B, and
the tailors of classes absent from the whole global batch stay untouched (invariant 2 across
ranks)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kind.io import read_tensors

SCRIPT = Path(__file__).with_name("ddp_script.py")
pytestmark = pytest.mark.slow


def _run(out: Path, ranks: int, *extra: str) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parents[1] / "src"))
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
        if ranks > 1
        else [sys.executable]
    )
    subprocess.run(
        [*launcher, str(SCRIPT), "--out", str(out), *extra],
        check=True,
        env=env,
        capture_output=True,
        timeout=300,
    )


def _tensors(run: Path, step: int) -> dict[str, dict[str, torch.Tensor]]:
    d = run / "checkpoints" / f"step_{step:07d}"
    return {part: read_tensors(d / f"{part}.safetensors") for part in ("model", "ema", "optimizer")}


def test_two_ranks_match_one_process_with_twice_the_batch_and_keep_tailors_isolated(tmp_path):
    _run(tmp_path / "one", 1, "--batch-size", "8")
    _run(tmp_path / "two", 2, "--batch-size", "8")  # 4 per rank
    a, b = _tensors(tmp_path / "one", 3), _tensors(tmp_path / "two", 3)
    for part in a:
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            torch.testing.assert_close(a[part][k], b[part][k], rtol=1e-5, atol=1e-6, msg=k)

    # a class on one rank only moves on both (the rows are the global batch's): find such a
    # class and step by drawing the loop's global batches again (indices, dropout, flips; seed 0)
    g, labels = torch.Generator().manual_seed(0), torch.arange(32) % 4
    lone = []
    for step in (1, 2, 3):
        drawn = labels[torch.randint(32, (8,), generator=g)]
        torch.rand(8, generator=g), torch.rand(8, generator=g)
        ranks = [set(drawn[:4].tolist()), set(drawn[4:].tolist())]
        lone += [(step, c) for c in ranks[0] ^ ranks[1] if step > 1]  # step 1: no step 0 saved
    assert lone
    for step, c in lone:
        was, now = (
            _tensors(tmp_path / "two", s)["model"]["tailors.rows"] for s in (step - 1, step)
        )
        assert not torch.equal(was[c], now[c]), (step, c)

    # resume the two-rank run on data without class 2: its tailors and optimiser state stay put
    _run(tmp_path / "two", 2, "--batch-size", "8", "--steps", "5", "--classes", "0,1,3", "--resume")
    before, after = _tensors(tmp_path / "two", 3), _tensors(tmp_path / "two", 5)
    for bank in ("tailors.rows", "y_embedder.table"):  # row 2: class 2's tailor group and label
        assert torch.equal(before["model"][bank][2], after["model"][bank][2]), bank
        assert torch.equal(before["ema"][bank][2], after["ema"][bank][2]), bank
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(before["optimizer"][f"{bank}/{k}"][2],
                               after["optimizer"][f"{bank}/{k}"][2]), (bank, k)  # fmt: skip
        assert not torch.equal(before["model"][bank][1], after["model"][bank][1])


def test_sampling_over_two_ranks_gathers_what_one_process_draws(tmp_path):
    import numpy as np

    _run(tmp_path / "run", 1, "--steps", "1")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parents[1] / "src"))
    args = ["sample", str(tmp_path / "run"), "--per-class", "3", "--steps", "2", "--device", "cpu"]
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    for name, cmd in (("one", [sys.executable]), ("two", launch)):
        subprocess.run([*cmd, "-m", "kind.cli", *args, "--out", str(tmp_path / name)],
                       check=True, env=env, capture_output=True, timeout=300)  # fmt: skip
    # one sample over two ranks: the second rank's share is empty and it sends nothing
    lone = ["--per-class", "1", "--classes", "0", "--out", str(tmp_path / "lone")]
    subprocess.run([*launch, "-m", "kind.cli", *args, *lone],
                   check=True, env=env, capture_output=True, timeout=300)  # fmt: skip
    one, two, lone = (np.load(tmp_path / n / "samples.npz") for n in ("one", "two", "lone"))
    assert one["arr_0"].shape == (12, 28, 28, 1)
    assert np.array_equal(one["arr_0"], two["arr_0"])
    assert np.array_equal(one["labels"], two["labels"])
    assert np.array_equal(lone["arr_0"], one["arr_0"][:1])  # class 0's first sample, same seed
    assert lone["labels"].tolist() == [0]
