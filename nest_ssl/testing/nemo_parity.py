"""Adapter between NeMo's parity checker (tests/fixtures/parity/parity_check.py) and nest_ssl.

Every function takes and returns numpy arrays, builds our modules from the parity set's NeMo `model` config,
loads the set's NeMo state_dict strictly (no key mapping: our attribute names are NeMo's) and runs them.

    python tests/fixtures/parity/parity_check.py tests/fixtures/parity/nest_tiny --adapter nest_ssl.testing.nemo_parity
"""
from __future__ import annotations

import copy
import random
import warnings

import numpy as np
import torch

from nest_ssl import export, nemo_compat
from nest_ssl.config import from_dict
from nest_ssl.data.augmentation import MultiSpeakerNoiseAugmentation
from nest_ssl.optim import OptimConfig, SchedConfig, build_scheduler


def _t(x, dtype=None):
    t = torch.from_numpy(np.ascontiguousarray(x))
    return t if dtype is None else t.to(dtype)


def _sub_state(state_dict: dict, prefix: str) -> dict:
    """The tensors under `prefix.` with the prefix stripped, as torch tensors."""
    n = len(prefix) + 1
    return {k[n:]: _t(v) for k, v in state_dict.items() if k.startswith(prefix + ".")}


# ---- sections built through the _target_ table, NeMo state loaded strictly -----------------------------------
def _section(cfg: dict, key: str, state_dict: dict | None = None, prefix: str | None = None) -> torch.nn.Module:
    """Our module for cfg["model"][key] (eval), its NeMo state_dict entries under `prefix` (default: key) loaded."""
    module = nemo_compat.instantiate(cfg["model"][key], f"model.{key}")
    if state_dict is not None:
        module.load_state_dict(_sub_state(state_dict, prefix or key), strict=True)
    return module.eval()


def build_preprocessor(cfg: dict, state_dict: dict | None = None):
    return _section(cfg, "preprocessor", state_dict)


def features(wave, wave_lengths, state_dict, cfg):
    pre = build_preprocessor(cfg, state_dict)
    feats, lens = pre(_t(wave, torch.float32), _t(wave_lengths, torch.int64))
    return feats.numpy(), lens.numpy()


def build_encoder(cfg: dict, state_dict: dict | None = None):
    """The encoder alone; with post_conv it comes from the whole model, whose `encoder.pre_encode` is NeMo's masking
    wrapper (keys `encoder.pre_encode.pre_encode.*`, `encoder.pre_encode.masking.mask_embedding`)."""
    if cfg["model"].get("mask_position", "pre_conv") == "post_conv":
        return build_model(cfg, state_dict).encoder.eval()
    return _section(cfg, "encoder", state_dict)


def pre_encode(features, feature_lengths, state_dict, cfg):
    enc = build_encoder(cfg, state_dict)
    with torch.no_grad():
        x, lengths = enc.pre_encode(_t(features).transpose(1, 2), _t(feature_lengths).long())
    return x.numpy(), lengths.numpy()


def encode(features, feature_lengths, state_dict, cfg):
    enc = build_encoder(cfg, state_dict)
    with torch.no_grad():
        x, lengths = enc(_t(features), _t(feature_lengths))
    return x.numpy(), lengths.numpy()


def quantize(x, state_dict, cfg):
    q = _section(cfg, "quantizer", state_dict)  # the module as configured
    with torch.no_grad():
        xq, tokens = q(_t(x, torch.float32))
    return xq.numpy(), tokens.numpy()


def mask(x, lengths, masks, state_dict, cfg):
    m = _section(cfg, "masking", state_dict, prefix="mask_processor")
    with torch.no_grad():
        return m.apply_masks(_t(x, torch.float32), _t(masks, torch.float32)).numpy()


def decode(encoded, state_dict, cfg):
    dec = _section(cfg, "decoder", state_dict)
    with torch.no_grad():
        return dec(_t(encoded, torch.float32)).numpy()


def mlm_loss(masks, log_probs, tokens, cfg):
    loss = _section(cfg, "loss")
    return float(loss(_t(masks, torch.float32), _t(log_probs, torch.float32), _t(tokens, torch.int64)))


# ---- batch augmentation ---------------------------------------------------------------------------------------
def _augmentor(aug_cfg: dict) -> MultiSpeakerNoiseAugmentation:
    section = {k: v for k, v in aug_cfg.items() if k != "_target_"}
    return MultiSpeakerNoiseAugmentation(from_dict(MultiSpeakerNoiseAugmentation.config_class, section,
                                                   "model.train_ds.batch_augmentor"))


def _augment_out(noise, noise_len, noisy, noisy_len):
    return {"noise": noise.numpy(), "noise_lengths": noise_len.numpy(), "noisy_audio": noisy.numpy(),
            "noisy_audio_lengths": noisy_len.numpy()}


def augment(audio, audio_lengths, noise, noise_lengths, aug_cfg, seed):
    aug, rng = _augmentor(aug_cfg), random.Random(seed)
    lens = [int(x) for x in audio_lengths]
    decisions = [aug.decide(i, lens, rng) for i in range(len(lens))]
    return _augment_out(*aug.augment(_t(audio), _t(audio_lengths), _t(noise), _t(noise_lengths), decisions))


def augment_with_decisions(audio, audio_lengths, noise, noise_lengths, decisions, aug_cfg):
    aug = _augmentor(aug_cfg)
    return _augment_out(*aug.augment(_t(audio), _t(audio_lengths), _t(noise), _t(noise_lengths), decisions))


def build_model(cfg: dict, state_dict: dict | None = None, train: bool = False):
    """The whole NEST model, NeMo state_dict loaded strictly. train=True: train mode, dropout 0, dither 0."""
    model_cfg = copy.deepcopy(cfg["model"])
    if train:
        model_cfg["preprocessor"]["dither"] = 0.0
        for key in ("dropout", "dropout_pre_encoder", "dropout_emb", "dropout_att"):
            if key in model_cfg["encoder"]:
                model_cfg["encoder"][key] = 0.0
    model = nemo_compat.build_model(model_cfg)
    if state_dict is not None:
        model.load_state_dict({k: _t(v) for k, v in state_dict.items()}, strict=True)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout) and train:
            m.p = 0.0
    return model.train(train)


def _run_model(model, wave, wave_lengths, noisy_wave, noisy_wave_lengths, masks, dtype=torch.float32):
    captured = {}
    handle = model.encoder.register_forward_hook(lambda mod, args, out: captured.update(encoded=out[0]))
    try:
        log_probs, enc_len, masks, tokens = model(
            input_signal=_t(wave, dtype), input_signal_length=_t(wave_lengths, torch.int64),
            noisy_input_signal=_t(noisy_wave, dtype),
            noisy_input_signal_length=_t(noisy_wave_lengths, torch.int64), apply_mask=True,
            masks=_t(masks, dtype))
    finally:
        handle.remove()
    loss, _ = model.compute_loss(log_probs, enc_len, masks, tokens)
    return loss, log_probs, enc_len, tokens, captured.get("encoded")


def forward(wave, wave_lengths, noisy_wave, noisy_wave_lengths, masks, state_dict, cfg):
    model = build_model(cfg, state_dict)
    with torch.no_grad():
        loss, log_probs, enc_len, tokens, encoded = _run_model(model, wave, wave_lengths, noisy_wave,
                                                               noisy_wave_lengths, masks)
    out = {"loss": float(loss), "log_probs": log_probs.numpy(), "tokens": tokens.numpy(),
           "encoded_lengths": enc_len.numpy()}
    if encoded is not None:
        out["encoded"] = encoded.numpy()
    return out


def train_grads(wave, wave_lengths, noisy_wave, noisy_wave_lengths, masks, state_dict, cfg, dtype=torch.float32):
    """dtype=torch.float64 runs everything after the (float32, as in NeMo) preprocessor in float64: gradients exact
    to ~1e-12, so a comparison with NeMo's float32 gradients measures NeMo's rounding only, on any CPU."""
    model = build_model(cfg, state_dict, train=True).to(dtype)
    loss, log_probs, _, _, encoded = _run_model(model, wave, wave_lengths, noisy_wave, noisy_wave_lengths, masks,
                                                dtype)
    loss.backward()
    grads = {n: p.grad.numpy() for n, p in model.named_parameters() if p.grad is not None}
    bn_after = {k: v.numpy() for k, v in model.state_dict().items() if ".batch_norm." in k}
    out = {"loss": float(loss.detach()), "grads": grads, "bn_after": bn_after, "log_probs": log_probs.detach().numpy()}
    if encoded is not None:
        out["encoded"] = encoded.detach().numpy()
    return out


def model_summary(model_cfg: dict) -> dict:
    """The whole model built on the meta device (no memory, no init cost): state_dict rows in NeMo's
    `nest_large_state_dict.txt` form (key, shape, dtype, numel, kind) plus total / trainable / frozen counts."""
    model = nemo_compat.build_model(model_cfg, device="meta")
    params = dict(model.named_parameters())  # each tensor once: the counts
    every_name = dict(model.named_parameters(remove_duplicate=False))  # post_conv's aliases are parameters too
    rows = []
    for key, v in model.state_dict(keep_vars=True).items():
        kind = "buffer" if key not in every_name else ("param" if every_name[key].requires_grad else "param_frozen")
        rows.append((key, tuple(v.shape), str(v.dtype).replace("torch.", ""), v.numel(), kind))
    total = sum(p.numel() for p in params.values())
    trainable = sum(p.numel() for p in params.values() if p.requires_grad)
    return {"rows": rows, "total": total, "trainable": trainable, "frozen": total - trainable}


# ---- optimisation (NoamAnnealing) -------------------------------------------------------------------
def noam_lr(steps, sched, cfg):
    """lr optimizer step s uses: run our Scheduler (stepped after each optimizer step, like Lightning)."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=sched["lr"], betas=(0.9, 0.98), weight_decay=1e-3)
    ocfg = OptimConfig(lr=sched["lr"], sched=SchedConfig(name="NoamAnnealing", d_model=sched["d_model"],
                                                          warmup_steps=sched["warmup_steps"], min_lr=sched["min_lr"]))
    scheduler = build_scheduler(opt, ocfg, sched["max_steps"])
    out, want = {}, sorted(set(int(s) for s in steps))
    for k in range(want[-1] + 1):
        if k in want:
            out[k] = opt.param_groups[0]["lr"]
        with warnings.catch_warnings():  # no real optimizer step here: skip torch's order warning
            warnings.simplefilter("ignore")
            scheduler.step()
    return [out[int(s)] for s in steps]


# ---- NeMo files (.nemo) -----------------------------------------------------------------------------
def load_nemo(path):
    """(model config dict, state_dict of numpy arrays under NeMo keys) from a `.nemo`, a NeMo `.ckpt` or ours:
    the same reader `nest_ssl.export.load_pretrained` uses."""
    model_cfg, state = export.read_checkpoint(path)
    return model_cfg, {k: v.numpy() for k, v in state.items()}


def save_nemo(model_cfg, state_dict, path):
    """Write a `.nemo` NeMo's restore_from loads: the model is built from `model_cfg` and the state_dict loaded
    strictly (a wrong key fails here, not in NeMo), then saved through `nest_ssl.export.save_nemo`."""
    model = export.build_model(model_cfg)
    model.load_state_dict({k: _t(v) for k, v in state_dict.items()}, strict=True)
    return str(export.save_nemo(model, model_cfg, path))
