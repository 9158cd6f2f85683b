"""The run schema: NeMo's top-level YAML sections (`model`, `trainer`, `exp_manager`, ...) as typed dataclasses.

    plain, run = load_config("configs/nest_tiny_cpu.yaml", ["trainer.max_steps=10"])

`plain` is the resolved dict (written to the run directory and embedded in checkpoints); `run` is the validated
`RunConfig`. Untargeted sections are typed by their owners' dataclasses (data/config.py, optim.py, exp_manager.py
and `TrainerConfig` here); `_target_` sections stay plain dicts and are checked against the allow-list in
nemo_compat.py. CLI: `python -m nest_ssl.run_config FILE [overrides...]` (or `--config-path DIR --config-name NAME`)
prints the resolved YAML, or one `config error:` line and exit code 1.
"""
from __future__ import annotations

import dataclasses
import sys
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

from nest_ssl.config import (
    ConfigError,
    apply_overrides,
    blame_origin,
    config_file_from_args,
    dataclass_keys,
    from_dict,
    load_yaml,
    missing_keys,
    resolve_with_origins,
    to_yaml,
)
from nest_ssl.conformer.checkpointing import parse_mode
from nest_ssl.data.config import DatasetConfig
from nest_ssl.data.lhotse_config import strip_off_keys
from nest_ssl.exp_manager import ExpManagerConfig
from nest_ssl.fsdp import mixed_precision
from nest_ssl.health import HealthConfig
from nest_ssl.nemo_compat import TARGETS, target_class, validate_targets
from nest_ssl.optim import OptimConfig
from nest_ssl.probe import ProbeConfig

Precision = Literal[32, "32", "32-true", 16, "16", "16-mixed", "bf16", "bf16-mixed"]


@dataclass
class TrainerConfig:
    """NeMo/Lightning `trainer` keys with their Lightning meaning (the ignored ones are in IGNORED_KEYS)."""

    devices: Any = -1                 # -1 / "auto": all visible GPUs (torchrun decides the process count)
    num_nodes: int = 1
    max_epochs: Optional[int] = None  # None: 1000 unless max_steps is set (Lightning); -1: unlimited
    max_steps: int = -1
    val_check_interval: Union[int, float] = 1.0   # int: every n train batches; float: fraction of an epoch
    check_val_every_n_epoch: Optional[int] = 1
    accelerator: Literal["auto", "gpu", "cuda", "cpu"] = "auto"
    # one process per device under torchrun; DDP (Lightning's DDP spellings and auto mean it too) or FSDP2 (fsdp.py)
    strategy: Literal["auto", "ddp", "ddp_find_unused_parameters_false", "ddp_find_unused_parameters_true",
                      "fsdp"] = "ddp"
    accumulate_grad_batches: int = 1
    gradient_clip_val: Optional[float] = 0.0
    gradient_clip_algorithm: Literal["norm", "value"] = "norm"
    precision: Precision = 32
    log_every_n_steps: int = 50
    enable_progress_bar: bool = True
    num_sanity_val_steps: int = 2
    sync_batchnorm: bool = False
    enable_checkpointing: bool = False  # Lightning's own callback; exp_manager does checkpointing
    logger: Any = False                 # Lightning logger; exp_manager provides TensorBoard
    benchmark: Optional[bool] = False   # cudnn.benchmark
    deterministic: Any = False
    use_distributed_sampler: bool = True
    enable_model_summary: bool = True
    # ---- ours ----
    max_nonfinite_steps: int = 10     # consecutive skipped (non-finite) steps before the run stops
    compile: bool = False             # torch.compile each encoder layer (ConformerEncoder.compile_layers)
    compile_backend: str = "inductor"  # torch.compile backend (tests use aot_eager: no C++ compiler needed)
    fit_scan: bool = False            # run the largest batch once at start-up (nest_ssl/fit_scan.py)
    health: HealthConfig = field(default_factory=HealthConfig)  # health metrics at each log step (health.py)
    probe: ProbeConfig = field(default_factory=ProbeConfig)     # frozen-encoder probe every N steps (probe.py)
    activation_checkpointing: str = "none"  # none | full | every_<k>: Conformer layers recompute in backward
    collective_timeout: float = 300.0  # seconds a collective may wait for the other ranks before the run stops

    def __post_init__(self):
        if self.accumulate_grad_batches < 1:
            raise ValueError(f"trainer.accumulate_grad_batches={self.accumulate_grad_batches}; must be >= 1")
        if isinstance(self.val_check_interval, float) and not 0.0 < self.val_check_interval <= 1.0:
            raise ValueError(f"trainer.val_check_interval={self.val_check_interval}; a float must be in (0, 1]")
        if not self.collective_timeout > 0:
            raise ValueError(f"trainer.collective_timeout={self.collective_timeout}; must be > 0 seconds (a "
                             "collective waits at most this long for the other ranks)")
        if isinstance(self.val_check_interval, float) and self.check_val_every_n_epoch is None:
            raise ValueError(f"trainer.val_check_interval={self.val_check_interval} is a fraction of an epoch; with "
                             "trainer.check_val_every_n_epoch: null it must be an int (optimizer steps), as in NeMo")
        parse_mode(self.activation_checkpointing)
        if self.strategy == "fsdp":
            mixed_precision(self.precision)  # 16-mixed is refused under fsdp


@dataclass
class ModelConfig:
    """NeMo's `model` section. Targeted sections stay plain dicts (checked and built through nemo_compat)."""

    sample_rate: int = 16000
    num_classes: int = 8192
    num_books: int = 1
    code_dim: int = 16
    squeeze_single: bool = False
    mask_position: Literal["pre_conv", "post_conv"] = "pre_conv"
    train_ds: Optional[DatasetConfig] = None
    validation_ds: Optional[DatasetConfig] = None
    preprocessor: Optional[dict] = None
    spec_augment: Optional[dict] = None  # the contrastive model applies it; NEST (as NeMo's) never does
    masking: Optional[dict] = None
    quantizer: Optional[dict] = None
    encoder: Optional[dict] = None
    decoder: Optional[dict] = None
    loss: Optional[dict] = None
    optim: Optional[OptimConfig] = None
    decoder_out: Optional[int] = None   # contrastive SSL (SpeechEncDecSelfSupervisedModel) only
    loss_list: Optional[dict] = None    # contrastive SSL: {name: {decoder: {_target_...}, loss: {...}, ...}}
    target: Optional[str] = None        # NeMo writes these two into saved configs
    nemo_version: Optional[str] = None


@dataclass
class RunConfig:
    name: str = "SSL-NEST-FastConformer"
    model: ModelConfig = field(default_factory=ModelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    exp_manager: ExpManagerConfig = field(default_factory=ExpManagerConfig)
    init_from_nemo_model: Optional[Any] = None  # a path, or NeMo's {name: {path, include, exclude}}
    init_from_pretrained_model: Optional[Any] = None  # NGC model name: needs a download, refused at train()
    init_from_ptl_ckpt: Optional[Any] = None
    init_from_hf: Optional[str] = None  # ours: a transformers Parakeet directory; its encoder, loaded strictly
    seed: int = 0


_DS_IGNORED = {
    "use_start_end_token": (False, "text tokens are not used by SSL pretraining"),
    "labels": (None, "text labels are not used by SSL pretraining"),
    "parser": ("en", "text is not parsed by SSL pretraining"),
    "normalize": (False, "text is not normalized by SSL pretraining"),
    "int_values": (False, "audio is always read as float"),
    "concat_shuffle": (True, "concatenated datasets are always shuffled by the sampler"),
    "bucketing_weights": (None, "use batch_duration / num_buckets"),
    "defer_setup": (False, "loaders are built when training starts"),
    "global_rank": (None, "the rank comes from torchrun"),
    "world_size": (None, "the world size comes from torchrun"),
    "bucketing_strategy": ("synced_randomized", "it applies to bucketing_batch_size (not supported); batch_duration "
                           "buckets are reshuffled every epoch"),
    "persistent_workers": (False, "workers restart every epoch: the datasets seed their draws from the epoch"),
}

# NeMo / Lightning keys a NeMo YAML may carry that have no effect here: key -> (the value under which ignoring it
# changes nothing, why). Any other value warns once per key. The *_kwargs of the W&B / MLflow loggers are inert
# without their create_* switch and are not listed.
IGNORED_KEYS: dict[str, tuple[Any, str]] = {
    "trainer.enable_checkpointing": (False, "exp_manager writes the checkpoints"),
    "trainer.logger": (False, "exp_manager writes TensorBoard logs"),
    "trainer.deterministic": (False, "seeded CPU runs are reproducible without it; GPU kernels are not forced"),
    "trainer.use_distributed_sampler": (True, "the data loaders always shard by rank"),
    "trainer.enable_model_summary": (True, "the parameter count is always logged"),
    "model.optim.sched.monitor": ("loss", "ReduceLROnPlateau is not supported"),
    "model.preprocessor.stft_exact_pad": (False, "deprecated in NeMo, which ignores it too"),
    "model.preprocessor.stft_conv": (False, "deprecated in NeMo, which ignores it too"),
    "model.spec_augment.use_numba_spec_augment": (False, "the vectorised torch path always runs"),
    "model.encoder.use_pytorch_sdpa": (False, "attention runs NeMo's explicit math (or our kernel)"),
    "exp_manager.resume_past_end": (False, "a finished run resumes and stops at once"),
    "exp_manager.summary_writer_kwargs": (None, "TensorBoard runs with its defaults"),
    "exp_manager.create_wandb_logger": (False, "only TensorBoard is written"),
    "exp_manager.create_mlflow_logger": (False, "only TensorBoard is written"),
    "exp_manager.files_to_copy": (None, "the resolved config is the only file copied into the run directory"),
    "exp_manager.log_step_timing": (True, "step timing is part of the progress line"),
    "exp_manager.log_local_rank_0_only": (False, "only global rank 0 logs"),
    "exp_manager.log_global_rank_0_only": (False, "only global rank 0 logs"),
    "exp_manager.disable_validation_on_resume": (True, "the sanity validation never runs on resume"),
    "exp_manager.max_time_per_run": (None, "use SLURM's time limit with preemption signals"),
    **{f"exp_manager.checkpoint_callback_params.{key}": value for key, value in {
        "filepath": (None, "use dirpath and filename"),
        "verbose": (True, "checkpoint paths are always logged"),
        "save_last": (True, "the -last checkpoint is always written (resume needs it)"),
        "save_weights_only": (False, "checkpoints always hold the full training state"),
        "auto_insert_metric_name": (True, "metric names are always inserted"),
        "every_n_epochs": (1, "checkpoints follow validation (trainer.val_check_interval)"),
        "every_n_train_steps": (None, "checkpoints follow validation (trainer.val_check_interval)"),
        "train_time_interval": (None, "checkpoints follow validation (trainer.val_check_interval)"),
        "postfix": (".nemo", "the .nemo file is always <prefix or name>.nemo"),
        "save_best_model": (False, "the best model goes to .nemo with always_save_nemo"),
        "save_nemo_on_train_end": (True, "the .nemo file follows always_save_nemo"),
        "model_parallel_size": (None, "no model parallelism"),
        "save_on_train_epoch_end": (False, "checkpoints follow validation"),
        "save_last_n_optim_states": (-1, "every checkpoint holds the optimizer state"),
    }.items()},
    **{f"model.{ds}.{key}": value for ds in ("train_ds", "validation_ds") for key, value in _DS_IGNORED.items()},
}


def warn_ignored(run: RunConfig) -> list[str]:
    """Warn about each IGNORED_KEYS entry set to another value (Python shows a given warning once); returns the keys."""
    hits = []
    for key, (default, why) in IGNORED_KEYS.items():
        *parents, last = key.split(".")
        node: Any = run
        for part in parents:  # dataclass sections, or the plain dicts of `_target_` sections
            node = node.get(part) if isinstance(node, dict) else getattr(node, part, None)
        value = node.get(last, default) if isinstance(node, dict) else getattr(node, last, default)
        if value != default:
            warnings.warn(f"{key}={value!r} has no effect in nest_ssl ({why})", UserWarning, stacklevel=2)
            hits.append(key)
    return hits


def build_run_config(plain: dict) -> RunConfig:
    """Typed view of a resolved plain dict; every section checked (unknown keys, types, `_target_`)."""
    plain = _without_lhotse_off_keys(plain)
    run = from_dict(RunConfig, plain, "")
    validate_targets(plain)
    warn_ignored(run)
    return run


def _without_lhotse_off_keys(plain: dict) -> dict:
    """`use_lhotse: true` sections may carry NeMo Lhotse keys we do not implement, switched off
    (data/lhotse_config.py); they are dropped here, and one switched on is an error naming it."""
    model = plain.get("model")
    if not isinstance(model, dict):
        return plain
    model = dict(model)
    for ds in ("train_ds", "validation_ds", "test_ds"):
        section = model.get(ds)
        if isinstance(section, dict) and section.get("use_lhotse") is True:
            model[ds] = strip_off_keys(section, f"model.{ds}")
    return {**plain, "model": model}


def _section_class(tp: Any, node: Any) -> type | None:
    """The dataclass that types a section: its annotation's (Optional unwrapped), or its `_target_`'s config_class."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = options[0] if len(options) == 1 else None
    if dataclasses.is_dataclass(tp):
        return tp
    if isinstance(node, dict) and node.get("_target_") in TARGETS:
        return getattr(target_class(node, "?"), "config_class", None)
    return None


def schema_keys(tree: dict, parts: list[str]) -> list[str] | None:
    """The keys RunConfig accepts under section `parts` of a raw config tree (None: not fixed by the schema), so
    that every documented key is settable with a plain `a.b=v` override (config.apply_overrides)."""
    tp, node = RunConfig, tree
    for part in parts:
        cls = _section_class(tp, node)
        if cls is None:
            return None
        hints = typing.get_type_hints(cls)
        if part not in hints:
            return []
        tp, node = hints[part], node.get(part) if isinstance(node, dict) else None
    cls = _section_class(tp, node)
    return None if cls is None else dataclass_keys(cls)


def load_config(path: str | Path, overrides: typing.Iterable[str] = ()) -> tuple[dict, RunConfig]:
    """YAML file + overrides -> (resolved plain dict, validated RunConfig)."""
    plain, origins = resolve_with_origins(apply_overrides(load_yaml(path), overrides, schema_keys))
    try:
        return plain, build_run_config(plain)
    except ConfigError as e:
        blamed = blame_origin(e, origins)
        if blamed is e:
            raise
        raise blamed from e


USAGE = """usage: python -m nest_ssl.run_config (FILE | --config FILE | --config-path DIR --config-name NAME)
                                        [OVERRIDE ...]

Print the resolved run config (interpolations filled in, overrides applied) as YAML after validating it.
OVERRIDE: Hydra's syntax: a.b=1 (set), +a.new=1 (add), ++a.b=1 (set or add), ~a.b (delete).
Exit status: 0 valid and complete; 1 a config error, or a mandatory value ('???') still unset (the YAML is printed,
the unset keys are named on stderr)."""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(USAGE)
        return 0
    try:
        path, overrides = config_file_from_args(argv)
        plain, _ = load_config(path, overrides)
    except ValueError as e:  # ConfigError, or an owner's __post_init__
        print(f"config error: {e}", file=sys.stderr)
        return 1
    sys.stdout.write(to_yaml(plain))
    missing = missing_keys(plain)
    if missing:
        print(f"config error: mandatory value ('???') not set: {', '.join(missing)}; set it in the YAML or on the "
              f"command line ({missing[0]}=...)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
