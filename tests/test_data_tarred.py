"""Tarred shards (make_tarred_dataset -> read), sharding strategies, shuffle_n, and scripts/check_data.py."""
import contextlib
import io
import json
import os
import runpy
import subprocess
import sys

import pytest
from test_data import cfg, write_manifest, write_wav

from nest_ssl.data.loader import build_dataloader
from nest_ssl.data.tarred import shard_list, write_tarred_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def tarred(tmp_path):
    rows = []
    for i in range(16):
        write_wav(tmp_path / f"utt{i}.wav", 1.0 + 0.01 * i, seed=i)
        rows.append({"audio_filepath": f"utt{i}.wav", "duration": 1.0 + 0.01 * i})
    m = write_manifest(tmp_path / "m.json", rows)
    write_tarred_dataset(m, str(tmp_path / "tar"), num_shards=4)
    return str(tmp_path / "tar"), m


def tcfg(d, **kw):
    base = dict(is_tarred=True, tarred_audio_filepaths=f"{d}/audio__OP_0..3_CL_.tar", shuffle=False, batch_size=2,
                manifest_filepath=f"{d}/tarred_audio_manifest.json")
    base.update(kw)
    return cfg(base.pop("manifest_filepath"), **base)


def durations(loader):
    return [round(x / 16000, 2) for b in loader for x in b.audio_len.tolist()]


def test_tarred_round_trip_reads_every_sample_once(tarred):
    d, _ = tarred
    assert sorted(os.listdir(d)) == [f"audio_{i}.tar" for i in range(4)] + ["tarred_audio_manifest.json"]
    rows = [json.loads(x) for x in open(f"{d}/tarred_audio_manifest.json")]
    assert {r["shard_id"] for r in rows} == {0, 1, 2, 3} and not os.path.isabs(rows[0]["audio_filepath"])
    loader = build_dataloader(tcfg(d))
    assert len(loader) == 8
    assert sorted(durations(loader)) == [round(1.0 + 0.01 * i, 2) for i in range(16)]


def test_tarred_with_workers_and_pipe_source(tarred):
    d, _ = tarred
    assert len(durations(build_dataloader(tcfg(d, num_workers=2)))) == 16
    pipe = tcfg(d, tarred_audio_filepaths=[f"pipe:cat {d}/audio_{i}.tar" for i in range(4)])
    assert len(durations(build_dataloader(pipe))) == 16


def test_scatter_and_replicate():
    shards = [f"s{i}" for i in range(5)]
    assert [shard_list(shards, r, 2, "scatter") for r in range(2)] == [["s0", "s1", "s2"], ["s3", "s4"]]
    assert shard_list(shards, 1, 2, "replicate") == shards
    with pytest.raises(ValueError, match="tarred_shard_strategy"):
        shard_list(shards, 0, 1, "bogus")
    with pytest.raises(ValueError, match=r"5 shards over world_size=6 leave ranks 5..5 with no shard.*replicate"):
        shard_list(shards, 0, 6, "scatter")


def _epoch(loader):
    batches = [[round(x / 16000, 2) for x in b.audio_len.tolist()] for b in loader]
    return len(batches), [x for b in batches for x in b]


# 16 items dealt round-robin to 4 shards (4 each), batches of 2. Per rank and epoch under scatter:
# world size -> (items per rank, batches every rank runs); a rank with fewer items re-reads, nothing is skipped.
SCATTER_4_SHARDS = {1: ([16], 8), 2: ([8, 8], 4), 3: ([8, 4, 4], 4), 4: ([4, 4, 4, 4], 2)}


@pytest.mark.parametrize("world_size,workers", [(1, 0), (2, 0), (3, 0), (4, 0), (3, 2)])
def test_scatter_over_four_shards_reads_every_item_with_equal_batches(tarred, world_size, workers):
    d, _ = tarred
    every = [round(1.0 + 0.01 * i, 2) for i in range(16)]
    items, batches = SCATTER_4_SHARDS[world_size]
    loaders = [build_dataloader(tcfg(d, num_workers=workers), rank=r, world_size=world_size)
               for r in range(world_size)]
    epochs = [_epoch(x) for x in loaders]
    assert [len(x) for x in loaders] == [batches] * world_size  # what DDP needs: the same count on every rank
    assert [n for n, _ in epochs] == [batches] * world_size
    assert sorted({x for _, seen in epochs for x in seen}) == every  # no item lost
    for (_, seen), mine in zip(epochs, items):
        assert len(set(seen)) == mine and len(seen) - mine == batches * 2 - mine  # the repeats fill up to batches


def test_scatter_over_more_ranks_than_shards_is_refused_and_replicate_works(tarred):
    d, _ = tarred
    with pytest.raises(ValueError, match="4 shards over world_size=5 leave ranks 4..4 with no shard"):
        build_dataloader(tcfg(d), rank=0, world_size=5)
    for r in range(5):
        n, seen = _epoch(build_dataloader(tcfg(d, tarred_shard_strategy="replicate"), rank=r, world_size=5))
        assert n == 8 and sorted(seen) == [round(1.0 + 0.01 * i, 2) for i in range(16)]


# Validation over the same 16 items in 4 shards, batches of 2: world size -> batches each rank runs (each reads its
# own items once; scatter ranks past the last shard have none; replicate keeps entry i on rank i % W, e.g. W=3:
# 6/5/5 items, W=5: 4/3/3/3/3 items).
VAL_BATCHES = {"scatter": {1: [8], 2: [4, 4], 3: [4, 2, 2], 4: [2, 2, 2, 2], 5: [2, 2, 2, 2, 0]},
               "replicate": {1: [8], 2: [4, 4], 3: [3, 3, 3], 4: [2, 2, 2, 2], 5: [2, 2, 2, 2, 2]}}


@pytest.mark.parametrize("strategy", ["scatter", "replicate"])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 5])
def test_tarred_validation_counts_every_item_once_across_ranks(tarred, strategy, world_size):
    d, _ = tarred
    loaders = [build_dataloader(tcfg(d, tarred_shard_strategy=strategy), rank=r, world_size=world_size,
                                is_train=False) for r in range(world_size)]
    epochs = [_epoch(x) for x in loaders]
    assert [len(x) for x in loaders] == [n for n, _ in epochs] == VAL_BATCHES[strategy][world_size]
    assert sorted(x for _, seen in epochs for x in seen) == [round(1.0 + 0.01 * i, 2) for i in range(16)]
    assert [_epoch(x) for x in loaders] == epochs  # a second validation pass counts the same items again


@pytest.mark.parametrize("strategy", ["scatter", "replicate"])
def test_tarred_validation_with_workers_and_a_missing_shard_counts_each_item_once(tarred, strategy):
    d, _ = tarred
    os.remove(f"{d}/audio_3.tar")  # training would re-read the short stream; validation must not
    seen = [x for r in range(3) for x in _epoch(build_dataloader(
        tcfg(d, tarred_shard_strategy=strategy, num_workers=2), rank=r, world_size=3, is_train=False))[1]]
    assert sorted(seen) == [round(1.0 + 0.01 * i, 2) for i in range(16) if i % 4 != 3]


def _uneven_sharded_manifests(tmp_path) -> str:
    """7 items in 3 shards of 3, 2, 2 items, with NeMo's per-shard manifests; returns the tarred directory."""
    rows = []
    for i in range(7):
        write_wav(tmp_path / f"v{i}.wav", 1.0 + 0.01 * i, seed=i)
        rows.append({"audio_filepath": f"v{i}.wav", "duration": 1.0 + 0.01 * i})
    d = str(tmp_path / "tar")
    write_tarred_dataset(write_manifest(tmp_path / "m.json", rows), d, num_shards=3)  # 3, 2, 2 items
    os.makedirs(f"{d}/sharded_manifests")
    for s in range(3):
        write_manifest(f"{d}/sharded_manifests/manifest_{s}.json",
                       [r for r in map(json.loads, open(f"{d}/tarred_audio_manifest.json")) if r["shard_id"] == s])
    return d


def test_tarred_validation_over_sharded_manifests_counts_each_item_once(tmp_path):
    d = _uneven_sharded_manifests(tmp_path)
    every = [round(1 + 0.01 * i, 2) for i in range(7)]
    for strategy in ("scatter", "replicate"):
        c = dict(tarred_audio_filepaths=f"{d}/audio__OP_0..2_CL_.tar", tarred_shard_strategy=strategy,
                 manifest_filepath=f"{d}/sharded_manifests/manifest__OP_0..2_CL_.json")
        loaders = [build_dataloader(tcfg(d, **c), rank=r, world_size=2, is_train=False) for r in range(2)]
        epochs = [_epoch(x) for x in loaders]
        assert [len(x) for x in loaders] == [n for n, _ in epochs]
        assert sorted(x for _, seen in epochs for x in seen) == every, strategy


def test_sharded_manifests_of_uneven_size_give_equal_batches(tmp_path):
    d = _uneven_sharded_manifests(tmp_path)
    c = dict(tarred_audio_filepaths=f"{d}/audio__OP_0..2_CL_.tar",
             manifest_filepath=f"{d}/sharded_manifests/manifest__OP_0..2_CL_.json")
    epochs = [_epoch(build_dataloader(tcfg(d, **c), rank=r, world_size=2)) for r in range(2)]
    assert [n for n, _ in epochs] == [3, 3]  # rank 0: shards 0, 1 (5 items); rank 1: shard 2 (2 items, re-read)
    assert sorted({x for _, seen in epochs for x in seen}) == [round(1 + 0.01 * i, 2) for i in range(7)]


def test_tarred_ranks_get_equal_batches_and_disjoint_shards(tarred):
    d, _ = tarred
    loaders = [build_dataloader(tcfg(d), rank=r, world_size=2) for r in range(2)]
    per_rank = [durations(x) for x in loaders]
    assert len(per_rank[0]) == len(per_rank[1]) == 8 and not set(per_rank[0]) & set(per_rank[1])


def test_shuffle_n_mixes_samples_across_shards(tarred):
    d, _ = tarred
    plain = durations(build_dataloader(tcfg(d)))
    shuffled = durations(build_dataloader(tcfg(d, shuffle=True, shuffle_n=8), seed=1))
    assert sorted(shuffled) == sorted(plain) and shuffled != plain
    # samples of one shard are no longer consecutive: shuffling only the shard order would keep them in blocks of 4
    shard_of = {v: i % 4 for i, v in enumerate(round(1.0 + 0.01 * i, 2) for i in range(16))}
    blocks = [shard_of[v] for v in shuffled]
    assert any(blocks[i] != blocks[i + 1] for i in range(0, 16, 4))
    assert shuffled == durations(build_dataloader(tcfg(d, shuffle=True, shuffle_n=8), seed=1))


def test_missing_and_corrupt_shard_are_reported(tarred):
    d, _ = tarred
    os.remove(f"{d}/audio_1.tar")
    with open(f"{d}/audio_2.tar", "r+b") as f:
        f.truncate(700)
    loader = build_dataloader(tcfg(d, drop_last=False))
    list(loader)
    reasons = {os.path.basename(p): r for p, r in loader.bad_samples}
    assert reasons["audio_1.tar"] == "missing shard"
    assert any("audio_2.tar" in p for p, _ in loader.bad_samples)


def run_check(*args):
    """scripts/check_data.py main() in this process (one worker: no process pool), from the repository root."""
    main = runpy.run_path(os.path.join(ROOT, "scripts", "check_data.py"))["main"]
    out = io.StringIO()
    with contextlib.chdir(ROOT), contextlib.redirect_stdout(out):
        rc = main([*args, "--json", "--workers", "1"])
    return rc, json.loads(out.getvalue().strip().splitlines()[-1])


def test_check_data_json_and_exit_code(tmp_path, tarred):
    _, m = tarred
    rc, rep = run_check("--manifest", m)
    assert rc == 0 and rep["utterances"] == 16 and rep["errors"] == [] and rep["sample_rates"] == {"16000": 16}
    assert abs(rep["hours"] - sum(1.0 + 0.01 * i for i in range(16)) / 3600) < 1e-6
    (tmp_path / "broken.wav").write_bytes(b"junk" * 20)
    m2 = write_manifest(tmp_path / "m2.json", [{"audio_filepath": "utt0.wav"}, {"audio_filepath": "broken.wav"},
                                               {"audio_filepath": "nope.wav"}])
    rc, rep = run_check("--manifest", m2)
    assert rc == 1 and rep["utterances"] == 1 and [os.path.basename(b["path"]) for b in rep["errors"]] == [
        "broken.wav", "nope.wav"]
    assert [b["line"] for b in rep["errors"]] == [2, 3] and rep["warnings"][0]["kind"] == "missing_duration"


def test_check_data_tarred(tarred):
    d, _ = tarred
    rc, rep = run_check("--manifest", f"{d}/tarred_audio_manifest.json", "--tarred", f"{d}/audio__OP_0..3_CL_.tar")
    assert rc == 0 and rep["utterances"] == 16


def test_check_data_reads_pipe_shards_and_names_a_missing_one(tarred):
    d, _ = tarred
    pipes = [f"pipe:cat {d}/audio_{i}.tar" for i in range(4)]
    rc, rep = run_check("--manifest", f"{d}/tarred_audio_manifest.json", "--tarred", ",".join(pipes))
    assert rc == 0 and rep["utterances"] == 16
    os.remove(f"{d}/audio_3.tar")
    rc, rep = run_check("--manifest", f"{d}/tarred_audio_manifest.json", "--tarred", ",".join(pipes))
    assert rc == 1 and {(e["path"], e["kind"]) for e in rep["errors"] if e["path"] == pipes[3]} == {
        (pipes[3], "unreadable")}


def test_tarred_resume_mid_epoch(tarred):
    d, _ = tarred
    c = dict(shuffle=True, shuffle_n=4)
    full = durations(build_dataloader(tcfg(d, **c), seed=2))
    loader = build_dataloader(tcfg(d, **c), seed=2)
    it = iter(loader)
    head = [round(x / 16000, 2) for _ in range(3) for x in next(it).audio_len.tolist()]
    resumed = build_dataloader(tcfg(d, **c), seed=2)
    resumed.load_state_dict(loader.state_dict())
    assert head + durations(resumed) == full


def test_sharded_tarred_manifests_split_by_rank(tmp_path):
    rows = []
    for i in range(8):
        write_wav(tmp_path / f"v{i}.wav", 1.0 + 0.01 * i, seed=i)
        rows.append({"audio_filepath": f"v{i}.wav", "duration": 1.0 + 0.01 * i})
    d = str(tmp_path / "tar")
    write_tarred_dataset(write_manifest(tmp_path / "m.json", rows), d, num_shards=2)
    os.makedirs(f"{d}/sharded_manifests")
    for s in range(2):
        write_manifest(f"{d}/sharded_manifests/manifest_{s}.json",
                       [r for r in map(json.loads, open(f"{d}/tarred_audio_manifest.json")) if r["shard_id"] == s])
    c = dict(tarred_audio_filepaths=f"{d}/audio__OP_0..1_CL_.tar",
             manifest_filepath=f"{d}/sharded_manifests/manifest__OP_0..1_CL_.json")
    got = [durations(build_dataloader(tcfg(d, **c), rank=r, world_size=2)) for r in range(2)]
    assert len(got[0]) == len(got[1]) == 4 and sorted(got[0] + got[1]) == [round(1 + 0.01 * i, 2) for i in range(8)]


def test_scripts_make_manifest_then_make_tarred_dataset_round_trip(tmp_path):
    os.makedirs(tmp_path / "audio/sub")
    for i in range(3):
        write_wav(tmp_path / f"audio/sub/w{i}.wav", 1.0 + 0.25 * i, seed=i)
    write_wav(tmp_path / "audio/x.flac", 1.5, fmt="FLAC")
    m, out = str(tmp_path / "m.json"), str(tmp_path / "tar")
    for cmd in (["scripts/make_manifest.py", str(tmp_path / "audio"), m, "--relative"],
                ["scripts/make_tarred_dataset.py", "--manifest", m, "--out", out, "--num_shards", "2"]):
        subprocess.run([sys.executable, *cmd], cwd=ROOT, check=True, capture_output=True, timeout=120)
    rows = [json.loads(x) for x in open(m)]
    assert [r["duration"] for r in rows] == [1.0, 1.25, 1.5, 1.5] and rows[0]["audio_filepath"] == "audio/sub/w0.wav"
    c = tcfg(out, tarred_audio_filepaths=f"{out}/audio_[0..1].tar", batch_size=1)
    assert sorted(durations(build_dataloader(c))) == [1.0, 1.25, 1.5, 1.5]


def test_tarred_short_stream_is_reread_to_give_len_batches(tarred):
    d, _ = tarred
    os.remove(f"{d}/audio_3.tar")  # 12 of 16 samples left; len() still promises 8 batches of 2
    loader = build_dataloader(tcfg(d))
    assert len(loader) == 8 and sum(1 for _ in loader) == 8
    assert loader.bad_samples == [(f"{d}/audio_3.tar", "missing shard")]


def test_check_data_from_nemo_yaml_section(tarred):
    _, m = tarred
    rc, rep = run_check("--config", "configs/nest_fast-conformer.yaml", "--section", "model.train_ds",
                        f"model.train_ds.manifest_filepath={m}")
    assert rc == 0 and rep["utterances"] == 16


def test_make_tarred_dataset_refuses_two_files_with_one_stem(tmp_path):
    os.makedirs(tmp_path / "a")
    os.makedirs(tmp_path / "b")
    write_wav(tmp_path / "a/x.wav", 1.0, seed=0)
    write_wav(tmp_path / "b/x.wav", 1.0, seed=1)
    m = write_manifest(tmp_path / "m.json", [{"audio_filepath": str(tmp_path / f"{d}/x.wav"), "duration": 1.0}
                                             for d in "ab"])
    with pytest.raises(ValueError, match="share the stem 'x'"):
        write_tarred_dataset(m, str(tmp_path / "tar"), num_shards=2)


def test_tarred_entry_without_duration_under_a_filter_is_a_bad_line_for_loader_and_check(tarred):
    d, _ = tarred
    m = f"{d}/tarred_audio_manifest.json"
    rows = [json.loads(x) for x in open(m)]
    del rows[5]["duration"]
    write_manifest(m, rows)
    loader = build_dataloader(tcfg(d, max_duration=4.0))
    assert len(loader.bad_samples) == 1 and "no 'duration' in the tarred manifest" in loader.bad_samples[0][1]
    rc, rep = run_check("--manifest", m, "--tarred", f"{d}/audio__OP_0..3_CL_.tar", "--max-duration", "4")
    assert rc == 1 and [(x["line"], x["kind"]) for x in rep["errors"]] == [(6, "unmeasurable_duration")]
    assert rep["utterances"] == 15
    rc, rep = run_check("--manifest", m, "--tarred", f"{d}/audio__OP_0..3_CL_.tar")  # no filter: trained on
    assert rc == 0 and rep["utterances"] == 16


def test_check_data_reports_a_tarred_entry_no_shard_holds(tarred):
    d, _ = tarred
    m = f"{d}/tarred_audio_manifest.json"
    rows = [json.loads(x) for x in open(m)] + [{"audio_filepath": "ghost.wav", "duration": 1.0, "shard_id": 0}]
    write_manifest(m, rows)
    rc, rep = run_check("--manifest", m, "--tarred", f"{d}/audio__OP_0..3_CL_.tar")
    assert rc == 1 and [(x["line"], x["kind"], x["path"]) for x in rep["errors"]] == [(17, "not_in_shards",
                                                                                         "ghost.wav")]
    assert rep["utterances"] == 16
