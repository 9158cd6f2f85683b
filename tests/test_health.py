"""Health metrics (nest_ssl/health.py): hand computations, the hooks on a real tiny NEST model, the collapse alarm,
no host sync in the step, and the 2-rank reduction equal to one rank on the union batch."""
import gc
import json
import math

import pytest
import torch
import torch.multiprocessing as mp
from test_host_syncs import HostSyncs

from conftest import PARITY
from nest_ssl import distributed, health
from nest_ssl.data.batch import AudioNoiseBatch
from nest_ssl.nest.model import EncDecDenoiseMaskedTokenPredModel


def tiny_model(seed=0):
    torch.manual_seed(seed)
    cfg = json.loads((PARITY / "nest_tiny" / "config.json").read_text())["model"]
    return EncDecDenoiseMaskedTokenPredModel(cfg)


def equal_length_batch(B=4, L=16000, seed=0):
    g = torch.Generator().manual_seed(seed)
    audio = torch.randn(B, L, generator=g)
    lens = torch.full((B,), L)
    return AudioNoiseBatch(audio=audio, audio_len=lens, noise=torch.zeros(B, L), noise_len=lens.clone(),
                           noisy_audio=audio + 0.1 * torch.randn(B, L, generator=g), noisy_audio_len=lens.clone())


def test_token_stats_match_a_hand_computation():
    # one utterance, 4 tokens, 3 classes, 1 codebook; predictions argmax = [0, 1, 2, 2]
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6], [1 / 3, 1 / 3 - 0.01, 1 / 3 + 0.01]])
    lp = probs.log()[None, :, :, None]  # (1, 4, 3, 1)
    tokens = torch.tensor([0, 2, 2, 1])[None, :, None]
    selected = torch.tensor([[True, True, False, False]])
    unmasked = ~selected
    valid = torch.tensor([[True, True, True, False]])  # the last token is padding
    m = health.derive(health.token_stats(lp, tokens, selected, valid, unmasked))
    assert float(m["masked_acc_0"]) == pytest.approx(1 / 2)  # token 0 right, token 1 wrong
    assert float(m["unmasked_acc_0"]) == pytest.approx(1.0)  # token 2 right; token 3 is padding
    h = lambda p: -sum(x * math.log(x) for x in p)  # noqa: E731
    assert float(m["mean_pred_entropy_0"]) == pytest.approx((h(probs[0].tolist()) + h(probs[1].tolist())) / 2)
    # targets over valid tokens: [0, 2, 2] -> coverage 2/3, entropy of (1/3, 2/3)
    assert float(m["target_coverage_0"]) == pytest.approx(2 / 3)
    assert float(m["target_entropy_0"]) == pytest.approx(h([1 / 3, 2 / 3]))
    assert float(m["target_perplexity_0"]) == pytest.approx(math.exp(h([1 / 3, 2 / 3])))
    assert float(m["target_majority_0"]) == pytest.approx(2 / 3)
    # predictions on masked tokens: [0, 1] -> coverage 2/3, perplexity 2
    assert float(m["pred_coverage_0"]) == pytest.approx(2 / 3)
    assert float(m["pred_perplexity_0"]) == pytest.approx(2.0)


def test_histogram_counts_per_codebook():
    ids = torch.tensor([[[0, 3], [1, 3], [1, 3]]])  # (1, 3, 2)
    hist = health.histogram(ids, torch.tensor([[True, True, False]]), 4)
    assert hist.tolist() == [[1, 1, 0, 0], [0, 0, 0, 2]]


def test_relative_frame_variance_by_hand():
    x = torch.tensor([[[1.0, 0.0], [3.0, 0.0], [100.0, 100.0]]])  # the third frame is padding
    m = health.frame_moments(x, torch.tensor([[True, True, False]]))
    # feature 0: mean 2, var 1, E[x^2] 5; feature 1: all 0 -> 1 / 5
    assert float(health.relative_frame_variance(m)) == pytest.approx(0.2)


def test_effective_rank_equals_the_svd_formula():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 6, generator=g, dtype=torch.float64) * torch.tensor([5.0, 3, 2, 1, 0.5, 0.1],
                                                                          dtype=torch.float64)
    s = torch.linalg.svdvals(x - x.mean(0))
    p = s / s.sum()
    expected = math.exp(-(p * p.log()).sum())
    sums = health.subsample_gram(x[None], torch.ones(1, 40, dtype=torch.bool), max_frames=1000)
    got = health.effective_rank(sums["rank_gram"], sums["rank_sum"], sums["rank_n"])
    assert float(got) == pytest.approx(expected, rel=1e-9)
    rank1 = torch.randn(40, 1, generator=g, dtype=torch.float64) * torch.randn(1, 6, generator=g, dtype=torch.float64)
    sums = health.subsample_gram(rank1[None], torch.ones(1, 40, dtype=torch.bool), max_frames=1000)
    assert float(health.effective_rank(sums["rank_gram"], sums["rank_sum"], sums["rank_n"])) == pytest.approx(
        1.0, abs=1e-4)


def test_grad_groups():
    assert health.grad_group("encoder.layers.3.self_attn.linear_q.weight") == "encoder.layers.3"
    assert health.grad_group("encoder.pre_encode.conv.0.weight") == "encoder.pre_encode"
    assert health.grad_group("decoder.decoder_layers.0.weight") == "decoder"


def test_monitor_on_the_nest_model_matches_its_outputs():
    model = tiny_model()
    mon = health.HealthMonitor(model)
    batch = equal_length_batch()
    gen = torch.Generator().manual_seed(1)
    log_probs, enc_len, masks, tokens = model(**model._step_inputs(batch), apply_mask=True, generator=gen)
    model.compute_loss(log_probs, enc_len, masks, tokens)
    m = mon.collect("train")
    sel = health.token_mask(masks, model.loss.cfg.combine_time_steps, model.loss.cfg.mask_threshold)
    assert int(sel.sum()) > 0
    for h in range(2):
        pred = log_probs[..., h].argmax(-1)
        expected = (pred[sel] == tokens[..., h][sel]).double().mean()
        assert m[f"masked_acc_{h}"] == pytest.approx(float(expected))
        valid = torch.arange(tokens.shape[1])[None, :] < enc_len[:, None]  # tokens of padding frames do not count
        assert m[f"target_coverage_{h}"] == pytest.approx(len(tokens[..., h][valid].unique()) / 64)
    assert {"frame_var_layer0", "frame_var_layer1", "frame_var_final", "eff_rank"} <= set(m)
    assert mon.alarms(m) == []  # a random-init encoder is not collapsed
    assert mon.collect("train") == {}  # the window was reset


def test_a_collapsed_encoder_trips_the_alarm():
    model = tiny_model()
    norm = model.encoder.layers[-1].norm_out  # every frame of the last layer becomes the LayerNorm bias
    with torch.no_grad():
        norm.weight.zero_(), norm.bias.normal_()
    mon = health.HealthMonitor(model)
    model.training_step(equal_length_batch(), generator=torch.Generator().manual_seed(1))
    m = mon.collect("train")
    assert m["frame_var_final"] == pytest.approx(0.0, abs=1e-9)
    assert m["eff_rank"] == 0.0
    alarms = mon.alarms(m)
    assert any("frame_var_final" in a for a in alarms) and any("eff_rank" in a for a in alarms)


def test_monitored_step_has_no_host_sync(monkeypatch):
    monkeypatch.setattr("nest_ssl.checks.HOST_CHECKED", ())
    model = tiny_model()
    health.HealthMonitor(model)
    batch, gen = equal_length_batch(B=2), torch.Generator().manual_seed(0)
    with HostSyncs() as mode:
        out = model.training_step(batch, generator=gen)
        out["loss"].backward()
        health.grad_norms(model)
    assert mode.found == []


def _eval_window(model, batch, masks) -> dict:
    mon = health.HealthMonitor(model, health.HealthConfig(rank_frames=10_000))  # no subsampling: exact union
    model.eval()
    with torch.no_grad():
        model.compute_loss(*model(**model._step_inputs(batch), masks=masks))
    return mon.collect("val")


def _rank_worker(rank, world, out_dir):
    import torch.distributed as dist
    torch.set_num_threads(1)
    # a file store, not a TCP port: a port picked free can be taken by another process before rank 0 binds it
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/store", rank=rank, world_size=world)
    batch, masks = _union_inputs()
    half = slice(2 * rank, 2 * rank + 2)
    part = AudioNoiseBatch(**{k: getattr(batch, k)[half] for k in ("audio", "audio_len", "noise", "noise_len",
                                                                   "noisy_audio", "noisy_audio_len")})
    torch.save(_eval_window(tiny_model(), part, masks[half]), f"{out_dir}/health_rank{rank}.pt")
    gc.collect()  # the monitor's forward hooks and the model form a cycle: free them before the group goes
    distributed.teardown()


def _union_inputs():
    batch = equal_length_batch(B=4)
    g = torch.Generator().manual_seed(5)
    T = 112  # preprocessor frames of 1 s: 101, padded to a multiple of 16 (pad_to)
    masks = (torch.rand(4, 1, T // 8, generator=g) < 0.4).float().repeat_interleave(8, -1).expand(4, 80, T)
    return batch, masks.contiguous()


@pytest.mark.slow
def test_two_rank_reduction_equals_one_rank_on_the_union_batch(tmp_path):
    mp.spawn(_rank_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    batch, masks = _union_inputs()
    single = _eval_window(tiny_model(), batch, masks)
    per_rank = [torch.load(tmp_path / f"health_rank{r}.pt") for r in range(2)]
    assert per_rank[0] == per_rank[1]  # every rank gets the reduced value
    assert set(per_rank[0]) == set(single) and "masked_acc_0" in single
    for k, v in single.items():
        assert per_rank[0][k] == pytest.approx(v, rel=1e-5, abs=1e-7), k


def test_contrastive_quantities_match_the_loss_intermediates():
    from nest_ssl.contrastive.model import SpeechEncDecSelfSupervisedModel
    cfg = json.loads((PARITY / "contrastive_tiny" / "config.json").read_text())["model"]
    torch.manual_seed(0)
    model = SpeechEncDecSelfSupervisedModel.from_config(cfg).eval()
    mon = health.HealthMonitor(model)
    wave = torch.randn(2, 32000, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.step(wave, torch.tensor([32000, 32000]), generator=torch.Generator().manual_seed(0))
    m = mon.collect("val")
    loss = model.decoder_losses["contrastive"]["loss"]
    sim, q = loss.last["similarity"], loss.quantizer
    assert m["contrastive_acc"] == pytest.approx(float((sim.argmax(0) == 0).double().mean()))
    assert m["diversity_loss"] == pytest.approx(float(loss.last["prob_ppl"]))
    assert m["code_perplexity"] == pytest.approx(q.groups * q.num_vars * (1 - float(loss.last["prob_ppl"])))
    assert "frame_var_final" in m


def test_context_gain_by_hand():
    # 1 codebook, 3 classes; targets over valid tokens [0, 2, 2]; masked tokens 0 and 1 (targets 0 and 2)
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6], [0.3, 0.3, 0.4]])
    tokens = torch.tensor([0, 2, 2, 1])[None, :, None]
    selected = torch.tensor([[True, True, False, False]])
    valid = torch.tensor([[True, True, True, False]])
    m = health.derive(health.token_stats(probs.log()[None, :, :, None], tokens, selected, valid, ~selected))
    masked_loss = (-math.log(0.7) - math.log(0.1)) / 2
    prior_entropy = -(1 / 3) * math.log(1 / 3) - (2 / 3) * math.log(2 / 3) + (2 - 1) / (2 * 3)  # + Miller-Madow
    assert m["masked_loss_0"] == pytest.approx(masked_loss)
    assert m["context_gain_0"] == pytest.approx(prior_entropy - masked_loss)
    assert m["context_gain"] == pytest.approx(prior_entropy - masked_loss)


def test_a_model_that_outputs_the_code_prior_has_zero_context_gain():
    g = torch.Generator().manual_seed(0)
    q = torch.tensor([0.4, 0.2, 0.15, 0.1, 0.08, 0.04, 0.02, 0.01], dtype=torch.float64)
    N = 200_000
    tokens = torch.multinomial(q, N, replacement=True, generator=g).view(1, N, 1)
    lp = q.log().float().view(1, 1, 8, 1).expand(1, N, 8, 1)  # the prior at every frame, whatever the context
    selected = torch.rand(1, N, generator=g) < 0.3
    m = health.derive(health.token_stats(lp, tokens, selected, torch.ones(1, N, dtype=torch.bool), ~selected))
    nll = -q.log()[tokens[0, :, 0][selected[0]]]
    se = float(nll.std()) / math.sqrt(len(nll))  # the masked loss is a sample mean: gain 0 within its noise
    assert abs(m["context_gain_0"]) < 4 * se
    # a model that knows the context (2/3 on the right code) gains what it should over the prior's entropy
    right = torch.nn.functional.one_hot(tokens[0, :, 0], 8).double() * (2 / 3 - 1 / 21) + 1 / 21
    m = health.derive(health.token_stats(right.log().float().view(1, N, 8, 1), tokens, selected,
                                         torch.ones(1, N, dtype=torch.bool), ~selected))
    entropy_q = float(-(q * q.log()).sum())
    assert m["context_gain_0"] == pytest.approx(entropy_q + math.log(2 / 3), abs=4 * se)


def test_the_code_prior_comes_from_the_running_histogram():
    mon = health.HealthMonitor(torch.nn.Linear(1, 1))  # no encoder: no hooks, collect only
    lp = torch.tensor([[0.5, 0.5]]).log()[None, :, :, None]  # one masked token, 2 classes
    sel = torch.ones(1, 1, dtype=torch.bool)
    mon.sums["train"] = health.token_stats(lp, torch.tensor([[[0]]]), sel, sel, ~sel)
    first = mon.collect("train")
    mon.sums["train"] = health.token_stats(lp, torch.tensor([[[1]]]), sel, sel, ~sel)
    second = mon.collect("train")
    assert first["context_gain_0"] == pytest.approx(0.0 - math.log(2))  # one code seen: entropy 0
    # the prior now holds both windows' targets (1 of each): log 2 + Miller-Madow 1 / (2 * 2)
    assert second["context_gain_0"] == pytest.approx(math.log(2) + 0.25 - math.log(2))


def test_the_context_alarm_tells_each_change_after_warm_up():
    mon = health.HealthMonitor(torch.nn.Linear(1, 1), health.HealthConfig(context_warmup_steps=100))
    assert mon.alarms({"context_gain": -0.3}, step=50) == []  # warm-up: the prior phase is expected
    assert ["predicting the code prior only" in a for a in mon.alarms({"context_gain": -0.3}, step=100)] == [True]
    assert mon.alarms({"context_gain": 0.0}, step=105) == []  # still <= 0: told once
    assert ["context learned" in a for a in mon.alarms({"context_gain": 0.2}, step=110)] == [True]
    assert mon.alarms({"context_gain": 0.3}, step=115) == []
    assert ["context learned" in a for a in mon.alarms({"context_gain": 0.2}, step=110, phase="val")] == [True]
    assert mon.alarms({"context_gain": math.nan}, step=120) == []  # no masked token in the window
    assert mon.alarms({"context_gain": -0.2}, step=125, context=False) == []  # the trainer's train windows with val
