"""NeMo file formats: `.nemo` archives in and out, Lightning `.ckpt` weights in. No NeMo, no omegaconf.

`.nemo` (spec 7.1): a tar (plain, or gzipped when read) with `model_config.yaml` (the resolved `model` section plus
`target`) and `model_weights.ckpt` (`torch.save` of a plain dict of tensors under NeMo's state_dict keys). NeMo
restores weights with `torch.load(weights_only=True)`, so what we write holds tensors only.

Lightning `.ckpt` (spec 7.2): a torch zip checkpoint whose `hyper_parameters` hold a pickled omegaconf DictConfig, so
`torch.load(weights_only=True)` refuses it. `read_ptl_checkpoint` unpickles it with an allow-list: torch's tensor
rebuild functions and containers are real, every omegaconf / Lightning / typing object becomes an inert `_Opaque`
placeholder whose code never runs, and any other global is refused with its name.
"""
from __future__ import annotations

import _compat_pickle
import collections
import io
import os
import pickle
import tarfile
import tempfile
import zipfile
from pathlib import Path

import torch
import yaml

CONFIG_NAME = "model_config.yaml"
WEIGHTS_NAME = "model_weights.ckpt"
MAX_CONFIG_BYTES = 16 * 2**20  # a model config is a few KB; anything this big is not one
MAX_WEIGHTS_BYTES = 64 * 2**30  # larger than any NEST model (XXL in fp32 is ~5 GB)


class NemoFileError(ValueError):
    """A `.nemo` or `.ckpt` file that is malformed or unsafe; the message names the file and member."""


# ---- .nemo ------------------------------------------------------------------------------------------


def _check_member(path: Path, m: tarfile.TarInfo) -> None:
    name = m.name
    if name.startswith("/") or os.path.isabs(name):
        raise NemoFileError(f"{path}: archive member {name!r} has an absolute path; refusing to read it")
    if ".." in Path(name).parts:
        raise NemoFileError(f"{path}: archive member {name!r} points outside the archive ('..'); refusing to read it")
    if m.issym() or m.islnk():
        raise NemoFileError(f"{path}: archive member {name!r} is a link; refusing to read it")
    if not (m.isfile() or m.isdir()):
        raise NemoFileError(f"{path}: archive member {name!r} is not a regular file or directory; refusing to read it")


def _open_tar(path: Path) -> tarfile.TarFile:
    try:
        return tarfile.open(path, "r:*")  # plain tar (NeMo's "w:") or gzip, as NeMo's reader accepts
    except (tarfile.TarError, OSError) as e:
        raise NemoFileError(f"{path}: not a readable .nemo archive ({e})") from e


def _find(path: Path, members: dict, name: str, limit: int) -> tarfile.TarInfo:
    m = members.get(name)
    if m is None:
        raise NemoFileError(f"{path}: no {name} in the archive (members: {sorted(members)[:10]})")
    if m.size > limit:
        raise NemoFileError(f"{path}: archive member {m.name!r} is {m.size} bytes, over the {limit}-byte limit")
    return m


def read_nemo(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read a `.nemo` file -> (model config dict, state_dict of tensors under NeMo keys)."""
    path = Path(path)
    with _open_tar(path) as tar:
        members = {}
        for m in tar.getmembers():
            _check_member(path, m)
            if m.isfile():
                members[os.path.normpath(m.name)] = m  # "./model_config.yaml" and "model_config.yaml" alike
        cfg_m = _find(path, members, CONFIG_NAME, MAX_CONFIG_BYTES)
        w_m = _find(path, members, WEIGHTS_NAME, MAX_WEIGHTS_BYTES)
        cfg = yaml.safe_load(tar.extractfile(cfg_m).read().decode("utf-8"))
        if not isinstance(cfg, dict):
            raise NemoFileError(f"{path}: {CONFIG_NAME} is not a mapping")
        with tempfile.TemporaryDirectory() as tmp:
            weights = Path(tmp) / WEIGHTS_NAME
            with tar.extractfile(w_m) as src, open(weights, "wb") as dst:
                _copy_limited(src, dst, MAX_WEIGHTS_BYTES, f"{path}:{w_m.name}")
            state = torch.load(weights, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise NemoFileError(f"{path}: {WEIGHTS_NAME} is not a dict of tensors")
    return cfg, dict(state)


def _copy_limited(src, dst, limit: int, what: str) -> None:
    total = 0
    while chunk := src.read(1 << 22):
        total += len(chunk)
        if total > limit:  # the header's size can lie in a crafted stream
            raise NemoFileError(f"{what}: more than {limit} bytes; refusing to read it")
        dst.write(chunk)


def write_nemo(path: str | os.PathLike, model_cfg: dict, state_dict: dict[str, torch.Tensor]) -> Path:
    """Write a `.nemo` that NeMo's `restore_from` loads; atomic (temp file + rename)."""
    path = Path(path)
    bad = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise NemoFileError(f"{path}: state_dict values must be tensors (NeMo loads weights_only); not: {bad[:5]}")
    weights = io.BytesIO()
    # A plain dict of contiguous CPU tensors: loadable with weights_only=True, no views into larger storages.
    torch.save({k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}, weights)
    cfg_bytes = yaml.safe_dump(model_cfg, sort_keys=False).encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tarfile.open(tmp, "w:") as tar:  # uncompressed, as NeMo writes it
        root = tarfile.TarInfo(".")
        root.type, root.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(root)
        for name, data in ((CONFIG_NAME, cfg_bytes), (WEIGHTS_NAME, weights.getvalue())):
            info = tarfile.TarInfo("./" + name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    os.replace(tmp, path)
    return path


# ---- Lightning .ckpt --------------------------------------------------------------------------------


class _Opaque:
    """Stands in for an omegaconf / Lightning object inside a checkpoint; keeps its pickled state, runs nothing."""

    state = None  # NEWOBJ skips __init__; BUILD then hands the pickled state to __setstate__

    def __setstate__(self, state):
        self.state = state


def opaque_to_plain(obj):
    """Turn pickled omegaconf containers (as `_Opaque` placeholders) back into plain dicts/lists/values."""
    if isinstance(obj, _Opaque):
        st = obj.state if isinstance(obj.state, dict) else {}
        if "_content" in st:
            return opaque_to_plain(st["_content"])
        return opaque_to_plain(st.get("_val"))
    if isinstance(obj, dict):
        return {k: opaque_to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [opaque_to_plain(v) for v in obj]
    return obj


_OPAQUE_PREFIXES = ("omegaconf.", "typing.", "pytorch_lightning.", "lightning.", "lightning_fabric.", "nemo.")
_TORCH_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"), ("torch", "Size"), ("torch", "device"),
}
_BUILTIN_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict, ("collections", "defaultdict"): collections.defaultdict,
    ("builtins", "set"): set, ("builtins", "frozenset"): frozenset, ("builtins", "slice"): slice,
    ("builtins", "complex"): complex, ("builtins", "dict"): dict, ("builtins", "list"): list,
    ("builtins", "tuple"): tuple, ("builtins", "int"): int, ("builtins", "float"): float, ("builtins", "str"): str,
    ("builtins", "bool"): bool, ("builtins", "object"): object, ("builtins", "type"): type,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, zf: zipfile.ZipFile, prefix: str, origin: Path):
        super().__init__(file)
        self.zf, self.prefix, self.origin = zf, prefix, origin
        self.opaque: dict[str, type] = {}

    def find_class(self, module, name):
        if (module, name) in _compat_pickle.NAME_MAPPING:  # protocol-2 pickles use Python 2 names (__builtin__.long)
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) in _BUILTIN_GLOBALS:
            return _BUILTIN_GLOBALS[(module, name)]
        if (module, name) in _TORCH_GLOBALS or (module == "torch" and name.endswith("Storage")):
            return getattr(__import__(module, fromlist=[name]), name)
        if module == "torch" and name in ("float32", "float64", "float16", "bfloat16", "int64", "int32", "bool"):
            return getattr(torch, name)
        if (module + ".").startswith(_OPAQUE_PREFIXES) or module in ("enum", "copyreg", "pathlib"):
            key = f"{module}.{name}"
            if module == "copyreg" and name == "_reconstructor":
                return lambda cls, base, state: cls() if isinstance(cls, type) and issubclass(cls, _Opaque) else \
                    _Opaque()
            return self.opaque.setdefault(key, type(name, (_Opaque,), {"__module__": module}))
        raise NemoFileError(f"{self.origin}: checkpoint refers to {module}.{name}, which is not on the allow-list")

    def persistent_load(self, pid):
        kind, storage_type, key, _location, numel = pid
        if kind != "storage":
            raise NemoFileError(f"{self.origin}: unknown persistent id kind {kind!r}")
        data = self.zf.read(f"{self.prefix}data/{key}")
        dtype = storage_type._dtype  # torch.FloatStorage etc. carry their dtype as a class attribute
        raw = torch.UntypedStorage(0)
        if data:
            raw = torch.frombuffer(bytearray(data), dtype=torch.uint8).untyped_storage()
        return torch.storage.TypedStorage(wrap_storage=raw, dtype=dtype, _internal=True)


def read_ptl_checkpoint(path: str | os.PathLike) -> dict:
    """Load a Lightning `.ckpt` without omegaconf or Lightning. Returns the checkpoint dict; its `state_dict` holds
    real tensors under NeMo keys, `hyper_parameters` holds inert placeholders."""
    path = Path(path)
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise NemoFileError(f"{path}: not a torch zip checkpoint ({e})") from e
    with zf:
        pkl = [n for n in zf.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pkl) != 1:
            raise NemoFileError(f"{path}: expected one data.pkl in the checkpoint, found {pkl}")
        prefix = pkl[0][: -len("data.pkl")]
        ckpt = _RestrictedUnpickler(io.BytesIO(zf.read(pkl[0])), zf, prefix, path).load()
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise NemoFileError(f"{path}: no 'state_dict' in the checkpoint (keys: {list(ckpt)[:10]})")
    return ckpt


def load_nemo_weights(path: str | os.PathLike) -> tuple[dict | None, dict[str, torch.Tensor]]:
    """(model config, weights) from a `.nemo` or a NeMo Lightning `.ckpt` (config None if it holds none)."""
    path = Path(path)
    if path.suffix == ".nemo":
        return read_nemo(path)
    ckpt = read_ptl_checkpoint(path)
    cfg = opaque_to_plain((ckpt.get("hyper_parameters") or {}).get("cfg"))
    weights = {k: v for k, v in ckpt["state_dict"].items() if isinstance(v, torch.Tensor)}
    return (cfg if isinstance(cfg, dict) else None), weights
