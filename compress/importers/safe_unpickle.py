"""Read a ``torch.save`` pickle of whole modules without running anything from it.

Every class the pickle names becomes an inert :class:`Record` (its dotted path, constructor arguments and
state) unless it is one of a few loaders that only rebuild tensors and containers. Classes from modules
outside an allow-list of module prefixes are refused, naming them, before anything is built.
"""

from __future__ import annotations

import _compat_pickle
import collections
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from compress.errors import CheckpointError


class Record:
    """An inert stand-in for an object of class ``path``: nothing of the original class runs."""

    path = "?"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args
        self.kwargs = kwargs
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state

    @property
    def name(self) -> str:
        """The class name (last part of the path)."""
        return self.path.rsplit(".", 1)[-1]

    def attrs(self) -> dict[str, Any]:
        """The instance ``__dict__`` as pickled (or {} when the state is not a mapping)."""
        if isinstance(self.state, dict):
            return self.state
        if isinstance(self.state, tuple) and self.state and isinstance(self.state[0], dict):
            return self.state[0]
        return {}

    def __getitem__(self, key: str) -> Any:  # Records of mappings (OmegaConf) are read like dicts
        return self.attrs()[key]

    def __repr__(self) -> str:
        return f"Record({self.path})"


_record_classes: dict[str, type[Record]] = {}


def record_class(path: str) -> type[Record]:
    """The (cached) Record subclass standing for the class at dotted ``path``."""
    cls = _record_classes.get(path)
    if cls is None:
        cls = type(path.rsplit(".", 1)[-1], (Record,), {"path": path})
        _record_classes[path] = cls
    return cls


def _reconstructor(cls: Any, base: Any, state: Any) -> Any:
    """copyreg._reconstructor for protocol < 2 pickles, building a Record instead of calling ``base``."""
    obj = cls() if isinstance(cls, type) and issubclass(cls, Record) else Record()
    return obj


def _rebuild_parameter(data: torch.Tensor, requires_grad: bool, backward_hooks: Any, *_: Any) -> torch.Tensor:
    return data  # a plain tensor: parameters and buffers are told apart by the module's own dicts


def _rebuild_tensor(storage: Any, offset: int, size: Any, stride: Any, *_: Any) -> torch.Tensor:
    # Type-checked here: only a storage we built from the archive ever reaches this.
    if not isinstance(storage, _Storage):
        raise CheckpointError("the pickle rebuilds a tensor from something that is not a stored tensor")
    flat = storage.tensor
    return flat.as_strided(tuple(size), tuple(stride), offset) if flat.numel() else flat.new_empty(tuple(size))


class _Storage:
    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


class _StorageType:
    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype


_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}

# Real callables the pickle may use: they only rebuild tensors and plain containers.
_SAFE = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    **{("builtins", t.__name__): t
       for t in (set, frozenset, dict, list, tuple, int, float, complex, str, bool, bytes, slice)},
    ("copyreg", "_reconstructor"): _reconstructor,
    ("torch", "Size"): tuple,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles into Records; refuses classes from modules not matching ``allowed_prefixes``."""

    def __init__(self, file: Any, archive: zipfile.ZipFile, prefix: str, allowed_prefixes: tuple[str, ...],
                 source: str) -> None:
        super().__init__(file)
        self.archive = archive
        self.prefix = prefix
        self.allowed = allowed_prefixes
        self.source = source
        self.classes: set[str] = set()

    def find_class(self, module: str, name: str) -> Any:
        # Protocol-2 pickles name builtins the Python 2 way; map them back as pickle itself does.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        safe = _SAFE.get((module, name))
        if safe is not None:
            return safe
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        path = f"{module}.{name}"
        if not any(module == p or module.startswith(p + ".") for p in self.allowed):
            raise CheckpointError(
                f"{self.source} names class {path}, which no Fast-FoundationStereo checkpoint holds; refused "
                "(nothing from the file was run)"
            )
        self.classes.add(path)
        return record_class(path)

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise CheckpointError(f"{self.source}: unexpected persistent id {pid!r} in the pickle")
        _, stype, key, _location, numel = pid[:5]
        dtype = stype.dtype if isinstance(stype, _StorageType) else torch.uint8
        try:
            raw = self.archive.read(f"{self.prefix}data/{key}")
        except KeyError:
            raise CheckpointError(f"{self.source} is truncated or damaged: tensor data {key} is missing") from None
        tensor = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype) if raw else torch.empty(0, dtype=dtype)
        if tensor.numel() != numel and numel is not None and tensor.numel() < numel:
            raise CheckpointError(f"{self.source} is truncated: tensor data {key} is shorter than recorded")
        return _Storage(tensor)


def safe_load(path: str | Path, allowed_prefixes: tuple[str, ...]) -> tuple[Any, set[str]]:
    """The pickled object of a ``torch.save`` zip archive, rebuilt from Records; and the class paths it names."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise CheckpointError(
            f"{path} is not a torch.save archive (not a zip file: truncated, damaged or saved in the legacy format)"
        ) from None
    with archive:
        names = archive.namelist()
        pkl = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
        if not pkl:
            raise CheckpointError(f"{path} is not a torch.save archive (it holds no data.pkl)")
        prefix = pkl[0][: -len("data.pkl")]
        try:
            with archive.open(pkl[0]) as f:
                unpickler = RestrictedUnpickler(f, archive, prefix, allowed_prefixes, str(path))
                obj = unpickler.load()
        except CheckpointError:
            raise
        except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, ValueError, TypeError, AttributeError,
                IndexError, KeyError, RuntimeError) as exc:
            raise CheckpointError(f"{path} could not be read (truncated or damaged): {exc}") from None
    return obj, unpickler.classes
