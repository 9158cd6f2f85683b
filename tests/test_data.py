"""Data pipeline: manifests, bad items, decoding, noise, collate, samplers, resume, determinism."""
import json
import random
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from nest_ssl.config import ConfigError, from_dict
from nest_ssl.data.audio import AudioLoader, pad_to_min_len
from nest_ssl.data.batch import AudioNoiseBatch
from nest_ssl.data.config import DatasetConfig
from nest_ssl.data.loader import build_dataloader
from nest_ssl.data.manifest import expand_braces, read_manifests
from nest_ssl.data.sampler import BatchSampler

SR = 16000


def write_wav(path, secs, sr=SR, channels=1, seed=0, fmt=None):
    x = np.random.default_rng(seed).uniform(-0.5, 0.5, (int(secs * sr), channels)).astype(np.float32)
    sf.write(str(path), x if channels > 1 else x[:, 0], sr, format=fmt)
    return x


def write_manifest(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


@pytest.fixture
def corpus(tmp_path):
    """12 utterances of 0.5-1.6 s (relative paths) and 2 noise files."""
    rows = []
    for i in range(12):
        write_wav(tmp_path / f"u{i}.wav", 0.5 + 0.1 * i, seed=i)
        rows.append({"audio_filepath": f"u{i}.wav", "duration": 0.5 + 0.1 * i, "text": "x"})
    noise = []
    for i in range(2):
        write_wav(tmp_path / f"n{i}.wav", 2.0, seed=100 + i)
        noise.append({"audio_filepath": str(tmp_path / f"n{i}.wav"), "duration": 2.0})
    return write_manifest(tmp_path / "train.json", rows), write_manifest(tmp_path / "noise.json", noise)


def cfg(manifest, **kw):
    base = dict(manifest_filepath=manifest, sample_rate=SR, batch_size=2, shuffle=True, drop_last=True,
                return_sample_id=True)
    base.update(kw)
    return DatasetConfig(**base)


def ids(loader):
    return [tuple(b.sample_id) for b in loader]


def test_return_sample_id_is_honoured(corpus):
    with_ids = next(iter(build_dataloader(cfg(corpus[0], shuffle=False), seed=0)))
    without = next(iter(build_dataloader(cfg(corpus[0], shuffle=False, return_sample_id=False), seed=0)))
    assert with_ids.sample_id == ["0", "1"] and without.sample_id is None


# ---- manifests ----
def test_manifest_relative_paths_and_inclusive_duration_filter(corpus, tmp_path):
    entries = read_manifests(corpus[0], min_duration=0.6, max_duration=1.0)
    assert [round(e.duration, 2) for e in entries] == [0.6, 0.7, 0.8, 0.9, 1.0]
    assert entries[0].audio_filepath == str(tmp_path / "u1.wav")


def test_manifest_list_and_comma_string_and_missing_duration_kept(corpus, tmp_path):
    m2 = write_manifest(tmp_path / "m2.json", [{"audio_filepath": "u0.wav"}, ""])
    assert len(read_manifests(f"{corpus[0]},{m2}", min_duration=5.0)) == 1
    assert len(read_manifests([corpus[0], m2])) == 13


def test_bad_json_line_names_file_and_line(tmp_path):
    m = write_manifest(tmp_path / "m.json", [{"audio_filepath": "a.wav"}, "{not json"])
    with pytest.raises(ValueError, match=r"m.json:2: invalid JSON"):
        read_manifests(m)


@pytest.mark.parametrize("pattern,expected", [
    ("a_OP_0..2_CL_.tar", ["a0.tar", "a1.tar", "a2.tar"]),
    ("a(1..2)", ["a1", "a2"]), ("a[x,y]b", ["axb", "ayb"]), ("a<08..10>", ["a08", "a09", "a10"]),
    ("{a,b}{0..1}", ["a0", "a1", "b0", "b1"]), ("plain.tar", ["plain.tar"]),
])
def test_brace_expansion(pattern, expected):
    assert expand_braces(pattern) == expected


# ---- decoding ----
def test_resample_and_downmix_logged_once(tmp_path, caplog):
    write_wav(tmp_path / "s.wav", 0.5, sr=8000, channels=2)
    loader = AudioLoader(SR)
    y = loader.load(str(tmp_path / "s.wav"))
    loader.load(str(tmp_path / "s.wav"))
    assert y.ndim == 1 and abs(y.shape[0] - 8000) <= 1
    import torchaudio
    x, _ = sf.read(str(tmp_path / "s.wav"), dtype="float32")
    ref = torchaudio.functional.resample(torch.from_numpy(x.mean(1)), 8000, SR)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    assert sum("resampling" in r.message for r in caplog.records) == 1
    assert sum("down-mixing" in r.message for r in caplog.records) == 1


def test_offset_duration_and_repeat_pad(tmp_path):
    x = write_wav(tmp_path / "s.wav", 1.0)
    y = AudioLoader(SR).load(str(tmp_path / "s.wav"), offset=0.25, duration=0.5)
    torch.testing.assert_close(y, torch.from_numpy(x[4000:12000, 0]), rtol=0, atol=1e-4)
    p = pad_to_min_len(torch.arange(3.0), 7, "repeat")
    assert p.tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert pad_to_min_len(torch.arange(3.0), 5, "zero").tolist() == [0, 1, 2, 0, 0]


# ---- bad items ----
def _bad_corpus(tmp_path, kind):
    rows = [{"audio_filepath": str(tmp_path / f"g{i}.wav"), "duration": 1.0} for i in range(4)]
    for i in range(4):
        write_wav(tmp_path / f"g{i}.wav", 1.0, seed=i)
    bad = tmp_path / "bad.wav"
    if kind == "truncated":
        write_wav(bad, 1.0)
        bad.write_bytes(bad.read_bytes()[:30])
    elif kind == "zero_length":
        sf.write(str(bad), np.zeros(0, np.float32), SR)
    elif kind == "nan":
        sf.write(str(bad), np.full(SR, np.nan, np.float32), SR, subtype="FLOAT")
    elif kind == "garbage":
        bad.write_bytes(b"not audio at all" * 10)
    rows.insert(1, {"audio_filepath": str(bad), "duration": 1.0})  # kind == "missing": never written
    return write_manifest(tmp_path / "m.json", rows)


@pytest.mark.parametrize("kind", ["missing", "truncated", "zero_length", "nan", "garbage"])
def test_bad_item_skipped_counted_and_strict_mode_raises(tmp_path, kind):
    m = _bad_corpus(tmp_path, kind)
    loader = build_dataloader(cfg(m, shuffle=False, batch_size=5, drop_last=False))
    batches = list(loader)
    assert [len(b) for b in batches] == [4]
    assert len(loader.bad_samples) == 1 and loader.bad_samples[0][0].endswith("bad.wav")
    assert (loader.bad_samples[0][1] == "no such file") == (kind == "missing")
    with pytest.raises(ValueError, match="bad.wav"):
        list(build_dataloader(cfg(m, shuffle=False, batch_size=5, skip_bad_samples=False)))


def test_strict_mode_finds_a_missing_file_at_start_up_naming_manifest_and_line(tmp_path):
    m = _bad_corpus(tmp_path, "missing")  # bad.wav is line 2
    with pytest.raises(ValueError, match=f"{m}:2: .*bad.wav: no such file \\(skip_bad_samples=false\\)"):
        build_dataloader(cfg(m, shuffle=False, batch_size=5, skip_bad_samples=False))  # no batch is read


def test_max_bad_samples_error_names_files(tmp_path):
    m = _bad_corpus(tmp_path, "missing")
    loader = build_dataloader(cfg(m, shuffle=False, batch_size=5, max_bad_samples=0))
    with pytest.raises(RuntimeError, match="bad.wav"):
        list(loader)


def test_bad_item_in_worker_process_does_not_hang(tmp_path):
    m = _bad_corpus(tmp_path, "garbage")
    loader = build_dataloader(cfg(m, shuffle=False, batch_size=1, num_workers=2, skip_bad_samples=False))
    with pytest.raises(ValueError, match="bad.wav"):
        list(loader)


def test_empty_manifest_rejected_natively_and_through_lhotse(tmp_path):
    m = write_manifest(tmp_path / "m.json", [])
    with pytest.raises(ValueError, match="no items"):
        build_dataloader(cfg(m))
    with pytest.raises(ValueError, match="model.train_ds: no cuts left"):
        build_dataloader(cfg(m, use_lhotse=True))


# ---- collate / noise ----
def test_collate_pads_and_mixes_noise(corpus):
    loader = build_dataloader(cfg(corpus[0], noise_manifest=corpus[1], shuffle=False, batch_size=4))
    b = next(iter(loader))
    assert isinstance(b, AudioNoiseBatch) and b.audio.shape == b.noise.shape == b.noisy_audio.shape
    assert b.audio_len.dtype == torch.long and b.audio.dtype == torch.float32
    assert b.audio_len.tolist() == [SR] * 4  # 0.5-0.8 s repeat-padded to min_audio_len_secs
    assert (b.noise.abs().sum(1) > 0).all()
    torch.testing.assert_close(b.noisy_audio, b.audio + b.noise)


def test_augmentor_called_in_collate_with_seeded_rng(corpus):
    seen = []

    def stub(batch, rng):
        seen.append(rng.random())
        batch.noisy_audio, batch.noisy_audio_len = batch.audio * 0, batch.audio_len
        return batch

    loader = build_dataloader(cfg(corpus[0], shuffle=False), augmentor=stub, seed=3)
    assert all((b.noisy_audio == 0).all() for b in loader)
    first = list(seen)
    seen.clear()
    list(build_dataloader(cfg(corpus[0], shuffle=False), augmentor=stub, seed=3))
    assert seen == first and len(set(first)) == len(first)


def test_augment_on_device_leaves_mixing_to_model(corpus):
    b = next(iter(build_dataloader(cfg(corpus[0], augment_on_device=True), augmentor=lambda b, r: 1 / 0)))
    assert b.noisy_audio is None and b.noise is not None


def test_noise_deterministic_regardless_of_workers(corpus):
    a = [b.noise for b in build_dataloader(cfg(corpus[0], noise_manifest=corpus[1]), seed=5)]
    b = [b.noise for b in build_dataloader(cfg(corpus[0], noise_manifest=corpus[1], num_workers=2), seed=5)]
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and len(a) == 6


# ---- samplers ----
def test_determinism_from_seed_and_epoch(corpus):
    assert ids(build_dataloader(cfg(corpus[0]), seed=1)) == ids(build_dataloader(cfg(corpus[0]), seed=1))
    assert ids(build_dataloader(cfg(corpus[0]), seed=1)) != ids(build_dataloader(cfg(corpus[0]), seed=2))
    loader = build_dataloader(cfg(corpus[0]), seed=1)
    loader.set_epoch(1)
    assert ids(loader) != ids(build_dataloader(cfg(corpus[0]), seed=1))


@pytest.mark.parametrize("world_size", [2, 3, 5])
@pytest.mark.parametrize("duration", [None, 2.5])
def test_same_number_of_batches_on_every_rank(world_size, duration):
    durs = [random.Random(i).uniform(0.5, 2.0) for i in range(37)]
    samplers = [BatchSampler(durs, 3, shuffle=True, drop_last=False, rank=r, world_size=world_size, seed=0,
                             batch_duration=duration, num_buckets=4) for r in range(world_size)]
    counts = {len(list(s)) for s in samplers}
    assert len(counts) == 1 and counts.pop() > 0
    seen = [i for s in samplers for b in s for i in b]
    assert len(seen) == len(set(seen))  # ranks never share an item within an epoch


def test_bucketing_respects_duration_budget():
    durs = [random.Random(i).uniform(0.5, 20.0) for i in range(300)]
    s = BatchSampler(durs, 1, shuffle=True, drop_last=False, seed=0, batch_duration=40.0, num_buckets=8,
                     bucket_buffer_size=100)
    batches = list(s)
    assert all(len(b) * max(durs[i] for i in b) <= 40.0 for b in batches)
    assert sorted(i for b in batches for i in b) == list(range(300))
    assert np.mean([len(b) for b in batches]) > 3


def test_resume_mid_epoch_yields_exactly_the_remaining_batches(corpus):
    full = ids(build_dataloader(cfg(corpus[0]), seed=4))
    loader = build_dataloader(cfg(corpus[0]), seed=4)
    it = iter(loader)
    head = [tuple(next(it).sample_id) for _ in range(2)]
    sd = loader.state_dict()
    resumed = build_dataloader(cfg(corpus[0]), seed=4)
    resumed.load_state_dict(sd)
    assert head + ids(resumed) == full and len(resumed) == len(full) == 6


def test_concat_temperature_sampling(corpus, tmp_path):
    m2 = write_manifest(tmp_path / "m2.json", [{"audio_filepath": "u0.wav", "duration": 0.5}] * 2)
    c = cfg([corpus[0], m2], is_concat=True, concat_sampling_temperature=1e6, batch_size=1)
    picked = [int(b.sample_id[0]) for b in build_dataloader(c, seed=0)]
    assert len(picked) == 14 and sum(i >= 12 for i in picked) >= 3  # ~uniform over datasets at high T


@pytest.mark.parametrize("key,value", [("trim_silence", True), ("bucketing_batch_size", 4), ("batch_size", 0),
                                       ("augmentor", {"a": 1}), ("concat_sampling_technique", "random")])
def test_config_rejects_unsupported_values(corpus, key, value):
    with pytest.raises(ValueError, match=key):
        build_dataloader(cfg(corpus[0], is_concat=True, **{key: value}))


@pytest.mark.parametrize("key", ["pad_audio_mode", "tarred_shard_strategy", "bucketing_strategy",
                                 "concat_sampling_technique"])
def test_config_variants_name_the_allowed_values(key):
    with pytest.raises(ConfigError, match=rf"model\.train_ds\.{key}='x': allowed values are \['"):
        from_dict(DatasetConfig, {key: "x"}, "model.train_ds")


def test_concat_from_comma_string_counts_bad_file_once_per_epochs(corpus, tmp_path):
    m2 = write_manifest(tmp_path / "m2.json", [{"audio_filepath": "gone.wav", "duration": 1.0}])
    loader = build_dataloader(cfg(f"{corpus[0]},{m2}", is_concat=True, batch_size=1, max_bad_samples=1))
    for epoch in range(2):
        loader.set_epoch(epoch)
        list(loader)
    assert loader.bad_samples == [("gone.wav", "no such file")]  # unresolved: the joined path does not exist


def test_missing_duration_is_measured_before_the_filters(corpus, tmp_path):
    m2 = write_manifest(tmp_path / "m2.json", [{"audio_filepath": "u3.wav"}])
    real = sf.info(str(tmp_path / "u3.wav")).duration
    loader = build_dataloader(cfg([corpus[0], m2], batch_duration=3.0, num_buckets=2))
    assert loader.bad_samples == [] and len(loader.manifest_report.measured) == 1
    assert loader.dataset.entries[-1].duration == pytest.approx(real)  # batch_duration budgets the real length
    short = build_dataloader(cfg([corpus[0], m2], batch_size=1, max_duration=real - 0.01))
    mine = [f for f in short.manifest_report.filtered if f.where == f"{m2}:1"]
    assert [f.kind for f in mine] == ["too_long"]  # measured, so max_duration applies to it
    assert str(tmp_path / "u3.wav") not in [e.audio_filepath for e in short.dataset.entries]


def test_batch_to_and_pin_memory_move_every_tensor():
    b = AudioNoiseBatch(sample_id=["0"], audio=torch.ones(1, 4), audio_len=torch.tensor([4]), noise=torch.zeros(1, 4),
                        noise_len=torch.tensor([4]))
    moved = b.to("cpu", non_blocking=True)
    assert moved.sample_id == ["0"] and moved.noisy_audio is None and torch.equal(moved.audio, b.audio)
    assert len(b) == 1
    if torch.cuda.is_available():
        pinned = b.pin_memory()
        assert pinned.audio.is_pinned() and pinned.audio_len.is_pinned()
        assert b.to("cuda", non_blocking=True).audio.is_cuda


def test_pin_memory_loader_keeps_batch_type(corpus):
    b = next(iter(build_dataloader(cfg(corpus[0], pin_memory=torch.cuda.is_available()))))
    assert isinstance(b, AudioNoiseBatch)


def test_char_dataset_labels_and_collate(corpus, tmp_path):
    from nest_ssl.data.char_dataset import AudioToCharDataset, char_collate
    m = write_manifest(tmp_path / "c.json", [{"audio_filepath": "u0.wav", "text": "Ab c!"},
                                             {"audio_filepath": "u1.wav", "text": "b"}])
    ds = AudioToCharDataset(read_manifests(m), [" ", "a", "b", "c"], SR)
    audio, a_len, tokens, t_len = char_collate([ds[0], ds[1]])
    assert tokens.tolist() == [[1, 2, 0, 3], [2, 0, 0, 0]] and t_len.tolist() == [4, 1]
    assert a_len.tolist() == [8000, 9600] and audio.shape == (2, 9600)


def test_fixed_batches_wrap_around_when_fewer_items_than_batch_size():
    s = BatchSampler([1.0] * 3, 8, shuffle=False, drop_last=False)
    assert list(s) == [[0, 1, 2, 0, 1, 2, 0, 1]]
    assert list(BatchSampler([1.0] * 3, 8, shuffle=False, drop_last=True)) == []


def test_resample_and_downmix_notes_are_logged_once_per_run_across_loaders_workers_and_epochs(tmp_path):
    """Workers restart every epoch with a fresh copy of the dataset; train and validation have their own loaders.
    A subprocess, so that the workers' log lines reach a stderr we can read."""
    import subprocess
    import sys
    import textwrap

    rows = []
    for i in range(6):  # 22.05 kHz stereo: every file is resampled and down-mixed
        p = tmp_path / f"a{i}.wav"
        sf.write(str(p), np.random.default_rng(i).uniform(-0.3, 0.3, (22050, 2)).astype(np.float32), 22050)
        rows.append({"audio_filepath": str(p), "duration": 1.0})
    m = write_manifest(tmp_path / "m.json", rows)
    code = textwrap.dedent(f"""
        import logging, sys
        from nest_ssl.data.config import DatasetConfig
        from nest_ssl.data.loader import build_dataloader
        logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
        for is_train in (True, False):
            loader = build_dataloader(DatasetConfig(manifest_filepath={str(m)!r}, noise_manifest={str(m)!r},
                                                    batch_size=2, num_workers=2), is_train=is_train)
            for epoch in range(2):
                loader.set_epoch(epoch)
                for _ in loader:
                    pass
        """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1])
    assert run.returncode == 0, run.stderr
    assert run.stderr.count("further resampling is not logged") == 1, run.stderr
    assert run.stderr.count("further down-mixes are not logged") == 1, run.stderr
