"""Images of a data spec -> a latent store (`kind-dit encode`): the SD-VAE latents of every
image and of its mirror, encoded once, so a DiT trains on [C, h, w] latents (4x32x32 for
256x256 ImageNet) instead of pixels.

Why a cache: the VAE encoder costs far more than a DiT-B/2 step's share of it, and the same
image is drawn hundreds of times in a run. Encoding once, streaming (never all images in memory:
ImageNet has 1.28M), into one ``.npy`` that training opens with ``mmap_mode="r"`` keeps RAM flat
and lets every rank read the same file (`kind.data.latents`).

Choices, each with its reason:

- **Posterior mean, not a sample.** DiT's ``extract_features`` stores ``latent_dist.sample()``,
  but a cache freezes that one draw for every epoch, so it adds no augmentation; it only adds
  noise of the SD-VAE's posterior std (small next to the latents) to the training targets and
  makes a store depend on a seed. The mean is deterministic: the same images give the same store.
- **Flips encoded, not flipped in latent space.** The VAE's convolutions are not mirror-symmetric,
  so the mirror of a latent is not the latent of the mirrored image; the store keeps the true
  encoding of both (twice the disk, no extra cost per step).
- **float16 on disk.** Scaled latents have unit-order std, far inside float16's range, and its
  ~1e-3 relative step is below the VAE's own reconstruction error; it halves the store (ImageNet
  256: 1.28M x 2 x 4x32x32 x 2 B = 21 GB).
- **Resumable.** Hours of encoding are not thrown away by a preempted job or one broken file:
  the unfinished store keeps its rows, each marked once on disk, and ``resume`` continues it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, suppress
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from kind.core.device import pick_device
from kind.core.distributed import DistInfo
from kind.data.images import (
    UNREADABLE,
    DataError,
    ImageItem,
    check_image_size,
    list_images,
    parse_spec,
    read_image,
    spec_folders,
)
from kind.data.store_format import (
    FORMAT,
    LABELS_FILE,
    LATENTS_FILE,
    META_FILE,
    STORE_DTYPE,
    is_store,
)
from kind.data.vae import VAE_WEIGHTS, LatentError, encode, load_vae, vae_root, vae_space
from kind.io import (
    PROGRESS,
    OutputDirError,
    atomic_dir,
    check_new_dir,
    leftovers,
    partial_dir,
    read_json,
    sha256_file,
    write_checksums,
    write_json,
)

if TYPE_CHECKING:
    from diffusers import AutoencoderKL

log = logging.getLogger(__name__)
T = TypeVar("T")

# an unfinished encode's record and its rows' marks (a byte a row), in its PROGRESS directory
JOB_FILE, DONE_FILE = "job.json", "done.bin"
SYNC_SECONDS = 10.0  # at most this much encoding is lost when a job is killed
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _read_batches(
    items: Sequence[ImageItem], batch_size: int, image_size: int, workers: int
) -> Iterator[np.ndarray]:
    """uint8 batches [b, H, W, 3] of ``items`` in order; reads the next batch in threads (Pillow
    decodes outside the GIL) while the caller encodes this one, and never holds more than two."""
    if workers <= 0:
        for start in range(0, len(items), batch_size):
            yield np.stack(
                [read_image(it, image_size, 3) for it in items[start : start + batch_size]]
            )
        return
    with ThreadPoolExecutor(workers) as pool:
        pending: list[Future] | None = None
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            submitted = [pool.submit(read_image, it, image_size, 3) for it in chunk]
            if pending is not None:
                yield np.stack([f.result() for f in pending])
            pending = submitted
        if pending is not None:
            yield np.stack([f.result() for f in pending])


_SHOWN_UNREADABLE = 20


def _check_headers(items: Sequence[ImageItem], workers: int) -> None:
    """Open every image file of the listing (its header only: Pillow decodes lazily) before the
    VAE encodes anything, so a file that is no image (a saved error page, an empty file) stops
    the encode at its start, all of them named at once, rather than hours into it. A file
    whose header reads but whose data are cut short is still found where it is decoded."""
    files = [it for it in items if isinstance(it, Path)]

    def problem(path: Path) -> str | None:
        try:
            with Image.open(path):
                return None
        except UNREADABLE as err:
            return f"{path} ({type(err).__name__}: {err})"

    with ThreadPoolExecutor(max(1, workers)) as pool:
        checked = tqdm(pool.map(problem, files, chunksize=256), total=len(files),
                       desc="check images", unit="img", dynamic_ncols=True)  # fmt: skip
        bad = [p for p in checked if p is not None]
    if bad:
        more = f"; and {len(bad) - _SHOWN_UNREADABLE} more" if len(bad) > _SHOWN_UNREADABLE else ""
        raise DataError(
            f"{len(bad)} of {len(files)} image files cannot be read: "
            f"{'; '.join(bad[:_SHOWN_UNREADABLE])}{more}. Remove or replace them, then encode "
            "again (nothing was written)"
        )


def _encode_into(
    tmp: Path,
    rows: np.ndarray,
    vae: AutoencoderKL,
    items: Sequence[ImageItem],
    image_size: int,
    batch_size: int,
    workers: int,
    bar: tqdm,
) -> None:
    """Write the encodings of ``items[i]`` and of its mirror into row i of the store's
    ``latents.npy`` (float16 [N, 2, C, h, w], made at full size) for each i in ``rows``, batch
    by batch, so only a batch of images is ever in memory. Positioned writes of exactly those
    bytes, not a memory map: the ranks of a torchrun job fill their rows of one file, and a page
    that two ranks' rows share would be written back whole by each (a shared filesystem across
    nodes). A row is marked in ``DONE_FILE`` once its latents are on disk (an fsync first), every
    SYNC_SECONDS and when encoding stops for any reason, so a resumed encode skips it."""
    header = np.load(tmp / LATENTS_FILE, mmap_mode="r")
    offset, row = header.offset, header[0].nbytes
    del header
    written: list[int] = []  # rows on their way to disk, not yet marked
    with open(tmp / LATENTS_FILE, "r+b") as f, open(tmp / PROGRESS / DONE_FILE, "r+b") as marks:

        def mark() -> None:  # the latents on disk first, then their rows' marks
            os.fsync(f.fileno())
            for i in written:
                os.pwrite(marks.fileno(), b"\x01", i)
            written.clear()

        synced = time.monotonic()
        batches = _read_batches([items[i] for i in rows], batch_size, image_size, workers)
        try:
            for at, batch in zip(np.array_split(rows, range(batch_size, len(rows), batch_size)),
                                 batches):  # fmt: skip
                x = torch.from_numpy(batch).permute(0, 3, 1, 2)  # [b, H, W, 3] -> [b, 3, H, W]
                both = torch.cat([x, x.flip(-1)])  # [2b, 3, H, W]: originals, then mirrors
                z = encode(vae, both).unflatten(0, (2, len(x))).transpose(0, 1)  # [b, 2, C, h, w]
                z16 = z.to(torch.float16).contiguous().numpy()
                if not np.isfinite(z16).all():
                    raise LatentError(
                        f"latents of images {at[0]}..{at[-1]} ({items[at[0]]} ...) are not finite "
                        "in float16; the VAE diverged (try dtype fp32) or the images are unusual."
                    )
                for i, z_i in zip(at.tolist(), z16):  # [2, C, h, w] each
                    os.pwrite(f.fileno(), z_i.data, offset + i * row)
                written += at.tolist()
                bar.update(len(x))
                if time.monotonic() - synced >= SYNC_SECONDS:
                    mark()
                    synced = time.monotonic()
        except BaseException:
            with suppress(OSError):  # keep what is written; the error that stopped us is raised
                mark()
            raise
        mark()  # every row on disk before rank 0 renames the store into place


def _together(step: Callable[[], T], info: DistInfo | None) -> T:
    """``step()`` on every rank of a torchrun job (``info``; None: one process), then one
    collective that every rank reaches whether its step failed or not: a rank's own error is
    raised there, every other rank raises one naming the ranks that failed. So no rank waits on
    one that has gone, and rank 0 unwinds (removing an unfinished store) instead of being killed
    mid-wait by torchrun."""
    if info is None:
        return step()
    import torch.distributed as dist

    failed, result = None, None
    try:
        result = step()
    except Exception as e:
        failed = e
    flags = torch.zeros(info.world)
    flags[info.rank] = failed is not None
    dist.all_reduce(flags, group=info.host)  # [world]: 1 where a rank failed
    if failed is not None:
        raise failed
    if flags.any():
        ranks = ", ".join(str(r) for r in flags.nonzero().flatten().tolist())
        raise LatentError(f"encoding stopped: rank(s) {ranks} failed (their error is in their log)")
    return result


def _broadcast(tmp: Path | None, listing: str, info: DistInfo) -> list:
    """[rank 0's temporary store directory, rank 0's image listing digest], on every rank."""
    import torch.distributed as dist

    sent = [str(tmp) if info.is_main else None, listing]
    dist.broadcast_object_list(sent, src=0, group=info.host)
    return sent


def _broadcast_done(prepared: tuple | None, info: DistInfo) -> tuple | None:
    """Rank 0's verdict that the store is finished already (`_finished`: ``prepared`` None)
    for every rank, which then returns without encoding."""
    import torch.distributed as dist

    sent = [prepared is None]
    dist.broadcast_object_list(sent, src=0, group=info.host)
    return None if sent[0] else prepared


def _rank_sees(sent: list, listing: str, info: DistInfo) -> Path:
    """Rank 0's temporary store directory, checked from this rank: the same images listed (a node
    that sees another folder would scramble the rows) and the directory visible."""
    if sent[1] != listing:
        raise LatentError(
            f"rank {info.rank} lists other images than rank 0 for this data spec; every node must "
            "see the same image folder (a filesystem they share)"
        )
    tmp = Path(sent[0])
    if not (tmp / LATENTS_FILE).is_file():
        raise LatentError(
            f"rank {info.rank} cannot see {tmp}, which rank 0 made: every node must see --out's "
            "parent directory (a filesystem they share)"
        )
    return tmp


def _check_out_apart(out: Path, spec: str, vae: str | Path | None) -> None:
    """Refuse an ``out`` inside an image folder the spec reads (the store would become one of
    its class folders, changing the user's data set) or inside the VAE's directory."""
    where = Path(os.path.realpath(out))
    vaes = [("VAE", Path(vae).expanduser())] if vae else []
    for what, folder in [("image folder", f) for f in spec_folders(spec)] + vaes:
        folder = Path(os.path.realpath(folder))
        if where == folder or folder in where.parents:
            raise OutputDirError(
                f"{out} is inside the {what} {folder} that encoding reads: a store there would "
                f"change it; choose an output directory outside {folder} (nothing was written)"
            )


def _warn_leftovers(out: Path) -> None:
    """Name what an interrupted command writing ``out`` left beside it (hidden, a store's size),
    without removing it: another command writing ``out`` may be writing it now. An unfinished
    encode's own directory (`partial_dir`) is not among them: `_progress` says what to do."""
    for left in leftovers(out):
        if left != partial_dir(out):
            log.warning("%s is the unfinished output of an interrupted command writing %s "
                        "(hidden: `ls -a` shows it); unless one is running, remove it: rm -r %s",
                        left, out, left)  # fmt: skip


def _listing(items: Sequence[ImageItem], labels: torch.Tensor, class_names: list[str]) -> str:
    """sha256 of which images are encoded into which row under which class."""
    rows = (f"{label}\t{item}" for label, item in zip(labels.tolist(), items))
    return hashlib.sha256("\n".join([*class_names, "", *rows]).encode()).hexdigest()


def _progress(out: Path, tmp: Path, job: dict, resume: bool | str) -> np.ndarray | None:
    """The row marks (uint8 [N], 1: on disk) of the unfinished encode of ``job`` into ``out`` in
    ``tmp`` (`partial_dir`) to continue, or None when there is none and encoding starts afresh
    (a directory without a job record stopped before its first row: it is made anew).
    ``resume``: True (--resume) continues one and refuses to start; "auto" (--auto-resume)
    continues one or starts; False starts and refuses to continue one."""
    records = tmp / PROGRESS
    if not (records / JOB_FILE).is_file():
        if resume is True:
            raise LatentError(f"there is no unfinished encode of {out} to continue (no "
                              f"{records / JOB_FILE}); run without --resume")  # fmt: skip
        return None
    try:
        recorded = read_json(records / JOB_FILE, *job)
        done = np.fromfile(records / DONE_FILE, dtype=np.uint8)  # [N]
        shape = np.load(tmp / LATENTS_FILE, mmap_mode="r").shape
        if done.shape != (recorded["count"],) or shape != (done.size, 2, *recorded["latent_shape"]):
            raise ValueError(f"{done.size} row marks and latents {shape} for {recorded['count']} "
                             "images")  # fmt: skip
    except (OSError, ValueError, TypeError) as err:
        raise LatentError(f"the unfinished encode of {out} in {tmp} is damaged ({err}); remove "
                          f"it (rm -r {tmp}) and encode again") from err  # fmt: skip
    if not resume:
        raise OutputDirError(
            f"{out} has an unfinished encode ({int(done.sum())} of {done.size} images encoded) "
            f"in {tmp} (hidden: `ls -a` shows it); continue it with the same command and "
            f"--resume (unless it is running now), or start over: rm -r {tmp}"
        )
    differ = [k for k in job if recorded[k] != job[k]]
    if differ:
        said = "; ".join(
            "other images, or in another order (files added, removed or renamed)" if k == "images"
            else "the VAE's weights changed" if k == "vae_weights_sha256"
            else f"{k} {recorded[k]!r} then, {job[k]!r} now" for k in differ
        )  # fmt: skip
        raise LatentError(
            f"the unfinished encode in {tmp} was another job: {said}. Continue it with the "
            f"settings and images it started with, or start over: rm -r {tmp}"
        )
    return done


def _worth_keeping(n: int, tmp: Path) -> bool:
    """Whether a failed encode's directory holds rows to continue (`atomic_dir`'s `keep`); says
    so, and how, when it does. One without a row on disk is removed."""
    marks = tmp / PROGRESS / DONE_FILE
    count = int(np.fromfile(marks, dtype=np.uint8).sum()) if marks.is_file() else 0
    if count:
        log.warning("encoding stopped with %d of %d images encoded, kept in %s: the same command "
                    "with --resume continues from there (replace an unreadable image under its "
                    "own name: removing it changes the images listed, which a resume refuses)",
                    count, n, tmp)  # fmt: skip
    return count > 0


def _job_digest(job: dict) -> str:
    return hashlib.sha256(json.dumps(job, sort_keys=True).encode()).hexdigest()


def _finished(out: Path, job: dict) -> bool:
    """Whether ``out`` is the finished store of ``job`` (--auto-resume of a job requeued after it
    finished: nothing to do); another store there is refused."""
    if not is_store(out):
        return False
    recorded = read_json(out / META_FILE).get("job_sha256")
    if recorded != _job_digest(job):
        raise OutputDirError(
            f"{out} is a finished latent store of another encode (other images or settings); "
            "choose another --out"
        )
    log.info("%s is this encode's finished store already; nothing to do", out)
    return True


def encode_to_store(
    spec: str,
    out: str | Path,
    vae_path: str | Path,
    image_size: int,
    split: str = "train",
    *,
    batch_size: int = 64,
    device: str | torch.device = "auto",
    dtype: torch.dtype | str = torch.float32,
    workers: int = 4,
    limit_per_class: int | None = None,
    resume: bool | str = False,
    info: DistInfo | None = None,
) -> Path:
    """Encode the ``split`` of a data spec with the VAE at ``vae_path`` into a new store ``out``.

    Images are read, centre-cropped and resized (bicubic) to ``image_size`` as RGB exactly as
    ``kind.data.images`` makes them, ``batch_size`` at a time, and each is encoded twice (as is and
    mirrored). ``device`` is "auto" (CUDA when present), "cpu", "cuda:N" or a torch device;
    ``dtype`` is the VAE's compute dtype ("fp32", "bf16", "fp16" or a torch dtype);
    ``workers`` threads read images. The store is built in a hidden directory beside ``out``
    (`kind.io.partial_dir`) and renamed into place at the end, so ``out`` is either complete or
    absent; an existing non-empty ``out`` is refused. ``limit_per_class`` keeps the first
    images of each class.

    An encode that stops (an unreadable image, a killed job) keeps the rows it wrote there;
    ``resume`` True continues it, "auto" continues one or starts (and returns a finished store
    of this encode as it is). A resume must be the same job: the spec, split, limit, image
    size, VAE (its path, config and weights), dtype and device type, and the same images listed
    in the same order; it may run on another number of ranks or with another batch size (the
    VAE's convolutions may then round the new rows' last bits differently).

    Under torchrun (``info``: its DistInfo) each rank encodes a contiguous
    share of the images into the one store, which every node must see; rank 0 makes and
    publishes it, and the store is the one a single process writes. Returns ``out``.
    """
    out = Path(out).expanduser().absolute()
    main = info is None or info.is_main
    world = info.world if info is not None else 1
    if resume not in (False, True, "auto"):
        raise LatentError(f"resume must be False, True or 'auto', got {resume!r}.")

    def prepare():  # every rank, before anything is written
        if main:  # rank 0 alone: the others could see its temporary directory in an empty `out`
            if not (resume == "auto" and is_store(out)):  # a finished store: `_finished` below
                check_new_dir(out, resumable=True)
            _check_out_apart(out, spec, vae_path)
        if not isinstance(batch_size, int) or batch_size < 1:
            raise LatentError(f"batch_size must be a positive integer, got {batch_size!r}.")
        compute = DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
        if compute not in DTYPES.values():
            raise LatentError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}.")
        check_image_size(image_size)  # and below, with the VAE's config, before it loads
        space = vae_space(vae_path)
        f = space["downsampling"]
        if image_size % f:
            raise LatentError(
                f"image_size must be a multiple of the VAE's downsampling factor {f}, got "
                f"{image_size!r} (256 gives 32x32 latents with an SD VAE)."
            )
        on = pick_device(device) if isinstance(device, str) else device
        items, labels, class_names = list_images(spec, split, limit_per_class)
        job = {  # what the store's bytes depend on: an unfinished encode continues only the same
            "spec": spec.strip(),
            "split": split,
            "limit_per_class": limit_per_class,
            "image_size": image_size,
            "latent_shape": [space["latent_channels"], image_size // f, image_size // f],
            "vae": str(vae_root(vae_path).resolve()),
            "vae_space": space,
            "vae_weights_sha256": sha256_file(vae_root(vae_path) / VAE_WEIGHTS),
            "dtype": str(compute).removeprefix("torch."),
            "device": on.type,  # GPUs' convolutions (TF32) round otherwise than CPUs'
            "count": len(items),
            "images": _listing(items, labels, class_names),
        }
        if main and resume == "auto" and _finished(out, job):
            return None
        if main:  # one rank opens the images; the others learn of a refusal from `_together`
            done = _progress(out, partial_dir(out), job, resume)  # refused before the VAE loads
            todo = items if done is None else [it for it, d in zip(items, done) if not d]
            _check_headers(todo, workers)
        vae = load_vae(vae_path, compute).to(on)
        return (items, labels, class_names), job, vae

    if main:
        _warn_leftovers(out)
    prepared = _together(prepare, info)
    if world > 1:  # rank 0 alone knows whether it is finished already
        prepared = _broadcast_done(prepared, info)
    if prepared is None:
        return out
    (items, labels, class_names), job, vae = prepared
    dataset, _ = parse_spec(spec)
    n = len(items)
    per = -(-n // world)
    rank = info.rank if info is not None else 0
    share = range(min(rank * per, n), min((rank + 1) * per, n))  # [N] -> this rank's rows

    with ExitStack() as stack:

        def make() -> Path | None:  # rank 0: the store's directory, its file at full size
            if not main:
                return None
            tmp = stack.enter_context(atomic_dir(out, keep=partial(_worth_keeping, n)))  # locked
            if _progress(out, tmp, job, resume) is None:  # checked again, under the lock
                np.lib.format.open_memmap(tmp / LATENTS_FILE, mode="w+", dtype=STORE_DTYPE,
                                          shape=(n, 2, *job["latent_shape"])).flush()  # fmt: skip
                (tmp / PROGRESS / DONE_FILE).write_bytes(bytes(n))
                write_json(tmp / PROGRESS / JOB_FILE, job)  # last: with it, one to continue
            return tmp

        tmp = _together(make, info)
        if world > 1:
            sent = _broadcast(tmp, job["images"], info)
            tmp = _together(partial(_rank_sees, sent, job["images"], info), info)

        def fill() -> None:  # every rank the rows of its share not yet on disk
            done = np.fromfile(tmp / PROGRESS / DONE_FILE, dtype=np.uint8)[share.start : share.stop]
            rows = np.flatnonzero(done == 0) + share.start
            with tqdm(total=len(share), initial=len(share) - len(rows), desc=f"encode {out.name}",
                      unit="img", dynamic_ncols=True, disable=not main) as bar:  # fmt: skip
                _encode_into(tmp, rows, vae, items, image_size, batch_size, workers, bar)

        _together(fill, info)  # every share is on disk before rank 0 publishes the store
        if not main:
            return out
        np.save(tmp / LABELS_FILE, labels.numpy().astype(np.int64))
        meta = {
            "format": FORMAT,
            "count": n,
            "class_names": class_names,
            "class_counts": torch.bincount(labels, minlength=len(class_names)).tolist(),
            "spec": job["spec"],
            "dataset": dataset,
            "split": split,
            "limit_per_class": limit_per_class,
            "image_size": image_size,
            "latent_shape": job["latent_shape"],
            "dtype": np.dtype(STORE_DTYPE).name,
            "flips": "latents[:, 1] encodes the horizontally mirrored image",
            "posterior": "mean",
            "vae": job["vae"],
            **job["vae_space"],
            "job_sha256": _job_digest(job),  # what --auto-resume of a finished encode compares
        }
        write_json(tmp / META_FILE, meta)
        write_checksums(tmp)  # hashes latents.npy once here; LatentStore says when it reads it
    log.info("encoded %s %s: %d images -> %s %s", spec, split, n, out, job["latent_shape"])
    return out
