"""NEST encoders to and from Hugging Face transformers' `ParakeetEncoder` (`model_type: parakeet_encoder`).

    save_hf(model, "enc_hf/")                 # config.json, model.safetensors, preprocessor_config.json, README.md
    init_from_hf(model, "enc_hf/")            # the reverse: an HF Parakeet encoder starts NEST pretraining

The key and config mapping is read from transformers' `models/parakeet/modeling_parakeet.py` and
`configuration_parakeet.py` (5.23): the subsampling's `nn.Conv2d`/`nn.ReLU` list keeps NeMo's indices
(`pre_encode.conv.{0,2,3,5,6}` -> `subsampling.layers.*`), the attention renames its projections, the conv module
calls its BatchNorm `norm`; everything else has NeMo's names. Renames are prefix substitutions, so the mapping is a
bijection and a round trip is bit-identical; an unknown key fails the strict load on either side.

What HF's encoder cannot represent is refused by name (`unsupported`), never exported as a silently different
model. Differences that only act in training: NeMo's dropout after each residual branch has no HF counterpart (HF
applies `dropout` to the subsampled input, `activation_dropout` inside the feed-forward, `attention_dropout`), and
stochastic depth is not carried (`layerdrop: 0`). HF's subsampling does not zero the padded input frames (ours does):
its feature extractor writes zeros there, as our preprocessor with `pad_value: 0` does.

transformers and safetensors are the optional extra `hf` (`pip install 'nest_ssl[hf]'`).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from torch import nn

EXTRA = "pip install 'nest_ssl[hf]'"
WEIGHTS = "model.safetensors"
# Ours -> HF, applied as prefix substitutions on encoder-level keys (layer keys after `layers.<i>.`).
SUBSAMPLING_RENAMES = (("pre_encode.out.", "subsampling.linear."), ("pre_encode.conv.", "subsampling.layers."))
LAYER_RENAMES = (
    ("self_attn.linear_q.", "self_attn.q_proj."), ("self_attn.linear_k.", "self_attn.k_proj."),
    ("self_attn.linear_v.", "self_attn.v_proj."), ("self_attn.linear_out.", "self_attn.o_proj."),
    ("self_attn.linear_pos.", "self_attn.relative_k_proj."),
    ("self_attn.pos_bias_u", "self_attn.bias_u"), ("self_attn.pos_bias_v", "self_attn.bias_v"),
    ("conv.batch_norm.", "conv.norm."),
)
POST_CONV_WRAPPER = "pre_encode.pre_encode."  # mask_position: post_conv nests the subsampling one level deeper
SSL_ONLY_ENCODER = ("pre_encode.masking.",)   # post_conv's mask embedding lives in the encoder; SSL-only
# HF config keys that fix the architecture (not dropouts): an init_from_hf source must agree on all of them.
ARCH_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
             "attention_bias", "convolution_bias", "conv_kernel_size", "subsampling_factor",
             "subsampling_conv_channels", "num_mel_bins", "subsampling_conv_kernel_size", "subsampling_conv_stride",
             "scale_input")


def require_hf():
    """transformers (with ParakeetEncoder), or an ImportError naming the extra."""
    try:
        import safetensors  # noqa: F401
        import transformers
        from transformers import ParakeetEncoder  # noqa: F401 - in transformers >= 4.57
    except ImportError as e:
        raise ImportError(f"--format hf / init_from_hf need transformers (>= 4.57, with ParakeetEncoder) and "
                          f"safetensors: {EXTRA} ({e})") from None
    return transformers


def _hf_config_fields() -> set[str]:
    from transformers import ParakeetEncoderConfig

    return set(ParakeetEncoderConfig().to_dict())


# ---- what HF can represent -----------------------------------------------------------------------------------


def unsupported(enc_cfg, hf_fields: set[str]) -> list[str]:
    """Settings of our ConformerEncoderConfig that ParakeetEncoder cannot represent, each naming the key."""
    k = enc_cfg.conv_kernel_size
    bad = {
        "self_attention_model": (enc_cfg.self_attention_model != "rel_pos", "HF has rel_pos attention only"),
        "att_context_size": (list(enc_cfg.att_context_size) != [-1, -1], "HF attends to full context only"),
        "conv_context_size": (enc_cfg.conv_context_size not in (None, "symmetric", [(k - 1) // 2] * 2),
                              "HF's depthwise conv is symmetric (not causal)"),
        "causal_downsampling": (bool(enc_cfg.causal_downsampling), "HF's subsampling is not causal"),
        "conv_norm_type": (enc_cfg.conv_norm_type != "batch_norm", "HF's conv module has a BatchNorm"),
        "subsampling": (enc_cfg.subsampling != "dw_striding", "HF implements dw_striding subsampling only"),
        "untie_biases": (not enc_cfg.untie_biases, "HF has per-layer bias_u/bias_v (tied pos biases differ)"),
        "feat_out": (enc_cfg.feat_out > 0, "HF's encoder has no output projection"),
        "reduction": (enc_cfg.reduction is not None, "HF has no time reduction layer"),
        "use_bias": (not enc_cfg.use_bias and "convolution_bias" not in hf_fields,
                     "this transformers has no convolution_bias (conv biases would be added); upgrade transformers"),
    }
    out = [f"model.encoder.{key}={getattr(enc_cfg, key)!r}: {why}" for key, (hit, why) in bad.items() if hit]
    f = enc_cfg.feat_in
    for _ in range(int(math.log2(enc_cfg.subsampling_factor))):
        f = (f + 2 - 3) // 2 + 1  # NeMo's calc_length of a kernel-3, stride-2, padding-1 conv
    if f != enc_cfg.feat_in // enc_cfg.subsampling_factor:  # HF sizes subsampling.linear as num_mel_bins // factor
        out.append(f"model.encoder.feat_in={enc_cfg.feat_in}: HF's subsampling keeps feat_in // "
                   f"{enc_cfg.subsampling_factor} = {enc_cfg.feat_in // enc_cfg.subsampling_factor} mel bins, ours {f}")
    return out


def unsupported_preprocessor(pre_cfg) -> list[str]:
    """Settings of our preprocessor that ParakeetFeatureExtractor cannot represent (it fixes these)."""
    fixed = {"normalize": "per_feature", "window": "hann", "log": True, "log_zero_guard_type": "add",
             "log_zero_guard_value": 2 ** -24, "mag_power": 2.0, "lowfreq": 0, "frame_splicing": 1,
             "exact_pad": False, "mel_norm": "slaney"}
    out = [f"model.preprocessor.{key}={getattr(pre_cfg, key)!r}: ParakeetFeatureExtractor has {want!r} only"
           for key, want in fixed.items() if getattr(pre_cfg, key) != want]
    if pre_cfg.highfreq not in (None, pre_cfg.sample_rate / 2):
        out.append(f"model.preprocessor.highfreq={pre_cfg.highfreq!r}: ParakeetFeatureExtractor uses "
                   f"sample_rate / 2 = {pre_cfg.sample_rate / 2}")
    return out


def hf_config(enc_cfg) -> dict:
    """ParakeetEncoderConfig keyword arguments for our ConformerEncoderConfig (refusals checked first)."""
    return {
        "hidden_size": enc_cfg.d_model, "num_hidden_layers": enc_cfg.n_layers, "num_attention_heads": enc_cfg.n_heads,
        "intermediate_size": enc_cfg.d_model * enc_cfg.ff_expansion_factor, "hidden_act": "silu",
        "attention_bias": bool(enc_cfg.use_bias), "convolution_bias": bool(enc_cfg.use_bias),
        "conv_kernel_size": enc_cfg.conv_kernel_size, "subsampling_factor": enc_cfg.subsampling_factor,
        "subsampling_conv_channels": (enc_cfg.d_model if enc_cfg.subsampling_conv_channels == -1
                                      else enc_cfg.subsampling_conv_channels),
        "num_mel_bins": enc_cfg.feat_in, "subsampling_conv_kernel_size": 3, "subsampling_conv_stride": 2,
        "scale_input": bool(enc_cfg.xscaling), "max_position_embeddings": enc_cfg.pos_emb_max_len,
        # training-only: HF's `dropout` hits the subsampled input (our dropout_pre_encoder), activation_dropout the
        # feed-forward's inner activation (NeMo uses the layer `dropout` there); NeMo's stochastic depth is not HF's
        # layerdrop, so layerdrop is off.
        "dropout": enc_cfg.dropout_pre_encoder, "dropout_positions": enc_cfg.dropout_emb,
        "activation_dropout": enc_cfg.dropout, "attention_dropout": enc_cfg.dropout_att, "layerdrop": 0.0,
    }


# ---- keys ----------------------------------------------------------------------------------------------------


def _rename(key: str, renames) -> str:
    for old, new in renames:
        if key.startswith(old):
            return new + key[len(old):]
    return key


def _map_key(key: str, sub, layer) -> str:
    if key.startswith("layers."):
        _, i, rest = key.split(".", 2)
        return f"layers.{i}.{_rename(rest, layer)}"
    return _rename(key, sub)


def to_hf_state(encoder_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our encoder's state_dict (keys without `encoder.`) -> ParakeetEncoder's; post_conv's wrapper level and its
    SSL-only mask embedding dropped."""
    out = {}
    for key, value in encoder_state.items():
        if key.startswith(SSL_ONLY_ENCODER):
            continue
        if key.startswith(POST_CONV_WRAPPER):
            key = "pre_encode." + key[len(POST_CONV_WRAPPER):]
        out[_map_key(key, SUBSAMPLING_RENAMES, LAYER_RENAMES)] = value
    return out


def from_hf_state(hf_state: dict[str, torch.Tensor], post_conv: bool) -> dict[str, torch.Tensor]:
    """The inverse of to_hf_state: ParakeetEncoder keys -> our encoder's (post_conv: under its wrapper level)."""
    inverse = [tuple(reversed(pair)) for pair in SUBSAMPLING_RENAMES], [tuple(reversed(p)) for p in LAYER_RENAMES]
    out = {}
    for key, value in hf_state.items():
        key = _map_key(key, *inverse)
        if post_conv and key.startswith("pre_encode."):
            key = POST_CONV_WRAPPER + key[len("pre_encode."):]
        out[key] = value
    return out


# ---- export --------------------------------------------------------------------------------------------------


def source_step(path: str | os.PathLike) -> int | None:
    """The training step a `.ckpt` (NeMo's or ours) or a sharded `.dcp` directory records; None for a `.nemo`."""
    from nest_ssl import nemo_io

    path = Path(path)
    if path.is_dir():
        from nest_ssl import dcp_checkpoint  # torch.distributed.checkpoint: only for a sharded checkpoint

        step = dcp_checkpoint.read_train_state(path).get("global_step")
    elif path.suffix == ".nemo" or not path.is_file():
        return None
    else:
        step = nemo_io.read_ptl_checkpoint(path).get("global_step")
    return int(step) if step is not None else None


def feature_extractor_kwargs(preprocessor: nn.Module) -> dict:
    """ParakeetFeatureExtractor arguments for our preprocessor (refusals checked first)."""
    cfg, fz = preprocessor.cfg, preprocessor.featurizer
    return {"feature_size": cfg.features, "sampling_rate": cfg.sample_rate, "hop_length": fz.hop_length,
            "n_fft": fz.n_fft, "win_length": fz.win_length, "preemphasis": cfg.preemph, "padding_value": 0.0}


def to_hf_encoder(model: nn.Module):
    """An HF ParakeetEncoder (eval) holding our encoder's weights; raises ValueError naming every unsupported key."""
    transformers = require_hf()
    fields = _hf_config_fields()
    problems = unsupported(model.encoder.cfg, fields) + unsupported_preprocessor(model.preprocessor.cfg)
    # an older ParakeetEncoderConfig keeps an unknown keyword as a plain attribute: the model would ignore it
    absent = sorted(set(hf_config(model.encoder.cfg)) - fields - {"convolution_bias"})  # use_bias: checked above
    if absent:
        problems.append(f"transformers {transformers.__version__}'s ParakeetEncoderConfig has no {absent}; "
                        "upgrade transformers (the mapping was read from 5.23)")
    if problems:
        raise ValueError("Hugging Face's ParakeetEncoder cannot represent this model: " + "; ".join(problems))
    hf = transformers.ParakeetEncoder(transformers.ParakeetEncoderConfig(**hf_config(model.encoder.cfg)))
    hf.load_state_dict(to_hf_state(model.encoder.state_dict()), strict=True)
    return hf.eval()


def save_hf(model: nn.Module, out: str | os.PathLike, source: str = "", step: int | None = None) -> Path:
    """Write `out/` (config.json, model.safetensors, preprocessor_config.json, README.md) that
    `transformers.AutoModel.from_pretrained(out)` loads as ParakeetEncoder with no missing or unexpected key."""
    from transformers import ParakeetFeatureExtractor

    out = Path(out)
    hf = to_hf_encoder(model)
    hf.save_pretrained(out)
    ParakeetFeatureExtractor(**feature_extractor_kwargs(model.preprocessor)).save_pretrained(out)
    (out / "README.md").write_text(model_card(model, hf.config, source, step))
    return out


def model_card(model: nn.Module, config, source: str, step: int | None) -> str:
    cfg = getattr(model, "model_cfg", {}) or {}
    train = (cfg.get("train_ds") or {}).get("manifest_filepath") or (cfg.get("train_ds") or {}).get(
        "tarred_audio_filepaths")
    n_params = sum(p.numel() for p in model.encoder.parameters()) - sum(
        p.numel() for k, p in model.encoder.named_parameters() if k.startswith(SSL_ONLY_ENCODER))
    return f"""---
library_name: transformers
tags: [audio, speech, self-supervised, fastconformer, parakeet, nest]
---
# NEST FastConformer encoder ({type(model).__name__})

A self-supervised FastConformer encoder pretrained with NEST (nest_ssl), converted to transformers'
`ParakeetEncoder` (`model_type: parakeet_encoder`) by `scripts/export.py --format hf`.

- source checkpoint: `{source or 'unknown'}`
- training step: {step if step is not None else 'not recorded in the source'}
- training data: {train or 'not recorded in the source'} (data hours are not recorded in checkpoints)
- encoder: {config.num_hidden_layers} layers, hidden size {config.hidden_size}, {config.num_attention_heads} heads,
  {n_params / 1e6:.2f} M parameters; features: {config.num_mel_bins} log-mel bins (`ParakeetFeatureExtractor`)

Not carried: the quantizer, the decoder and the masking (mask embedding) are SSL-only and are dropped. NeMo's
dropout after each residual branch and its stochastic depth have no ParakeetEncoder counterpart (training only;
outputs in eval mode are the same). Fine-tune it, e.g. with a CTC head:

```python
from transformers import AutoModel, ParakeetCTCConfig, ParakeetForCTC
encoder = AutoModel.from_pretrained("THIS_DIR")
model = ParakeetForCTC(ParakeetCTCConfig(encoder_config=encoder.config.to_dict(), vocab_size=V, pad_token_id=V - 1))
model.encoder.load_state_dict(encoder.state_dict())
```
"""


# ---- the reverse: an HF Parakeet encoder into our model ------------------------------------------------------


def read_hf(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """(ParakeetEncoder config, encoder state) of an HF directory: a `parakeet_encoder`, or the encoder of a
    `parakeet_ctc` / `parakeet_rnnt` / `parakeet_tdt` model (its `encoder_config`, its `encoder.*` weights)."""
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise ImportError(f"init_from_hf needs safetensors: {EXTRA}") from None

    path = Path(path)
    if not (path / "config.json").is_file() or not (path / WEIGHTS).is_file():
        raise FileNotFoundError(f"{path}: not a Hugging Face model directory (needs config.json and {WEIGHTS}; "
                                "sharded weights are not supported)")
    config = json.loads((path / "config.json").read_text())
    state = load_file(str(path / WEIGHTS))
    kind = config.get("model_type")
    if kind == "parakeet_encoder":
        return config, state
    if kind in ("parakeet_ctc", "parakeet_rnnt", "parakeet_tdt"):
        return config["encoder_config"], {k[len("encoder."):]: v for k, v in state.items()
                                          if k.startswith("encoder.")}
    raise ValueError(f"{path}/config.json: model_type={kind!r}; expected parakeet_encoder (or parakeet_ctc / "
                     "parakeet_rnnt / parakeet_tdt)")


def init_from_hf(model: nn.Module, path: str | os.PathLike) -> list[str]:
    """Load an HF Parakeet encoder's weights strictly into `model.encoder`; every other part starts fresh. Returns the
    log lines saying which keys came from where."""
    config, hf_state = read_hf(path)
    ours = hf_config(model.encoder.cfg)
    diff = [f"{k}: {config.get(k)!r} there, {ours[k]!r} here" for k in ARCH_KEYS if config.get(k) != ours[k]]
    if diff:
        raise ValueError(f"init_from_hf={str(path)!r}: the encoder differs from model.encoder ({'; '.join(diff)}); "
                         "set model.encoder to match it")
    enc = model.encoder
    post_conv = any(k.startswith(POST_CONV_WRAPPER) for k in enc.state_dict())
    mapped = from_hf_state(hf_state, post_conv)
    expected = {k for k in enc.state_dict() if not k.startswith(SSL_ONLY_ENCODER)}
    missing, unexpected = sorted(expected - set(mapped)), sorted(set(mapped) - expected)
    if missing or unexpected:
        raise ValueError(f"init_from_hf={str(path)!r}: keys do not match model.encoder (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]})")
    try:
        enc.load_state_dict(mapped, strict=False)  # strict over `expected`, checked above
    except RuntimeError as e:  # a size mismatch
        raise ValueError(f"init_from_hf={str(path)!r}: {' '.join(str(e).split())[:400]}") from e
    loaded = {id(t) for k, t in enc.state_dict(keep_vars=True).items() if k in expected}
    # by identity: post_conv's `pre_encoder.*` aliases are the encoder's own (loaded) tensors
    everything = model.state_dict(keep_vars=True).items()
    partly = {k.split(".")[0] for k, t in everything if id(t) in loaded}  # named by module inside these
    fresh = sorted({k.rsplit(".", 1)[0] if k.split(".")[0] in partly else k.split(".")[0]
                    for k, t in everything if id(t) not in loaded})
    return [f"init_from_hf: {len(mapped)} encoder tensors (encoder.*) from {Path(path) / WEIGHTS}",
            f"init_from_hf: fresh (not in the source): {', '.join(fresh)}"]


# ---- checks --------------------------------------------------------------------------------------------------


def verify_hf(model: nn.Module, path: str | os.PathLike, n: int = 3, max_batch: int = 4, max_time: int = 300,
              seed: int = 0) -> dict:
    """Load `path` with transformers and compare `last_hidden_state` with our encoder (both eval, fp32) on `n` random
    padded feature batches, valid frames only: rel err = max|HF - ours| / max|ours|, worst over the batches."""
    from transformers import AutoModel

    hf = AutoModel.from_pretrained(str(path), dtype=torch.float32).eval()
    enc = model.encoder.float().eval()
    g = torch.Generator().manual_seed(seed)
    worst, lengths_ok = 0.0, True
    for _ in range(n):
        b = int(torch.randint(1, max_batch + 1, (1,), generator=g))
        t = int(torch.randint(16, max_time + 1, (1,), generator=g))
        lens = torch.randint(16, t + 1, (b,), generator=g)
        lens[0] = t  # the longest utterance fills the batch
        valid = torch.arange(t)[None, :] < lens[:, None]  # (B, T)
        # padded frames are zero, as both feature extractors write them (HF's subsampling does not zero them)
        x = torch.randn(b, enc.cfg.feat_in, t, generator=g) * valid[:, None, :]  # (B, F, T)
        with torch.no_grad():
            ref, ref_len = enc(x, lens)  # (B, d, T')
            out = hf(input_features=x.transpose(1, 2), attention_mask=valid)
        got = out.last_hidden_state.transpose(1, 2)  # (B, T', d) -> (B, d, T')
        lengths_ok &= bool(torch.equal(out.attention_mask.sum(-1).long(), ref_len))
        keep = (torch.arange(ref.shape[-1])[None, :] < ref_len[:, None])[:, None, :]
        worst = max(worst, float(((got - ref).abs() * keep).max() / (ref.abs() * keep).max().clamp_min(1e-30)))
    return {"max_rel_err": worst, "lengths_equal": lengths_ok, "batches": n}


def compare_features(model: nn.Module, path: str | os.PathLike, seconds=(1.0, 0.73), seed: int = 0) -> dict:
    """ParakeetFeatureExtractor of `path` against our preprocessor (eval: no dither) on the same random audio:
    max |difference| over the valid frames of the normalised log-mel features, and the frame counts."""
    import numpy as np
    from transformers import AutoFeatureExtractor

    fe = AutoFeatureExtractor.from_pretrained(str(path))
    pre = model.preprocessor.eval()
    g = torch.Generator().manual_seed(seed)
    audio = [torch.randn(int(s * fe.sampling_rate), generator=g) * 0.1 for s in seconds]
    lens = torch.tensor([len(a) for a in audio])
    batch = nn.utils.rnn.pad_sequence(audio, batch_first=True)  # (B, L)
    with torch.no_grad():
        ours, n = pre(batch, lens)  # (B, F, T), pad_to applied
    hf = fe([a.numpy().astype(np.float32) for a in audio], sampling_rate=fe.sampling_rate, return_tensors="pt")
    theirs, hf_n = hf["input_features"].transpose(1, 2), hf["attention_mask"].sum(-1)  # (B, F, T_hf)
    t = int(n.max())
    keep = (torch.arange(t)[None, :] < n[:, None])[:, None, :]
    diff = float(((ours[..., :t] - theirs[..., :t]).abs() * keep).max())
    return {"max_abs_diff": diff, "lengths_equal": bool(torch.equal(n, hf_n.long())),
            "frames_ours": ours.shape[-1], "frames_hf": theirs.shape[-1], "pad_to": pre.cfg.pad_to,
            "dither": pre.cfg.dither, "normalize": pre.cfg.normalize}
