"""Fixtures shared by the test modules."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch


def pytest_configure(config):
    """Under pytest-xdist (`make test` runs a worker a core) each worker takes its share of the
    cores: torch's default, a thread a core in every worker, would oversubscribe the machine."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(workers)))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on the shared 2-core CPU: one thread is many times faster than threads that
    contend (LAPACK's SVD in PiSSA and SVDiff slows by orders of magnitude). Use it in a module
    with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def vae_dir(tmp_path_factory) -> Path:
    """A tiny randomly initialised AutoencoderKL in the sd-vae-ft-* layout (2 down blocks: x2)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    )
    path = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(path, safe_serialization=True)
    return path


class TinyInception(torch.nn.Module):
    """torch-fidelity's Inception call signature and ``Mixed_6d.branch1x1`` hook point, tiny: its
    spatial map is 4×4, so the sFID features are 7 × 16 = 112-d (Inception's are 7 × 17 × 17 =
    2023-d, whose eigendecompositions take minutes on a small CPU)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.Mixed_6d = torch.nn.Module()
        self.Mixed_6d.branch1x1 = torch.nn.Conv2d(3, 9, 3, stride=2, padding=1)  # 8 → 4
        self.pool = torch.nn.Linear(9, 16)
        self.fc = torch.nn.Linear(16, 12)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.nn.functional.interpolate(x.float() / 128 - 1, size=(8, 8), mode="bilinear")
        h = torch.relu(self.Mixed_6d.branch1x1(x))  # [B, 9, 4, 4]
        pool = self.pool(h.mean(dim=(2, 3)))  # [B, 16]
        return pool, self.fc(pool)


@pytest.fixture
def tiny_inception():
    """A stand-in for the FID Inception network (`InceptionFeatureNet` around `TinyInception`)."""
    from kind.eval.features import InceptionFeatureNet

    return InceptionFeatureNet(module=TinyInception(), name="tiny", sha256="f" * 64)
