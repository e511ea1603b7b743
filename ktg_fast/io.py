"""Atomic file writes and safe checkpoint reads.

A crash never leaves a half-written checkpoint or result; a full disk names itself; files are
created with the permissions the umask allows (not 0600); checkpoints are read with
``torch.load(weights_only=True)`` (tensors and plain Python types only, no code runs).
"""
from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

__all__ = ["CheckpointError", "atomic_write", "atomic_write_text", "atomic_write_json", "atomic_torch_save",
           "append_jsonl", "load_checkpoint", "check_state_dict", "current_umask"]


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read or does not fit; the message names the file and the mismatch."""


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (``/proc/self/status``)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def _write_error(path: Path, e: OSError) -> OSError:
    """The same OSError (same errno) with a message naming the file and what to do."""
    why = {errno.ENOSPC: "no space left on device: free some space and rerun with --resume",
           errno.EDQUOT: "disk quota exceeded: free some space and rerun with --resume",
           errno.EFBIG: "file too large for this file system or the process's file-size limit (ulimit -f)"}
    reason = why.get(e.errno, (e.strerror or str(e)).lower())
    return OSError(e.errno, f"cannot write {path}: {reason}; the previous version of the file, if any, is intact")


class _Recording:
    """A file wrapper remembering the first OSError of a write (torch.save turns it into a RuntimeError)."""

    def __init__(self, f: Any) -> None:
        self._f, self.error = f, None

    def write(self, data: Any) -> int:
        try:
            return self._f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        self._f.flush()


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], mode: str = "wb") -> Path:
    """Write through ``write(fileobj)`` to a temporary file beside ``path``, fsync, then rename over it.

    The file gets mode ``0o666 & ~umask`` like any ``open()``; on failure the temporary file is
    removed and ``path`` keeps its previous content. An ``OSError`` (full disk, file-size limit)
    is re-raised with a message naming ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    rec = None
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp creates 0600 whatever the umask
        with os.fdopen(fd, mode) as f:
            rec = _Recording(f)
            write(rec)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        cause = e if isinstance(e, OSError) else (rec.error if rec is not None else None)
        if cause is not None and cause.errno is not None:
            raise _write_error(path, cause) from None
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Atomically write a text file (UTF-8)."""
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Atomically write ``obj`` as indented JSON."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """Atomically ``torch.save`` a checkpoint (keep ``obj`` to tensors and plain types: it is read back
    with ``weights_only=True``)."""
    return atomic_write(path, lambda f: torch.save(obj, f))


def _drop_partial_last_line(path: Path) -> None:
    """Cut a last line that has no newline (a write killed half-way)."""
    try:
        f = open(path, "r+b")
    except FileNotFoundError:
        return
    with f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        # Search backwards for the last complete line.
        pos, keep = size, 0
        while pos > 0:
            step = min(65536, pos)
            pos -= step
            f.seek(pos)
            chunk = f.read(step)
            i = chunk.rfind(b"\n")
            if i >= 0:
                keep = pos + i + 1
                break
        f.truncate(keep)


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON line and flush it to disk (metrics survive a kill).

    A last line left without its newline by a kill is dropped first, so the record never joins a
    fragment.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _drop_partial_last_line(path)
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        if e.errno is None:
            raise
        raise _write_error(path, e) from None


def _load_reason(e: BaseException) -> str:
    """torch.load's error in one line, without its advice to load with ``weights_only=False``."""
    msg = str(e)
    if "Weights only load failed" in msg:
        detail = msg.split("WeightsUnpickler error:", 1)[-1].strip().splitlines()
        detail = next((line.strip() for line in detail if line.strip()), "")
        if detail.startswith("Unsupported global"):
            name = detail.split("GLOBAL", 1)[-1].split()[0] if "GLOBAL" in detail else "?"
            return (f"it holds a Python object ({name}) besides tensors and plain types, which is never "
                    "unpickled (it could run code)")
        return f"not a PyTorch checkpoint ({detail or 'unreadable pickle'})"
    if isinstance(e, EOFError) or not msg:
        return "the file is empty or cut short"
    if "central directory" in msg or "zip archive" in msg:
        return "the file is truncated or damaged (not a complete zip archive)"
    return f"not a readable PyTorch checkpoint ({type(e).__name__}: {msg.splitlines()[0].strip()})"


def load_checkpoint(path: str | os.PathLike) -> Any:
    """``torch.load(path, weights_only=True)`` onto the CPU; an unreadable file raises one
    :class:`CheckpointError` line naming it (``FileNotFoundError`` passes through)."""
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except Exception as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {_file_reason(path) or _load_reason(e)}; delete it "
                              "(or restore a good copy) and train again") from None


def _file_reason(path: Path) -> str:
    """What the file's first bytes say: empty, or no checkpoint at all ('' when it looks like one)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return ""
    if not head:
        return "the file is empty or cut short"
    # torch.save writes a zip archive (PK\x03\x04); the legacy format starts with a pickle's \x80.
    if head[:4] != b"PK\x03\x04" and head[:1] != b"\x80":
        return "not a PyTorch checkpoint (neither a zip archive nor a pickle)"
    return ""


def check_state_dict(module: torch.nn.Module, state: Any, path: str | os.PathLike, what: str = "the model") -> None:
    """Raise :class:`CheckpointError` naming the first tensor of ``state`` that does not fit ``module``.

    Missing or unexpected tensors (another architecture) and a shape mismatch (another class or
    channel count) are reported with the tensor's name and both shapes.
    """
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} holds no state dict of tensors")
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} tensor(s) of {what} are missing, e.g. {missing[0]}")
        if unexpected:
            parts.append(f"{len(unexpected)} tensor(s) are not in {what}, e.g. {unexpected[0]}")
        raise CheckpointError(f"{path} was written for another architecture: {'; '.join(parts)}")
    first_conv = next((k for k, v in own.items() if v.dim() == 4), None)
    classifier = [k for k, v in own.items() if v.dim() == 2][-1:]
    for k, v in own.items():
        theirs = state[k]
        if tuple(theirs.shape) != tuple(v.shape):
            hint = ""
            if k in classifier and theirs.shape[1:] == v.shape[1:]:
                hint = f" (trained for {theirs.shape[0]} classes, this dataset has {v.shape[0]})"
            elif k == first_conv and theirs.shape[0] == v.shape[0] and theirs.shape[1] != v.shape[1]:
                hint = f" (trained on {theirs.shape[1]}-channel images, these have {v.shape[1]})"
            raise CheckpointError(f"{path} does not fit {what}: tensor {k} has shape {tuple(theirs.shape)} "
                                  f"in the file, {tuple(v.shape)} in the model{hint}")
