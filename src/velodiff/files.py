"""Files a command reads and writes: the one atomic writer every command uses, the checks of its
outputs before any work (:func:`output_file`, :func:`check_model_out`, :func:`check_results_folder`,
:func:`distinct_files`) and the
reading of a user's text files (:func:`read_text`).

:func:`write_atomic` (bytes or text) and :func:`save_image_atomic` (a PIL image) write to a temporary
file in the destination's folder (``.NAME.XXXXXXXX.tmp``), flush and fsync it, then rename it over
the destination (``os.replace``, atomic on POSIX and Windows): a reader sees the old file or the new
one, never a half-written one, and a killed process leaves at most a stray temporary file. On any
failure the temporary file is removed; an ``OSError`` (missing folder, no permission, disk full)
becomes one :class:`~velodiff.errors.VelodiffError` line naming the file.

The temporary file is created with mode 0o666 and the kernel applies the process umask (and a
folder's default ACL), as for ``open(path, "w")``: the result is readable by whoever could read a
plainly written file (``tempfile.mkstemp`` would leave 0o600, owner-only). A model folder written by
diffusers' ``save_pretrained`` (whose weight files come out 0o600) is given the same modes by
:func:`plain_modes`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any

from .errors import VelodiffError


def cache_root() -> Path:
    """velodiff's cache folder: ``$VELODIFF_CACHE``, else ``~/.cache/velodiff``."""
    return Path(os.environ.get("VELODIFF_CACHE") or Path.home() / ".cache" / "velodiff").expanduser()


#: files at least this large have their digest remembered in the cache (:func:`file_sha256`)
MEMO_MIN_BYTES = 64 << 20


def file_sha256(path: Path) -> str:
    """SHA-256 (hex) of a file's whole content. A large file's digest is remembered in the cache, keyed
    by its path, size and modification time (as A1111 remembers its checkpoints' hashes), so a 7 GB
    checkpoint is read once per version, not once per process."""
    import hashlib

    st = path.stat()
    version = f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()
    memo = cache_root() / "hashes" / hashlib.sha256(version).hexdigest()[:32]
    remember = st.st_size >= MEMO_MIN_BYTES
    if remember:
        try:
            known = memo.read_text().strip()
            if len(known) == 64:
                return known
        except OSError:
            pass
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    digest = h.hexdigest()
    if remember:
        try:
            memo.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(memo, digest)
        except (OSError, VelodiffError):  # a read-only cache costs a re-read next time, nothing else
            pass
    return digest


def files_under(root: Path) -> list[Path]:
    """Every file in a folder, sorted, following symbolic links (an assembled shipped student links to
    its base's folders); ``[root]`` for a file."""
    if root.is_file():
        return [root]
    return sorted(Path(d) / f for d, _, names in os.walk(root, followlinks=True) for f in names)


def make_parent(path: Path, what: str) -> Path:
    """Make sure ``path``'s folder exists and is writable before any work: a missing folder is created
    when its own parent exists (``--json out/x.json`` in a fresh clone), so a mistyped path, two folders
    deep, still fails in one line. Returns ``path``."""
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.exists():
        if not folder.parent.is_dir():
            raise VelodiffError(f"{what}: the folder {str(folder.parent)!r} does not exist; create it first")
        folder.mkdir()
    if not folder.is_dir():
        raise VelodiffError(f"{what}: {str(folder)!r} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):  # read-only: said now, not after the work
        raise VelodiffError(f"{what}: the folder {str(folder)!r} is not writable")
    return path


def writable_folder(folder: Path, what: str) -> Path:
    """A folder velodiff owns (its cache, a model's artefacts folder), made with its parents and checked
    writable before any work, not found unwritable after minutes of it. Returns ``folder``."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise VelodiffError(f"{what}: cannot make the folder {str(folder)!r} ({e.strerror or e})") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise VelodiffError(f"{what}: the folder {str(folder)!r} is not writable")
    return folder


def output_file(path: Path, what: str, example: str = "") -> Path:
    """``path`` as an output file, checked before any work: its folder made as :func:`make_parent`
    does, and the path itself not a folder."""
    make_parent(path, what)
    if path.is_dir():
        raise VelodiffError(f"{what}: {str(path)!r} is a folder; give a file name {example}".rstrip())
    return path


def check_model_out(out: Path, what: str = "--out") -> Path:
    """A folder a command writes a model into, checked before any work. Writing the model replaces the
    folder whole, so it must be absent, empty, or a model folder (``model_index.json``) from an
    earlier run; a file, a folder holding anything else, or the current folder or one above it is
    refused in one line (``--out ..`` emptied the user's folder). Its parent is made as
    :func:`make_parent` does."""
    p = Path(out)
    here = Path.cwd().resolve()
    if p.resolve() == here or p.resolve() in here.parents:
        raise VelodiffError(f"{what} {str(p)!r} is the current folder or one above it; give a new folder")
    if p.exists():
        if not p.is_dir():
            raise VelodiffError(f"{what} {str(p)!r} is a file; give a folder")
        if any(p.iterdir()) and not (p / "model_index.json").is_file():
            raise VelodiffError(
                f"{what} {str(p)!r} holds files that are not a model, which writing the model would "
                "replace; give a new or empty folder"
            )
        others = sorted(e.name for e in p.iterdir() if e.name not in _model_entries(p))
        if others:  # a note or a folder of LoRAs put into an earlier run's model: deleted with it once
            raise VelodiffError(
                f"{what} {str(p)!r} holds {others[0]!r}, which is not part of the model and writing the "
                "model would delete; move it out or give a new folder"
            )
    return make_parent(p, what)


#: what a model folder holds besides the components its model_index.json names: the card, the
#: sampling defaults, a LoRA student's adapter, velodiff's calibration artefacts beside the model
MODEL_FOLDER_EXTRAS = ("model_index.json", "MODEL_CARD.md", "sampling.json", "lora", "velodiff")


def _model_entries(folder: Path) -> set[str]:
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError):
        index = {}
    named = {k for k in index if not k.startswith("_")} if isinstance(index, dict) else set()
    return named | set(MODEL_FOLDER_EXTRAS)


def check_results_folder(
    out: Path, what: str, writes: Iterable[str], own: Callable[[Path], bool]
) -> Path:
    """A folder a command writes its results into (``velodiff bench``, ``velodiff tune``), checked
    before any work: writing there may replace only what the command itself wrote. If any of the names
    it ``writes`` is there already, the folder must be the command's own (``own(folder)``: an earlier
    or interrupted run, which it resumes or replaces); otherwise, e.g. a bench's ``pareto.png`` under a
    tune (it was overwritten once), it is refused in one line naming the file. Other files (notes, a
    README beside the results) stay and are no reason to refuse. A file instead of a folder is refused;
    the folder's parent is made as :func:`make_parent` does."""
    p = Path(out)
    if p.exists():
        if not p.is_dir():
            raise VelodiffError(f"{what} {str(p)!r} is a file; give a folder")
        taken = [name for name in writes if (p / name).exists()]
        if taken and not own(p):
            raise VelodiffError(
                f"{what} {str(p)!r} holds a {taken[0]!r} this command did not write, which it would "
                "replace; give a new folder"
            )
    return make_parent(p, what)


def distinct_files(**paths: Path | None) -> None:
    """Refuse, before any work, two of a command's files that are one file (``--json r.md`` when the
    markdown goes beside it as ``r.md``; an output over the command's own input): the last write
    silently replaced the other. Keyword names are the options, as the message says them."""
    seen: dict[Path, str] = {}
    for name, p in paths.items():
        if p is None:
            continue
        key = Path(p).expanduser().resolve()
        if key in seen:
            raise VelodiffError(f"{seen[key]} and {name} are the same file {str(p)!r}; give each its own")
        seen[key] = name


def _umask() -> int:
    """The process umask (read from /proc where it can be, without changing it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def plain_modes(folder: Path) -> None:
    """Give every file under ``folder`` the mode a plain ``open(path, "w")`` gives (0o666 less the
    umask): diffusers' ``save_pretrained`` leaves its weight files owner-only (0o600), so a shared
    model folder was unreadable to the others its card and configs were readable by."""
    mode = 0o666 & ~_umask()
    for p in folder.rglob("*"):
        if p.is_file() and not p.is_symlink():
            p.chmod(mode)


#: the suffix of temporary files (a set folder's resume removes stale ones: ``.*.tmp``)
TEMP_SUFFIX = ".tmp"


def _create_temporary(path: Path) -> tuple[int, Path]:
    """A new, exclusive temporary file beside ``path`` with the mode a plain ``open`` would give."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{os.urandom(4).hex()}{TEMP_SUFFIX}")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary file name beside {path}")


def _write_with(path: str | os.PathLike[str], fill: Callable[[IO[bytes]], Any]) -> None:
    path = Path(path)
    try:
        fd, tmp = _create_temporary(path)
    except OSError as e:
        raise VelodiffError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise VelodiffError(f"cannot write {path}: {e.strerror or e}") from None
        if isinstance(e, ValueError):  # an encoder's limit: PIL's WebP past 16383 pixels a side
            raise VelodiffError(f"cannot write {path}: {e}") from None
        raise


#: the lock file a writer holds in its folder (a set's --out, a training --run)
LOCK = ".lock"


def lock_folder(folder: str | os.PathLike[str], option: str = "--out") -> Any:
    """An exclusive lock on ``folder`` for this process (released by the OS if it is killed; close the
    returned file to release it); a second writer of the same folder is one line naming ``option``."""
    return lock_file(Path(folder) / LOCK, f"another velodiff process is writing {folder}; wait for it or use "
                     f"another {option}")


def lock_file(path: str | os.PathLike[str], refusal: str) -> Any:
    """An exclusive lock on the file ``path`` (made if missing) for this process, released by the OS if
    it is killed (close the returned file to release it); held elsewhere, ``refusal`` as one line."""
    import fcntl

    fh = open(path, "a+")  # noqa: SIM115 - held open: the lock lives as long as the file
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.close()
        raise VelodiffError(refusal) from None
    return fh


def write_atomic(path: str | os.PathLike[str], data: bytes | str) -> None:
    """Write ``data`` (text is UTF-8 encoded) to ``path``, replacing it whole or not at all."""
    blob = data.encode() if isinstance(data, str) else data
    _write_with(path, lambda f: f.write(blob))


def save_image_atomic(
    image: Any, path: str | os.PathLike[str], fmt: str | None = None, parameters: str | None = None
) -> None:
    """``image.save(path, format=fmt)`` for a PIL image, replacing ``path`` whole or not at all (``fmt``
    defaults to the format PIL gives the suffix: PNG for .png, JPEG for .jpg ...), with ``parameters``
    (how it was made, ``velodiff.infotext``) inside where the format has a place for it."""
    if fmt is None:
        from PIL import Image

        Image.init()
        fmt = Image.EXTENSION.get(Path(path).suffix.lower())
        if fmt is None:
            raise VelodiffError(f"cannot write {path}: unknown image type {Path(path).suffix!r}")
    from .infotext import save_options

    _write_with(path, lambda f: image.save(f, format=fmt, **save_options(fmt, parameters)))


#: the largest text file a user hands a command (prompt lists, plans, sweeps, labels)
MAX_TEXT_BYTES = 256 << 20


def read_text(path: str | os.PathLike[str], what: str) -> str:
    """A user's UTF-8 text file, or one line naming the file and what is wrong with it. Only a regular
    file of at most ``MAX_TEXT_BYTES`` is read (``--plan @/dev/zero`` read until memory ran out; a
    FIFO would wait for ever)."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise VelodiffError(f"the {what} {str(p)!r} is a folder; give a text file")
    if p.exists() and not p.is_file():
        raise VelodiffError(f"the {what} {str(p)!r} is not a regular file")
    if p.is_file() and p.stat().st_size > MAX_TEXT_BYTES:
        raise VelodiffError(f"the {what} {str(p)!r} is larger than {MAX_TEXT_BYTES >> 20} MB")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise VelodiffError(f"cannot read the {what} {str(p)!r}: {e.strerror or e}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise VelodiffError(f"the {what} {str(p)!r}: line {line} is not UTF-8 text") from None
