"""Contrastive SSL heads vs real NeMo 2.6.2 outputs (tests/fixtures/parity/contrastive_tiny).

Patch masks, frequency masks, negatives and Gumbel noise are replayed from the set's seeds (our RNG order equals
NeMo's on CPU) or injected from the stored draws.
"""
import json
import random

import numpy as np
import pytest
import torch

from conftest import PARITY
from nest_ssl.contrastive.decoders import (
    ConvASRDecoder,
    ConvASRDecoderConfig,
    ConvASRDecoderReconstruction,
    ConvASRDecoderReconstructionConfig,
)
from nest_ssl.contrastive.loss import ContrastiveLoss, ContrastiveLossConfig
from nest_ssl.contrastive.patch_masking import MaskedPatchAugmentation, MaskedPatchAugmentationConfig

SET = PARITY / "contrastive_tiny"
CFG = json.loads((SET / "config.json").read_text())
FORWARD_SEED = json.loads((SET / "manifest.json").read_text())["forward_seed"]


def npz(name):
    with np.load(SET / name) as z:
        return {k: z[k] for k in z.files}


STATE = npz("state_dict.npz")


def rel(got, ref):
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def _sub(prefix):
    return {k[len(prefix):]: torch.from_numpy(v) for k, v in STATE.items() if k.startswith(prefix)}


def _args(section):
    return {k: v for k, v in section.items() if k != "_target_"}


def contrastive_loss(**over):
    cfg = ContrastiveLossConfig(**{**_args(CFG["model"]["loss_list"]["contrastive"]["loss"]), **over})
    loss = ContrastiveLoss(cfg)
    if cfg.quantized_targets:
        loss.load_state_dict(_sub("decoder_losses.contrastive.loss."), strict=True)
    return loss.eval()


def test_patch_and_frequency_masks_replay_nemo_draws_from_seed():
    m, p = npz("masking.npz"), npz("preprocessor.npz")
    aug = MaskedPatchAugmentation(MaskedPatchAugmentationConfig(**_args(CFG["model"]["spec_augment"])))
    g = torch.Generator().manual_seed(FORWARD_SEED)
    patches, width, start = aug.draw(torch.from_numpy(p["feature_lengths"]), 80, random.Random(FORWARD_SEED), g)
    assert patches == m["patch_indices"].tolist()
    assert width.tolist() == m["freq_mask_width"].tolist() and start.tolist() == m["freq_mask_start"].tolist()
    tm, fm = aug.masks(p["features"].shape, patches, width, start, "cpu")
    assert np.array_equal(tm.numpy(), m["time_mask"]) and np.array_equal(fm.numpy(), m["freq_mask"])
    feats = torch.from_numpy(p["features"])
    out = aug(feats, None, time_mask=tm, freq_mask=fm)
    assert np.array_equal(out.numpy(), m["masked_features"])
    assert np.array_equal(feats.numpy(), p["features"])  # never written in place (NeMo does)


def test_patch_count_rules():
    aug = MaskedPatchAugmentation(MaskedPatchAugmentationConfig(patch_size=48, mask_patches=0.5))
    assert aug.num_patches(800) == 9  # ceil(int(0.5 * 800) / 48)
    assert aug.num_patches(40) == 0  # shorter than one patch: nothing masked
    assert MaskedPatchAugmentation(MaskedPatchAugmentationConfig(patch_size=48, mask_patches=4)).num_patches(100) == 2
    with pytest.raises(ValueError, match="mask_patches=-1"):
        MaskedPatchAugmentation(MaskedPatchAugmentationConfig(mask_patches=-1))


@pytest.mark.numerics
def test_decoders_match_nemo():
    e, d = npz("encoder.npz"), npz("decoders.npz")
    rec = ConvASRDecoderReconstruction(
        ConvASRDecoderReconstructionConfig(**_args(CFG["model"]["loss_list"]["contrastive"]["decoder"])))
    rec.load_state_dict(_sub("decoder_losses.contrastive.decoder."), strict=True)
    mlm = ConvASRDecoder(ConvASRDecoderConfig(**_args(CFG["model"]["loss_list"]["mlm"]["decoder"])))
    mlm.load_state_dict(_sub("decoder_losses.mlm.decoder."), strict=True)
    enc = torch.from_numpy(e["encoded"])
    assert rel(rec(enc).detach(), d["contrastive_out"]) <= 1e-4
    assert rel(mlm(enc).detach(), d["mlm_log_probs"]) <= 1e-4


@pytest.mark.numerics
def test_quantizer_eval_and_train_match_nemo():
    q, p = npz("quantizer.npz"), npz("preprocessor.npz")
    loss = contrastive_loss()
    x = loss._stack(torch.from_numpy(p["features"]), q["target_ids"].shape[1])
    quant, ppl, ids = loss.quantizer(x)
    assert rel(quant.detach(), q["quantized"]) <= 1e-4
    assert rel(ppl.detach(), q["prob_ppl"]) <= 1e-4
    assert np.array_equal(ids.numpy(), q["target_ids"])
    loss.train()
    loss.set_num_updates(1000)
    assert loss.quantizer.curr_temp == pytest.approx(float(q["train_temp"]), rel=1e-12)
    quant, ppl, ids = loss.quantizer(x, gumbel_noise=torch.from_numpy(q["train_gumbel_noise"]))
    assert rel(quant.detach(), q["train_quantized"]) <= 1e-4
    assert np.array_equal(ids.numpy(), q["target_ids"])  # ids stay the noise-free argmax in training


@pytest.mark.numerics
def test_contrastive_loss_matches_nemo_and_negatives_replay_from_seed():
    p, m, d, c = npz("preprocessor.npz"), npz("masking.npz"), npz("decoders.npz"), npz("contrastive.npz")
    loss = contrastive_loss()
    args = (torch.from_numpy(p["features"]), torch.from_numpy(m["spec_masks"]), torch.from_numpy(d["contrastive_out"]))
    value = loss(*args, neg_idxs=torch.from_numpy(c["neg_idxs"]))
    assert rel(value.detach(), c["loss"]) <= 1e-4
    assert np.array_equal(loss.last["token_mask"].numpy(), c["token_mask"])
    assert np.array_equal(loss.last["neg_is_pos"].numpy(), c["neg_is_pos"])
    sim, ref = loss.last["similarity"].detach().numpy(), c["similarity"]
    assert np.array_equal(np.isfinite(sim), np.isfinite(ref))
    assert rel(sim[np.isfinite(ref)], ref[np.isfinite(ref)]) <= 1e-4
    # Drawing instead of injecting: widths, starts, then the negatives, from the forward seed.
    g = torch.manual_seed(FORWARD_SEED)
    torch.rand(3, 3, generator=g), torch.rand(3, 3, generator=g)
    loss(*args)
    assert np.array_equal(loss.last["neg_idxs"].numpy(), c["neg_idxs"])


@pytest.mark.numerics
def test_non_quantized_targets_loss_and_gradients_match_nemo():
    p, m, d, n = npz("preprocessor.npz"), npz("masking.npz"), npz("decoders.npz"), npz("contrastive_nonquant.npz")
    loss = ContrastiveLoss(ContrastiveLossConfig(**CFG["derived"]["nonquant_loss_kwargs"]))
    loss.target_proj.weight.data.copy_(torch.from_numpy(n["target_proj_weight"]))
    loss.target_proj.bias.data.copy_(torch.from_numpy(n["target_proj_bias"]))
    dec_out = torch.from_numpy(d["contrastive_out"]).requires_grad_()
    value = loss(torch.from_numpy(p["features"]), torch.from_numpy(m["spec_masks"]), dec_out,
                 neg_idxs=torch.from_numpy(n["neg_idxs"]))
    value.backward()
    assert rel(value.detach(), n["loss"]) <= 1e-4
    assert np.array_equal(loss.last["neg_is_pos"].numpy(), n["neg_is_pos"])
    assert rel(loss.target_proj.weight.grad, n["grad_target_proj_weight"]) <= 1e-4
    assert rel(loss.target_proj.bias.grad, n["grad_target_proj_bias"]) <= 1e-4
    assert rel(dec_out.grad, n["grad_decoder_outputs"]) <= 1e-4


def test_nemo_crashes_become_clear_errors():
    p, m, d = npz("preprocessor.npz"), npz("masking.npz"), npz("decoders.npz")
    feats, masks, out = (torch.from_numpy(p["features"]), torch.from_numpy(m["spec_masks"]),
                         torch.from_numpy(d["contrastive_out"]))
    with pytest.raises(ValueError, match="num_negatives=100"):  # NeMo: torch.multinomial RuntimeError
        contrastive_loss(num_negatives=100)(feats, masks, out)
    uneven = masks.clone()
    uneven[0, :, :4] = 1.0  # one more masked step in utterance 0 only
    with pytest.raises(ValueError, match="masked steps per utterance differ"):  # NeMo: silent misalignment
        contrastive_loss()(feats, uneven, out)
    with pytest.raises(ValueError, match="group_loss"):  # NeMo: shape-mismatch crash
        contrastive_loss(group_loss=True)
