"""Pretrained models in and out: `.nemo` / NeMo `.ckpt` / our checkpoints -> model, model -> `.nemo`, and the
encoder (optionally with its preprocessor) -> `torch.export` (.pt2) or ONNX, verified against eager.

File formats live in `nest_ssl.nemo_io` (archive safety, weights-only loading); this module only decides which
class to build (`model.target` through `nemo_compat`'s allow-list) and which `_target_`s to write (NeMo's, so NeMo's
`restore_from` loads what we save). Weights move with `load_state_dict(strict=True)`: our attribute names are
NeMo's state_dict keys, so there is no key mapping anywhere.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import os
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from nest_ssl import checkpoint, nemo_io
from nest_ssl.config import ConfigError, from_dict, resolve
from nest_ssl.nemo_compat import NEMO_TARGET, TARGETS, build_model, nemo_target
from nest_ssl.optim import OptimConfig, build_optimizer, build_scheduler

NEMO_VERSION = "2.6.2"  # the NeMo release whose numbers we match; written into saved configs like NeMo does
EXPORT_FORMATS = ("pt2", "onnx")


# ---- loading -----------------------------------------------------------------------------------------------


def read_checkpoint(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """(model config, state_dict under NeMo keys) from a `.nemo`, a NeMo Lightning `.ckpt`, one of our checkpoints
    or a sharded (DCP) checkpoint directory of an fsdp run.

    Every torch file goes through nemo_io's allow-list unpickler (never `torch.load(weights_only=False)`): a NeMo
    `.ckpt` keeps its config as `hyper_parameters['cfg']`, ours as the whole run config under `config`.
    """
    path = Path(path)
    if path.is_dir():
        from nest_ssl import dcp_checkpoint

        cfg, state = dcp_checkpoint.read_weights(path)
        return _model_section(cfg, path, "train_state.pt 'config'"), state
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".nemo":
        return nemo_io.read_nemo(path)
    return _ckpt_weights(nemo_io.read_ptl_checkpoint(path), path)


def _ckpt_weights(ckpt: dict, path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(model config, state_dict) of a loaded `.ckpt`: NeMo's (hyper_parameters['cfg']) or ours ('config')."""
    if "hyper_parameters" in ckpt:
        cfg = (ckpt["hyper_parameters"] or {}).get("cfg")
        return _model_section(cfg, path, "hyper_parameters['cfg']"), dict(ckpt["state_dict"])
    return _model_section(ckpt.get("config"), path, "'config'"), dict(ckpt["state_dict"])


def _model_section(cfg, path: Path, where: str) -> dict:
    """The `model` section of a whole run config, or the config itself when it already is one."""
    if isinstance(cfg, dict) and "encoder" not in cfg and isinstance(cfg.get("model"), dict):
        cfg = cfg["model"]
    if not isinstance(cfg, dict) or "encoder" not in cfg:
        raise nemo_io.NemoFileError(f"{path}: no model config (a mapping with 'encoder') in {where}")
    if "${" in repr(cfg):  # a Lightning .ckpt may keep NeMo's `${model.x}` interpolations unresolved
        cfg = resolve({"model": cfg})["model"]
    return cfg


def load_pretrained(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> nn.Module:
    """A ready model (eval mode) from a `.nemo`, a NeMo `.ckpt` or our checkpoint; weights loaded strictly."""
    cfg, state = read_checkpoint(path)
    model = build_model(cfg)
    model.load_state_dict(state, strict=True)
    model.model_cfg = cfg  # kept for save_nemo and feature extraction (not a module, not in the state_dict)
    return model.to(map_location).eval()


# ---- continuing a NeMo run --------------------------------------------------------------------------------

# The generic LRScheduler fields of a scheduler state; NeMo's schedule parameters (warmup_steps, max_steps, ...)
# come from the config instead, so a resumed run with a longer trainer.max_steps keeps its own.
_SCHED_KEYS = ("base_lrs", "last_epoch", "_step_count", "_last_lr", "_is_initial", "_get_lr_called_within_step")


def training_state(path: str | os.PathLike, model: nn.Module, optim_cfg: dict, ckpt: dict | None = None) -> dict:
    """The optimizer, scheduler and position of a NeMo Lightning `.ckpt`, as our training checkpoint holds them.

    Returns {"optimizer", "scheduler", "global_step", "epoch"}. The optimizer state is loaded into an optimizer
    built from `optim_cfg` (NeMo's `model.optim`) for `model` (weights already loaded), which checks the group
    layout; each moment tensor's shape is checked against its parameter's (torch does not). `ckpt`: the file
    already loaded, so a caller that has it does not unpickle it again.
    """
    path = Path(path)
    if ckpt is None:
        ckpt = nemo_io.read_ptl_checkpoint(path)
    if not ckpt.get("optimizer_states") or "global_step" not in ckpt:
        raise nemo_io.NemoFileError(f"{path}: no optimizer_states / global_step; not a Lightning training checkpoint")
    cfg = from_dict(OptimConfig, optim_cfg, "model.optim")
    optimizer = build_optimizer(model, cfg)
    try:
        optimizer.load_state_dict(ckpt["optimizer_states"][0])
    except (ValueError, KeyError) as e:
        raise nemo_io.NemoFileError(f"{path}: optimizer_states[0] does not fit {cfg.name} over this model ({e})") from e
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for i, st in optimizer.state_dict()["state"].items():
        bad = [k for k, v in st.items() if k != "step" and v.shape != params[i].shape]
        if bad:
            raise nemo_io.NemoFileError(f"{path}: optimizer state of parameter {i} ({bad[0]}) has shape "
                                        f"{tuple(st[bad[0]].shape)}, the parameter {tuple(params[i].shape)}")
    opt_state = optimizer.state_dict()  # before a scheduler is built: its first step would reset the lr
    sched_state = None
    if ckpt.get("lr_schedulers"):
        sched_state = {k: v for k, v in ckpt["lr_schedulers"][0].items() if k in _SCHED_KEYS}
        scheduler = build_scheduler(optimizer, cfg, None)
        if scheduler is None:
            raise nemo_io.NemoFileError(f"{path}: holds a scheduler state but model.optim has no sched")
        scheduler.load_state_dict(sched_state)
    return {"optimizer": opt_state, "scheduler": sched_state,
            "global_step": int(ckpt["global_step"]), "epoch": int(ckpt.get("epoch", 0))}


def to_training_checkpoint(src: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write `src` (a NeMo `.ckpt`, a `.nemo` or ours) as our training checkpoint.

    From a NeMo `.ckpt` it holds the AdamW state, scheduler, step and epoch, so a run continues from it
    (`exp_manager.resume_from_checkpoint`); the data order restarts at the beginning of that epoch (Lightning's
    loop counters do not map to our sampler). A `.nemo` holds weights only: the file has weights and config and
    loads through load_pretrained / init_from_nemo_model, not as a resume point. A sharded `.dcp` directory gives
    weights, optimizer, scheduler, step and config (dcp_checkpoint.to_single_file).
    """
    if Path(src).is_dir():
        from nest_ssl import dcp_checkpoint  # torch.distributed.checkpoint: loaded only for a sharded checkpoint

        return dcp_checkpoint.to_single_file(src, out)

    src = Path(src)
    if src.suffix == ".nemo" or not src.is_file():
        ckpt, (cfg, state) = None, read_checkpoint(src)  # read_checkpoint names a missing file
    else:
        ckpt = nemo_io.read_ptl_checkpoint(src)  # one read: weights, and for NeMo's the optimizer too
        cfg, state = _ckpt_weights(ckpt, src)
    model = build_model(cfg)
    model.load_state_dict(state, strict=True)
    body = {"format_version": checkpoint.FORMAT_VERSION, "state_dict": model.state_dict(), "global_step": 0,
            "config": {"model": cfg}}
    if ckpt is not None and "hyper_parameters" in ckpt:
        if "optim" not in cfg:
            raise nemo_io.NemoFileError(f"{src}: hyper_parameters['cfg'] has no optim section")
        ts = training_state(src, model, cfg["optim"], ckpt)
        loop = checkpoint.TrainState(step=ts["global_step"], epoch=ts["epoch"])
        body.update(ts, scaler=None, rng=checkpoint.rng_state(), train_state=dataclasses.asdict(loop),
                    loader={"epoch": ts["epoch"], "start": 0, "bad_samples": []})
    checkpoint.atomic_save(body, out)
    return Path(out)


# ---- saving ------------------------------------------------------------------------------------------------


def to_nemo_targets(node, path: str = "model"):
    """A copy with every `_target_` (ours or a NeMo alias) replaced by NeMo's canonical path; unknown ones raise."""

    if isinstance(node, dict):
        out = {k: to_nemo_targets(v, f"{path}.{k}") for k, v in node.items()}
        if "_target_" in out:
            t = out["_target_"]
            if t not in TARGETS:
                raise ConfigError(f"{path}._target_={t!r} is not a known target; known: {sorted(TARGETS)}")
            out["_target_"] = NEMO_TARGET[TARGETS[t]]
        return out
    if isinstance(node, (list, tuple)):
        return [to_nemo_targets(v, f"{path}[{i}]") for i, v in enumerate(node)]
    if isinstance(node, str) and "${" in node:
        raise ValueError(f"{path}={node!r} is an unresolved interpolation; resolve the config first "
                         "(nest_ssl.config.resolve), NeMo writes .nemo configs resolved")
    return node


def nemo_model_config(model: nn.Module, model_cfg: dict) -> dict:
    """The `model_config.yaml` NeMo expects: NeMo `_target_`s, `target` = NeMo's class path, `nemo_version`."""

    cfg = to_nemo_targets(copy.deepcopy(model_cfg))
    if cfg.get("mask_position") == "post_conv":
        # NeMo's post_conv sets quantizer.feat_in itself but keeps combine_time_steps from the config; written
        # here, NeMo builds the same quantizer projection as ours and loads the weights strictly.
        cfg["quantizer"].update(feat_in=cfg["encoder"]["d_model"], combine_time_steps=1)
    cfg["target"] = nemo_target(model)
    cfg.setdefault("nemo_version", NEMO_VERSION)
    return cfg


def save_nemo(model: nn.Module, model_cfg: dict, path: str | os.PathLike) -> Path:
    """Write `model` as a `.nemo` that NeMo's `restore_from` and our `load_pretrained` both load."""
    return nemo_io.write_nemo(path, nemo_model_config(model, model_cfg), model.state_dict())


# ---- export ------------------------------------------------------------------------------------------------


class EncoderForExport(nn.Module):
    """The encoder (optionally behind the preprocessor) as one graph: (x, lengths) -> (encoded (B, d, T'), len).

    x is audio (B, L) with the preprocessor, features (B, F, T) without. Built from the model's own submodules
    (shared, not copied), always in eval mode: no dither, no dropout, batch-norm running statistics.
    """

    def __init__(self, model: nn.Module, with_preprocessor: bool = False):
        super().__init__()
        self.encoder = model.encoder
        self.preprocessor = model.preprocessor if with_preprocessor else None
        self.featurizer, self.pad_to = None, 0
        if with_preprocessor:
            self.featurizer, self.pad_to = _export_featurizer(model.preprocessor.featurizer)
        enc_cfg = getattr(model.encoder, "cfg", None)
        self.feat_in = int(enc_cfg.feat_in if enc_cfg is not None else model.model_cfg["encoder"]["feat_in"])
        self.eval()

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.preprocessor is not None:
            # The featurizer directly: the preprocessor's input check syncs on tensor values (`bool(bad.any())`),
            # which torch.export cannot trace; the features are the same float32 ones.
            x, lengths = self.featurizer(x.to(torch.float32), lengths.to(torch.int64))  # (B, F, T)
            if self.pad_to:  # unconditional (a 0-frame pad is fine): a traced `if T % pad_to` would be baked in
                x = nn.functional.pad(x, (0, (-x.shape[-1]) % self.pad_to), value=self.featurizer.cfg.pad_value)
        return self.encoder(x, lengths)


def _export_featurizer(featurizer: nn.Module) -> tuple[nn.Module, int]:
    """A shallow copy (same buffers) that skips its own `pad_to` padding, and the pad_to the wrapper applies.

    The featurizer pads T to a multiple of pad_to only when T is not one already; torch.export would record that
    branch as a guard and reject audio whose frame count happens to be a multiple of pad_to.
    """
    pad_to = featurizer.cfg.pad_to
    if not isinstance(pad_to, int) or pad_to <= 0:  # 0 (none) or "max" (a static length): nothing to move
        return featurizer, 0
    shallow = copy.copy(featurizer)
    shallow.cfg = dataclasses.replace(featurizer.cfg, pad_to=0)
    return shallow, pad_to


def example_inputs(module: EncoderForExport, batch: int, time_steps: int, lengths=None, device="cpu", seed=0):
    """Random inputs for `module` (audio samples or feature frames); lengths default to full length."""
    g = torch.Generator().manual_seed(seed)
    if module.preprocessor is not None:
        x = torch.randn(batch, time_steps, generator=g) * 0.1  # (B, L) audio
    else:
        x = torch.randn(batch, module.feat_in, time_steps, generator=g)  # (B, F, T) features
    if lengths is None:
        lengths = torch.full((batch,), time_steps, dtype=torch.int64)
    return x.to(device), torch.as_tensor(lengths, dtype=torch.int64).to(device)


def _dynamic_shapes(module: EncoderForExport, min_time: int, max_time: int):
    # Dim.DYNAMIC (not a named Dim): shape guards the tracer cannot prove symbolically (e.g. on strided views)
    # narrow the range instead of failing the export; a dimension that gets specialised still raises.
    batch = torch.export.Dim("batch", min=1, max=1024)  # one named Dim: x and lengths share it (B = 1 included)
    t = torch.export.Dim.DYNAMIC(min=min_time, max=max_time)
    x_shape = {0: batch, 1: t} if module.preprocessor is not None else {0: batch, 2: t}
    return (x_shape, {0: batch})


def _no_check(*args, **kwargs) -> None:
    return None


@contextlib.contextmanager
def _without_value_checks(module: nn.Module):
    """Skip submodules' `_check_input` while tracing: they test tensor values (`bool((length > T).any())`), which
    torch.export cannot trace, and the dynamic-shape spec already fixes the layouts. (A check written as
    `if not torch.compiler.is_compiling(): ...` needs no help.)"""
    patched = [m for m in module.modules() if callable(getattr(type(m), "_check_input", None))]
    for m in patched:
        m.__dict__["_check_input"] = _no_check  # shadows the method on this instance only
    try:
        yield
    finally:
        for m in patched:
            m.__dict__.pop("_check_input", None)


def export_encoder(model: nn.Module, path: str | os.PathLike, with_preprocessor: bool = False, fmt: str = "pt2",
                   device: str = "cpu", example_time: int | None = None, min_time: int | None = None,
                   max_time: int | None = None) -> dict:
    """Export the encoder with dynamic batch and time; returns {"path", "format", "seconds", "program"}.

    Time bounds are in the input's unit: audio samples with the preprocessor, feature frames without.
    """
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"fmt={fmt!r}; allowed: {list(EXPORT_FORMATS)}")
    module = EncoderForExport(model, with_preprocessor).to(device)
    hop = module.preprocessor.hop_length if with_preprocessor else 1  # time bounds scale with the input's unit
    example_time = example_time or 64 * hop
    min_time, max_time = min_time or 16 * hop, max_time or 20000 * hop
    args = example_inputs(module, 2, example_time, device=device)
    dyn = _dynamic_shapes(module, min_time, max_time)
    path, t0 = Path(path), time.perf_counter()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with _without_value_checks(module):
            program = torch.export.export(module, args, dynamic_shapes=dyn, strict=False)
    except Exception as e:  # export raises many types (UserError, Unsupported, guard errors): re-raised with context
        what = "encoder with preprocessor" if with_preprocessor else "encoder"
        raise RuntimeError(f"torch.export of the {what} failed ({type(e).__name__}: {str(e)[:400]})"
                           + ("; try again without --with-preprocessor" if with_preprocessor else "")) from e
    if fmt == "pt2":
        torch.export.save(program, path)
    else:
        _onnx_export(program, path)
    return {"path": path, "format": fmt, "seconds": time.perf_counter() - t0, "program": program}


def onnx_available() -> bool:
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401 - torch.onnx's exporter (dynamo=True) is built on it
    except ImportError:
        return False
    return True


# Messages of torch's exporters that the user cannot act on; each filter matches one exact message and nothing else.
_ONNX_REGISTRY_LOGGER = "torch.onnx._internal.exporter._registration"
_TORCHVISION_NOTE = "torchvision is not installed"  # its ops are not ours: the registry skips them, 4 lines
_LEAFSPEC_NOTE = r"`isinstance\(treespec, LeafSpec\)` is deprecated"  # torch's own pytree call, during decomposition
_READONLY_BUFFER_NOTE = "The given buffer is not writable"  # torch.export.load reads weights from a bytes object


def _drop_torchvision_note(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(_TORCHVISION_NOTE)


@contextlib.contextmanager
def _quiet(logger_name: str, log_filter, *warning_messages: str):
    """Within: `log_filter` on one logger, and the warnings whose message starts with one of `warning_messages`
    ignored."""
    logger = logging.getLogger(logger_name)
    logger.addFilter(log_filter)
    try:
        with warnings.catch_warnings():
            for message in warning_messages:
                warnings.filterwarnings("ignore", message=message)
            yield
    finally:
        logger.removeFilter(log_filter)


def _onnx_export(program, path: Path) -> None:
    if not onnx_available():
        raise RuntimeError("ONNX export needs the `onnx` extra (pip install 'nest_ssl[onnx]': onnx, onnxscript)")
    with _quiet(_ONNX_REGISTRY_LOGGER, _drop_torchvision_note, _LEAFSPEC_NOTE):
        onnx_program = torch.onnx.export(program, dynamo=True, input_names=["x", "lengths"],
                                         output_names=["encoded", "encoded_len"])
    onnx_program.save(str(path))


def load_exported(path: str | os.PathLike):
    """A callable from a saved `.pt2` (torch.export.load(...).module())."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_READONLY_BUFFER_NOTE, category=UserWarning)
        return torch.export.load(str(path)).module()


def onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def load_onnx(path: str | os.PathLike):
    """A callable (x, lengths) -> (encoded, encoded_len) that runs a saved `.onnx` file with onnxruntime on the CPU
    (torch tensors in and out, on the inputs' device)."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def run(x: torch.Tensor, lengths: torch.Tensor):
        enc, enc_len = session.run(None, {"x": x.cpu().numpy(), "lengths": lengths.cpu().numpy()})
        return torch.from_numpy(enc).to(x.device), torch.from_numpy(enc_len).to(x.device)
    return run


def _exported_callable(exported) -> tuple:
    """(callable, what it is) for a `.onnx` / `.pt2` path, an ExportedProgram or any callable."""
    if isinstance(exported, (str, os.PathLike)) and str(exported).endswith(".onnx"):
        import onnxruntime

        return load_onnx(exported), f"{exported} with onnxruntime {onnxruntime.__version__}"
    if isinstance(exported, (str, os.PathLike)):
        return load_exported(exported), f"{exported} with torch.export.load"
    if isinstance(exported, torch.export.ExportedProgram):
        return exported.module(), "the in-memory torch.export program"
    return exported, "a callable"


def verify_export(model: nn.Module, exported, with_preprocessor: bool = False, n: int = 5, device: str = "cpu",
                  max_batch: int = 4, max_time: int | None = None, seed: int = 0) -> dict:
    """Run `exported` (a callable, an ExportedProgram, a .pt2 path, or a .onnx path run by onnxruntime) and eager on
    `n` random batches with random lengths; rel err = max|exported - eager| / max|eager| over valid frames, worst
    over the batches. The report's `checked` says what was run."""
    exported, checked = _exported_callable(exported)
    eager = EncoderForExport(model, with_preprocessor).to(device)
    hop = eager.preprocessor.hop_length if with_preprocessor else 1
    max_time = max_time or 200 * hop
    rng = torch.Generator().manual_seed(seed)
    worst, lengths_ok = 0.0, True
    for i in range(n):
        b = int(torch.randint(1, max_batch + 1, (1,), generator=rng))
        t = int(torch.randint(16 * hop, max_time + 1, (1,), generator=rng))
        lens = torch.randint(16 * hop, t + 1, (b,), generator=rng)
        lens[0] = t  # the longest utterance fills the batch, as in a real padded batch
        x, lens = example_inputs(eager, b, t, lens, device, seed=seed + i)
        with torch.no_grad():
            ref, ref_len = eager(x, lens)
            got, got_len = exported(x, lens)
        lengths_ok &= bool(torch.equal(ref_len.cpu(), got_len.cpu()))
        valid = (torch.arange(ref.shape[-1], device=ref.device)[None, :] < ref_len[:, None])[:, None, :]
        d = ((got - ref).abs() * valid).max()
        worst = max(worst, float(d / (ref.abs() * valid).max().clamp_min(1e-30)))
    return {"max_rel_err": worst, "lengths_equal": lengths_ok, "batches": n, "device": str(device), "checked": checked}


# ---- NeMo's init_from_* keys -------------------------------------------------------------------------------

INIT_KEYS = ("init_from_nemo_model", "init_from_ptl_ckpt")


def _partial(state: dict, include, exclude) -> dict:
    """NeMo's `load_part_of_state_dict` filter: keep a key when an `include` string is a substring of it and no
    `exclude` string is."""
    return {k: v for k, v in state.items() if any(p in k for p in include) and not any(e in k for e in exclude)}


def init_from_pretrained(model: nn.Module, run_cfg: dict) -> list[str]:
    """Apply the run config's top-level `init_from_nemo_model` / `init_from_ptl_ckpt` as NeMo does
    (`maybe_init_from_pretrained_checkpoint`): a path loads every weight, a mapping `{name: {path, include, exclude}}`
    loads the filtered part; both with `strict=False`. Then ours, `init_from_hf: DIR`: a transformers Parakeet
    directory's encoder, strictly (hf_export.init_from_hf). Returns one log line per source (keys loaded, missing).

    Both take weights only, as in NeMo: the AdamW state, scheduler and step of a `.ckpt` are not applied here. To
    continue a NeMo run with them, convert the `.ckpt` with `to_training_checkpoint` (`scripts/export.py --format
    ckpt`) and resume from the result."""
    if run_cfg.get("init_from_pretrained_model"):
        raise ValueError(f"init_from_pretrained_model={run_cfg['init_from_pretrained_model']!r} needs a download from "
                         "NVIDIA's catalogue; download the .nemo and give its path as init_from_nemo_model")
    lines = []
    for key in INIT_KEYS:
        spec = run_cfg.get(key)
        if spec is None:
            continue
        entries = {"": {"path": spec}} if isinstance(spec, str) else spec
        if not isinstance(entries, dict):
            raise ValueError(f"{key}={spec!r}: expected a path or a mapping name -> {{path, include, exclude}}")
        for name, entry in entries.items():
            where = f"{key}.{name}" if name else key
            if not isinstance(entry, dict) or "path" not in entry:
                raise ValueError(f"{where}={entry!r}: expected a mapping with 'path' (and optional include/exclude)")
            _, state = read_checkpoint(entry["path"])
            part = _partial(state, entry.get("include") or [""], entry.get("exclude") or [])
            result = model.load_state_dict(part, strict=False)
            lines.append(f"{where}: loaded {len(part)} tensors from {entry['path']}; "
                         f"{len(result.missing_keys)} model keys not in it, {len(result.unexpected_keys)} unexpected")
    if run_cfg.get("init_from_hf"):  # after NeMo's keys: the encoder it names wins
        from nest_ssl import hf_export  # safetensors: only for this key

        lines += hf_export.init_from_hf(model, run_cfg["init_from_hf"])
    return lines
