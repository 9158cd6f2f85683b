"""nest_ssl.features: per-utterance layer features from a manifest, batched, equal to one-at-a-time encoding."""
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from test_export import tiny_model

from nest_ssl import export, features

DURATIONS = (0.5, 0.83, 0.31)  # seconds; different lengths so the batch is padded


@pytest.fixture
def manifest(tmp_path):
    rng = np.random.default_rng(0)
    lines = []
    for i, dur in enumerate(DURATIONS):
        path = tmp_path / "wav" / f"utt{i}.wav"
        path.parent.mkdir(exist_ok=True)
        sf.write(path, (0.1 * rng.standard_normal(int(dur * 16000))).astype(np.float32), 16000, subtype="FLOAT")
        lines.append(json.dumps({"audio_filepath": str(path), "duration": dur, "text": ""}))
    m = tmp_path / "manifest.json"
    m.write_text("\n".join(lines) + "\n")
    return m


def _one_at_a_time(model, path, layers):
    wav = torch.from_numpy(sf.read(path, dtype="float32")[0])[None]  # (1, L)
    out = features.encode_batch(model, wav, torch.tensor([wav.shape[1]]), layers)
    n = int(out.pop("_len")[0])
    return {k: v[0, :n].numpy() for k, v in out.items()}


@pytest.mark.parametrize("fmt", features.FEATURE_FORMATS)
def test_batched_features_equal_single_utterance_encoding(tmp_path, manifest, fmt):
    model = tiny_model()
    out_manifest, failed = features.extract_features(model, manifest, tmp_path / "feats", layers="0,-1",
                                                     batch_size=2, fmt=fmt, device="cpu", progress=False)
    assert failed == []
    rows = [json.loads(line) for line in out_manifest.read_text().splitlines()]
    assert [r["duration"] for r in rows] == list(DURATIONS)
    d_model = model.model_cfg["encoder"]["d_model"]
    worst = 0.0
    for row in rows:
        ref = _one_at_a_time(model, row["audio_filepath"], [0, "final"])
        if fmt == "npz":
            with np.load(row["feature_filepath"]) as z:
                got = {0: z["layer_0"], "final": z["final"]}
        else:
            got = {0: np.load(row["feature_filepath_layer_0"]), "final": np.load(row["feature_filepath_final"])}
        for k in ref:
            assert got[k].shape == ref[k].shape and got[k].shape[1] == d_model and got[k].dtype == np.float32
            worst = max(worst, float(np.abs(got[k] - ref[k]).max() / np.abs(ref[k]).max()))
    print(f"\nbatched vs single max rel err {worst:.2e}")
    assert worst <= 1e-4  # padding changes only summation order (batch statistics use the valid frames)


def test_last_layer_hook_equals_encoder_output(tmp_path, manifest):
    model = tiny_model()
    n = len(model.encoder.layers)
    wav = torch.from_numpy(sf.read(json.loads(manifest.read_text().splitlines()[0])["audio_filepath"],
                                   dtype="float32")[0])[None]
    out = features.encode_batch(model, wav, torch.tensor([wav.shape[1]]), [n - 1, "final"])
    assert torch.equal(out[n - 1], out["final"])  # no out_proj in nest_tiny (feat_out = -1)


def test_extract_from_a_nemo_file(tmp_path, manifest):
    model = tiny_model()
    nemo = export.save_nemo(model, model.model_cfg, tmp_path / "m.nemo")
    out, _ = features.extract_features(export.load_pretrained(nemo), manifest, tmp_path / "f", layers="final",
                                       device="cpu", progress=False)
    assert len(out.read_text().splitlines()) == len(DURATIONS)


@pytest.mark.parametrize("spec, needle", [("0,x", "not an integer"), ("7", "out of range"), ("-2", "out of range"),
                                          ("", "not an integer")])
def test_bad_layer_specs_are_refused(spec, needle):
    with pytest.raises(ValueError, match=needle):
        features.parse_layers(spec, 2)


def test_layer_spec_parsing():
    assert features.parse_layers("0, 1,-1,final", 2) == [0, 1, "final"]


def test_a_missing_audio_mid_run_is_listed_and_never_in_a_manifest_that_looks_complete(tmp_path, manifest, capsys):
    lines = manifest.read_text().splitlines()
    gone = json.loads(lines[1])["audio_filepath"]
    Path(gone).unlink()  # the second of three: met mid-run, after the first batch was written
    out, failed = features.extract_features(tiny_model(), manifest, tmp_path / "f", batch_size=1, device="cpu")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["audio_filepath"] for r in rows] == [json.loads(lines[i])["audio_filepath"] for i in (0, 2)]
    assert [(f["audio_filepath"], f["kind"]) for f in failed] == [(gone, "no_such_file")]
    listed = [json.loads(line) for line in (tmp_path / "f" / features.FAILED).read_text().splitlines()]
    assert listed == failed
    err = capsys.readouterr().err
    assert "1/3 utterances, 0 failed" in err and err.endswith("\n")
    assert "2/3 utterances, 1 failed, " in err.split("\n")[0]  # the failure ends the \r line: nothing joins it
    assert not list((tmp_path / "f").glob(".*.tmp"))
