"""Frozen-encoder probe (nest_ssl/probe.py): scoring helpers by hand, the probe learns the synthetic corpus and is
reproducible, it leaves the model and the RNG as they were, and the tarred char dataset serves the same items."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import PARITY
from nest_ssl import probe
from nest_ssl.data.char_dataset import AudioToCharDataset, TarredAudioToCharDataset
from nest_ssl.data.manifest import read_manifests
from nest_ssl.data.probe_corpus import LABELS, write_probe_corpus
from nest_ssl.data.tarred import write_tarred_dataset
from nest_ssl.nest.model import EncDecDenoiseMaskedTokenPredModel


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_probe_corpus(tmp_path_factory.mktemp("probe"), num_train=48, num_eval=16, seed=0)


def tiny_model():
    torch.manual_seed(0)
    return EncDecDenoiseMaskedTokenPredModel(json.loads((PARITY / "nest_tiny" / "config.json").read_text())["model"])


def test_edit_distance_and_greedy_ctc_by_hand():
    assert probe.edit_distance("kitten", "sitting") == 3
    assert probe.edit_distance("ab cd".split(), "ab ce".split()) == 1
    blank = 9
    frames = torch.tensor([1, 1, blank, 1, 2, 2, blank, 3, 4])  # -> 1 1 2 3 (the last frame is padding)
    log_probs = torch.nn.functional.one_hot(frames, 10).float().log()
    assert probe.greedy_ctc(log_probs, 8, blank) == [1, 1, 2, 3]


def test_ctc_probe_learns_and_is_reproducible(corpus):
    model = tiny_model()
    cfg = probe.ProbeConfig(task="ctc", train_manifest=corpus["train"], eval_manifest=corpus["eval"],
                            labels=corpus["labels"], steps=150, hidden=128)
    rng_before = torch.get_rng_state()
    first = probe.run_probe(model, cfg)
    assert torch.equal(torch.get_rng_state(), rng_before) and model.training  # training streams untouched
    # chance: an empty or random transcript has CER >= 1; a random-init encoder's features already carry the sounds
    assert first["probe_cer"] < 0.75
    assert sum(first["layer_weights"]) == pytest.approx(1.0) and len(first["layer_weights"]) == 3
    assert probe.run_probe(model, cfg) == first


def test_classification_probe_beats_chance(corpus):
    cfg = probe.ProbeConfig(task="classification", train_manifest=corpus["train"], eval_manifest=corpus["eval"],
                            steps=100, hidden=64)
    result = probe.run_probe(tiny_model(), cfg)
    assert result["probe_acc"] > 1 / 3 + 0.15  # three speakers


def test_probe_config_errors():
    with pytest.raises(ValueError, match="train_manifest and eval_manifest"):
        probe.ProbeConfig(enabled=True)
    with pytest.raises(ValueError, match="task"):
        probe.ProbeConfig(task="asr")
    with pytest.raises(ValueError, match="0..2"):
        probe.select_states([0, 3], 3)


def test_tarred_char_dataset_serves_the_plain_items(corpus, tmp_path):
    shards = write_tarred_dataset(corpus["eval"], str(tmp_path / "shards"), num_shards=2)
    plain = AudioToCharDataset(read_manifests(corpus["eval"]), LABELS, 16000)
    tarred = TarredAudioToCharDataset(read_manifests(str(tmp_path / "shards" / "tarred_audio_manifest.json")),
                                      shards, LABELS, 16000)
    a = sorted((x[2].tolist(), x[0].sum().item()) for x in plain)
    b = sorted((x[2].tolist(), x[0].sum().item()) for x in tarred)
    assert a == b and len(a) == 16


def test_cli_scores_a_saved_model(corpus, tmp_path):
    from nest_ssl.export import save_nemo
    model = tiny_model()
    save_nemo(model, json.loads((PARITY / "nest_tiny" / "config.json").read_text())["model"], tmp_path / "m.nemo")
    script = Path(__file__).resolve().parents[1] / "scripts" / "probe.py"
    run = subprocess.run([sys.executable, str(script), str(tmp_path / "m.nemo"), "--train-manifest", corpus["train"],
                          "--eval-manifest", corpus["eval"], "--steps", "5", "--json"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert 0.0 <= json.loads(run.stdout)["probe_cer"]


def test_the_demo_says_what_it_is_doing_as_it_starts_each_part(tmp_path):
    heard = []
    cfg = json.loads((PARITY / "nest_tiny" / "config.json").read_text())["model"]
    rows = probe.demo(str(tmp_path), None, cfg, steps=2, num_train=8, num_eval=4, progress=heard.append)
    assert len(rows) == 2 and len(heard) == 3  # the corpus, then each (encoder, task) before it runs
    assert heard[0].startswith("probe demo: writing the labelled corpus (8 train, 4 eval)")
    assert heard[1].startswith("probe demo: 1/2 random init, ctc") and heard[2].startswith("probe demo: 2/2 random")
