"""use_lhotse: NeMo's Lhotse keys, every input kind, lhotse's own samplers, rank split, resume, key checks.

Inputs are written with lhotse's own writers (CutSet.to_file, SharWriter) from a generated corpus; nothing is
downloaded. Training runs through this path are in test_lhotse_train.py.
"""
import json
import os

import numpy as np
import pytest
import soundfile as sf
import torch

from nest_ssl.config import ConfigError
from nest_ssl.data.config import DatasetConfig
from nest_ssl.data.lhotse_source import LhotsePlan
from nest_ssl.data.loader import build_dataloader
from nest_ssl.data.tarred import write_tarred_dataset
from nest_ssl.run_config import build_run_config

lhotse = pytest.importorskip("lhotse")
SR = 16000
N = 13  # not a multiple of the batch sizes or of 2 ranks


def durations():
    return [round(0.5 + 0.1 * i, 1) for i in range(N)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from lhotse import CutSet, Recording
    from lhotse.shar import SharWriter

    d = tmp_path_factory.mktemp("lhotse")
    rows = []
    for i, secs in enumerate(durations()):
        x = np.random.default_rng(i).uniform(-0.5, 0.5, int(secs * SR)).astype(np.float32)
        sf.write(d / f"u{i}.wav", x, SR)
        rows.append({"audio_filepath": str(d / f"u{i}.wav"), "duration": secs})
    (d / "m.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cuts = CutSet.from_cuts([Recording.from_file(r["audio_filepath"]).to_cut() for r in rows])
    cuts.to_file(d / "cuts.jsonl.gz")
    os.makedirs(d / "shar")
    with SharWriter(str(d / "shar"), fields={"recording": "flac"}, shard_size=4) as w:
        for c in cuts:
            w.write(c)
    write_tarred_dataset(str(d / "m.json"), str(d / "tarred"), num_shards=3)
    return d


def inputs(d):
    return {"manifest": dict(manifest_filepath=str(d / "m.json")),
            "cuts": dict(cuts_path=str(d / "cuts.jsonl.gz")),
            "shar": dict(shar_path=str(d / "shar")),
            "nemo_tarred": dict(manifest_filepath=str(d / "tarred" / "tarred_audio_manifest.json"),
                                tarred_audio_filepaths=str(d / "tarred" / "audio__OP_0..2_CL_.tar"))}


def cfg(src: dict, **kw) -> DatasetConfig:
    base = dict(use_lhotse=True, sample_rate=SR, batch_size=None, batch_duration=3.0, shuffle=True, shard_seed=5,
                return_sample_id=True, min_audio_len_secs=0.0)
    return DatasetConfig(**{**base, **src, **kw})


def durations_of(loader) -> list[list[float]]:
    return [[round(int(n) / SR, 1) for n in b.audio_len] for b in loader]


@pytest.mark.parametrize("kind", ["manifest", "cuts", "shar", "nemo_tarred"])
def test_every_input_kind_yields_every_cut_once_with_the_same_samples(corpus, kind):
    """The same audio through each input kind: every cut once per epoch, sample for sample equal to the file (Shar
    members are FLAC of the 16-bit WAVs, so lossless). Fails if a tar member is read at the wrong offset, a shard or
    cut is dropped, or the Shar shard pairing is off by one."""
    loader = build_dataloader(cfg(inputs(corpus)[kind], shuffle=False, batch_duration=None, batch_size=1))
    got = {}
    for b in loader:
        got[round(int(b.audio_len[0]) / SR, 1)] = b.audio[0, : b.audio_len[0]]
    assert sorted(got) == durations()
    for i, secs in enumerate(durations()):
        ref = torch.from_numpy(sf.read(corpus / f"u{i}.wav", dtype="float32")[0])
        assert torch.equal(got[secs], ref), (kind, i)


def test_plan_is_lhotses_own_sampler_over_the_cuts(corpus):
    """Our plan for a cuts manifest equals lhotse's DynamicBucketingSampler run directly on that manifest with the
    arguments NeMo passes (shard_seed as seed, buffer_size + shuffle_buffer_size, the bins): the batching is
    lhotse's, not a reimplementation. Fails if any argument differs (seed, bins, constraint, drop_last)."""
    from lhotse import CutSet
    from lhotse.dataset import DynamicBucketingSampler

    c = cfg(inputs(corpus)["cuts"], use_bucketing=True, num_buckets=3, bucket_duration_bins=[0.9, 1.3],
            shuffle_buffer_size=7)
    ours = LhotsePlan(c, __import__("nest_ssl.data.lhotse_inputs", fromlist=["x"]).read_inputs(c, "t"), rank=0,
                      world_size=1, seed=5, even=True)
    ids = [c.id for c in CutSet.from_file(corpus / "cuts.jsonl.gz")]
    for epoch in (0, 1):
        ref = DynamicBucketingSampler(CutSet.from_jsonl_lazy(corpus / "cuts.jsonl.gz"), max_duration=3.0,
                                      shuffle=True, seed=5, duration_bins=[0.9, 1.3], buffer_size=10000 + 7,
                                      concurrent=False, world_size=1, rank=0)
        ref.set_epoch(epoch)
        ours.set_epoch(epoch)
        assert [[ids[i] for i in b] for b in ours.epoch_batches()] == [[c.id for c in b] for b in ref]
    assert ours.epoch_batches() != LhotsePlan(c, ours.items, rank=0, world_size=1, seed=5, even=True).epoch_batches()


@pytest.mark.parametrize("shuffle", [True, False])
def test_shar_plan_is_nemos_sampler_over_nemos_shard_order(corpus, shuffle):
    """Our Shar plan equals what NeMo 2.6.2 samples: lhotse's DynamicCutSampler over CutSet.from_shar(
    shuffle_shards=True, seed=shard_seed) (nemo/collections/common/data/lhotse/cutset.py, read_lhotse_manifest's
    shar_path branch: shards shuffled even with shuffle false), whose LazySharIterator shuffles the shards with
    random.Random(shard_seed + epoch), epoch = the passes made so far (lhotse/shar/readers/lazy.py, _get_rng with
    stateful_shuffle). Fails if our shard order uses another RNG (it was random.Random(f"{seed}-{epoch}"): same
    cuts, other batches; 4 shards here) or keeps the written order without shuffle."""
    import glob

    from lhotse import CutSet
    from lhotse.dataset import DynamicCutSampler

    loader = build_dataloader(cfg(inputs(corpus)["shar"], shuffle=shuffle))
    ids = [e.where.split(": cut ", 1)[1] for e in loader.dataset.entries]
    nemo_cuts = CutSet.from_shar(fields={"cuts": sorted(glob.glob(str(corpus / "shar" / "cuts.*")))},
                                 shuffle_shards=True, seed=5)  # one object: its pass count is the epoch
    ref = DynamicCutSampler(nemo_cuts, max_duration=3.0, shuffle=shuffle, shuffle_buffer_size=10000, seed=5)
    for epoch in (0, 1):
        ref.set_epoch(epoch)
        loader.set_epoch(epoch)
        assert [[ids[i] for i in b] for b in loader.sampler.epoch_batches()] == [[c.id for c in b] for b in ref]


def test_plans_repeat_for_a_seed_and_change_with_the_epoch_and_shard_seed(corpus):
    c = cfg(inputs(corpus)["shar"])
    a, b = build_dataloader(c), build_dataloader(c)
    assert durations_of(a) == durations_of(b)  # two builds, one plan (epoch 0)
    first = durations_of(b)  # b is now at epoch 1
    assert durations_of(b) != first
    other = build_dataloader(cfg(inputs(corpus)["shar"], shard_seed=6))
    assert durations_of(other) != durations_of(build_dataloader(c))


def test_trng_shard_seed_uses_the_run_seed_so_a_run_can_resume(corpus):
    """NeMo's default shard_seed 'trng' draws a new seed per run; here it is the run's seed (parity policy: seeded)."""
    c = cfg(inputs(corpus)["shar"], shard_seed="trng")
    assert durations_of(build_dataloader(c, seed=3)) == durations_of(build_dataloader(c, seed=3))
    assert durations_of(build_dataloader(c, seed=3)) == durations_of(build_dataloader(cfg(inputs(corpus)["shar"],
                                                                                          shard_seed=3)))


def test_bucket_batch_size_caps_each_bucket_and_drops_cuts_past_the_last_bin(corpus):
    """NeMo's per-bucket batch sizes (FixedBucketBatchSizeConstraint): a batch holds at most its bucket's size, and
    the cuts longer than the last bin (1.2 and 1.3..1.7 s here) are filtered out and counted, as NeMo's
    BucketingFilter drops them."""
    c = cfg(inputs(corpus)["cuts"], batch_duration=None, use_bucketing=True, bucket_duration_bins=[0.8, 1.1],
            bucket_batch_size=[3, 2])
    loader = build_dataloader(c)
    batches = durations_of(loader)
    for b in batches:
        cap = 3 if max(b) <= 0.8 else 2
        assert len(b) <= cap and (max(b) <= 0.8 or min(b) > 0.8), b  # one bucket per batch
    assert sorted(x for b in batches for x in b) == [d for d in durations() if d <= 1.1]
    assert len(loader.manifest_report.filtered) == sum(d > 1.1 for d in durations())
    assert "last bucket_duration_bins edge" in loader.manifest_report.filtered[0].reason


@pytest.mark.parametrize("kind", ["cuts", "shar"])
def test_two_ranks_get_equal_batch_counts_and_every_cut_once(corpus, kind):
    """Training uses lhotse's rank split: equal batch counts, and each cut in exactly one batch. 12 cuts in batches
    of 2 (6 batches, 3 rounds of 2) and 13 cuts in batches of 4 (4, 4, 4, 1: the second round is (4, 1)) are both
    dealt once. 13 cuts in batches of 2 leave one cut for the last round of 2 ranks: the one case where lhotse
    repeats a cut (so that both ranks have a last batch), counted in `repeated`. Fails if a rank gets one batch
    more (a DDP hang), or a cut is dropped or doubled outside that case."""
    def run(**kw):
        loaders = [build_dataloader(cfg(inputs(corpus)[kind], batch_duration=None, **kw), rank=r, world_size=2)
                   for r in range(2)]
        per_rank = [durations_of(ld) for ld in loaders]
        assert len(per_rank[0]) == len(per_rank[1]) == len(loaders[0])
        return sorted(x for r in per_rank for b in r for x in b), sum(ld.sampler.repeated for ld in loaders)

    assert run(batch_size=2, max_duration=1.6) == (durations()[:12], 0)
    assert run(batch_size=4) == (durations(), 0)
    seen, repeated = run(batch_size=2)
    assert repeated == 1 and len(seen) == N + 1 and set(seen) == set(durations())


def test_validation_counts_every_item_once_over_ranks(corpus):
    """Validation: one global plan, rank r takes batches r, r+W, ...: every item once, a rank may have one batch
    fewer; with one cut, the second rank has none (and build does not fail)."""
    c = cfg(inputs(corpus)["cuts"], batch_duration=None, batch_size=2, shuffle=False)
    per_rank = [durations_of(build_dataloader(c, rank=r, world_size=3, is_train=False)) for r in range(3)]
    assert sorted(x for r in per_rank for b in r for x in b) == durations()
    assert [len(r) for r in per_rank] == [3, 2, 2]
    one = cfg(inputs(corpus)["cuts"], batch_duration=None, batch_size=2, max_duration=0.5)
    assert [len(build_dataloader(one, rank=r, world_size=2, is_train=False)) for r in range(2)] == [1, 0]


def test_resume_mid_epoch_yields_exactly_the_remaining_batches(corpus):
    c = cfg(inputs(corpus)["shar"], use_bucketing=True, num_buckets=2, max_duration=2.0)
    full = build_dataloader(c)
    full.set_epoch(1)
    ref = durations_of(full)
    first = build_dataloader(c)
    first.set_epoch(1)
    it = iter(first)
    done = [next(it) for _ in range(2)]
    state = first.state_dict()
    resumed = build_dataloader(c)
    resumed.load_state_dict(state)
    rest = durations_of(resumed)
    assert len(done) == 2 and rest == ref[2:] and len(ref) > 3


def test_weighted_input_cfg_draws_sources_by_weight(corpus, tmp_path):
    """input_cfg weights are mixing proportions (NeMo muxes its sources by weight): 3:1 over two copies of the
    corpus gives ~75% of an epoch's draws from the first. Fails if weights are ignored (then ~50%)."""
    d = inputs(corpus)
    spec = [{"type": "lhotse", "cuts_path": d["cuts"]["cuts_path"], "weight": 3.0},
            {"type": "nemo", "manifest_filepath": d["manifest"]["manifest_filepath"], "weight": 1.0}]
    c = cfg({"input_cfg": spec}, batch_duration=None, batch_size=1)
    from nest_ssl.data.lhotse_inputs import read_inputs

    items = read_inputs(c, "t")
    plan = LhotsePlan(c, items, rank=0, world_size=1, seed=1, even=True)
    draws = [i for epoch in range(20) for i in plan._order(epoch)]
    share = sum(items.sources[i] == 0 for i in draws) / len(draws)
    assert len(plan._order(0)) == 2 * N and 0.70 < share < 0.80


def test_input_cfg_from_a_yaml_file_and_bad_sources_name_the_key(corpus, tmp_path):
    d = inputs(corpus)
    f = tmp_path / "input.yaml"
    f.write_text(f"- type: lhotse_shar\n  shar_path: {d['shar']['shar_path']}\n")
    assert len(build_dataloader(cfg({"input_cfg": str(f)}, batch_size=1, batch_duration=None))) == N
    with pytest.raises(ValueError, match=r"input_cfg\[0\].type='webdataset'"):
        build_dataloader(cfg({"input_cfg": [{"type": "webdataset"}]}))
    with pytest.raises(ValueError, match=r"input_cfg\[0\]: keys \['tokenizer'\]"):
        build_dataloader(cfg({"input_cfg": [{"type": "lhotse", "cuts_path": "x", "tokenizer": 1}]}))


def test_max_open_streams_bounds_the_open_tar_files(corpus):
    loader = build_dataloader(cfg(inputs(corpus)["shar"], max_open_streams=2, batch_size=1, batch_duration=None))
    list(loader)
    assert len(loader.dataset._open) == 2  # 4 Shar shards read, 2 left open
    unlimited = build_dataloader(cfg(inputs(corpus)["shar"], batch_size=1, batch_duration=None))
    list(unlimited)
    assert len(unlimited.dataset._open) == 4


def run_cfg(ds: dict) -> dict:
    return {"model": {"train_ds": ds}}


def test_nemo_lhotse_keys_switched_off_are_accepted_and_switched_on_name_the_key(corpus):
    ds = {"use_lhotse": True, "shar_path": "x", "perturb_speed": False, "noise_path": None, "max_tps": "inf",
          "noise_snr": [10, 20], "force_finite": True, "concurrent_bucketing": True}
    run = build_run_config(run_cfg(ds))
    assert run.model.train_ds.shar_path == "x" and run.model.train_ds.batch_size is None  # NeMo: no cut limit
    with pytest.raises(ConfigError, match=r"model.train_ds.perturb_speed=True: this NeMo Lhotse option is not "):
        build_run_config(run_cfg({**ds, "perturb_speed": True}))
    with pytest.raises(ConfigError, match="model.train_ds.noise_path"):
        build_run_config(run_cfg({**ds, "noise_path": "noise/"}))
    with pytest.raises(ConfigError, match="unknown key 'model.train_ds.tokenizer'"):
        build_run_config(run_cfg({**ds, "tokenizer": "x"}))
    with pytest.raises(ConfigError, match="perturb_speed"):  # without use_lhotse it is no key of ours at all
        build_run_config(run_cfg({"manifest_filepath": "m.json", "perturb_speed": False}))


@pytest.mark.parametrize("kw, match", [
    (dict(use_lhotse=False, manifest_filepath="m.json", shar_path="s"), r"shar_path='s' is a Lhotse key: set "
                                                                          r"model.train_ds.use_lhotse=true"),
    (dict(shar_path="s", cuts_path="c"), r"exactly one of .*got \['cuts_path', 'shar_path'\]"),
    (dict(shar_path="s", use_bucketing=True, bucket_batch_size=[4, 2]), "bucket_batch_size=.*needs bucket_duration"),
    (dict(shar_path="s", use_bucketing=True, bucket_duration_bins=[2.0, 1.0]), "bucket_duration_bins=.*increasing"),
    (dict(shar_path="s", use_bucketing=True, bucket_duration_bins=[1.0, 2.0], bucket_batch_size=[4]),
     "one batch size >= 1 per bin"),
    (dict(shar_path="s", bucket_duration_bins=[1.0], bucket_batch_size=[4]), "needs use_bucketing: true"),
    (dict(shar_path="s", batch_size=None, batch_duration=None), "needs batch_size, batch_duration or"),
    (dict(shar_path="s", shard_seed="random"), "shard_seed='random': must be an integer, 'trng' or 'randomized'"),
    (dict(shar_path="s", is_concat=True), "is_concat=True: not supported with use_lhotse"),
])
def test_config_mistakes_name_the_key(kw, match):
    c = DatasetConfig(**{**dict(use_lhotse=True, manifest_filepath=None, sample_rate=SR), **kw})
    with pytest.raises(ValueError, match=match):
        c.validate()


def test_inputs_lhotse_cannot_read_exactly_are_refused_by_name(corpus, tmp_path):
    from lhotse import CutSet, Recording

    x = np.zeros((SR, 2), dtype=np.float32)
    sf.write(tmp_path / "st.wav", x, SR)
    cut = Recording.from_file(tmp_path / "st.wav").to_cut().with_channels(1)
    CutSet.from_cuts([cut]).to_file(tmp_path / "c.jsonl.gz")
    with pytest.raises(ValueError, match=r"selects channel 1 of a 2-channel recording"):
        build_dataloader(cfg({"cuts_path": str(tmp_path / "c.jsonl.gz")}))
    with pytest.raises(ValueError, match=r"shar_path=.*no cuts\.\*\.jsonl"):
        build_dataloader(cfg({"shar_path": str(tmp_path)}))
    import gzip
    import shutil

    shutil.copytree(corpus / "shar", tmp_path / "gz")
    tar = tmp_path / "gz" / "recording.000001.tar"
    tar.write_bytes(gzip.compress(tar.read_bytes()))
    with pytest.raises(ValueError, match=r"recording.000001.tar is a compressed tar: its members cannot be read by "):
        build_dataloader(cfg({"shar_path": str(tmp_path / "gz")}))


def test_without_lhotse_installed_the_error_names_the_extra(corpus, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "lhotse", None)
    with pytest.raises(ImportError, match=r"use_lhotse=true needs the lhotse package: pip install "
                                          r"'nest_ssl\[lhotse\]'"):
        build_dataloader(cfg(inputs(corpus)["cuts"]))


def test_fit_scan_and_estimate_take_the_per_bucket_batch_sizes(corpus):
    """trainer.fit_scan's worst case is the planned batch with the most padded audio (not batch_size x the longest
    cut, which a per-bucket plan never builds); estimate.py sizes the bucket of the duration it is given."""
    from nest_ssl.estimate import _batch_shape
    from nest_ssl.fit_scan import largest_batch

    c = cfg(inputs(corpus)["cuts"], batch_duration=None, use_bucketing=True, bucket_duration_bins=[0.8, 1.7],
            bucket_batch_size=[5, 3])
    loader = build_dataloader(c)
    batches = durations_of(loader)
    worst = max(batches, key=lambda b: len(b) * max(b))
    n, secs = largest_batch(loader, c)
    assert (n, round(secs, 1)) == (len(worst), max(worst)) and n <= 5
    assert _batch_shape(c, None) == (1.7, 3) and _batch_shape(c, 0.7) == (0.7, 5)
    with pytest.raises(ValueError, match="longer than the last model.train_ds.bucket_duration_bins edge 1.7"):
        _batch_shape(c, 2.0)


def test_an_epoch_with_more_batches_than_the_first_is_read_to_its_end(corpus):
    """Dynamic batches number differently from epoch to epoch (here 7, 8, 8, 8, 9, 7 batches of <= 2.5 s); the
    loader's length follows the epoch, so no epoch is cut at epoch 0's count. Fails when len() is fixed at start-up
    (an epoch with more batches than epoch 0 loses its last cuts)."""
    loader = build_dataloader(cfg(inputs(corpus)["cuts"], batch_duration=2.5, shard_seed=1))
    counts = []
    for _ in range(6):
        batches = durations_of(loader)
        counts.append(len(batches))
        assert sorted(x for b in batches for x in b) == durations()
    assert max(counts[1:]) > counts[0], counts  # the case this test is about happened


def test_noise_and_batch_augmentor_are_the_native_loaders_own(corpus):
    """Over the same NeMo manifest, in the same batches (no shuffle), the Lhotse path gives the native loader's
    batches exactly: audio, the noise drawn from noise_manifest, and NeMo's MultiSpeakerNoiseAugmentation's mix
    (both seeded per (seed, epoch, item)). Fails if the Lhotse dataset numbers its items differently or draws noise
    or augmentation some other way."""
    import yaml

    from nest_ssl.data.loader import build_loader

    noise = corpus / "noise.json"
    noise.write_text(json.dumps({"audio_filepath": str(corpus / "u12.wav"), "duration": 1.7}) + "\n")
    aug = yaml.safe_load(open("configs/nest_tiny_cpu.yaml"))["model"]["train_ds"]["batch_augmentor"]
    aug = {**aug, "prob": 1.0}
    common = dict(manifest_filepath=str(corpus / "m.json"), noise_manifest=str(noise), batch_augmentor=aug,
                  sample_rate=SR, shuffle=False, batch_size=2, return_sample_id=True, max_duration=1.6)
    native, _ = build_loader(DatasetConfig(**common), seed=4)
    ours, _ = build_loader(DatasetConfig(**common, use_lhotse=True, batch_duration=None), seed=4)
    pairs = list(zip(native, ours))
    assert len(pairs) == len(ours) == 6  # 12 cuts (the native loader would wrap a 13th's batch around)
    for a, b in pairs:
        assert a.sample_id == b.sample_id
        for field in ("audio", "noise", "noisy_audio", "audio_len", "noisy_audio_len"):
            assert torch.equal(getattr(a, field), getattr(b, field)), field
    plain, _ = build_loader(DatasetConfig(**{**common, "batch_augmentor": None}, use_lhotse=True,
                                          batch_duration=None), seed=4)
    assert any(not torch.equal(a.noisy_audio, p.noisy_audio) for (a, _), p in zip(pairs, plain))  # it did mix


def test_too_few_cuts_to_estimate_the_buckets_name_the_settings(corpus):
    """lhotse asserts when asked for more buckets than cuts; the error names num_buckets and the alternatives."""
    with pytest.raises(ValueError, match=r"30 num_buckets cannot be estimated from 13 cut\(s\); set "
                                         r"bucket_duration_bins, a finite max_duration, or fewer num_buckets"):
        build_dataloader(cfg(inputs(corpus)["cuts"], use_bucketing=True))
    assert len(build_dataloader(cfg(inputs(corpus)["cuts"], use_bucketing=True, num_buckets=3))) > 0
