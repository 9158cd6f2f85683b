"""The chunked loss from encoder frames equals MultiMLMLoss(decoder(encoded)) on nest_tiny: in one slice the loss
and every gradient bit for bit, in several slices to fp32 rounding (1e-6);
it keeps less memory alive; feature extraction keeps full log-probs."""
import json

import numpy as np
import pytest
import torch

from conftest import PARITY
from nest_ssl.memory import PeakMemory
from nest_ssl.nest.decoder import MultiSoftmaxDecoder, MultiSoftmaxDecoderConfig
from nest_ssl.nest.losses import MultiMLMLoss, MultiMLMLossConfig
from nest_ssl.nest.masked_logits import mlm_loss_from_encoded
from nest_ssl.testing import nemo_parity

SET = PARITY / "nest_tiny"


def _npz(name):
    with np.load(SET / name) as z:
        return {k: torch.from_numpy(z[k]) for k in z.files}


def _heads(num_classes=64, H=2, feat_in=64):
    dec = MultiSoftmaxDecoder(MultiSoftmaxDecoderConfig(feat_in=feat_in, num_classes=num_classes, num_decoders=H,
                                                        use_bias=True))
    loss = MultiMLMLoss(MultiMLMLossConfig(combine_time_steps=8, mask_threshold=0.8, num_decoders=H))
    return dec, loss


def _loss_and_grads(dec, loss, masks, encoded, tokens, chunk):
    enc = encoded.clone().requires_grad_(True)
    dec.zero_grad()
    out = loss(masks, dec(enc), tokens) if chunk is None else mlm_loss_from_encoded(dec, loss, masks, enc, tokens,
                                                                                   chunk)
    out.backward()
    return out.detach(), enc.grad, [p.grad.clone() for p in dec.parameters()], loss.last_num_selected


@pytest.mark.numerics
@pytest.mark.parametrize("chunk", [16, 64, 1024])  # nest_tiny: 3 x 38 frames; 1024 is one slice
def test_head_loss_and_grads_equal_full_log_probs_on_nest_tiny(chunk):
    sd, f, m = _npz("state_dict.npz"), _npz("forward.npz"), _npz("masking.npz")
    dec, loss = _heads()
    dec.load_state_dict({k[len("decoder."):]: v for k, v in sd.items() if k.startswith("decoder.")})
    ref = _loss_and_grads(dec, loss, m["masks"], f["encoded"], f["tokens"], None)
    got = _loss_and_grads(dec, loss, m["masks"], f["encoded"], f["tokens"], chunk)
    # one slice: the decoder's own ops on the same shapes; slices: smaller GEMMs, weight gradients summed per slice
    tol = dict(rtol=0, atol=0) if chunk >= 3 * 38 else dict(rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(got[0], ref[0], **tol)
    assert float(got[0]) == pytest.approx(float(_npz("decoder_loss.npz")["loss"]), rel=1e-6)  # NeMo's value
    torch.testing.assert_close(got[1], ref[1], **tol)
    for g, r in zip(got[2], ref[2]):
        torch.testing.assert_close(g, r, **tol)
    assert int(got[3]) == int(ref[3]) > 0


def test_odd_chunk_and_short_targets_match():
    """A chunk not dividing B*T' and targets shorter than the token mask (NeMo right-pads them with 0)."""
    torch.manual_seed(0)
    dec, loss = _heads(num_classes=11, H=1, feat_in=8)
    masks = (torch.rand(2, 1, 56) < 0.9).float().expand(2, 4, 56)
    enc, tokens = torch.randn(2, 8, 7), torch.randint(0, 11, (2, 6, 1))
    ref = _loss_and_grads(dec, loss, masks, enc, tokens, None)
    got = _loss_and_grads(dec, loss, masks, enc, tokens, 5)
    for g, r in zip([got[0], got[1], *got[2]], [ref[0], ref[1], *ref[2]]):
        torch.testing.assert_close(g, r, rtol=1e-6, atol=1e-7)


def test_bad_shapes_raise():
    dec, loss = _heads()
    with pytest.raises(ValueError, match="token mask"):
        mlm_loss_from_encoded(dec, loss, torch.zeros(1, 80, 80), torch.zeros(1, 64, 9), torch.zeros(1, 10, 2))
    with pytest.raises(ValueError, match="chunk"):
        mlm_loss_from_encoded(dec, loss, torch.zeros(1, 80, 80), torch.zeros(1, 64, 10), torch.zeros(1, 10, 2), 0)


def test_model_training_step_equals_full_log_probs_path():
    """The whole nest_tiny model on the parity inputs: the default (chunked) step equals decoder.forward's."""
    cfg = json.loads((SET / "config.json").read_text())
    sd = {k: v.numpy() for k, v in _npz("state_dict.npz").items()}
    p, f, m = _npz("preprocessor.npz"), _npz("forward.npz"), _npz("masking.npz")
    inputs = dict(input_signal=p["wave"], input_signal_length=p["wave_lengths"], apply_mask=True, masks=m["masks"],
                  noisy_input_signal=p["wave"] + f["noise"], noisy_input_signal_length=p["wave_lengths"])
    results = []
    for chunked in (False, True):
        model = nemo_parity.build_model(cfg, sd, train=True)  # the default chunk: one slice here
        out = model(**inputs, decode=not chunked)
        loss, stats = model.compute_loss(*out, from_encoded=chunked)
        loss.backward()
        results.append((loss.detach(), {n: q.grad for n, q in model.named_parameters() if q.grad is not None}))
    (ref, ref_g), (got, got_g) = results
    assert torch.equal(got, ref)
    assert ref_g.keys() == got_g.keys() and "decoder.decoder_layers.0.weight" in got_g
    for name in ref_g:
        assert torch.equal(got_g[name], ref_g[name]), name
    with torch.no_grad():  # feature extraction: forward() still returns the full log-probs
        log_probs = model(**inputs)[0]
    assert log_probs.shape == f["log_probs"].shape


def test_chunked_head_keeps_less_memory_alive():
    torch.manual_seed(0)
    dec, loss = _heads(num_classes=512, H=1, feat_in=32)
    masks, enc = torch.ones(2, 4, 8 * 256), torch.randn(2, 32, 256)
    tokens = torch.randint(0, 512, (2, 256, 1))
    peaks = []
    for chunk in (None, 64):
        with PeakMemory() as mem:
            _loss_and_grads(dec, loss, masks, enc, tokens, chunk)
        peaks.append(mem.peak)
    assert peaks[1] < 0.5 * peaks[0]  # 512 frames of logits vs 64 at a time


def _tiny_model_and_batch():
    from nest_ssl.data.batch import AudioNoiseBatch
    from nest_ssl.nest.model import EncDecDenoiseMaskedTokenPredModel

    torch.manual_seed(0)
    model = EncDecDenoiseMaskedTokenPredModel(json.loads((SET / "config.json").read_text())["model"]).train()
    audio, lens = torch.randn(2, 16000), torch.tensor([16000, 12000])
    batch = AudioNoiseBatch(audio=audio, audio_len=lens, noise=torch.zeros_like(audio), noise_len=lens,
                            noisy_audio=audio, noisy_audio_len=lens)
    decoded = []
    model.decoder.register_forward_hook(lambda *a: decoded.append(1))
    return model, batch, decoded


def _step(model, batch):
    torch.manual_seed(1)  # the same dropout draws
    return model.training_step(batch, generator=torch.Generator().manual_seed(0))["loss"]


def test_full_log_probs_when_something_reads_the_loss_inputs():
    """A hook on the loss module reads the log-probs: then the step goes through decoder.forward."""
    model, batch, decoded = _tiny_model_and_batch()
    model.loss_logits_chunk = 8  # 2 x 14 frames: several slices
    unhooked = _step(model, batch)
    model.loss.register_forward_hook(lambda *a: None)
    hooked = _step(model, batch)
    assert decoded == [1]  # only the hooked step built the full log-probs
    torch.testing.assert_close(unhooked, hooked, rtol=1e-6, atol=0)


def test_chunks_only_where_they_save_memory():
    """Up to 1.5 chunks of frames the chunked head's peak is higher than the full log-probs' (masked_logits.py):
    decoder.forward there."""
    model, batch, decoded = _tiny_model_and_batch()  # 2 x 14 frames
    for chunk, full in ((1024, True), (19, True), (18, False)):  # 28 > 1.5 * 18 only
        model.loss_logits_chunk, before = chunk, len(decoded)
        _step(model, batch)
        assert len(decoded) - before == int(full), chunk


def test_health_metrics_come_from_the_chunked_head_unchanged():
    """trainer.health (on by default) no longer forces the full log-probs: with it the step takes the chunked head
    and every health metric equals the full path's."""
    from nest_ssl.health import HealthMonitor

    model, batch, decoded = _tiny_model_and_batch()
    monitor = HealthMonitor(model)
    metrics = []
    for chunk in (0, 8):  # 0: decoder.forward; 8: several slices
        model.loss_logits_chunk = chunk
        _step(model, batch)
        metrics.append(monitor.collect("train"))
        monitor.prior_hist.clear()  # each window its own code prior
    assert decoded == [1]  # only the chunk=0 step built the full log-probs
    full, chunked = metrics
    assert "context_gain_1" in full and "masked_acc_0" in full and full.keys() == chunked.keys()
    for k in full:
        assert chunked[k] == pytest.approx(full[k], rel=1e-5, abs=1e-7), k
