"""File I/O every part of mmsec shares: atomic writes, JSON, safetensors.

Every file mmsec writes goes through :func:`atomic_open`: a temporary file in the same
folder, fsync, ``os.replace``, fsync of the folder. An interrupted write never leaves a
half-written file behind, and the old content stays until the new one is complete.
Temporary files are named ``.<name>.<random>.tmp``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from .errors import MmsecError

if TYPE_CHECKING:
    import torch

__all__ = [
    "TMP_SUFFIX",
    "atomic_open",
    "fsync_dir",
    "jsonable",
    "load_tensors",
    "safetensors_bytes",
    "write_safetensors_atomic",
    "write_atomic",
    "write_json_atomic",
]

TMP_SUFFIX = ".tmp"

# mkstemp creates files readable by the owner only; results should get the usual
# permissions. Reading the umask means setting it, so do it once, at import.
UMASK = os.umask(0o022)
os.umask(UMASK)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; on success fsync it and move it over ``path``.

    If the block raises, the temporary file is removed and ``path`` keeps its old content.
    ``mode`` is ``"wb"`` or ``"w"`` (text, UTF-8).
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open mode must be 'w' or 'wb', not {mode!r}")
    with atomic_path(path, _fsync=False) as tmp, \
            open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as handle:
        yield handle
        handle.flush()
        os.fsync(handle.fileno())


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """Persist a rename in ``directory`` (POSIX); a no-op where folders cannot be opened."""
    if os.name != "posix":
        return
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, _fsync: bool = True) -> Iterator[Path]:
    """A temporary file name beside ``path`` for a writer that wants a name (not a handle);
    on success the file is fsynced and moved over ``path``, else removed."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=TMP_SUFFIX,
                                    dir=target.parent)
    os.close(fd)
    try:
        os.chmod(tmp_name, 0o666 & ~UMASK)
        yield Path(tmp_name)
        if _fsync:  # (atomic_open fsyncs through its own handle)
            fd = os.open(tmp_name, os.O_RDWR)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp_name, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    fsync_dir(target.parent)


def write_atomic(path: str | os.PathLike[str], data: bytes | str) -> Path:
    """Write ``data`` (bytes, or str as UTF-8) to ``path`` atomically; returns the path.

    A file name that is not UTF-8 (a surrogate-escaped ``str``) is written as ``\\udcff``
    rather than failing the whole write."""
    payload = data.encode("utf-8", "backslashreplace") if isinstance(data, str) else data
    with atomic_open(path, "wb") as handle:
        handle.write(payload)
    return Path(path)


def jsonable(obj: Any) -> Any:
    """Plain JSON data from pydantic models, paths, tensors, numpy values, tuples, sets.

    Non-finite floats become ``None``; anything else unknown becomes its ``str``.
    """
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        items = sorted(obj, key=str) if isinstance(obj, (set, frozenset)) else obj
        return [jsonable(v) for v in items]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "model_dump"):  # pydantic model
        return jsonable(obj.model_dump(mode="json"))
    if hasattr(obj, "tolist"):  # torch tensor, numpy array or scalar
        return jsonable(obj.tolist())
    return str(obj)


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write ``obj`` as indented JSON atomically (non-finite floats become ``null``)."""
    text = json.dumps(jsonable(obj), indent=2, allow_nan=False) + "\n"
    return write_atomic(path, text)


def safetensors_bytes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, Any]) -> bytes:
    """Serialise tensors (any device) and metadata (non-strings stored as JSON) as safetensors."""
    from safetensors.torch import save

    return save(*_safetensors_prepared(tensors, metadata))


def write_safetensors_atomic(path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor],
                             metadata: Mapping[str, Any]) -> Path:
    """``write_atomic(path, safetensors_bytes(tensors, metadata))`` without the bytes:
    safetensors writes the file itself, so a 1 GB checkpoint costs no extra GB of memory
    (``safetensors_bytes`` holds the whole file, twice at its peak) and a sixteenth of the
    CPU time (``benchmarks/checkpoint.py``)."""
    from safetensors.torch import save_file

    prepared, text_meta = _safetensors_prepared(tensors, metadata)
    with atomic_path(path) as tmp:
        try:
            save_file(prepared, str(tmp), metadata=text_meta)
        except Exception as exc:
            # safetensors reports a failed write (a full disk) as its own error type with
            # "(os error N)" in the text: callers handle OSError (and say "disk full")
            found = re.search(r"\(os error (\d+)\)", str(exc))
            if found is None:
                raise
            code = int(found.group(1))
            raise OSError(code, os.strerror(code), str(path)) from exc
    return Path(path)


def _safetensors_prepared(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, Any]
                          ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    import torch

    prepared: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"tensor {name!r} is a {type(tensor).__name__}, not a torch.Tensor")
        tensor = tensor.detach()
        if tensor.device.type != "cpu":
            tensor = tensor.to("cpu")  # a fresh copy of its own
        elif tensor.numel():
            # Only an entry whose storage another entry already uses (tied weights) is
            # copied: safetensors refuses shared storage. Copying every tensor doubled the
            # memory of a checkpoint (optimiser state included: 1 GB more for ViT-B/32's
            # image tower) for nothing; serialising reads the tensors as they are now.
            ptr = tensor.untyped_storage().data_ptr()
            if ptr in storages:
                tensor = tensor.clone()
            else:
                storages.add(ptr)
        prepared[name] = tensor.contiguous()
    text_meta = {
        str(k): v if isinstance(v, str) else json.dumps(jsonable(v)) for k, v in metadata.items()
    }
    return prepared, text_meta


def load_tensors(
    path: str | os.PathLike[str], device: str = "cpu"
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load a safetensors file (never pickle); returns ``(tensors, metadata)``.

    Raises :class:`~mmsec.errors.MmsecError` naming the file when it is missing or unreadable.
    """
    from safetensors import safe_open

    source = Path(path)
    if not source.is_file():
        raise MmsecError(f"{source}: no such file")
    try:
        with safe_open(str(source), framework="pt", device=device) as handle:
            meta = dict(handle.metadata() or {})
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as exc:  # safetensors raises several unrelated types for a bad file
        raise MmsecError(f"{source}: not a readable safetensors file ({exc})") from None
    return tensors, meta
