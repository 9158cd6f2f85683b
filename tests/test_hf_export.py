"""nest_ssl.hf_export: NEST encoders to and from transformers' ParakeetEncoder (issue 28)."""
import dataclasses
import runpy
import sys
from pathlib import Path

import pytest
import torch

from nest_ssl import export, hf_export
from nest_ssl.nemo_compat import build_model
from nest_ssl.run_config import load_config

transformers = pytest.importorskip("transformers")  # the hf extra is in dev; without it `--format hf` is one line
REPO = Path(__file__).resolve().parents[1]
NEMO = REPO / "tests" / "fixtures" / "nemo_files" / "nest_tiny_train.nemo"
TINY = ("nest_tiny_cpu.yaml", [])
L_SHAPED = ("nest_fast-conformer_l.yaml", ["model.encoder.n_layers=1"])  # d_model 512, 8 heads, ff 2048
XL_SHAPED = ("nest_fast-conformer_xl.yaml", ["model.encoder.n_layers=1"])  # d_model 1024, use_bias false, no xscale
# HF runs the same fp32 math in another order (its attention scores in one matmul with the masked position term);
# the measure on NEST tiny was 2.6e-7. 1e-4 is --verify's threshold.
HF_RTOL = 1e-4


def script_main(path: str):
    """`main` of a script, run in this process (a subprocess would import torch and transformers again)."""
    return runpy.run_path(str(REPO / path))["main"]


def randomized(config: str, overrides: list, seed: int):
    """A model of `configs/config` with every encoder tensor random (biases, BN statistics and pos biases too), so a
    dropped, swapped or zero-initialised tensor shows."""
    plain, _ = load_config(REPO / "configs" / config, overrides)
    model = build_model(plain["model"])
    model.model_cfg = plain["model"]
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, t in model.encoder.state_dict().items():
            if not t.is_floating_point():
                continue
            if "running_var" in key:
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif t.dim() >= 2 and "pos_bias" not in key:  # a weight: unit-variance outputs, as at init
                t.copy_(torch.randn(t.shape, generator=g) * (t[0].numel() ** -0.5))
            else:  # biases, norms, BN statistics, pos biases: large enough that a swapped one shows
                t.copy_(torch.randn(t.shape, generator=g) * 0.5)
    return model.eval()


def load_hf(path):
    model, info = transformers.AutoModel.from_pretrained(str(path), output_loading_info=True)
    assert type(model).__name__ == "ParakeetEncoder"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model


@pytest.mark.parametrize("config,overrides", [TINY, L_SHAPED, XL_SHAPED], ids=["tiny", "L-shaped", "XL-shaped"])
def test_ours_to_hf_to_ours_is_bit_identical_and_hf_matches(tmp_path, config, overrides):
    model = randomized(config, overrides, seed=1)
    out = hf_export.save_hf(model, tmp_path / "hf")
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", "preprocessor_config.json",
                                               "README.md"}
    hf = load_hf(out)
    assert hf.config.convolution_bias == hf.config.attention_bias == model.encoder.cfg.use_bias
    rep = hf_export.verify_hf(model, out, n=2, max_batch=2, max_time=120)
    assert rep["lengths_equal"] and rep["max_rel_err"] < HF_RTOL, rep

    back = randomized(config, overrides, seed=2)  # other weights everywhere, so nothing matches by accident
    lines = export.init_from_pretrained(back, {"init_from_hf": str(out)})
    for key, t in model.encoder.state_dict().items():
        assert torch.equal(back.encoder.state_dict()[key], t), key
    assert "encoder tensors (encoder.*) from" in lines[0] and "decoder" in lines[1] and "quantizer" in lines[1]


def test_post_conv_drops_its_wrapper_and_mask_embedding(tmp_path):
    model = randomized("nest_tiny_cpu.yaml", ["model.mask_position=post_conv"], seed=3)
    out = hf_export.save_hf(model, tmp_path / "hf")
    load_hf(out)
    back = randomized("nest_tiny_cpu.yaml", ["model.mask_position=post_conv"], seed=4)
    fresh_mask = back.encoder.state_dict()["pre_encode.masking.mask_embedding"].clone()
    lines = hf_export.init_from_hf(back, out)
    for key, t in model.encoder.state_dict().items():
        want = fresh_mask if key == "pre_encode.masking.mask_embedding" else t  # SSL-only: starts fresh
        assert torch.equal(back.encoder.state_dict()[key], want), key
    # the aliases pre_encoder.pre_encode.* are the loaded tensors; pre_encoder.masking is the fresh mask embedding
    assert "encoder.pre_encode.masking" in lines[1] and "pre_encoder.pre_encode" not in lines[1], lines


def test_nemo_written_file_exports_to_hf_and_verifies(tmp_path, capsys):
    out = tmp_path / "hf"
    assert script_main("scripts/export.py")([str(NEMO), "--format", "hf", "--out", str(out), "--verify", "1"]) == 0
    printed = capsys.readouterr().out
    assert "max rel err" in printed and "lengths equal" in printed and "features:" in printed
    hf = load_hf(out)
    ours = export.load_pretrained(NEMO)
    assert torch.equal(hf.state_dict()["layers.1.self_attn.relative_k_proj.weight"],
                       ours.state_dict()["encoder.layers.1.self_attn.linear_pos.weight"])
    card = (out / "README.md").read_text()
    assert str(NEMO) in card and "quantizer, the decoder and the masking" in card


def test_feature_extractor_matches_our_preprocessor_on_valid_frames(tmp_path):
    model = export.load_pretrained(NEMO)
    out = hf_export.save_hf(model, tmp_path / "hf")
    rep = hf_export.compare_features(model, out)
    # the same float32 ops (torch.stft, slaney mel, log(x + 2^-24), per-feature std + 1e-5) in the same order
    assert rep["lengths_equal"] and rep["max_abs_diff"] < 1e-5, rep
    assert rep["frames_ours"] % 16 == 0 and rep["frames_hf"] < rep["frames_ours"]  # ours: pad_to 16


ENCODER_REFUSALS = [
    ("self_attention_model", "abs_pos"), ("att_context_size", [64, 0]), ("conv_context_size", "causal"),
    ("causal_downsampling", True), ("conv_norm_type", "layer_norm"), ("subsampling", "striding"),
    ("untie_biases", False), ("feat_out", 32), ("reduction", "pooling"), ("feat_in", 81),
]


@pytest.mark.parametrize("key,value", ENCODER_REFUSALS, ids=[k for k, _ in ENCODER_REFUSALS])
def test_unrepresentable_encoder_settings_are_refused_by_name(key, value):
    model = export.load_pretrained(NEMO)
    fields = hf_export._hf_config_fields()
    assert hf_export.unsupported(model.encoder.cfg, fields) == []
    problems = hf_export.unsupported(dataclasses.replace(model.encoder.cfg, **{key: value}), fields)
    assert len(problems) == 1 and problems[0].startswith(f"model.encoder.{key}={value!r}"), problems


def test_use_bias_false_needs_convolution_bias_in_transformers():
    cfg = dataclasses.replace(export.load_pretrained(NEMO).encoder.cfg, use_bias=False)
    fields = hf_export._hf_config_fields()
    assert hf_export.unsupported(cfg, fields) == []
    problems = hf_export.unsupported(cfg, fields - {"convolution_bias"})  # a transformers before convolution_bias
    assert len(problems) == 1 and "model.encoder.use_bias=False" in problems[0] and "upgrade" in problems[0]


PREPROCESSOR_REFUSALS = [("normalize", "all_features"), ("window", "hamming"), ("log", False), ("mag_power", 1.0),
                         ("lowfreq", 20), ("highfreq", 7000.0), ("frame_splicing", 3), ("exact_pad", True),
                         ("log_zero_guard_value", 1e-5), ("log_zero_guard_type", "clamp"), ("mel_norm", None)]


@pytest.mark.parametrize("key,value", PREPROCESSOR_REFUSALS, ids=[k for k, _ in PREPROCESSOR_REFUSALS])
def test_unrepresentable_preprocessor_settings_are_refused_by_name(key, value):
    cfg = export.load_pretrained(NEMO).preprocessor.cfg
    assert hf_export.unsupported_preprocessor(cfg) == []
    problems = hf_export.unsupported_preprocessor(dataclasses.replace(cfg, **{key: value}))
    assert len(problems) == 1 and problems[0].startswith(f"model.preprocessor.{key}={value!r}"), problems


def test_export_refuses_a_transformers_without_a_config_key_it_needs(tmp_path, monkeypatch):
    fields = hf_export._hf_config_fields()
    monkeypatch.setattr(hf_export, "_hf_config_fields", lambda: fields - {"scale_input"})  # an older release
    with pytest.raises(ValueError, match=r"ParakeetEncoderConfig has no \['scale_input'\]; upgrade transformers"):
        hf_export.save_hf(randomized("nest_tiny_cpu.yaml", [], seed=0), tmp_path / "hf")


def test_export_refuses_a_model_hf_cannot_represent(tmp_path):
    model = randomized("nest_tiny_cpu.yaml", ["model.encoder.conv_norm_type=layer_norm"], seed=0)
    with pytest.raises(ValueError, match=r"model.encoder.conv_norm_type='layer_norm'"):
        hf_export.save_hf(model, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_init_from_hf_refuses_a_different_encoder(tmp_path):
    out = hf_export.save_hf(randomized("nest_tiny_cpu.yaml", [], seed=0), tmp_path / "hf")
    other = randomized("nest_tiny_cpu.yaml", ["model.encoder.xscaling=false"], seed=0)
    with pytest.raises(ValueError, match=r"scale_input: True there, False here"):
        export.init_from_pretrained(other, {"init_from_hf": str(out)})
    with pytest.raises(FileNotFoundError, match="not a Hugging Face model directory"):
        hf_export.init_from_hf(other, tmp_path)


def test_init_from_hf_takes_the_encoder_of_a_parakeet_ctc_model(tmp_path):
    model = randomized("nest_tiny_cpu.yaml", [], seed=5)
    encoder = load_hf(hf_export.save_hf(model, tmp_path / "enc"))
    ctc = transformers.ParakeetForCTC(transformers.ParakeetCTCConfig(encoder_config=encoder.config.to_dict(),
                                                                     vocab_size=5, pad_token_id=4))
    ctc.encoder.load_state_dict(encoder.state_dict())
    ctc.save_pretrained(tmp_path / "ctc")
    back = randomized("nest_tiny_cpu.yaml", [], seed=6)
    hf_export.init_from_hf(back, tmp_path / "ctc")  # ctc_head.* is not the encoder's and is left out
    for key, t in model.encoder.state_dict().items():
        assert torch.equal(back.encoder.state_dict()[key], t), key


def test_format_hf_refuses_flags_it_would_ignore(tmp_path, capsys):
    main = script_main("scripts/export.py")
    assert main([str(NEMO), "--format", "hf", "--out", str(tmp_path / "hf"), "--with-preprocessor"]) == 1
    assert "--with-preprocessor do not apply to --format hf" in capsys.readouterr().err


def test_init_from_hf_is_a_run_config_key():
    _, run = load_config(REPO / "configs" / "nest_tiny_cpu.yaml", ["+init_from_hf=enc_hf"])
    assert run.init_from_hf == "enc_hf"


def test_format_hf_without_transformers_is_one_line_naming_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` raises ImportError
    assert script_main("scripts/export.py")([str(NEMO), "--format", "hf", "--out", str(tmp_path / "hf")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'nest_ssl[hf]'" in err, err
    assert not (tmp_path / "hf").exists()


def test_readme_finetuning_example_runs(tmp_path, capsys):
    out = hf_export.save_hf(export.load_pretrained(NEMO), tmp_path / "hf")
    assert script_main("scripts/examples/finetune_hf_ctc.py")([str(out), "--steps", "3"]) == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]  # "ctc loss A -> B after 3 steps"
    first, last = (float(x) for x in summary.split("ctc loss ")[1].split(" after")[0].split(" -> "))
    assert last < first  # three AdamW steps on the same six utterances lower the CTC loss
    readme = (REPO / "README.md").read_text()
    assert "python scripts/examples/finetune_hf_ctc.py" in readme


@pytest.mark.slow
def test_pretraining_continues_from_an_hf_encoder(tmp_path, capsys):
    from nest_ssl.train import train
    from tests.train_support import make_data

    out = hf_export.save_hf(export.load_pretrained(NEMO), tmp_path / "hf")
    data = make_data(tmp_path / "demo")
    plain, _ = load_config(REPO / "configs" / "nest_tiny_cpu.yaml", [
        f"model.train_ds.manifest_filepath={data['train']}", f"model.validation_ds.manifest_filepath={data['val']}",
        f"exp_manager.exp_dir={tmp_path / 'run'}", "trainer.max_steps=1", "trainer.val_check_interval=1",
        "model.train_ds.batch_size=2", "model.validation_ds.batch_size=2", f"+init_from_hf={out}"])
    result = train(plain)
    assert len(result["losses"]) == 1 and torch.isfinite(torch.tensor(result["losses"])).all()
    printed = capsys.readouterr().out
    assert f"init_from_hf: 92 encoder tensors (encoder.*) from {out / 'model.safetensors'}" in printed
    assert "init_from_hf: fresh (not in the source): decoder, mask_processor, preprocessor, quantizer" in printed
