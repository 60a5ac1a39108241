"""Atomic, non-destructive saves: a killed save never leaves a loadable-but-wrong folder or file.

* :func:`check_output_path` validates an output path before any work (nothing is written).
* :func:`atomic_directory` is a context manager that yields a hidden temporary sibling folder to save into
  and, when the block succeeds, puts it in place as one step.
* :func:`atomic_write_text` / :func:`atomic_write_json` write one file the same way (strict JSON: no NaN).

Example::

    from deeptalk.saving import atomic_directory, check_output_path

    check_output_path(out, overwrite=args.overwrite, forbid=[args.source])   # before loading anything
    model = convert(...)
    with atomic_directory(out, overwrite=args.overwrite, forbid=[args.source]) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

What a kill (``kill -9``, power loss) at any instant leaves at ``out``:

* a fresh save: nothing, or the complete new folder;
* replacing a folder (``overwrite=True``): the complete previous folder or the complete new folder. On Linux
  the two are swapped in one ``renameat2(RENAME_EXCHANGE)`` call. Where the platform or filesystem lacks it,
  the previous folder is renamed away to a hidden sibling and the new one renamed in; a kill between those
  two renames leaves the previous folder under the hidden name, and the next :func:`check_output_path` or
  :func:`atomic_directory` for ``out`` renames it back.

The hidden siblings are named ``.<name>.deeptalk-partial-<pid>-<random>`` (a save in progress, or the old
folder being deleted) and ``.<name>.deeptalk-previous-<pid>-<random>``. Those left by a process that no
longer runs are cleaned up (or restored) by the next save to the same path.

Where the package uses them:

* ``deeptalk convert`` / ``upgrade`` / ``assign``, ``export_for_hub`` and ``create_space``: the whole folder in
  one ``atomic_directory`` block; a non-empty output only with ``--overwrite`` (``overwrite=True``).
* ``deeptalk train --output OUT``: the Trainer writes its ``checkpoint-*`` folders into OUT itself, so OUT cannot
  be swapped as a whole; the final model is saved into :func:`staging_folder` and moved in by
  :func:`publish_staged` (``config.json`` last). ``--resume-from-checkpoint latest`` uses
  :func:`latest_complete_checkpoint`, which skips checkpoints whose save was killed.
* ``deeptalk evaluate --output results.json``: :func:`atomic_write_text` of strict JSON.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import math
import os
import re
import secrets
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator
from typing import Any

__all__ = ["atomic_directory", "atomic_write_json", "atomic_write_text", "check_output_path", "clear_staging",
           "latest_complete_checkpoint", "nearest_writable_folder", "probe_write", "publish_staged", "staging_folder"]

_PARTIAL, _PREVIOUS = "partial", "previous"
_NAME_KEEP = 100  # sibling names must stay under NAME_MAX: longer target names are cut and hashed

PathLike = str | os.PathLike


# ---------------------------------------------------------------------------------------------- validation
def _describe(what: str, path: str) -> str:
    return f"{what} {path!r}"


def _inside(child: str, parent: str) -> bool:
    return child != parent and os.path.commonpath([child, parent]) == parent


def _check_forbidden(target: str, forbid: Iterable[PathLike | None], what: str, shown: str) -> None:
    real = os.path.realpath(target)
    for item in forbid:
        if item is None or (isinstance(item, str) and not item.strip()):
            continue
        source = os.path.realpath(os.path.expanduser(os.fspath(item)))
        if real == source:
            raise ValueError(
                f"{_describe(what, shown)} is the input {os.fspath(item)!r}: saving there would replace what is being "
                "read. Choose another output path."
            )
        if _inside(real, source):
            raise ValueError(
                f"{_describe(what, shown)} is inside the input {os.fspath(item)!r}: saving there would change the "
                "input. Choose an output path outside it."
            )
        if _inside(source, real):
            raise ValueError(
                f"{_describe(what, shown)} contains the input {os.fspath(item)!r}: replacing it would delete the "
                "input. Choose another output path."
            )


def _nearest_existing(path: str) -> str:
    while not os.path.lexists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def nearest_writable_folder(path: str) -> str:
    """The nearest existing ancestor of ``path`` (``path`` itself if it exists), checked by writing into it.

    Raises ``NotADirectoryError`` when that ancestor is a file and ``PermissionError`` (or another ``OSError``)
    when writing into it is refused; either carries the ancestor as ``filename``."""
    anchor = _nearest_existing(path)
    if not os.path.isdir(anchor):
        raise NotADirectoryError(errno.ENOTDIR, "not a folder", anchor)
    try:  # a real probe: os.access says yes to root even on a read-only filesystem
        probe_write(anchor)
    except OSError as err:
        raise type(err)(err.errno, err.strerror, anchor) from None
    return anchor


def _check_writable(parent: str, what: str, shown: str) -> None:
    try:
        nearest_writable_folder(parent)
    except NotADirectoryError as err:
        raise ValueError(
            f"{_describe(what, shown)} cannot be created: {err.filename!r} is a file, not a folder. "
            "Choose another path."
        ) from None
    except OSError as err:
        raise ValueError(
            f"{_describe(what, shown)} cannot be written: {err.filename!r} is not writable ({err.strerror}). Choose a "
            "folder you can write to."
        ) from None


def probe_write(folder: str) -> None:
    """Create a file in ``folder`` and let it vanish; raises ``OSError`` where that is not allowed."""
    if hasattr(os, "O_TMPFILE"):  # a file without a name: a kill at any instant leaves nothing behind
        try:
            os.close(os.open(folder, os.O_TMPFILE | os.O_WRONLY, 0o600))
            return
        except OSError as err:
            if err.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):  # the filesystem lacks O_TMPFILE
                raise
    os.rmdir(tempfile.mkdtemp(prefix=".deeptalk-write-test-", dir=folder))


def check_output_path(path: PathLike, *, overwrite: bool = False, forbid: Iterable[PathLike | None] = (),
                      kind: str = "directory", what: str = "output") -> str:
    """Validate an output path before any work; return it absolute. Raises ``ValueError`` naming the fix.

    Args:
        path: the folder (``kind="directory"``) or file (``kind="file"``) to be written.
        overwrite: allow replacing a non-empty folder / an existing file.
        forbid: input paths (model folders, data files) the output must not equal, lie inside or contain;
            compared after resolving symbolic links. ``None`` entries are ignored.
        kind: ``"directory"`` or ``"file"``.
        what: how messages name the path (e.g. ``"--output"``).

    Checked: the path is well-formed and not a symbolic link; it is not an input (see ``forbid``); it is not a
    file where a folder is wanted or a folder where a file is wanted; a non-empty folder / existing file only
    with ``overwrite=True``; the parent exists or can be created, and is writable (probed by creating and
    removing a hidden folder there). A previous folder left hidden by a save killed mid-swap is restored first.
    """
    if kind not in ("directory", "file"):
        raise ValueError(f"kind must be 'directory' or 'file', got {kind!r}.")
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path).strip():
        raise ValueError(f"{what} must be a non-empty path, got {path!r}.")
    shown = os.fspath(path)
    if "\0" in shown:
        raise ValueError(f"{_describe(what, shown)} contains a NUL character; choose a valid path.")
    target = os.path.abspath(os.path.expanduser(shown))
    if os.path.basename(target) in ("", ".", ".."):
        raise ValueError(f"{_describe(what, shown)} does not name a {kind}; give a path that ends in its name.")
    if isinstance(forbid, (str, bytes, os.PathLike)):
        forbid = [forbid]
    _check_forbidden(target, forbid, what, shown)
    if os.path.islink(target):
        raise ValueError(
            f"{_describe(what, shown)} is a symbolic link (to {os.readlink(target)!r}): saving would replace the link, "
            "not what it points to. Pass the real path."
        )
    parent, name = os.path.split(target)
    if os.path.isdir(parent):
        _recover(parent, name)
    if kind == "directory":
        if os.path.exists(target) and not os.path.isdir(target):
            raise ValueError(
                f"{_describe(what, shown)} is an existing file, not a folder: choose a folder path, or remove the file."
            )
        if os.path.isdir(target) and not overwrite:
            entries = sorted(os.listdir(target))
            if entries:
                listed = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
                raise ValueError(
                    f"{_describe(what, shown)} already exists and is not empty ({len(entries)} entries: {listed}). "
                    "Pass overwrite=True (--overwrite) to replace it - the previous contents are removed only once "
                    "the new save is complete - or choose a new folder."
                )
    else:
        if os.path.isdir(target):
            raise ValueError(f"{_describe(what, shown)} is a folder, not a file: give a file path inside it.")
        if os.path.exists(target) and not overwrite:
            raise ValueError(
                f"{_describe(what, shown)} already exists. Pass overwrite=True (--overwrite) to replace it, or choose "
                "a new file name."
            )
    try:
        name_max = os.pathconf(_nearest_existing(parent), "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        name_max = 255
    if len(os.fsencode(name)) > name_max:
        raise ValueError(f"{_describe(what, shown)} has a name longer than {name_max} bytes; choose a shorter name.")
    _check_writable(parent, what, shown)
    return target


# ---------------------------------------------------------------------------------------------- siblings
def _short(name: str) -> str:
    if len(name) <= _NAME_KEEP:
        return name
    return f"{name[: _NAME_KEEP - 9]}~{hashlib.sha1(name.encode('utf-8', 'surrogateescape')).hexdigest()[:8]}"


def _new_sibling(parent: str, name: str, role: str) -> str:
    """A fresh (not yet existing) hidden path next to ``parent/name``, tagged with this process id."""
    while True:
        path = os.path.join(parent, f".{_short(name)}.deeptalk-{role}-{os.getpid()}-{secrets.token_hex(4)}")
        if not os.path.lexists(path):
            return path


def _sibling_pattern(name: str) -> re.Pattern:
    return re.compile(rf"\.{re.escape(_short(name))}\.deeptalk-({_PARTIAL}|{_PREVIOUS})-(\d+)-[0-9a-f]+")


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _recover(parent: str, name: str) -> None:
    """Clean up after saves of ``parent/name`` whose process is gone; restore a previous folder left hidden."""
    pattern = _sibling_pattern(name)
    stale = {_PARTIAL: [], _PREVIOUS: []}
    try:
        entries = os.listdir(parent)
    except OSError:  # an unreadable parent: the writability probe reports it
        return
    for entry in entries:
        match = pattern.fullmatch(entry)
        if match and not _process_alive(int(match.group(2))):
            stale[match.group(1)].append(os.path.join(parent, entry))
    target = os.path.join(parent, name)
    previous = sorted(stale[_PREVIOUS], key=os.path.getmtime)
    if previous and not os.path.lexists(target):
        os.rename(previous.pop(), target)  # renamed away whole, so complete: the last save never got its new one in
    for leftover in stale[_PARTIAL] + previous:
        _remove(leftover)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def _fsync_path(path: str, directory: bool) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:  # e.g. directories cannot be opened on Windows; durability is best effort there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: str) -> None:
    """Flush every file and folder under ``root`` to disk, so the rename never publishes unwritten data."""
    for folder, _, files in os.walk(root):
        for file in files:
            _fsync_path(os.path.join(folder, file), directory=False)
        _fsync_path(folder, directory=True)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: str, b: str) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); ``False`` where that is unavailable."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):  # glibc < 2.28 or another libc
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    sys.audit("os.rename", a, b, -1, -1)  # the event os.rename raises: audit hooks see this rename like any other
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):  # the filesystem cannot exchange
        return False
    raise OSError(code, os.strerror(code), a, None, b)


def _commit_directory(tmp: str, target: str, overwrite: bool, shown: str, what: str) -> None:
    parent, name = os.path.split(target)
    if not overwrite and os.path.isdir(target) and os.listdir(target):
        raise ValueError(
            f"{_describe(what, shown)} was filled by something else while this save ran; it was left as it is and "
            "the new save discarded. Save again into another folder, or with overwrite=True."
        )
    if not os.path.isdir(target) or not os.listdir(target):
        os.replace(tmp, target)  # onto nothing or an empty folder: one rename
    elif _exchange(tmp, target):
        _remove(tmp)  # tmp now holds the previous folder
    else:
        previous = _new_sibling(parent, name, _PREVIOUS)
        os.rename(target, previous)
        try:
            os.rename(tmp, target)
        except BaseException:
            os.rename(previous, target)  # this process lives on, so no later save would restore it
            raise
        _remove(previous)
    _fsync_path(parent, directory=True)


# ---------------------------------------------------------------------------------------------- public API
@contextlib.contextmanager
def atomic_directory(path: PathLike, *, overwrite: bool = False, forbid: Iterable[PathLike | None] = (),
                     what: str = "output") -> Iterator[str]:
    """Save a folder atomically: yields a hidden temporary sibling of ``path`` to write into.

    :func:`check_output_path` runs first (same arguments, same messages). When the block ends without an
    exception the temporary folder is flushed to disk and renamed to ``path`` (swapped with the previous folder
    when ``overwrite=True``, which is then deleted); when it raises, the temporary folder is deleted and
    ``path`` is untouched. See the module docstring for what a kill at any instant leaves.
    """
    target = check_output_path(path, overwrite=overwrite, forbid=forbid, kind="directory", what=what)
    parent, name = os.path.split(target)
    os.makedirs(parent, exist_ok=True)
    tmp = _new_sibling(parent, name, _PARTIAL)
    os.mkdir(tmp)  # the umask applies, as for a folder save_pretrained would create
    try:
        yield tmp
        _fsync_tree(tmp)
        _commit_directory(tmp, target, overwrite, os.fspath(path), what)
    except BaseException:
        _remove(tmp)
        raise


def atomic_write_text(path: PathLike, text: str, *, overwrite: bool = True, forbid: Iterable[PathLike | None] = (),
                      encoding: str = "utf-8", what: str = "output") -> str:
    """Write ``text`` to ``path`` through a hidden temporary file and ``os.replace``: readers (and a kill at any
    instant) see the previous file or the complete new one. Returns the absolute path."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}.")
    target = check_output_path(path, overwrite=overwrite, forbid=forbid, kind="file", what=what)
    parent, name = os.path.split(target)
    os.makedirs(parent, exist_ok=True)
    tmp = _new_sibling(parent, name, _PARTIAL)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for open(path, "w")
    try:
        with os.fdopen(fd, "w", encoding=encoding, newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if os.path.exists(target):
            shutil.copymode(target, tmp)
        os.replace(tmp, target)
    except BaseException:
        _remove(tmp)
        raise
    _fsync_path(parent, directory=True)
    return target


def _first_non_json(value: Any, where: str) -> tuple[str, Any] | None:
    """Location and value of the first NaN / infinity (or non-JSON type) inside ``value``."""
    if isinstance(value, float):
        return None if math.isfinite(value) else (where, value)
    if value is None or isinstance(value, (str, int, bool)):
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            found = _first_non_json(item, f"{where}[{key!r}]")
            if found:
                return found
        return None
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            found = _first_non_json(item, f"{where}[{index}]")
            if found:
                return found
        return None
    return where, value


def atomic_write_json(path: PathLike, obj: Any, *, indent: int | None = 2, overwrite: bool = True,
                      forbid: Iterable[PathLike | None] = (), what: str = "output") -> str:
    """Write ``obj`` as strict JSON (``allow_nan=False``) with :func:`atomic_write_text`; returns the path.

    NaN and infinity are not JSON (most parsers reject them): they raise ``ValueError`` naming the key that
    holds them, before anything is written. Store ``None`` for "no value".
    """
    try:
        text = json.dumps(obj, indent=indent, allow_nan=False) + "\n"
    except (ValueError, TypeError) as err:
        found = _first_non_json(obj, "obj")
        if found is None:
            raise
        where, value = found
        if isinstance(value, float):
            reason = f"{where} is {value!r}, which strict JSON cannot hold; store None (null) for a missing value"
        else:
            reason = f"{where} is a {type(value).__name__} ({value!r:.80}), which JSON cannot hold; convert it first"
        raise ValueError(f"{_describe(what, os.fspath(path))} was not written: {reason}.") from err
    return atomic_write_text(path, text, overwrite=overwrite, forbid=forbid, what=what)


# ---------------------------------------------------------------------------------------------- training outputs
STAGING_NAME = ".deeptalk-final-save"
# what makes a folder loadable: moved in last, removed first, so a folder without them is never taken for a model
_COMMIT_MARKERS = ("config.json", "adapter_config.json")
_WEIGHT_FILE = re.compile(r"(model|adapter_model)(-\d+-of-\d+)?\.safetensors(\.index\.json)?")


def staging_folder(output_dir: PathLike) -> str:
    """Where a final model is written before :func:`publish_staged` moves it into ``output_dir``.

    A training output also holds the Trainer's ``checkpoint-*`` folders, so it cannot be swapped as a whole
    (:func:`atomic_directory`) without deleting them. The name is fixed so that every process of a multi-process
    save (ZeRO-3, FSDP gather on all ranks) writes to the same place.
    """
    return os.path.join(os.path.abspath(os.path.expanduser(os.fspath(output_dir))), STAGING_NAME)


def clear_staging(output_dir: PathLike) -> None:
    """Remove what a killed final save left in ``output_dir`` (its staging folder) - call before training."""
    _remove(staging_folder(output_dir))


def publish_staged(output_dir: PathLike) -> str:
    """Move the model saved in :func:`staging_folder` into ``output_dir``, leaving other entries (checkpoints) alone.

    ``config.json`` (``adapter_config.json`` for an adapter) is removed from ``output_dir`` first and put in place
    last, and weight files of a previous save that the new one lacks are removed in between, so a kill at any
    instant leaves the previous complete model, a folder that does not load (no ``config.json``, and the staging
    folder, which :func:`deeptalk.folder_checks.check_model_folder` names), or the new complete model - never a
    mix that loads. Returns ``output_dir`` absolute.
    """
    staging = staging_folder(output_dir)
    target = os.path.dirname(staging)
    if not os.path.isdir(staging):
        raise FileNotFoundError(f"{staging}: nothing was saved to publish.")
    _fsync_tree(staging)
    staged = set(os.listdir(staging))
    for marker in _COMMIT_MARKERS:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(target, marker))
    _fsync_path(target, directory=True)
    for entry in os.listdir(target):
        if _WEIGHT_FILE.fullmatch(entry) and entry not in staged:
            _remove(os.path.join(target, entry))
    for entry in sorted(staged - set(_COMMIT_MARKERS)):
        destination = os.path.join(target, entry)
        if os.path.isdir(destination) and not os.path.islink(destination):
            _remove(destination)  # a folder (codec/) is replaced whole, never merged
        os.replace(os.path.join(staging, entry), destination)
    _fsync_path(target, directory=True)
    for marker in _COMMIT_MARKERS:
        if marker in staged:
            os.replace(os.path.join(staging, marker), os.path.join(target, marker))
    _fsync_path(target, directory=True)
    _remove(staging)
    return target


_CHECKPOINT = re.compile(r"checkpoint-(\d+)")


def checkpoint_is_complete(folder: PathLike) -> bool:
    """A Trainer checkpoint is complete once its ``trainer_state.json`` (written last) parses and names its step."""
    match = _CHECKPOINT.fullmatch(os.path.basename(os.path.normpath(os.fspath(folder))))
    try:
        with open(os.path.join(folder, "trainer_state.json")) as f:
            state = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(state, dict) and (match is None or state.get("global_step") == int(match.group(1)))


def latest_complete_checkpoint(output_dir: PathLike) -> tuple[str | None, list[str]]:
    """The newest complete ``checkpoint-N`` folder in ``output_dir`` (or ``None``) and the newer, partial ones
    skipped on the way (a kill during a checkpoint save leaves one without its ``trainer_state.json``)."""
    found = []
    if os.path.isdir(output_dir):
        for entry in os.listdir(output_dir):
            match = _CHECKPOINT.fullmatch(entry)
            if match and os.path.isdir(os.path.join(output_dir, entry)):
                found.append((int(match.group(1)), os.path.join(output_dir, entry)))
    skipped = []
    for _, path in sorted(found, reverse=True):
        if checkpoint_is_complete(path):
            return path, skipped
        skipped.append(path)
    return None, skipped
