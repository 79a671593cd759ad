"""Bit-for-bit behaviour check: train KIND and dense for 30 steps, sample from each with a fixed
seed, and compare the sha256 of the exported EMA weights (the file) and of the samples (the arrays
arr_0, labels and class_names of the .npz, whose other entries record the source's absolute path)
with recorded values.

    python scripts/check_reproducible.py            # exit 0 when all four hashes match

The commands (run in a temporary directory):

    kind-dit train --data mnist:0-5 --size tiny --steps 30 --batch-size 32 --seed 0 --out kind_run
    kind-dit train --data mnist:0-5 --size tiny --steps 30 --batch-size 32 --seed 0 --model dense \
        --out dense_run
    kind-dit sample RUN --n 4 --seed 0 --steps 10 --out RUN.samp      (for both runs)

Every command runs on one thread (OMP_NUM_THREADS=1). Recorded on the project's reference machine
(2-core x86-64 CPU, torch 2.13.0+cpu) with the tailor bank (one tensor for every tailor, one label
table; label dropout and flips drawn on the host; attention's q, k and v as one GEMM), and
reproduced by a second run:

    kind_run/model/model.safetensors   cb02add04f97969d7d01e3a2bc3df902c65576b9f7dd99465827eb3ba3dc1dda
    dense_run/model/model.safetensors  2f192ea5d4a282c154e049f409e86a384b8f89c3c08d8129d4bba21c603f0634
    kind_run.samp/samples.npz arrays   e336ccde9024f0f5faa6790da3ba79dca5265ec5ef33708820bb5da164a51191
    dense_run.samp/samples.npz arrays  5720f05349c009d3b5edb92921e94953ba24d70dfa455c3269c46ea3229968ff

(kind-dit 0.1 and the layered package up to the bank gave 5382ad50…, a15f6cb9…, d533fb3f… and
6e3e7fc1…: the bank changed the file layout and the random stream on purpose; the bank before
the stacked q, k, v GEMM gave 030ffb60… and 8f58cad8… for the weights, whose last bits the wider
GEMM's summation order changes, and the same samples.)

Float results depend on the CPU's kernels and the thread count, so other machines may get other
hashes: there, run this script on two versions of the code and compare what it prints. That is
why this is a script and not a test. The grouped GEMM (torch's `grouped_mm` for the folded blocks)
was checked that way: on a later session's machine (an Intel Xeon, 2 cores) the code before it
(d111746) and after it both gave 135c1dd2…, c671de10…, 35ae4c62… and the dense samples above.
On an AMD EPYC guest (2 vCPUs, 2026-12-07) all four recorded hashes above matched, for 7dc507d
and for the multi-rank changes after it (which leave one process's training and sampling alone).
Seeding each sample by (seed, class, index within the class) instead of its place in the list
(aab37c8) changed the sample streams on purpose: the samples above were bb263615… and ec0c4202…
before it, the weights did not change (AMD EPYC guest, 2026-12-07, twice). A later AMD EPYC
guest (the ninth 2026-12-07 session) gave 5749881e… and 1b728392… for the weights at 7dc507d and
at the session's code alike, and the recorded samples: the machine's kernels, not the code. The
DDIM step written in `kind.core.diffusion` (diffusers' stepped between the wrong timesteps
unless the step count divides 1000) left both sample hashes as they were (10 steps divide it).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

RECORDED = {
    "kind_run/model/model.safetensors": "cb02add04f97969d7d01e3a2bc3df902c65576b9f7dd99465827eb3ba3dc1dda",
    "dense_run/model/model.safetensors": "2f192ea5d4a282c154e049f409e86a384b8f89c3c08d8129d4bba21c603f0634",
    "kind_run.samp/samples.npz": "e336ccde9024f0f5faa6790da3ba79dca5265ec5ef33708820bb5da164a51191",
    "dense_run.samp/samples.npz": "5720f05349c009d3b5edb92921e94953ba24d70dfa455c3269c46ea3229968ff",
}
TRAIN = ["train", "--data", "mnist:0-5", "--size", "tiny", "--steps", "30", "--batch-size", "32",
         "--seed", "0"]  # fmt: skip


def kind_dit(*args: str, cwd: Path) -> None:
    # One thread: with two, the CPU kernels split reductions by the threads' progress, and a busy
    # machine then gives other floats from run to run, old code and new alike.
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "kind.cli", *args], cwd=cwd, check=True, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip


def digest(path: Path) -> str:
    """sha256 of a weights file, or of the sample arrays of an .npz."""
    if path.suffix != ".npz":
        return hashlib.sha256(path.read_bytes()).hexdigest()
    h = hashlib.sha256()
    with np.load(path, allow_pickle=False) as npz:
        for key in ("arr_0", "labels", "class_names"):
            h.update(np.ascontiguousarray(npz[key]).tobytes())
    return h.hexdigest()


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        kind_dit(*TRAIN, "--out", "kind_run", cwd=work)
        kind_dit(*TRAIN, "--model", "dense", "--out", "dense_run", cwd=work)
        for run in ("kind_run", "dense_run"):
            kind_dit("sample", run, "--n", "4", "--seed", "0", "--steps", "10", "--out",
                     f"{run}.samp", cwd=work)  # fmt: skip
        same = True
        for name, recorded in RECORDED.items():
            got = digest(work / name)
            same &= got == recorded
            print(f"{'same' if got == recorded else 'DIFFERENT'}  {got}  {name}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
