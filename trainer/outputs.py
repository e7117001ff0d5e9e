"""Every file and folder the project writes for a person goes through here.

Three promises, kept in one place:

* **Nothing half-written under a final name.** An output is written under
  ``NAME.partial`` beside its target and renamed into place only when complete; a
  failure, a full disk or an interrupt removes the partial file, and a ``kill -9``
  leaves at most ``NAME.partial`` (the next write replaces it).
* **Nothing replaced unasked.** An existing output is replaced only with
  ``overwrite=True`` (the CLI's ``--overwrite``).
* **No input is ever written.** An output that is, contains or lies inside one of the
  command's inputs (the dataset, its images, its corrections store, the checkpoint) is
  refused whatever the flags.

Failures are :class:`OutputError`, one line naming the file and what went wrong.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

PARTIAL = ".partial"


class OutputError(Exception):
    """An output that may not or could not be written; the message is for people."""


def partial_name(out: str | Path) -> Path:
    """Where ``out`` is written until it is complete."""
    out = Path(out)
    return out.with_name(out.name + PARTIAL)


def store_folder(dataset: str | Path) -> Path:
    """The corrections-store folder kept beside a dataset (``NAME.marsviewer``)."""
    src = Path(dataset)
    return src.parent / (f"{src.name}.marsviewer" if src.is_dir() else f"{src.stem}.marsviewer")


def dataset_inputs(*sources: str | Path | None) -> list[Path]:
    """The paths a dataset argument stands for: the dataset itself and its corrections
    folder beside it (synthetic data and missing paths stand for nothing)."""
    found: list[Path] = []
    for source in sources:
        if not source or str(source).startswith("synthetic") and not Path(source).exists():
            continue
        found += [Path(source), store_folder(source)]
    return found


def _resolved(path: Path) -> Path:
    return Path(os.path.realpath(path))


def refuse_inputs(out: str | Path, inputs: Iterable[str | Path | None], what: str = "--out") -> None:
    """Refuse (an :class:`OutputError`) an ``out`` that is, contains or lies inside one of
    ``inputs``, whatever else is asked: writing it could destroy an input."""
    out = Path(out)
    target = _resolved(out)
    for given in inputs:
        if given is None:
            continue
        src = _resolved(Path(given))
        same = target == src or (out.exists() and Path(given).exists() and os.path.samefile(out, given))
        if same:
            raise OutputError(f"{out}: is an input of this command ({given}); choose another {what}")
        if src in target.parents:
            raise OutputError(f"{out}: lies inside an input of this command ({given}); choose another {what}")
        if target in src.parents:
            raise OutputError(f"{out}: contains an input of this command ({given}); choose another {what}")


def check_output(
    out: str | Path, inputs: Iterable[str | Path | None] = (), overwrite: bool = False, what: str = "--out"
) -> Path:
    """Refuse ``out`` (an :class:`OutputError`) when it is, contains or lies inside one of
    ``inputs``, when it exists and ``overwrite`` is not given, or when its folder does not
    exist. Returns ``out`` as a :class:`Path`."""
    out = Path(out)
    refuse_inputs(out, inputs, what)
    if not _resolved(out).parent.is_dir():
        raise OutputError(f"{out}: its folder {out.parent} does not exist")
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise OutputError(f"{out}: already exists; choose another {what} or pass --overwrite")
    return out


def _remove(path: Path) -> None:
    """Remove a partial output, quietly: where even that fails (a location that turned
    read-only), the error being reported matters more."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except OSError:
            pass


def why_not_written(exc: OSError) -> str:
    """What a person should read for an operating system's refusal to write."""
    return {
        errno.ENOSPC: "the disk is full",
        errno.EDQUOT: "the disk quota is used up",
        errno.EROFS: "the location is read-only",
        errno.EACCES: "no permission to write there",
        errno.EPERM: "no permission to write there",
    }.get(exc.errno or 0, exc.strerror or str(exc))


def could_not_write(out: str | Path, exc: OSError) -> OutputError:
    """The one-line error for an output that the operating system refused."""
    return OutputError(
        f"{out}: could not be written ({why_not_written(exc)}); nothing was left under its name"
    )


def replace_into(tmp: Path, out: Path) -> None:
    """Move the complete ``tmp`` to ``out``; an ``out`` already there (a file, or a folder
    when ``tmp`` is one) is replaced, a folder only once the new one is in place."""
    if tmp.is_dir() and out.is_dir() and not out.is_symlink():
        old = out.with_name(out.name + ".replaced" + PARTIAL)
        _remove(old)
        out.rename(old)
        tmp.rename(out)
        _remove(old)
    else:
        os.replace(tmp, out)


@contextmanager
def _removed_on_failure(tmp: Path, out: Path) -> Iterator[None]:
    """Any failure in the block removes the partial ``tmp``; an :class:`OSError` becomes
    an :class:`OutputError` naming ``out``."""
    try:
        yield
    except OSError as exc:
        _remove(tmp)
        raise could_not_write(out, exc) from None
    except BaseException:
        _remove(tmp)
        raise


@contextmanager
def written(
    out: str | Path,
    inputs: Iterable[str | Path | None] = (),
    overwrite: bool = False,
    folder: bool = False,
    what: str = "--out",
) -> Iterator[Path]:
    """Write ``out`` safely: yields the partial path (an empty folder when ``folder``) to
    write into, and renames it to ``out`` when the block ends without an error. On any
    error nothing is left under either name; an :class:`OSError` becomes an
    :class:`OutputError` naming ``out``."""
    out = check_output(out, inputs, overwrite, what)
    tmp = partial_name(out)
    try:
        _remove(tmp)
        if folder:
            tmp.mkdir()
        else:
            tmp.touch()  # fails here, before any work, where the location is not writable
    except OSError as exc:
        _remove(tmp)
        raise could_not_write(out, exc) from None
    with _removed_on_failure(tmp, out):
        yield tmp
        if not tmp.exists():
            raise OutputError(f"{out}: nothing was written")
        replace_into(tmp, out)


def write_bytes(out: str | Path, data: bytes | str, **kwargs) -> Path:
    """:func:`written` for a small file whose content is at hand (JSON, CSV text)."""
    with written(out, **kwargs) as tmp:
        if isinstance(data, str):
            tmp.write_text(data)
        else:
            tmp.write_bytes(data)
    return Path(out)


@contextmanager
def written_files(
    folder: str | Path,
    names: Iterable[str | Path],
    inputs: Iterable[str | Path | None] = (),
    overwrite: bool = False,
) -> Iterator[Path]:
    """Write files ``names`` (paths relative to ``folder``) into ``folder``, which may
    exist and hold other files: yields a partial folder to write them into (the same
    relative paths), and moves each complete file into ``folder`` when the block ends.
    Refused before any work: a ``folder`` that is, contains or lies inside an input, a
    name given twice, and (without ``overwrite``) a file already there."""
    folder = Path(folder)
    inputs = list(inputs)
    check_output(folder, inputs, overwrite=True, what="output folder")
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{folder}: is a file; the output must be a folder")
    names = [Path(n) for n in names]
    seen: set[Path] = set()
    for name in names:
        if name in seen:
            raise OutputError(
                f"{folder / name}: two inputs would be written to this one file; give them different names"
            )
        seen.add(name)
    present = [folder / n for n in names if (folder / n).exists()]
    if present and not overwrite:
        more = f" (and {len(present) - 1} more)" if len(present) > 1 else ""
        raise OutputError(f"{present[0]}: already exists{more}; choose another folder or pass --overwrite")
    tmp = partial_name(folder)
    try:
        _remove(tmp)
        tmp.mkdir(parents=True)
    except OSError as exc:
        _remove(tmp)
        raise could_not_write(folder, exc) from None
    with _removed_on_failure(tmp, folder):
        yield tmp
        for name in names:
            if not (tmp / name).exists():
                continue
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp / name, folder / name)
        _remove(tmp)
