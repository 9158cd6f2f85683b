"""SpeechEncDecSelfSupervisedModel vs real NeMo (contrastive_tiny): stages, train-mode gradients, sizes, train()."""
import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import PARITY, SPEC
from nest_ssl.contrastive.model import SpeechEncDecSelfSupervisedModel
from nest_ssl.nemo_compat import model_class
from nest_ssl.run_config import load_config
from nest_ssl.train import train
from tests.train_support import make_data

SET = PARITY / "contrastive_tiny"
CFG = json.loads((SET / "config.json").read_text())
ROOT = Path(__file__).resolve().parents[1]


def npz(name):
    with np.load(SET / name) as z:
        return {k: z[k] for k in z.files}


def rel(got, ref):
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def nemo_model(dither=True):
    cfg = copy.deepcopy(CFG["model"])
    if not dither:  # the train-mode set was made with dither 0
        cfg["preprocessor"]["dither"] = 0.0
    model = model_class(cfg).from_config(cfg)
    state = {k: torch.from_numpy(v) for k, v in npz("state_dict.npz").items()}
    model.load_state_dict(state, strict=True)
    return model


def run_forward(model):
    p, m = npz("preprocessor.npz"), npz("masking.npz")
    return model(input_signal=torch.from_numpy(p["wave"]), input_signal_length=torch.from_numpy(p["wave_lengths"]),
                 time_mask=torch.from_numpy(m["time_mask"]), freq_mask=torch.from_numpy(m["freq_mask"]))


def test_config_selects_the_contrastive_model_class():
    assert model_class(CFG["model"]) is SpeechEncDecSelfSupervisedModel


@pytest.mark.numerics
def test_eval_forward_and_losses_match_nemo():
    model = nemo_model().eval()
    e, f, c, m = npz("encoder.npz"), npz("forward.npz"), npz("contrastive.npz"), npz("masking.npz")
    with torch.no_grad():
        spec, masks, enc, enc_len = run_forward(model)
        total, values = model.decoder_loss_step(spec, masks, enc, enc_len,
                                                inject={"contrastive": {"neg_idxs": torch.from_numpy(c["neg_idxs"])}})
    assert np.array_equal(masks.numpy(), m["spec_masks"])
    assert np.array_equal(enc_len.numpy(), e["encoded_lengths"])
    for b, n in enumerate(enc_len.tolist()):
        assert rel(enc[b, :, :n], e["encoded"][b, :, :n]) <= 1e-4
    assert total.shape == (1,)
    assert rel(total, f["loss"]) <= 1e-4
    assert rel(values["contrastive"], f["loss_contrastive"]) <= 1e-4
    assert rel(values["mlm"], f["loss_mlm"]) <= 1e-4


@pytest.mark.numerics
def test_train_mode_loss_gradients_and_batchnorm_match_nemo():
    model = nemo_model(dither=False).train()
    t, g = npz("train.npz"), npz("grads.npz")
    model.set_num_updates(CFG["derived"]["global_step_for_train"])
    spec, masks, enc, enc_len = run_forward(model)
    inject = {"contrastive": {"neg_idxs": torch.from_numpy(t["neg_idxs"]),
                              "gumbel_noise": torch.from_numpy(t["gumbel_noise"])}}
    total, values = model.decoder_loss_step(spec, masks, enc, enc_len, inject=inject)
    total.backward()
    assert rel(total.detach(), t["loss"]) <= 1e-4
    assert rel(values["contrastive"].detach(), t["loss_contrastive"]) <= 1e-4
    zero = set(CFG["derived"]["grads_zero_in_exact_arithmetic"])
    params = dict(model.named_parameters())
    assert set(g) == {k for k, p in params.items() if p.requires_grad}
    scale = max(float(np.abs(v).max()) for k, v in g.items() if k not in zero)
    # 1e-4 of max|ref| per gradient (the parity checker's rule): ours are within 1.9e-6 of NeMo's under AVX2 and
    # ATEN_CPU_CAPABILITY=default, 1-2 threads, so another CPU's rounding has 50x room.
    for name, ref in g.items():
        got = params[name].grad.numpy()
        if name in zero:  # 0 in exact arithmetic: bound on the scale of the largest gradient
            assert np.abs(got).max() / scale <= 1e-4, name
        else:
            assert rel(got, ref) <= 1e-4, name
    state = model.state_dict()
    for key, ref in t.items():
        if ".batch_norm." in key:
            np.testing.assert_allclose(state[key].numpy(), ref, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["conformer_ssl", "fast-conformer"])
def test_shipped_configs_have_nemo_keys_and_parameter_counts(name):
    plain, _ = load_config(SPEC / f"contrastive_{name}.nemo.yaml")
    with torch.device("meta"):
        model = model_class(plain["model"]).from_config(plain["model"])
    lines = (SPEC / f"contrastive_{name}_state_dict.txt").read_text().splitlines()
    ref = [ln.split("\t")[0] for ln in lines if ln and not ln.startswith("#")]
    assert list(model.state_dict()) == ref
    counts = json.loads((SPEC / "contrastive_param_counts.json").read_text())[name]
    assert sum(p.numel() for p in model.parameters()) == counts["total"]


def test_targets_from_a_later_or_missing_loss_is_an_error():
    cfg = copy.deepcopy(CFG["model"])
    cfg["loss_list"]["mlm"]["targets_from_loss"] = "nope"
    with pytest.raises(ValueError, match="targets_from_loss='nope'"):
        SpeechEncDecSelfSupervisedModel.from_config(cfg)


def test_too_short_utterances_give_a_clear_error_instead_of_nemos_crash():
    model = nemo_model().eval()
    wave = torch.randn(2, 8000)  # 0.5 s: too few masked steps for 10 negatives
    with pytest.raises(ValueError, match="num_negatives=10"):
        model.step(wave, torch.tensor([8000, 8000]), generator=torch.Generator().manual_seed(0))


def test_trains_through_the_shared_train_loop(tmp_path):
    data = make_data(tmp_path / "data")
    plain, _ = load_config(ROOT / "configs" / "contrastive_tiny_cpu.yaml", [
        f"model.train_ds.manifest_filepath={data['train']}", f"model.validation_ds.manifest_filepath={data['val']}",
        f"exp_manager.exp_dir={tmp_path / 'exp'}", "trainer.max_steps=3", "trainer.val_check_interval=3"])
    out = train(plain)
    assert len(out["losses"]) == 3 and all(np.isfinite(out["losses"]))
    assert np.isfinite(out["val_loss"])
