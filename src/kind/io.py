"""Files on disk, written safely: the one home of atomic writes, JSON, tensors and checksums.

Tensors go to safetensors and everything else to JSON, so loading never unpickles. Every write lands
in a temporary file or directory beside its target first and is renamed into place: a crash leaves
the previous file whole. This module imports nothing from kind, so every layer may use it.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import glob
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import types
import typing
from collections.abc import Callable, Collection, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)


@functools.cache
def _umask() -> int:
    """The process umask, read once on first use (os.umask can only be read by setting it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish(tmp: str | Path, final: Path, directory: bool = False) -> None:
    """Give a temporary file or directory the usual permissions, then rename it into place."""
    os.chmod(tmp, (0o777 if directory else 0o666) & ~_umask())
    os.replace(tmp, final)


@contextmanager
def atomic_file(path: Path) -> Iterator[str]:
    """Yield a temporary file name beside `path`; on success rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # ".tmp" so that a run's start-up finds and removes what a crash left (store.runs)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        _publish(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_file(path) as tmp:
        Path(tmp).write_text(text)


def write_json(path: Path, data: object) -> None:
    """`data` as indented JSON, atomically; NaN and infinity are refused (JSON has neither)."""
    atomic_write_text(path, json.dumps(data, indent=2, allow_nan=False) + "\n")


def atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict | None = None):
    """Write `tensors` to a safetensors file, read each back and compare it byte for byte before
    the file takes `path`'s name: a write the disk or filesystem damaged fails here, leaving the
    previous file, rather than becoming what the file's checksum records."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_file(path) as tmp:
        # safetensors 0.8 writes no tensors with an empty metadata dict as invalid JSON (an
        # optimiser that has stepped nothing yet): no metadata at all there
        metadata = {k: str(v) for k, v in (meta or {}).items()} if meta or tensors else None
        save_file(tensors, tmp, metadata=metadata)
        with safe_open(tmp, "pt") as written:  # one tensor at a time: memory stays flat
            same = set(written.keys()) == set(tensors) and all(
                _same_bytes(written.get_tensor(k), v) for k, v in tensors.items()
            )
        if not same:
            raise OSError(f"{path} did not read back as written; the disk or filesystem damaged it")


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bytes (NaN payloads included, which torch.equal calls unequal)."""
    return (a.dtype, a.shape) == (b.dtype, b.shape) and torch.equal(
        a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)
    )


def _target(out: Path) -> Path:
    """Where an output directory's files go: `out` made absolute ("." has no name to put a
    temporary directory beside), or where it points when it is a link (the link stays)."""
    out = Path(os.path.abspath(out))
    return out.resolve() if out.is_symlink() else out


class OutputDirError(ValueError):
    """An output directory that may not be written as asked; nothing in it was touched."""


def check_link(out: Path) -> None:
    """Refuse an output path that is a symbolic link to nothing (dangling, or a loop): it would
    fail later as a bare "File exists" or "Too many levels of symbolic links"."""
    if out.is_symlink() and not out.exists():  # exists() follows the link
        raise OutputDirError(
            f"{out} is a symbolic link to {os.readlink(out)}, which does not exist or loops; make "
            "the directory it points to, or choose another output directory"
        )


def check_new_dir(out: str | Path, resumable: bool = False) -> Path:
    """`out` as a Path when a new directory of outputs may go there (absent, or an empty
    directory; `atomic_dir` fills it); refused before anything is written otherwise.
    `resumable`: `out` may also hold its resumable unfinished output (`partial_dir`), which the
    caller continues or refuses."""
    out = Path(out)
    check_link(out)
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"{out} is a file, not a directory; choose another output directory")
    above = next((p for p in out.parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise OutputDirError(
            f"{above} is a file, so {out} cannot be made; choose another output directory"
        )
    name = _target(out).name
    entries = [p.name for p in out.iterdir()] if out.exists() else []
    if resumable:
        entries = [e for e in entries if e != _partial_name(name)]
    if entries:
        if all(re.fullmatch(rf"\.{re.escape(name)}\..+\.tmp", e) for e in entries):
            raise OutputDirError(
                f"{out} holds only the unfinished output of an interrupted kind-dit command "
                f"({', '.join(entries)}: hidden, `ls -a` shows it); unless a command writing "
                f"into {out} is still running, remove it (rm -r {out / entries[0]}) and run "
                "again, or choose another output directory"
            )
        raise OutputDirError(
            f"{out} already exists and is not empty; choose another output directory (nothing "
            "was touched)"
        )
    return out


def leftovers(out: str | Path) -> list[Path]:
    """The hidden temporary entries (`.NAME.*.tmp`) beside `out` that `atomic_dir(out)` or
    `atomic_file(out)` makes: an interrupted command leaves them behind, invisible to `ls`,
    and a running one is writing them, so a caller can name them but must not remove them."""
    final = _target(Path(out))
    return sorted(final.parent.glob(f".{glob.escape(final.name)}.*.tmp"))


def _partial_name(name: str) -> str:
    return f".{name}.partial.tmp"  # a `leftovers` name, which no `mkdtemp` name can be


def partial_dir(out: str | Path) -> Path:
    """Where `atomic_dir(out, keep=...)` writes `out`'s unfinished output, under a fixed name so
    a later command can find and continue it: the one already there, else inside `out` when
    `out` is an empty directory, else beside it."""
    final = _target(Path(out))
    beside, inside = (where / _partial_name(final.name) for where in (final.parent, final))
    if beside.exists() or not (final.is_dir() and all(p == inside for p in final.iterdir())):
        return beside
    return inside


# Errors of a file system that has no locks (Lustre mounted without flock, some FUSE mounts).
_NO_LOCKS = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL)


@contextmanager
def hold_lock(path: Path, refuse: Callable[[str], Exception]) -> Iterator[None]:
    """Hold an exclusive lock on the file `path` (made when missing; it names its holder) while
    the block runs; raise `refuse(holder)` when another process holds it. The kernel drops the
    lock when the process ends, however it ends, so a crash leaves none. A regular file opened
    for writing, as NFS's emulation of flock needs; a file system without locks is warned of."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
            raise refuse(holder or "another process") from None
        except OSError as err:
            if err.errno not in _NO_LOCKS:
                raise
            log.warning("%s cannot be locked on this file system (%s): make sure no other "
                        "kind-dit command writes there at the same time", path, err.strerror)  # fmt: skip
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"kind-dit process {os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing drops the lock


PROGRESS = ".progress"  # a resumable output's records of progress, and its lock (`atomic_dir`)


@contextmanager
def atomic_dir(
    final: Path, replace: bool = False, keep: Callable[[Path], bool] | None = None
) -> Iterator[Path]:
    """Yield a temporary directory beside `final`; on success it becomes `final` in one rename.
    An empty directory already there (a user's `--out`, perhaps a mount point or behind a
    symlink) is kept, with its permissions and the links to it: the temporary directory is made
    inside it, on its file system, and the finished entries move up into it, a rename each.

    `replace`: a `final` that is there and not empty is replaced (a checkpoint, or a run's
    model, saved again). Otherwise it is left alone and refused, as is a directory that appears,
    or fills, while the output is written: callers check their `--out` when they start
    (`check_new_dir`), and a directory filled since, by the user or by another command given
    the same `--out`, holds someone's files.

    `keep`: the output is resumable, so that a long job (encoding ImageNet) can continue where
    it stopped. The temporary directory is `partial_dir(final)`, reused when it is there; its
    sub-directory PROGRESS holds the caller's records of progress and a lock that keeps other
    processes out while the block runs, and is removed before publishing (`write_checksums`
    does not read sub-directories). When the block fails, the directory is kept if `keep(it)`
    says so (the caller's judgement of what is worth continuing), else removed."""
    final = _target(final)
    tmp = partial_dir(final) if keep else None
    in_place = final.is_dir() and all(p == tmp for p in final.iterdir())
    existed = final.exists() and not in_place
    if existed and not replace:
        raise OutputDirError(
            f"{final} is no longer a new or empty directory (it was made or filled while the "
            "output was computed); nothing of it was touched, choose another output directory"
        )
    final.parent.mkdir(parents=True, exist_ok=True)
    where = final if in_place else final.parent
    with ExitStack() as held:
        if tmp is None:
            tmp = Path(tempfile.mkdtemp(dir=where, prefix=f".{final.name}.", suffix=".tmp"))
        else:
            try:
                tmp.mkdir()
                made = True  # by this process: no other can have made it too
            except FileExistsError:
                made = False
            try:
                (tmp / PROGRESS).mkdir(exist_ok=True)
                held.enter_context(hold_lock(tmp / PROGRESS / "lock", lambda holder: OutputDirError(
                    f"{final} is being written by {holder} (its unfinished output {tmp} is "
                    "locked); wait for it to finish, or choose another output directory")))  # fmt: skip
            except BaseException:
                if made:
                    shutil.rmtree(tmp, ignore_errors=True)
                raise
        done = False
        try:
            yield tmp
            if in_place and any(p != tmp for p in final.iterdir()):
                raise OutputDirError(f"{final} was filled while the output was written; nothing "
                                     "of it was touched, choose another output directory")  # fmt: skip
            if not in_place and not existed and final.exists():
                raise OutputDirError(f"{final} appeared while the output was written; nothing "
                                     "of it was touched, choose another output directory")  # fmt: skip
            if keep:
                shutil.rmtree(tmp / PROGRESS)
            if in_place:
                for entry in sorted(tmp.iterdir()):
                    os.replace(entry, final / entry.name)
            elif existed:  # `replace`: move the old one aside, then drop it
                old = final.with_name(f".{final.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
                _publish(tmp, final, directory=True)
                shutil.rmtree(old)
            else:
                _publish(tmp, final, directory=True)
            done = True
        finally:
            if done or not keep or not keep(tmp):
                shutil.rmtree(tmp, ignore_errors=True)


def _existing_file(path: Path) -> Path:
    """`path`, refused by name when it is missing or something other than a file (a directory
    where a record belongs reads as a raw "Is a directory" error further on)."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory where a file belongs; the run or model "
                                "holding it is damaged (restore it from a copy)")  # fmt: skip
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    return path


def read_json(path: Path, *required: str) -> dict:
    """A JSON object from `path` holding the top-level keys `required`; a damaged or hand-edited
    file (not JSON, not an object, a key missing) is a ValueError that names the file."""
    path = _existing_file(path)
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); the file is damaged") from e
    if not isinstance(data, dict):
        raise ValueError(
            f"{path} holds a JSON {type(data).__name__}, not an object; the file is damaged"
        )
    missing = [k for k in required if k not in data]
    if missing:
        raise ValueError(f"{path} has no {', '.join(map(repr, missing))}; the file is damaged")
    return data


def kind_problem(data: dict, kinds: dict[str, type]) -> str | None:
    """What is wrong with the optional keys `kinds` of a JSON object `data` (each of its JSON
    kind, or null), or None: a hand-edited file's `"latent": "x"` named, not an AttributeError
    where the value is first used."""
    bad = [
        f"{key} is {data[key]!r:.60}, not a JSON {_JSON_KIND[kind]}"
        for key, kind in kinds.items()
        if data.get(key) is not None and not isinstance(data[key], kind)
    ]
    return "; ".join(bad) or None


_JSON_KIND = {dict: "object", list: "array", str: "string"}


def is_a(value, kind) -> bool:
    """Whether a JSON value is of the annotated type `kind` (str, bool, int, float, X | None,
    list[X], dict[K, V], or a bare class): the one check of a read file's values against the
    types a dataclass field or a record's key declares (an int is a float too, a bool neither)."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        return any(is_a(value, a) for a in args)
    if origin is list:
        return isinstance(value, list) and all(is_a(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(
            is_a(k, args[0]) and is_a(v, args[1]) for k, v in value.items()
        )
    if kind is type(None):
        return value is None
    if kind is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def type_name(kind) -> str:
    """`int | None`, `list[str]`, `bool`: an annotated type as its annotation reads."""
    return kind.__name__ if isinstance(kind, type) else str(kind).replace("NoneType", "None")


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    path = _existing_file(path)
    try:
        return load_file(path)
    except Exception as e:  # safetensors raises its own error types for truncated headers etc.
        raise ValueError(
            f"{path} is not a readable safetensors file ({e}); the file is damaged or truncated"
        ) from e


def tensor_sha256(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes: equal exactly when the tensors are bit for bit
    the same (unlike torch.equal, which calls -0.0 and 0.0 equal and NaN unequal to itself)."""
    t = tensor.detach().cpu().contiguous()
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


CHECKSUMS = "checksums.json"
CARD = "README.md"  # a model card: documentation for people to edit, not data to verify


def write_checksums(directory: Path) -> None:
    """Record the sha256 of every file in `directory` (not its sub-directories) in checksums.json,
    so a reader can tell a flipped bit or a swapped file from the data that was written. The
    model card is left out: a user may edit it without making the model unloadable."""
    directory = Path(directory)
    sums = {p.name: sha256_file(p) for p in sorted(directory.iterdir())
            if p.is_file() and p.name not in (CHECKSUMS, CARD)}  # fmt: skip
    write_json(directory / CHECKSUMS, {"sha256": sums})


def verify_checksums(directory: Path, unhashed: Collection[str] = ()) -> bool:
    """Check every file listed in `directory`/checksums.json; raise ValueError naming the first
    file that is missing or differs. Returns False for a directory written before checksums were
    recorded (nothing to check), True when all match. Files named in `unhashed` are only checked
    to be there: a file too large to hash on every read, which the caller checks otherwise."""
    directory = Path(directory)
    if not (directory / CHECKSUMS).is_file():
        return False
    sums = read_json(directory / CHECKSUMS, "sha256")["sha256"]
    # names of files in `directory` itself, as written: a path elsewhere is never read
    if not is_a(sums, dict[str, str]) or any(Path(n).name != n or n in ("", "..") for n in sums):
        raise ValueError(
            f"{directory / CHECKSUMS}: sha256 is not an object of file name -> digest; the file "
            "is damaged (copy the directory again)"
        )
    for name, digest in sums.items():
        path = directory / name
        if not path.is_file():
            raise ValueError(f"{path} is missing; {directory} is incomplete (copy it again)")
        if name not in unhashed and sha256_file(path) != digest:
            raise ValueError(
                f"{path} does not match its sha256 in {CHECKSUMS}: the file was modified or "
                "damaged on disk (a bit flip, a partial copy); restore it from a copy"
            )
    return True
