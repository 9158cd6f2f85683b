"""NEST models: plumbing with a stub encoder (masks, tokens from clean, bad input, stats, post_conv), and, once the
real encoder exists, NEST-L's state_dict/param counts against NeMo and the nest_tiny forward."""
import copy
import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn

import nest_ssl.nest.model as models
from conftest import PARITY, SPEC
from nest_ssl.nest.model import EncDecDenoiseMaskedTokenPredModel, EncDecMaskedTokenPredModel

TINY = json.loads((PARITY / "nest_tiny" / "config.json").read_text())["model"]


def _length_after(n, times=3):
    for _ in range(times):
        n = torch.div(n - 1, 2, rounding_mode="floor") + 1
    return n


class _StubPreEncode(nn.Module):
    def __init__(self, feat_in, d_model):
        super().__init__()
        self.out = nn.Linear(8 * feat_in, d_model)

    def forward(self, x, lengths):  # (B, T, F) -> (B, T/8, d_model)
        B, T, Fd = x.shape
        return self.out(x.reshape(B, T // 8, 8 * Fd)), _length_after(lengths)


@dataclass
class _StubConfig:
    feat_in: int = 80
    d_model: int = 64


class _StubEncoder(nn.Module):
    """Conv-subsampling-shaped stand-in for ConformerEncoder: same interface, one linear layer."""

    def __init__(self, cfg):
        super().__init__()
        self.pre_encode = _StubPreEncode(cfg.feat_in, cfg.d_model)
        self.layer = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, audio_signal, length):
        x, n = self.pre_encode(audio_signal.transpose(1, 2), length)
        x = x + x.mean(1, keepdim=True)  # mixes frames, as attention does: masked outputs see unmasked inputs
        return (x + torch.tanh(self.layer(x))).transpose(1, 2), n


@pytest.fixture
def stub_encoder(monkeypatch):
    real = models.build_section

    def build(cfg, key):
        if key == "encoder":
            return _StubEncoder(_StubConfig(cfg["encoder"]["feat_in"], cfg["encoder"]["d_model"]))
        return real(cfg, key)

    monkeypatch.setattr(models, "build_section", build)


def _audio(seed=0, lengths=(4000, 6400, 3000)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(lengths), max(lengths), generator=g) * 0.1
    for b, n in enumerate(lengths):
        x[b, n:] = 0
    return x, torch.tensor(lengths)


def test_forward_shapes_and_masks_from_noisy_lengths(stub_encoder):
    torch.manual_seed(0)
    model = EncDecDenoiseMaskedTokenPredModel.from_config(TINY).eval()
    clean, lens = _audio()
    noisy = clean + 0.01 * torch.randn_like(clean)
    noisy_lens = torch.tensor([4000, 3200, 3000])
    lp, enc_len, masks, tokens = model(input_signal=clean, input_signal_length=lens, noisy_input_signal=noisy,
                                       noisy_input_signal_length=noisy_lens, apply_mask=True,
                                       generator=torch.Generator().manual_seed(1))
    T = masks.shape[2]
    assert lp.shape == (3, T // 8, 64, 2) and tokens.shape == (3, T // 8, 2) and masks.shape == (3, 80, T)
    assert masks[1, :, 3200 // 160:].sum() == 0  # masks follow the noisy lengths
    # tokens come from the CLEAN features
    feats, _ = model.preprocessor(clean, lens)
    assert torch.equal(tokens, model.quantizer(feats)[1])


def test_injected_masks_are_applied(stub_encoder):
    model = EncDecDenoiseMaskedTokenPredModel.from_config(TINY).eval()
    clean, lens = _audio()
    masks = torch.zeros(3, 80, 48)
    masks[:, :, 8:24] = 1
    seen = {}
    model.encoder.register_forward_pre_hook(lambda m, a: seen.update(x=a[0]))
    _, _, out_masks, _ = model(input_signal=clean, input_signal_length=lens, noisy_input_signal=clean,
                               noisy_input_signal_length=lens, masks=masks)
    assert torch.equal(out_masks, masks)
    assert torch.equal(seen["x"][:, :, 8:24], model.mask_processor.mask_embedding.view(1, -1, 1).expand(3, 80, 16))


def test_training_step_reports_masked_tokens_and_no_token_events(stub_encoder):
    model = EncDecDenoiseMaskedTokenPredModel.from_config(TINY).train()

    @dataclass
    class Batch:
        audio: torch.Tensor
        audio_len: torch.Tensor
        noise: torch.Tensor
        noise_len: torch.Tensor
        noisy_audio: torch.Tensor
        noisy_audio_len: torch.Tensor

    clean, lens = _audio(lengths=(700, 600, 500))  # short: only the fixed [0, 8) block, no 7/8-masked token
    batch = Batch(clean, lens, torch.zeros_like(clean), lens, clean, lens)
    out = model.training_step(batch, generator=torch.Generator().manual_seed(0))
    assert out["no_token"] == 1 and out["masked_tokens"] == 0 and out["loss"].item() == 0.0
    out["loss"].backward()
    clean, lens = _audio(lengths=(48000, 40000, 32000))
    batch = Batch(clean, lens, torch.zeros_like(clean), lens, clean, lens)
    out = model.validation_step(batch, generator=torch.Generator().manual_seed(0))
    assert out["masked_tokens"] > 0 and torch.isfinite(out["val_loss"])


def test_bad_input_raises(stub_encoder):
    model = EncDecDenoiseMaskedTokenPredModel.from_config(TINY)
    clean, lens = _audio()
    with pytest.raises(ValueError, match="clean signal shape"):
        model(input_signal=clean, input_signal_length=lens, noisy_input_signal=clean[:, :100],
              noisy_input_signal_length=lens)
    with pytest.raises(ValueError, match="masks shape"):
        model(input_signal=clean, input_signal_length=lens, noisy_input_signal=clean, noisy_input_signal_length=lens,
              masks=torch.zeros(3, 80, 40))
    bad = copy.deepcopy(TINY)
    bad["quantizer"]["num_books"] = 1
    with pytest.raises(ValueError, match="num_books=1"):
        EncDecDenoiseMaskedTokenPredModel.from_config(bad)
    bad = copy.deepcopy(TINY)
    bad["mask_position"] = "middle"
    with pytest.raises(ValueError, match="mask_position"):
        EncDecMaskedTokenPredModel.from_config(bad)


def test_post_conv_masks_pre_encoded_frames_and_trains_pre_encode(stub_encoder):
    cfg = copy.deepcopy(TINY)
    cfg["mask_position"] = "post_conv"
    cfg["masking"]["mask_prob"] = 0.3
    model = EncDecDenoiseMaskedTokenPredModel.from_config(cfg).train()
    assert model.encoder.pre_encode is model.pre_encoder and model.pre_encoder.masking is model.mask_processor
    assert model.quantizer.cfg.combine_time_steps == 1 and model.mask_processor.cfg.block_size == 40 // 8
    clean, lens = _audio(lengths=(48000, 40000, 32000))
    lp, enc_len, masks, tokens = model(input_signal=clean, input_signal_length=lens, noisy_input_signal=clean,
                                       noisy_input_signal_length=lens, apply_mask=True,
                                       generator=torch.Generator().manual_seed(0))
    assert masks.shape == (3, 64, lp.shape[1]) and tokens.shape[1] == lp.shape[1]
    loss, stats = model.compute_loss(lp, enc_len, masks, tokens)
    loss.backward()
    assert stats["masked_tokens"] > 0
    assert model.encoder.pre_encode.pre_encode.out.weight.grad.abs().sum() > 0  # no detach: pre_encode learns


# ---- with the real encoder ------------------------------------------------------------------------------------
def _nest_large_cfg():
    from nest_ssl.config import load_yaml, resolve

    return resolve(load_yaml(SPEC / "nest_fast-conformer.nemo.yaml"))["model"]


def _nemo_rows(prefixes=None):
    lines = [ln.split("\t") for ln in (SPEC / "nest_large_state_dict.txt").read_text().splitlines()
             if ln and not ln.startswith("#")]
    return [(k, s, d, int(n), kind) for k, s, d, n, kind in lines if prefixes is None or k.startswith(prefixes)]


def _our_rows(summary, prefixes=None):
    return [(k, str(s).replace("[]", "()"), d, n, kind) for k, s, d, n, kind in summary["rows"]
            if prefixes is None or k.startswith(prefixes)]


def test_heads_state_dict_rows_equal_nemo_nest_large(stub_encoder):
    from nest_ssl.testing.nemo_parity import model_summary

    heads = ("preprocessor.", "quantizer.", "mask_processor.", "decoder.")
    assert _our_rows(model_summary(_nest_large_cfg()), heads) == _nemo_rows(heads)


def test_nest_large_state_dict_equals_nemo():
    from nest_ssl.testing.nemo_parity import model_summary

    summary = model_summary(_nest_large_cfg())
    assert len(summary["rows"]) == 699 and _our_rows(summary) == _nemo_rows()
    assert (summary["total"], summary["trainable"]) == (113_106_000, 112_964_608)


@pytest.mark.numerics
def test_burn_rng_reproduces_nemo_seeded_init():
    """nest_tiny's state_dict is NeMo's init after torch.manual_seed(1234); burn_rng replays NeMo's build order.

    Same draws, not the same bits: uniform_ (from + x * (to - from)) and normal_ (Box-Muller: log, sqrt, cos) round
    differently in ATen's vectorised and scalar kernels, so another CPU dispatch moves values by a few units of
    float32 roundoff u (measured with ATEN_CPU_CAPABILITY=default: 8 u of max|w| at most, on the normal_ draws).
    A draw out of order changes a tensor by O(max|w|), so 64 u of max|w| per tensor still catches it."""
    sd = np.load(PARITY / "nest_tiny" / "state_dict.npz")
    torch.manual_seed(json.loads((PARITY / "nest_tiny" / "manifest.json").read_text())["seed"])
    model = EncDecDenoiseMaskedTokenPredModel.from_config(TINY, burn_rng=True)
    ours = model.state_dict()
    assert list(ours) == list(sd.files)
    tol = 64 * 2.0 ** -24
    differ = {k: float(np.abs(ours[k].numpy() - sd[k]).max() / max(np.abs(sd[k]).max(), 1e-30)) for k in sd.files
              if not np.array_equal(ours[k].numpy(), sd[k])}
    assert {k: e for k, e in differ.items() if not e <= tol} == {}


# ---- post_conv: NeMo's ConvFeatureMaksingWrapper layout ---------------------------------------------------------
def _post_conv_cfg():
    cfg = copy.deepcopy(TINY)
    cfg["mask_position"] = "post_conv"
    cfg["encoder"]["conv_norm_type"] = "layer_norm"
    return cfg


def _nemo_post_conv_keys(pre_conv_keys: list[str]) -> list[str]:
    """NeMo's post_conv keys, derived from its pre_conv ones: the wrapper takes pre_encode's slot in the encoder
    (`pre_encode.pre_encode.*` then `pre_encode.masking.mask_embedding`) and is registered once more, last, as
    `pre_encoder`."""
    sub = [k[len("encoder.pre_encode."):] for k in pre_conv_keys if k.startswith("encoder.pre_encode.")]
    wrapped = [f"encoder.pre_encode.pre_encode.{k}" for k in sub] + ["encoder.pre_encode.masking.mask_embedding"]
    first = next(i for i, k in enumerate(pre_conv_keys) if k.startswith("encoder.pre_encode."))
    rest = [k for k in pre_conv_keys if not k.startswith("encoder.pre_encode.")]
    return rest[:first] + wrapped + rest[first:] + [f"pre_encoder.pre_encode.{k}" for k in sub] + \
        ["pre_encoder.masking.mask_embedding"]


def test_post_conv_state_dict_has_nemo_keys_order_and_aliases():
    pytest.importorskip("nest_ssl.conformer.encoder")
    pre = EncDecDenoiseMaskedTokenPredModel.from_config({**_post_conv_cfg(), "mask_position": "pre_conv"})
    model = EncDecDenoiseMaskedTokenPredModel.from_config(_post_conv_cfg())
    sd = model.state_dict()
    assert list(sd) == _nemo_post_conv_keys(list(pre.state_dict()))
    assert not any("batch_norm.running" in k or "num_batches" in k for k in sd)  # layer_norm: no BN buffers
    emb = [sd[k] for k in sd if k.endswith("mask_embedding")]
    assert len(emb) == 3 and all(e.data_ptr() == emb[0].data_ptr() for e in emb)  # one tensor, three names
    out_w = ["encoder.pre_encode.pre_encode.out.weight", "pre_encoder.pre_encode.out.weight"]
    assert sd[out_w[0]].data_ptr() == sd[out_w[1]].data_ptr()
    assert len(list(model.parameters())) == len(list(pre.parameters()))  # the optimizer sees each tensor once


def test_post_conv_nemo_state_dict_loads_strict_both_ways(tmp_path):
    pytest.importorskip("nest_ssl.conformer.encoder")
    from nest_ssl import export
    from nest_ssl.nemo_io import read_nemo

    torch.manual_seed(0)
    src = EncDecDenoiseMaskedTokenPredModel.from_config(_post_conv_cfg())
    nemo_sd = {k: v.clone() for k, v in src.state_dict().items()}  # NeMo's layout: the test above pins it
    dst = EncDecDenoiseMaskedTokenPredModel.from_config(_post_conv_cfg())
    dst.load_state_dict(nemo_sd, strict=True)
    assert all(torch.equal(dst.state_dict()[k], v) for k, v in nemo_sd.items())
    for drop in ("pre_encoder.masking.mask_embedding", "encoder.pre_encode.pre_encode.out.bias"):
        with pytest.raises(RuntimeError, match="Missing key"):
            dst.load_state_dict({k: v for k, v in nemo_sd.items() if k != drop}, strict=True)
    pre_conv_layout = {k.replace("encoder.pre_encode.pre_encode.", "encoder.pre_encode."): v
                       for k, v in nemo_sd.items() if "pre_encoder." not in k and ".masking." not in k}
    with pytest.raises(RuntimeError, match="Missing key"):
        dst.load_state_dict(pre_conv_layout, strict=True)
    src.model_cfg = _post_conv_cfg()
    path = export.save_nemo(src, src.model_cfg, tmp_path / "post_conv.nemo")
    cfg, written = read_nemo(path)
    assert list(written) == list(nemo_sd)  # what NeMo's restore_from loads strictly
    assert cfg["quantizer"]["combine_time_steps"] == 1 and cfg["quantizer"]["feat_in"] == cfg["encoder"]["d_model"]
    assert cfg["masking"]["block_size"] == TINY["masking"]["block_size"]  # NeMo divides it by the subsampling itself
    back = export.load_pretrained(path)
    assert back.mask_processor.cfg.block_size == TINY["masking"]["block_size"] // 8
    assert all(torch.equal(back.state_dict()[k], v) for k, v in nemo_sd.items())


def test_parity_adapter_encodes_with_a_post_conv_state_dict():
    pytest.importorskip("nest_ssl.conformer.encoder")
    from nest_ssl.testing import nemo_parity

    torch.manual_seed(0)
    model = EncDecDenoiseMaskedTokenPredModel.from_config(_post_conv_cfg()).eval()
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    feats, lens = torch.randn(2, 80, 64), torch.tensor([64, 40])
    got, got_len = nemo_parity.encode(feats.numpy(), lens.numpy(), sd, {"model": _post_conv_cfg()})
    with torch.no_grad():
        want, want_len = model.encoder(feats, lens)
    assert np.array_equal(got_len, want_len.numpy()) and np.allclose(got, want.numpy(), rtol=0, atol=0)


def test_post_conv_model_summary_counts_each_tensor_once_and_lists_aliases():
    pytest.importorskip("nest_ssl.conformer.encoder")
    from nest_ssl.testing.nemo_parity import model_summary

    post, pre = model_summary(_post_conv_cfg()), model_summary({**_post_conv_cfg(), "mask_position": "pre_conv"})
    kinds = {k: kind for k, _, _, _, kind in post["rows"]}
    assert kinds["pre_encoder.pre_encode.out.weight"] == "param"
    assert kinds["pre_encoder.masking.mask_embedding"] == "param_frozen"
    # mask_embedding on d_model; the quantizer projects d_model frames (combine 1), not 8 stacked mel frames
    assert post["total"] == pre["total"] - 80 + 64 - 32 * 80 * 8 + 32 * 64
