"""torchrun with two gloo ranks: N ranks with batch B each equal one process with batch N*B, and
the tailors of classes absent from the whole global batch stay untouched (invariant 2 across
ranks)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kind.io import read_tensors

SCRIPT = Path(__file__).with_name("ddp_script.py")
pytestmark = pytest.mark.slow


def _launch(ranks: int, *cmd: str, ok: bool | None = True) -> subprocess.CompletedProcess:
    """python CMD, or under torchrun with `ranks` gloo ranks; fails the test with its stderr
    unless it exits as `ok` says (None: either way)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parents[1] / "src"))
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
        if ranks > 1
        else [sys.executable]
    )
    done = subprocess.run([*launcher, *cmd], env=env, capture_output=True, text=True, timeout=300)
    if ok is not None:
        assert (done.returncode == 0) == ok, done.stderr[-3000:]
    return done


def _run(out: Path, ranks: int, *extra: str) -> None:
    _launch(ranks, str(SCRIPT), "--out", str(out), *extra)


def _cli(ranks: int, *args: str) -> None:
    _launch(ranks, "-m", "kind.cli", *args)


def _tensors(run: Path, step: int) -> dict[str, dict[str, torch.Tensor]]:
    d = run / "checkpoints" / f"step_{step:07d}"
    return {part: read_tensors(d / f"{part}.safetensors") for part in ("model", "ema", "optimizer")}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """Three steps of the tiny KIND model in one process, batch 8 (the tailors train from the
    third: DiT's zero-initialised output layer and gates pass no gradient before)."""
    run = tmp_path_factory.mktemp("ddp") / "run"
    _run(run, 1, "--batch-size", "8")
    return run


def test_two_ranks_match_one_process_with_twice_the_batch_and_keep_tailors_isolated(
    trained, tmp_path
):
    _run(tmp_path / "two", 2, "--batch-size", "8")  # 4 per rank
    a, b = _tensors(trained, 3), _tensors(tmp_path / "two", 3)
    for part in a:
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            torch.testing.assert_close(a[part][k], b[part][k], rtol=1e-5, atol=1e-6, msg=k)
    # the final grid, drawn in shares over the ranks, is the one process's (to rounding: the
    # weights agree to fp32 summation order)
    grids = [np.asarray(Image.open(r / "samples" / "step_0000003.png"), dtype=int)
             for r in (trained, tmp_path / "two")]  # fmt: skip
    assert grids[0].shape == grids[1].shape and np.abs(grids[0] - grids[1]).max() <= 2

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


def test_a_rank_whose_share_is_all_null_samples_still_reduces_with_the_others(tmp_path):
    """One sample a rank and label dropout 0.5: in some steps a rank's only sample is the null
    class, which reads no tailor, so it has no tailor gradient; it must still take part in the
    reduction of the batch's rows (else the ranks' collectives mismatch and the run dies)."""
    g, null_shard = torch.Generator().manual_seed(0), False
    for _ in range(4):  # the loop's global batches (indices, dropout, flips; seed 0)
        torch.randint(32, (2,), generator=g)
        drop = torch.rand(2, generator=g) < 0.5
        torch.rand(2, generator=g)
        null_shard |= bool(drop.any() and not drop.all())  # one rank all null, one not
    assert null_shard, "no step of this seed has the case; change the steps"
    common = ("--batch-size", "2", "--steps", "4", "--class-dropout", "0.5")
    _run(tmp_path / "one", 1, *common)
    _run(tmp_path / "two", 2, *common)
    a, b = _tensors(tmp_path / "one", 4), _tensors(tmp_path / "two", 4)
    for part in a:  # one sample a rank: AdamW's normalised step amplifies the fp32 rounding of
        for k in a[part]:  # gradients that nearly cancel to ~1e-5 (batch 8 above: 1e-6)
            torch.testing.assert_close(a[part][k], b[part][k], rtol=1e-4, atol=2e-5, msg=k)


def test_sampling_over_two_ranks_gathers_what_one_process_draws(trained, tmp_path):
    args = ["sample", str(trained), "--per-class", "3", "--steps", "2", "--device", "cpu"]
    for name, ranks in (("one", 1), ("two", 2)):  # 9 samples: class 1's split 2 + 1 over the ranks
        _cli(ranks, *args, "--classes", "0,1,2", "--out", str(tmp_path / name))
    # one sample over two ranks: the second rank's share is empty and it sends nothing
    _cli(2, *args, "--per-class", "1", "--classes", "0", "--out", str(tmp_path / "lone"))
    one, two, lone = (np.load(tmp_path / n / "samples.npz") for n in ("one", "two", "lone"))
    assert one["arr_0"].shape == (9, 28, 28, 1)
    assert np.array_equal(one["arr_0"], two["arr_0"])
    assert np.array_equal(one["labels"], two["labels"])
    assert np.array_equal(lone["arr_0"], one["arr_0"][:1])  # class 0's first sample, same seed
    assert lone["labels"].tolist() == [0]


def test_a_sampling_stopped_in_one_process_resumes_over_two_ranks(trained, tmp_path, monkeypatch):
    """Rank 0 alone keeps the chunks (no shared file system needed); a job preempted on one
    process continues on two ranks, which draw only the chunks left, to the same samples."""
    import kind.core.sampling as sampling
    from kind.cli.main import main

    # 12 samples at 5 a batch: one process draws chunks of 4; two ranks would cut chunks of 3,
    # so the resume must keep the job's own
    argv = ["sample", str(trained), "--per-class", "4", "--steps", "2", "--device", "cpu",
            "--classes", "0,1,2", "--batch-size", "5"]  # fmt: skip
    main([*argv, "--out", str(tmp_path / "straight")])
    drawn = sampling.generate

    def preempted(model, diffusion, labels, **kwargs):
        if preempted.calls == 1:
            raise RuntimeError("preempted")
        preempted.calls += 1
        return drawn(model, diffusion, labels, **kwargs)

    preempted.calls = 0
    monkeypatch.setattr(sampling, "generate", preempted)
    with pytest.raises(SystemExit):
        main([*argv, "--out", str(tmp_path / "job")])
    assert len(list((tmp_path / "job" / ".samples.partial").glob("chunk_*"))) == 1  # of 3
    _cli(2, *argv, "--resume", "--out", str(tmp_path / "job"))
    a, b = (np.load(tmp_path / d / "samples.npz") for d in ("straight", "job"))
    assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["labels"], b["labels"])
    assert not (tmp_path / "job" / ".samples.partial").exists()


SHARES = """
import atexit, os, sys, torch
import torch.distributed as dist
import kind.core.sampling as sampling
from kind.core.distributed import setup

# runs after the handler setup registers (last in, first out): the group is gone by then
atexit.register(lambda: dist.is_initialized() and os._exit(3))

def fake(model, diffusion, labels, *, indices, device, **kwargs):  # a sample holds its label
    i = torch.tensor(labels, dtype=torch.uint8)
    return i.view(-1, 1, 1, 1).expand(-1, 1, 2, 2).clone()  # [n, 1, 2, 2]

sampling.generate = fake
info = setup("cpu")
for n in (7, 2):  # shares of 3, 3, 1 and of 1, 1, 0 over three ranks
    out = sampling.generate_sharded(None, None, list(range(n)), info)
    if info.is_main and not torch.equal(out, fake(None, None, list(range(n)), indices=None, device="cpu")):
        sys.exit(f"{n} samples gathered as {out.flatten(1)[:, 0].tolist()}")
    if not info.is_main and out is not None:
        sys.exit("only rank 0 returns the samples")

class Kept:  # rank 0's chunk store, in memory (kind.store.partial_samples keeps them on disk)
    size = 2
    def __init__(self): self.chunks = {}
    def done(self): return set(self.chunks)
    def read(self, k): return self.chunks[k]
    def write(self, k, images): self.chunks[k] = images.clone()

labels = list(range(11))  # 6 chunks of 2 (the last of 1): two rounds over three ranks
want = fake(None, None, labels, indices=None, device="cpu")
kept = Kept() if info.is_main else None
out = sampling.generate_sharded(None, None, labels, info, chunks=kept)
if info.is_main:  # each chunk written as received: the other ranks' too
    for k, images in kept.chunks.items():
        if not torch.equal(images, want[2 * k : 2 * k + 2]):
            sys.exit(f"chunk {k} was kept as {images.flatten(1)[:, 0].tolist()}")
    for k in (1, 4):  # as if the job had stopped before them: drawn again, the rest read
        del kept.chunks[k]
out = sampling.generate_sharded(None, None, labels, info, chunks=kept)
if info.is_main and not torch.equal(out, want):
    sys.exit(f"a resumed job gathered {out.flatten(1)[:, 0].tolist()}")
"""


def test_uneven_shares_arrive_in_order_on_rank_zero_and_the_group_ends_at_exit(tmp_path):
    """Shares in order whatever their sizes; kept chunks hold what each rank drew, and a job
    resumed with some chunks missing draws those and reads the rest."""
    script = tmp_path / "shares.py"
    script.write_text(SHARES)
    _launch(3, str(script))


def test_kind_transfer_over_two_ranks_matches_one_process(trained, tmp_path):
    # a KIND transfer trains only tailors and label rows, which the step reduces itself: there
    # is nothing left for DDP, which refused to wrap the model ("not needed when a module
    # doesn't have any parameter that requires a gradient")
    _cli(1, "decompose", str(trained), "--out", str(tmp_path / "parts"))
    args = ["transfer", str(tmp_path / "parts"), "--data", "mnist:6,7", "--method", "kind",
            "--steps", "2", "--batch-size", "8", "--set", "train.device=cpu",
            "--set", "train.checkpoint_every=1", "--set", "sample.steps=1",
            "--set", "sample.per_class=1"]  # fmt: skip
    for name, ranks in (("one", 1), ("two", 2)):
        _cli(ranks, *args, "--out", str(tmp_path / name))
    a, b = _tensors(tmp_path / "one", 2), _tensors(tmp_path / "two", 2)
    moved = _tensors(tmp_path / "one", 1)["model"]["tailors.rows"]
    assert not torch.equal(moved, a["model"]["tailors.rows"])  # the tailors trained
    for part in a:
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            torch.testing.assert_close(a[part][k], b[part][k], rtol=1e-5, atol=1e-6, msg=k)


def test_auto_resume_under_two_ranks_continues_where_the_job_stopped(tmp_path):
    """torchrun --max-restarts starts every rank again with the same command: each rank reads the
    run directory before rank 0 writes to it, so all agree to continue."""
    import shutil

    argv = ["train", "--data", "mnist:0-1", "--size", "tiny", "--steps", "3", "--batch-size", "8",
            "--device", "cpu", "--set", "train.threads=1", "--set", "train.sample_every=0",
            "--set", "sample.steps=1", "--set", "sample.per_class=1", "--set",
            "train.checkpoint_every=1", "--set", "train.keep_checkpoints=3", "--auto-resume",
            "--out"]  # fmt: skip
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    _cli(2, *argv, str(straight))  # the first start: nothing in --out
    shutil.copytree(straight, crashed)
    for gone in ("checkpoints/step_0000003", "model"):
        shutil.rmtree(crashed / gone)  # as if the job died after step 2's checkpoint
    kept = (crashed / "checkpoints" / "step_0000002").stat().st_ino
    _cli(2, *argv, str(crashed))
    assert (crashed / "checkpoints" / "step_0000002").stat().st_ino == kept  # continued, not redone
    a, b = _tensors(straight, 3), _tensors(crashed, 3)
    for part in a:
        for k in a[part]:
            torch.testing.assert_close(a[part][k], b[part][k], rtol=1e-6, atol=1e-7)


def test_ranks_that_disagree_on_resuming_stop_before_writing(trained, tmp_path):
    """One rank sees the checkpoint, the other not (a lagging network filesystem): both stop
    with the reason, and the run is left as it was."""
    import shutil

    shutil.copytree(trained, tmp_path / "run")
    before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    done = _launch(2, str(SCRIPT), "--out", str(tmp_path / "run"), "--steps", "4",
                   "--resume-on-rank", "1", ok=False)  # fmt: skip
    assert "the ranks disagree on whether" in done.stderr
    assert {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()} == before


def _image_folder(root: Path, broken: str | None = None) -> Path:
    """Three RGB classes of 7 images (train: 6 a class); `broken` names one file to cut short:
    its header still reads, so encoding's up-front check passes it and the rank that decodes
    it fails."""
    rng = np.random.default_rng(0)
    for name in "abc":
        (root / name).mkdir(parents=True)
        for i in range(7):
            img = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
            Image.fromarray(img).save(root / name / f"{i}.png")
    if broken:
        whole = (root / broken).read_bytes()
        (root / broken).write_bytes(whole[: len(whole) // 2])
    return root


def test_encoding_over_two_ranks_writes_the_store_one_process_writes(vae_dir, tmp_path):
    root = _image_folder(tmp_path / "imgs")
    args = ["encode", "--data", str(root), "--vae", str(vae_dir), "--image-size", "16",
            "--device", "cpu", "--batch-size", "3", "--workers", "0", "--limit-per-class", "5",
            "--out"]  # fmt: skip
    _cli(1, *args, str(tmp_path / "one"))
    _cli(2, *args, str(tmp_path / "two"))  # shares of 8 and 7 images
    for name in ("latents.npy", "labels.npy"):
        one, two = (np.load(tmp_path / d / name) for d in ("one", "two"))
        assert one.shape[0] == 15 and np.array_equal(one, two), name
    one, two = ((tmp_path / d / "meta.json").read_text() for d in ("one", "two"))
    assert one == two
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imgs", "one", "two"]  # no temporary


def test_a_rank_that_fails_to_encode_stops_every_rank_and_one_process_resumes(vae_dir, tmp_path):
    """Rank 1 meets a broken image: both ranks stop, rank 0's rows stay on disk, and once the
    file is whole again one process continues the encode into the store it would have made."""
    root = _image_folder(tmp_path / "imgs", broken="c/6.png")  # in the last rank's share
    args = ["encode", "--data", str(root), "--vae", str(vae_dir), "--image-size", "16",
            "--device", "cpu", "--workers", "0", "--batch-size", "4", "--out"]  # fmt: skip
    done = _launch(2, "-m", "kind.cli", *args, str(tmp_path / "store"), ok=False)
    assert "6.png" in done.stderr and "encoding stopped: rank(s) 1 failed" in done.stderr
    assert "with 17 of 18 images encoded, kept in" in done.stderr  # all but the broken one
    assert sorted(p.name for p in tmp_path.iterdir()) == [".store.partial.tmp", "imgs"]
    _image_folder(tmp_path / "whole")  # the same images, none broken
    shutil.copy(tmp_path / "whole" / "c" / "6.png", root / "c" / "6.png")
    _cli(1, *args, str(tmp_path / "store"), "--resume")
    _cli(1, *args, str(tmp_path / "one"), "--auto-resume")  # nothing to continue: starts
    for name in ("latents.npy", "labels.npy"):
        assert np.array_equal(np.load(tmp_path / "store" / name), np.load(tmp_path / "one" / name))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imgs", "one", "store", "whole"]


FAILING_RANK = """
import sys
from pathlib import Path
from kind.data.encoding import encode_to_store
from kind.core.distributed import setup

info = setup("cpu")
root, vae, tmp = sys.argv[1], sys.argv[2], Path(sys.argv[3])
cases = {  # what rank 1 gets wrong, and what it says
    "listing": ({"spec": root + (":a,b" if info.is_main else ":a,c")}, "lists other images"),
    "vae": ({"vae_path": vae if info.is_main else tmp / "no-vae"}, "no-vae does not exist"),
}
for name, (wrong, phrase) in cases.items():
    args = {"spec": root, "out": tmp / name / "store", "vae_path": vae, "image_size": 16,
            "device": "cpu", "workers": 0, "info": info} | wrong
    try:
        encode_to_store(**args)
        sys.exit(f"{name}: no error on rank {info.rank}")
    except Exception as e:
        want = "encoding stopped: rank(s) 1 failed" if info.is_main else phrase
        if want not in str(e):
            sys.exit(f"{name}: rank {info.rank} said {e!r}, not {want!r}")
    if info.is_main and (tmp / name).exists() and any((tmp / name).iterdir()):
        sys.exit(f"{name}: left {list((tmp / name).iterdir())}")
print(f"rank {info.rank}: both cases as expected", flush=True)
"""


def test_ranks_that_cannot_share_the_store_stop_together_and_leave_nothing(vae_dir, tmp_path):
    """Rank 1 lists other images than rank 0 (another folder on its node), or cannot load the
    VAE: both ranks stop, each with its reason, and rank 0 removes what it had made."""
    script = tmp_path / "failing_rank.py"
    script.write_text(FAILING_RANK)
    # each rank's verdict, not torchrun's exit status: in 4 of 16 launches here a rank whose
    # steps had raised (and were caught) died with SIGABRT in teardown after its last line, its
    # group destroyed (cause not found; a command whose rank fails exits non-zero anyway)
    done = _launch(2, str(script), str(_image_folder(tmp_path / "imgs")), str(vae_dir),
                   str(tmp_path), ok=None)  # fmt: skip
    for rank in (0, 1):
        assert f"rank {rank}: both cases as expected" in done.stdout, done.stderr[-3000:]


def test_cuda_without_an_index_means_this_ranks_gpu(monkeypatch):
    """`--device cuda` under torchrun: each rank its LOCAL_RANK's GPU (torch.cuda.set_device
    refuses a device without an index); an explicit index is kept."""
    from kind.core.device import pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device("cuda", 3) == torch.device("cuda", 3)
    assert pick_device("auto", 2) == torch.device("cuda", 2)
    assert pick_device("cuda:1", 3) == torch.device("cuda", 1)
    assert pick_device("cpu", 3) == torch.device("cpu")
