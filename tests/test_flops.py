"""The FLOP model behind MFU: the formula on a hand-checked case, and NEST-L at 20 s ~8.9 GFLOP per audio-second."""
import json

import pytest
import yaml

from conftest import SPEC
from nest_ssl.flops import mfu, nest_train_flops_per_audio_second

ENCODER = yaml.safe_load((SPEC / "nest_fast-conformer.nemo.yaml").read_text())["model"]["encoder"]
TRAINABLE = json.loads((SPEC / "nest_large_param_counts.json").read_text())["trainable"]  # NeMo's NEST-L count


def test_nest_l_at_20s_is_about_8_9_gflop_per_audio_second():
    assert nest_train_flops_per_audio_second(TRAINABLE, ENCODER, 20.0) / 1e9 == pytest.approx(8.9, rel=0.02)


def test_formula_on_a_hand_computed_case():
    # 0.8 s at subsampling 8: 12.5 frames per second, T' = 10; 12.5 * (6 * 1000 + 12 * 2 layers * d 4 * T' 10)
    encoder = {"d_model": 4, "n_layers": 2, "subsampling_factor": 8}
    assert nest_train_flops_per_audio_second(1000, encoder, 0.8) == 12.5 * (6000 + 960)


def test_longer_utterances_cost_more_per_second_through_attention():
    assert nest_train_flops_per_audio_second(TRAINABLE, ENCODER, 60.0) > \
        nest_train_flops_per_audio_second(TRAINABLE, ENCODER, 20.0)


def test_issue_target_40k_audio_seconds_is_about_36_percent_mfu_on_h100():
    f = nest_train_flops_per_audio_second(TRAINABLE, ENCODER, 20.0)
    assert mfu(40_000, f, 989e12) == pytest.approx(0.36, abs=0.01)
