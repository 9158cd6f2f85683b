"""NeMo file formats: `.nemo` archives in and out, Lightning `.ckpt` files in. No NeMo, omegaconf or Lightning.

`.nemo`: a tar (plain as NeMo writes it, or gzipped) with `model_config.yaml` (the resolved `model` section plus
`target`) and `model_weights.ckpt` (`torch.save` of a dict of tensors under NeMo's state_dict keys). NeMo restores
weights with `torch.load(weights_only=True)`, so what we write holds tensors only.

Lightning `.ckpt` (NeMo's pretraining writes them): a `torch.save` zip whose `hyper_parameters` hold a pickled
omegaconf DictConfig (DictConfig, ListConfig, AnyNode, ContainerMetadata, Metadata, typing.Any, defaultdict), so
`torch.load(weights_only=True)` refuses it. Every torch zip here (a `.ckpt`, the `.nemo`'s weights, our own
checkpoints) is read by one allow-list unpickler: tensors are rebuilt from the zip's storages, the omegaconf
objects become inert stand-ins (no omegaconf code runs) turned into plain dicts/lists, and any other global is
refused with an error naming the file and the global. A damaged or cut file raises NemoFileError naming it.
"""
from __future__ import annotations

import _compat_pickle
import collections
import io
import os
import pickle
import struct
import tarfile
import tempfile
import typing
import zipfile
import zlib
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
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise NemoFileError(f"{path}: not a readable .nemo archive ({type(e).__name__}: {e})") from e


def _find(path: Path, members: dict, name: str, limit: int) -> tarfile.TarInfo:
    m = members.get(name)
    if m is None:
        raise NemoFileError(f"{path}: no {name} in the archive (members: {sorted(members)[:10]})")
    if m.size > limit:
        raise NemoFileError(f"{path}: archive member {m.name!r} is {m.size} bytes, over the {limit}-byte limit")
    return m


def read_nemo(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read a `.nemo` file -> (model config dict, state_dict of tensors under NeMo keys).

    A file cut anywhere before the tar's end-of-archive marker (two zero blocks after the last member) raises
    NemoFileError naming it; the record padding after the marker carries no data, so a cut there reads the same."""
    path = Path(path)
    try:
        with _open_tar(path) as tar:
            return _read_nemo_members(path, tar)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:  # a cut or damaged archive
        raise NemoFileError(f"{path}: damaged or truncated .nemo archive ({type(e).__name__}: {e})") from e


def _read_nemo_members(path: Path, tar: tarfile.TarFile) -> tuple[dict, dict[str, torch.Tensor]]:
    members = {}
    for m in tar.getmembers():
        _check_member(path, m)
        if m.isfile():
            members[os.path.normpath(m.name)] = m  # "./model_config.yaml" and "model_config.yaml" alike
    cfg_m = _find(path, members, CONFIG_NAME, MAX_CONFIG_BYTES)
    w_m = _find(path, members, WEIGHTS_NAME, MAX_WEIGHTS_BYTES)
    _check_end_marker(path, tar)
    try:
        cfg = yaml.safe_load(tar.extractfile(cfg_m).read().decode("utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise NemoFileError(f"{path}: {CONFIG_NAME} is not valid YAML ({e})") from e
    if not isinstance(cfg, dict):
        raise NemoFileError(f"{path}: {CONFIG_NAME} is not a mapping")
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / WEIGHTS_NAME
        with tar.extractfile(w_m) as src, open(weights, "wb") as dst:
            _copy_limited(src, dst, MAX_WEIGHTS_BYTES, f"{path}:{w_m.name}")
        state = read_torch_zip(weights, origin=f"{path}:{w_m.name}")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise NemoFileError(f"{path}: {WEIGHTS_NAME} is not a dict of tensors")
    return cfg, dict(state)


def _check_end_marker(path: Path, tar: tarfile.TarFile) -> None:
    """tarfile stops quietly at a cut header: a missing end-of-archive marker is how a cut after a member shows."""
    tar.fileobj.seek(tar.offset)
    if tar.fileobj.read(2 * tarfile.BLOCKSIZE) != bytes(2 * tarfile.BLOCKSIZE):
        raise NemoFileError(f"{path}: the archive ends without tar's end-of-archive marker after its last member "
                            f"(file cut or damaged at byte {tar.offset} or later)")


def _copy_limited(src, dst, limit: int, what: str) -> None:
    total = 0
    while chunk := src.read(1 << 22):  # tarfile raises ReadError("unexpected end of data") on a cut member
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


# ---- torch zip checkpoints (Lightning .ckpt, model_weights.ckpt, ours) ---------------------------------------


class _OmegaNode:
    """Stands in for a pickled omegaconf object: keeps the state `BUILD` hands it and runs no omegaconf code.

    omegaconf pickles every node as `cls.__new__(cls)` + `BUILD(state)`; the state of a container holds
    `_content` (dict or list of nodes), that of a leaf `_val`. `_parent` points back up (a cycle): never followed.
    """

    state: dict = {}

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"{type(self).__name__}: expected a dict state, got {type(state).__name__}")
        self.state = state


class _DictConfig(_OmegaNode):
    pass


class _ListConfig(_OmegaNode):
    pass


class _ValueNode(_OmegaNode):
    pass


class _Metadata(_OmegaNode):
    pass


def _codecs_encode(text, encoding="latin1"):
    """Protocol-2 pickles write `bytes` as `_codecs.encode(str, 'latin1')`; only that use is allowed."""
    if not isinstance(text, str) or encoding != "latin1":
        raise pickle.UnpicklingError(f"_codecs.encode({type(text).__name__}, {encoding!r}) is not a bytes literal")
    return text.encode("latin1")


# (module, name) as pickled (after Python 2 -> 3 name mapping) -> what it becomes. Nothing else is resolved.
_OMEGACONF_GLOBALS = {
    ("omegaconf.dictconfig", "DictConfig"): _DictConfig, ("omegaconf.listconfig", "ListConfig"): _ListConfig,
    **{("omegaconf.nodes", n): _ValueNode for n in ("AnyNode", "StringNode", "IntegerNode", "FloatNode",
                                                    "BooleanNode", "BytesNode", "PathNode")},
    ("omegaconf.base", "ContainerMetadata"): _Metadata, ("omegaconf.base", "Metadata"): _Metadata,
    ("typing", "Any"): typing.Any,
}
_PLAIN_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict, ("collections", "defaultdict"): collections.defaultdict,
    ("_codecs", "encode"): _codecs_encode, ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter, ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
    **{("builtins", t.__name__): t for t in (dict, list, tuple, set, frozenset, int, float, complex, str, bool,
                                             bytes, bytearray, slice)},
}
_STORAGES = {f"{n}Storage": getattr(torch, f"{n}Storage") for n in (
    "Float", "Double", "Half", "BFloat16", "Long", "Int", "Short", "Char", "Byte", "Bool")}
_DTYPES = {n: getattr(torch, n) for n in ("float32", "float64", "float16", "bfloat16", "int64", "int32", "int16",
                                          "int8", "uint8", "bool")}


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the globals above; tensor storages come from the zip's `<prefix>data/<key>` members."""

    def __init__(self, file, zf: zipfile.ZipFile, prefix: str, origin: str):
        super().__init__(file)
        self.zf, self.prefix, self.origin = zf, prefix, origin
        self.storages: dict[str, torch.storage.TypedStorage] = {}  # tensors that share a storage share it here too

    def find_class(self, module, name):
        pickled = f"{module}.{name}"
        if (module, name) in _compat_pickle.NAME_MAPPING:  # protocol 2 writes Python 2 names (__builtin__.long)
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        found = _OMEGACONF_GLOBALS.get((module, name)) or _PLAIN_GLOBALS.get((module, name))
        if found is None and module == "torch":
            found = _STORAGES.get(name) or _DTYPES.get(name)
        if found is None:
            raise NemoFileError(f"{self.origin}: the pickle refers to the global {pickled}, which is not on the "
                                f"allow-list of a model checkpoint (tensors, plain containers, omegaconf configs); "
                                f"refusing to load it")
        return found

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise NemoFileError(f"{self.origin}: unknown persistent id {str(pid)[:80]}")
        _, storage_type, key, _location, numel = pid
        if storage_type not in _STORAGES.values():
            raise NemoFileError(f"{self.origin}: persistent id names {storage_type!r}, not a tensor storage class")
        key = str(key)
        if key not in self.storages:
            member = f"{self.prefix}data/{key}"
            try:
                data = self.zf.read(member)
            except KeyError:
                raise NemoFileError(f"{self.origin}: storage {member} is missing (file damaged or cut)") from None
            dtype = storage_type._dtype  # torch.FloatStorage etc. carry their dtype as a class attribute
            if len(data) != numel * dtype.itemsize:
                raise NemoFileError(f"{self.origin}: storage {member} has {len(data)} bytes, expected "
                                    f"{numel} x {dtype.itemsize}")
            raw = torch.frombuffer(bytearray(data), dtype=torch.uint8).untyped_storage() if data else \
                torch.UntypedStorage(0)
            self.storages[key] = torch.storage.TypedStorage(wrap_storage=raw, dtype=dtype, _internal=True)
        return self.storages[key]


# What a damaged zip or pickle raises on the way; each becomes a NemoFileError naming the file.
_DAMAGE = (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, zlib.error, struct.error, OSError, ValueError,
           TypeError, KeyError, IndexError, AttributeError, RuntimeError, RecursionError, UnicodeDecodeError)


def _load_zip(zf: zipfile.ZipFile, origin: str):
    pkl = [n for n in zf.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
    if len(pkl) != 1:
        raise NemoFileError(f"{origin}: expected one data.pkl in the torch zip checkpoint, found {pkl}")
    prefix = pkl[0][: -len("data.pkl")]
    if f"{prefix}byteorder" in zf.namelist() and zf.read(f"{prefix}byteorder") != b"little":
        raise NemoFileError(f"{origin}: big-endian checkpoint; re-save it on a little-endian machine")
    return _RestrictedUnpickler(io.BytesIO(zf.read(pkl[0])), zf, prefix, origin).load()


def read_torch_zip(path: str | os.PathLike, origin: str | None = None):
    """Unpickle a `torch.save` zip file without torch.load, omegaconf or Lightning, through the allow-list.

    Tensors come back as real tensors, omegaconf containers as plain dicts/lists (`to_plain`); a global outside
    the allow-list, a damaged or cut file raise NemoFileError naming `origin` (default: the path)."""
    origin = origin or str(path)
    try:
        with zipfile.ZipFile(path) as zf:
            return to_plain(_load_zip(zf, origin))
    except NemoFileError:
        raise
    except _DAMAGE as e:
        raise NemoFileError(f"{origin}: damaged or truncated torch checkpoint ({type(e).__name__}: {e})") from e


def to_plain(obj):
    """omegaconf stand-ins -> plain dicts / lists / values; other containers keep their type; the class reference
    Lightning stores in `hparams_type` becomes its dotted name."""
    if isinstance(obj, _DictConfig):
        content = obj.state.get("_content")
        return {k: to_plain(v) for k, v in content.items()} if isinstance(content, dict) else content
    if isinstance(obj, _ListConfig):
        content = obj.state.get("_content")
        return [to_plain(v) for v in content] if isinstance(content, list) else content
    if isinstance(obj, _ValueNode):
        return obj.state.get("_val")
    if isinstance(obj, type) and issubclass(obj, _OmegaNode):
        return next(f"{m}.{n}" for (m, n), v in _OMEGACONF_GLOBALS.items() if v is obj)
    if isinstance(obj, dict):
        out = {k: to_plain(v) for k, v in obj.items()}
        return collections.OrderedDict(out) if isinstance(obj, collections.OrderedDict) else out
    if isinstance(obj, (list, tuple)):
        out = [to_plain(v) for v in obj]
        return out if isinstance(obj, list) else tuple(out)
    return obj


def read_ptl_checkpoint(path: str | os.PathLike) -> dict:
    """A Lightning `.ckpt` (NeMo's, or one of ours) as plain Python: `state_dict` of tensors, `hyper_parameters`
    as plain dicts, optimizer and scheduler states as saved."""
    path = Path(path)
    ckpt = read_torch_zip(path)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        keys = list(ckpt)[:10] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise NemoFileError(f"{path}: no 'state_dict' in the checkpoint (keys: {keys})")
    return ckpt
