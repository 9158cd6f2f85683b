"""Config system: NeMo's NEST YAML loads unchanged; interpolation, ???, overrides, validation, _target_ table, CLI."""
from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import pytest

from nest_ssl import nemo_compat
from nest_ssl.config import (
    ConfigError,
    Missing,
    apply_overrides,
    config_file_from_args,
    from_dict,
    load_yaml,
    parse_value,
    resolve,
)
from nest_ssl.data.config import DatasetConfig
from nest_ssl.optim import OptimConfig, SchedConfig
from nest_ssl.run_config import IGNORED_KEYS, RunConfig, load_config, schema_keys, warn_ignored

ROOT = Path(__file__).resolve().parents[1]
NEMO_YAML = ROOT / "tests/fixtures/spec/nest_fast-conformer.nemo.yaml"
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
MANIFESTS = ["model.train_ds.manifest_filepath=/tmp/train.json", "model.validation_ds.manifest_filepath=/tmp/val.json"]


@pytest.fixture(scope="module")
def nemo_plain() -> dict:
    return resolve(load_yaml(NEMO_YAML))


# ------------------------------------------------------------------------------------------- NeMo YAML, resolve
def test_nemo_yaml_resolves_interpolations_and_yaml11_floats(nemo_plain):
    m = nemo_plain["model"]
    assert m["optim"]["weight_decay"] == 1e-3 and isinstance(m["optim"]["weight_decay"], float)
    assert m["optim"]["sched"]["min_lr"] == 1e-6 and isinstance(m["optim"]["sched"]["min_lr"], float)
    assert m["optim"]["betas"] == [0.9, 0.98]
    assert m["preprocessor"]["dither"] == 1e-5
    assert m["train_ds"]["sample_rate"] == 16000 and m["preprocessor"]["sample_rate"] == 16000
    assert m["masking"]["feat_in"] == 80 and m["quantizer"]["feat_in"] == 80 and m["encoder"]["feat_in"] == 80
    assert m["quantizer"]["combine_time_steps"] == 8 and m["loss"]["combine_time_steps"] == 8  # chained via encoder
    assert m["decoder"]["feat_in"] == 512 and m["optim"]["sched"]["d_model"] == 512
    assert m["decoder"]["num_classes"] == 8192 and m["decoder"]["num_decoders"] == 1
    assert m["encoder"]["att_context_size"] == [-1, -1]
    assert nemo_plain["exp_manager"]["name"] == "SSL-NEST-FastConformer"
    fname = nemo_plain["exp_manager"]["checkpoint_callback_params"]["filename"]
    assert fname == "SSL-NEST-FastConformer--{val_loss:.3f}-{step}"


def test_nemo_yaml_keeps_mandatory_values(nemo_plain):
    assert nemo_plain["model"]["train_ds"]["manifest_filepath"] == "???"
    assert nemo_plain["model"]["validation_ds"]["manifest_filepath"] == "???"


@pytest.mark.parametrize("text,expected", [("1e-3", 1e-3), ("5e4", 5e4), ("-1.5E-2", -1.5e-2), ("1.0", 1.0),
                                           ("7", 7), ("[0.9,0.98]", [0.9, 0.98]), ("null", None), ("'1e-3'", "1e-3"),
                                           ('"a b"', "a b"), ("true", True), ("", ""), ("abc", "abc")])
def test_parse_value_reads_yaml(text, expected):
    value = parse_value(text)
    assert value == expected and type(value) is type(expected)


def test_whole_string_interpolation_keeps_type_and_nested_refs():
    raw = {"a": {"n": 3, "l": [1, 2], "d": {"x": 1}, "k": "n"}, "b": "${a.n}", "c": "${a.l}", "e": "${a.d}",
           "f": "x${a.n}y", "g": "${b}", "h": "${a.${a.k}}"}
    out = resolve(raw)
    assert out["b"] == 3 and out["c"] == [1, 2] and out["e"] == {"x": 1}
    assert out["f"] == "x3y" and out["g"] == 3 and out["h"] == 3
    out["c"].append(9)
    assert out["a"]["l"] == [1, 2]  # interpolated copies do not alias


@pytest.mark.parametrize("raw,needle", [({"a": "${b}", "b": "${a}"}, "cycle"), ({"a": "${a}"}, "cycle"),
                                        ({"a": {"b": "${a}"}}, "cycle"), ({"a": "${nope.x}"}, "nope.x")])
def test_interpolation_errors_name_the_key(raw, needle):
    with pytest.raises(ConfigError, match=needle):
        resolve(raw)


# ------------------------------------------------------------------------------------------------- overrides
def test_overrides_every_form_before_resolution():
    raw = load_yaml(NEMO_YAML)
    out = resolve(apply_overrides(raw, [
        "model.sample_rate=8000", "model.optim.betas=[0.8,0.9]", "model.optim.lr=1e-3", "name='my run'",
        "+model.train_ds.new_key=1", "~model.spec_augment", "++model.encoder.n_layers=4", "++trainer.extra=x",
        "exp_manager.exp_dir=null", "model.encoder.att_context_size.0=64",
    ]))
    m = out["model"]
    assert m["train_ds"]["sample_rate"] == 8000 and m["preprocessor"]["sample_rate"] == 8000
    assert m["optim"]["betas"] == [0.8, 0.9] and m["optim"]["lr"] == 1e-3
    assert out["name"] == "my run" and out["exp_manager"]["name"] == "my run"
    assert m["train_ds"]["new_key"] == 1 and "spec_augment" not in m
    assert m["encoder"]["n_layers"] == 4 and out["trainer"]["extra"] == "x" and out["exp_manager"]["exp_dir"] is None
    assert m["encoder"]["att_context_size"] == [64, -1]
    assert raw["model"]["sample_rate"] == 16000  # the input tree is not mutated


@pytest.mark.parametrize("override,needle", [
    ("model.nope=1", "model.nope"), ("+model.sample_rate=1", "model.sample_rate"), ("~model.nope", "model.nope"),
    ("model.sample_rate", "key=value"), ("model..x=1", "invalid"), ("model.optim.betas=[1,", "cannot parse"),
])
def test_bad_overrides_raise_naming_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.").replace("[", r"\[")):
        apply_overrides(load_yaml(NEMO_YAML), [override])


def test_a_key_the_schema_knows_is_set_without_plus_when_the_yaml_lacks_it():
    """configs/*.yaml stay NeMo's files, so our own keys (with schema defaults) are absent from them; a plain
    `a.b=v` must still set them, also below a section the YAML lacks. A misspelt key is refused."""
    raw = load_yaml(NEMO_YAML)
    assert "activation_checkpointing" not in raw["trainer"] and "async_save" not in \
        raw["exp_manager"]["checkpoint_callback_params"]
    del raw["exp_manager"]["checkpoint_callback_params"]
    out = apply_overrides(raw, ["trainer.activation_checkpointing=every_2",
                                "exp_manager.checkpoint_callback_params.async_save=true"], schema_keys)
    assert out["trainer"]["activation_checkpointing"] == "every_2"
    assert out["exp_manager"]["checkpoint_callback_params"] == {"async_save": True}
    for typo in ("trainer.activation_checkpointin=full", "model.encoder.not_a_key=1", "nope.x=1"):
        with pytest.raises(ConfigError, match=f"Could not override '{typo.split('.')[0]}[^']*': no such key"):
            apply_overrides(raw, [typo], schema_keys)
    with pytest.raises(ConfigError, match="no such key"):  # without a schema only the tree counts
        apply_overrides(raw, ["trainer.activation_checkpointing=full"])
    plain, run = load_config(NEMO_YAML, ["trainer.activation_checkpointing=full"])
    assert run.trainer.activation_checkpointing == "full"


# ---------------------------------------------------------------------------------------------- from_dict
@dataclass
class _Inner:
    x: int = 1
    tags: list[str] = field(default_factory=list)


@dataclass
class _Outer:
    name: str = "n"
    lr: float = 0.1
    flag: bool = False
    opt: Optional[int] = None
    size: tuple[int, int] = (1, 2)
    either: Union[int, list[int]] = 0
    inner: _Inner = field(default_factory=_Inner)
    free: dict = field(default_factory=dict)
    anything: Any = None
    path: str = "???"


@pytest.mark.parametrize("tp,value", [(Union[int, float], 1.0), (Union[int, float], 2), (Union[str, int], 16),
                                      (Union[int, str], "bf16"), (Optional[float], 1)])
def test_union_prefers_the_exact_type(tp, value):
    from nest_ssl.config import _convert

    out = _convert(tp, value, "k")
    assert out == value and (type(out) is type(value) or tp == Optional[float] and type(out) is float)


def test_from_dict_converts_by_annotation():
    cfg = from_dict(_Outer, {"lr": "1e-3", "opt": 5e4, "size": [3, 4], "either": [1, 2], "inner": {"x": 2.0},
                             "free": {"_target_": "x"}, "anything": [1], "name": 123}, "sec")
    assert cfg.lr == 1e-3 and cfg.opt == 50000 and type(cfg.opt) is int and cfg.size == (3, 4)
    assert cfg.either == [1, 2] and cfg.inner == _Inner(x=2) and cfg.free == {"_target_": "x"} and cfg.name == "123"
    assert isinstance(cfg.path, str)


@pytest.mark.parametrize("data,needle", [
    ({"flag": "yes"}, "sec.flag='yes'"), ({"lr": "fast"}, "sec.lr='fast'"), ({"inner": {"x": 1.5}}, "sec.inner.x=1.5"),
    ({"size": [1]}, "sec.size"), ({"opt": True}, "sec.opt=True"), ({"inner": 3}, "sec.inner=3"),
])
def test_from_dict_wrong_type_names_key_and_value(data, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.").replace("[", r"\[")):
        from_dict(_Outer, data, "sec")


def test_from_dict_unknown_key_names_path_and_valid_keys():
    with pytest.raises(ConfigError, match=r"'sec\.inner\.y'.*valid keys: \['tags', 'x'\]"):
        from_dict(_Outer, {"inner": {"y": 1}}, "sec")
    with pytest.raises(ValueError):  # ConfigError is a ValueError
        from_dict(_Outer, {"typo": 1}, "")


def test_mandatory_value_errors_at_use_with_full_path():
    cfg = from_dict(_Outer, {"path": "???", "inner": {"tags": "???"}}, "model.train_ds")
    assert repr(cfg.path) == "???" and "???" in repr(cfg)  # printing still works
    for use in (str, Path, bool, list, lambda v: f"{v}", lambda v: open(v)):
        with pytest.raises(ConfigError, match=r"model\.train_ds\.path is mandatory"):
            use(cfg.path)
    with pytest.raises(ConfigError, match=r"model\.train_ds\.inner\.tags"):
        iter(cfg.inner.tags)
    assert cfg.path == "???" and isinstance(cfg.path, Missing)


# ------------------------------------------------------------------------------------------- _target_ table
def test_unknown_target_is_an_error_naming_it_and_listing_known():
    with pytest.raises(ConfigError, match=r"model\.encoder\._target_='os\.system'.*known: \["):
        nemo_compat.target_class({"_target_": "os.system"}, "model.encoder")


def test_every_target_maps_to_a_class_with_a_canonical_nemo_path():
    for target, (module, name) in nemo_compat.TARGETS.items():
        assert module.startswith("nest_ssl.") and (target.startswith("nemo.") or target.endswith(f".{name}"))
        assert nemo_compat.NEMO_TARGET[(module, name)].startswith("nemo.collections.asr.")


def test_targets_written_with_our_former_module_paths_still_load():
    old = {"_target_": "nest_ssl.masking.RandomBlockMasking", "block_size": 4, "feat_in": 8}
    assert type(nemo_compat.instantiate(old, "model.masking")).__module__ == "nest_ssl.nest.masking"
    assert nemo_compat.model_class({"target": "nest_ssl.models.EncDecMaskedTokenPredModel"}).__name__ == \
        "EncDecMaskedTokenPredModel"


@pytest.mark.parametrize("key", ["preprocessor", "spec_augment", "masking", "quantizer", "decoder", "loss"])
def test_targets_of_nemo_yaml_validate_and_instantiate(nemo_plain, key):
    section = nemo_plain["model"][key]
    module = nemo_compat.instantiate(section, f"model.{key}")
    assert nemo_compat.nemo_target(module) == section["_target_"]
    with pytest.raises(ConfigError, match=rf"model\.{key}\.bogus"):
        nemo_compat.target_config({**section, "bogus": 1}, f"model.{key}")


def test_batch_augmentor_target_validates(nemo_plain):
    aug = nemo_plain["model"]["train_ds"]["batch_augmentor"]
    cfg = nemo_compat.target_config(aug, "model.train_ds.batch_augmentor")
    assert cfg.prob == 0.5 and cfg.max_r_noise == 20.0


# ----------------------------------------------------------------------------------- whole configs + CLI
@pytest.mark.parametrize("path", [NEMO_YAML, *CONFIGS], ids=lambda p: p.name)
def test_every_config_loads_and_validates(path):
    plain, run = load_config(path, MANIFESTS)
    assert run.model.encoder["_target_"] == "nemo.collections.asr.modules.ConformerEncoder"
    assert run.model.train_ds.manifest_filepath == "/tmp/train.json"
    heads = [e["decoder"] for e in plain["model"]["loss_list"].values()] if "loss_list" in plain["model"] \
        else [plain["model"]["decoder"]]  # contrastive recipes / NEST
    assert all(h["feat_in"] == plain["model"]["encoder"]["d_model"] for h in heads)


def test_configs_match_nemo_header_table():
    rows = {"s": (176, 4, 16, 9, 0.0, True), "m": (256, 4, 16, 9, 1e-3, True), "l": (512, 8, 17, 9, 1e-3, True),
            "xl": (1024, 8, 24, 9, 1e-3, False), "xxl": (1024, 8, 42, 5, 1e-3, False)}
    assert resolve(load_yaml(ROOT / "configs/nest_fast-conformer.yaml")) == resolve(load_yaml(NEMO_YAML))
    for size, (d, h, n, k, wd, flag) in rows.items():
        m = resolve(load_yaml(ROOT / f"configs/nest_fast-conformer_{size}.yaml"))["model"]
        e = m["encoder"]
        assert (e["d_model"], e["n_heads"], e["n_layers"], e["conv_kernel_size"]) == (d, h, n, k)
        assert m["optim"]["weight_decay"] == wd and e["xscaling"] is flag and e["use_bias"] is flag


def test_tiny_cpu_config_matches_parity_fixture_shapes():
    import json

    tiny = json.loads((ROOT / "tests/fixtures/parity/nest_tiny/config.json").read_text())["model"]
    m = resolve(load_yaml(ROOT / "configs/nest_tiny_cpu.yaml"))["model"]
    recipe = {"block_size", "mask_prob"}  # the demo recipe's masking (README, "Is it learning?"), not the fixture's
    m["masking"] = {k: v for k, v in m["masking"].items() if k not in recipe}
    tiny["masking"] = {k: v for k, v in tiny["masking"].items() if k not in recipe}
    for key in ("preprocessor", "masking", "quantizer", "encoder", "decoder", "loss"):
        assert m[key] == tiny[key], key


def test_config_path_and_name_args():
    path, rest = config_file_from_args(["--config-path", "configs", "--config-name", "nest_tiny_cpu", "a=1"])
    assert path == Path("configs/nest_tiny_cpu.yaml") and rest == ["a=1"]
    path, rest = config_file_from_args(["--config-name=x.yaml", "--config-path=d"])
    assert path == Path("d/x.yaml") and rest == []
    assert config_file_from_args(["--config", "c.yaml", "~a"]) == (Path("c.yaml"), ["~a"])
    assert config_file_from_args(["c.yaml", "a=1"]) == (Path("c.yaml"), ["a=1"])
    with pytest.raises(ConfigError, match="usage"):
        config_file_from_args(["a=1"])


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "nest_ssl.run_config", *args], cwd=ROOT, capture_output=True,
                          text=True)


def test_cli_prints_resolved_yaml_and_exit_codes():
    ok = _cli("--config-path", "configs", "--config-name", "nest_tiny_cpu", "model.num_classes=32", *MANIFESTS)
    assert ok.returncode == 0, ok.stderr
    printed = parse_value(ok.stdout)
    assert printed["model"]["num_classes"] == 32 and printed["model"]["decoder"]["num_classes"] == 32
    ckpt = printed["exp_manager"]["checkpoint_callback_params"]
    assert ckpt["filename"] == "SSL-NEST-tiny-cpu--{val_loss:.3f}-{step}"
    missing = _cli("configs/nest_tiny_cpu.yaml")  # printing works with ??? present, and the exit status says so
    assert missing.returncode == 1 and parse_value(missing.stdout)["model"]["train_ds"]["manifest_filepath"] == "???"
    assert "model.train_ds.manifest_filepath" in missing.stderr
    bad = _cli(str(NEMO_YAML), "model.encoder.d_modle=3")
    assert bad.returncode == 1 and "model.encoder.d_modle" in bad.stderr and bad.stdout == ""
    assert len(bad.stderr.strip().splitlines()) == 1


def test_cli_bad_file_exits_1():
    bad = _cli("no/such.yaml")
    assert bad.returncode == 1 and "no/such.yaml" in bad.stderr


@pytest.mark.parametrize("name", ["contrastive_fast-conformer", "contrastive_conformer_ssl"])
def test_contrastive_nemo_yaml_loads(name):
    path = ROOT / f"tests/fixtures/spec/{name}.nemo.yaml"
    plain, run = load_config(path, MANIFESTS)
    assert set(run.model.loss_list) == set(plain["model"]["loss_list"])
    assert nemo_compat.model_class(plain["model"]).__name__ == "SpeechEncDecSelfSupervisedModel"


def test_model_class_from_target(nemo_plain):
    assert nemo_compat.model_class(nemo_plain["model"]).__name__ == "EncDecDenoiseMaskedTokenPredModel"
    saved = {**nemo_plain["model"], "target": "nemo.collections.asr.models.ssl_models.EncDecMaskedTokenPredModel"}
    assert nemo_compat.model_class(saved).__name__ == "EncDecMaskedTokenPredModel"
    with pytest.raises(ConfigError, match=r"model\.target\._target_='x\.Y'"):
        nemo_compat.model_class({"target": "x.Y"})


def test_load_config_types_every_section_and_names_bad_keys():
    plain, run = load_config(NEMO_YAML, ["model.optim.lr=2.0", "trainer.max_steps=7"])
    assert run.name == "SSL-NEST-FastConformer" and run.seed == 0 and run.init_from_nemo_model is None
    assert run.model.optim.lr == 2.0 and run.model.optim.sched.d_model == 512
    assert run.trainer.max_steps == 7 and plain["trainer"]["max_steps"] == 7
    assert run.exp_manager.checkpoint_callback_params.filename.startswith("SSL-NEST-FastConformer--{val_loss")
    assert isinstance(run.model.train_ds.manifest_filepath, Missing)
    with pytest.raises(ConfigError, match=r"model\.train_ds\.manifest_filepath is mandatory"):
        Path(run.model.train_ds.manifest_filepath)
    with pytest.raises(ConfigError, match=r"'model\.encoder\.d_modle'"):
        load_config(NEMO_YAML, ["+model.encoder.d_modle=1"])
    with pytest.raises(ConfigError, match=r"model\.quantizer\._target_='my\.Evil'"):
        load_config(NEMO_YAML, ["model.quantizer._target_=my.Evil"])
    with pytest.raises(ConfigError, match=r"model\.num_books='two'"):
        load_config(NEMO_YAML, ["model.num_books=two"])


@pytest.mark.parametrize("section", ["", "model", "model.train_ds", "model.validation_ds", "model.optim",
                                     "model.optim.sched", "trainer", "exp_manager",
                                     "exp_manager.checkpoint_callback_params"])
@pytest.mark.parametrize("path", [NEMO_YAML, *CONFIGS], ids=lambda p: p.name)
def test_unknown_key_in_any_section_of_any_config_names_it(path, section):
    key = f"{section}.no_such_key" if section else "no_such_key"
    with pytest.raises(ConfigError, match=rf"'{key}'.*valid keys: \["):
        load_config(path, [*MANIFESTS, f"+{key}=1"])


@pytest.mark.parametrize("override,allowed", [
    ("trainer.precision=fp8", "'bf16-mixed'"), ("trainer.accelerator=tpu", "'cpu'"),
    ("trainer.strategy=deepspeed", "'fsdp'"),
    ("model.optim.name=lamb", "'adamw'"), ("model.optim.sched.name=Poly", "'NoamAnnealing'"),
    ("model.mask_position=middle", "'post_conv'"), ("exp_manager.checkpoint_callback_params.mode=best", "'max'"),
    ("+model.optim.sched.hold_steps=100", "None"), ("+model.optim.sched.frequency=2", "1"),
])
def test_variants_are_checked_once_and_list_the_allowed_values(override, allowed):
    key, value = override.lstrip("+").split("=")
    with pytest.raises(ConfigError, match=rf"{key}='?{value}'?: allowed values are \[.*{allowed}"):
        load_config(NEMO_YAML, [*MANIFESTS, override])


def test_ignored_keys_warn_only_when_set_to_another_value(recwarn):
    _, run = load_config(NEMO_YAML, MANIFESTS)
    assert warn_ignored(run) == [] and not recwarn.list  # NeMo's own YAML sets none of them
    with pytest.warns(UserWarning, match=r"model\.train_ds\.persistent_workers=True has no effect"):
        _, run = load_config(NEMO_YAML, [*MANIFESTS, "+model.train_ds.persistent_workers=true", "trainer.logger=true",
                                         "+model.preprocessor.stft_conv=true"])
    assert warn_ignored(run) == ["trainer.logger", "model.preprocessor.stft_conv", "model.train_ds.persistent_workers"]


def test_ignored_keys_table_names_real_fields_at_their_defaults(nemo_plain):
    import dataclasses

    run = RunConfig()
    run.model.train_ds = run.model.validation_ds = DatasetConfig()
    run.model.optim = OptimConfig(sched=SchedConfig())
    for key, (default, why) in IGNORED_KEYS.items():
        *parents, last = key.split(".")
        section = nemo_plain["model"].get(parents[1]) if len(parents) == 2 and parents[0] == "model" else None
        if isinstance(section, dict) and "_target_" in section:  # a targeted section: its class's config field
            fields = {f.name: f for f in dataclasses.fields(nemo_compat.target_class(section, key).config_class)}
            assert fields[last].default == default and why, key
            continue
        node = run
        for part in key.split("."):
            node = getattr(node, part)  # AttributeError: the table names a key the schema does not have
        assert node == default and why, key


def test_to_yaml_round_trips_plain_and_typed_values(nemo_plain):
    import dataclasses

    from nest_ssl.config import to_yaml

    text = to_yaml(nemo_plain)
    assert "manifest_filepath: ???" in text.replace("'???'", "???")
    assert resolve(parse_value(text)) == nemo_plain
    cfg = from_dict(_Outer, {"path": "???"}, "x")
    assert parse_value(to_yaml(dataclasses.asdict(cfg)))["size"] == [1, 2]


def test_mandatory_value_used_in_post_init_names_the_key():
    @dataclass
    class _Checked:
        d_model: int = 4

        def __post_init__(self):
            if self.d_model <= 0:
                raise ValueError(f"d_model={self.d_model!r} must be positive")

    with pytest.raises(ConfigError, match=r"model\.encoder\.d_model is mandatory"):
        from_dict(_Checked, {"d_model": "???"}, "model.encoder")
    with pytest.raises(ConfigError, match=r"model\.encoder: d_model=-1 must be positive"):
        from_dict(_Checked, {"d_model": -1}, "model.encoder")


@pytest.mark.parametrize("override,suggestion", [
    ("trainer.max_step=5", "did you mean trainer.max_steps?"),
    ("+trainer.max_step=5", "did you mean trainer.max_steps?"),
    ("model.train_ds.skip_bad_sample=false", "did you mean model.train_ds.skip_bad_samples?"),
    ("trainer.helth.enabled=false", "did you mean trainer.health?"),
    ("model.encoder.d_modle=64", "did you mean model.encoder.d_model?"),
])
def test_a_misspelled_key_suggests_the_nearest_valid_key_never_plus(override, suggestion):
    with pytest.raises(ConfigError) as err:
        load_config(NEMO_YAML, [*MANIFESTS, override])
    assert suggestion in str(err.value)
    assert "use +" not in str(err.value)  # the schema would reject the key: `+` is never the way out


def test_deleting_a_key_the_yaml_does_not_set_says_so():
    with pytest.raises(ConfigError, match=r"^Could not delete 'trainer.health.enabled': no such key$"):
        load_config(NEMO_YAML, [*MANIFESTS, "~trainer.health.enabled"])


def test_an_unknown_key_far_from_every_valid_one_lists_the_section_keys_not_plus():
    with pytest.raises(ConfigError, match=r"no such key; valid keys under 'trainer': \[.*'max_steps'") as err:
        load_config(NEMO_YAML, [*MANIFESTS, "trainer.zzzz=1"])
    assert "+" not in str(err.value)


@pytest.mark.parametrize("override,get", [
    ("model.train_ds.skip_bad_samples=false", lambda r: r.model.train_ds.skip_bad_samples is False),
    ("model.train_ds.max_bad_samples=3", lambda r: r.model.train_ds.max_bad_samples == 3),
    ("trainer.health.enabled=false", lambda r: r.trainer.health.enabled is False),
    ("model.encoder.attention_impl=torch", lambda r: r.model.encoder["attention_impl"] == "torch"),
])
def test_a_schema_key_absent_from_the_yaml_is_set_without_plus(override, get):
    _, run = load_config(NEMO_YAML, [*MANIFESTS, override])
    assert get(run)
