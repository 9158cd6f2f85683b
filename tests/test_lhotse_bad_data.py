"""Bad data through the Lhotse source (`use_lhotse: true`, issue 29's "Done when"): a Shar whose recording tar lacks a
member or holds a corrupt one, and a cuts manifest naming a missing file, are skipped, counted once, logged and
limited by max_bad_samples as the native loaders do (tests/test_data.py has the native behaviour)."""
import gzip
import io
import json
import logging
import re
import tarfile
from pathlib import Path

import pytest

from nest_ssl.data.config import DatasetConfig
from nest_ssl.data.loader import TooManyBadSamples, build_dataloader
from tests.test_lhotse_train import SR, duration, lhotse_ds, write_cuts, write_shar, write_wavs


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    """5 WAVs (train0..4, 1.0-1.4 s) as a cuts manifest and a Shar directory (shards of 4: train1 in the first)."""
    root = tmp_path_factory.mktemp("lhotse_bad")
    wavs, _ = write_wavs(root, "train", 5)
    cuts = write_cuts(wavs, root / "cuts5.jsonl.gz")
    return {"train_wavs": wavs, "cuts5": cuts, "shar5": write_shar(cuts, root / "shar5")}


def damaged_shar(corpus, tmp_path, damage: str) -> tuple[str, str]:
    """A copy of the 5-cut Shar whose recording.000000.tar lacks cut train1's member ('missing') or holds garbage of
    the same size in it ('corrupt'); returns (directory, the name the loader reports for the damaged item)."""
    src, dst = Path(corpus["shar5"]), tmp_path / "shar"
    dst.mkdir()
    for p in src.iterdir():
        if p.name != "recording.000000.tar":
            (dst / p.name).write_bytes(p.read_bytes())
    tar_path = dst / "recording.000000.tar"
    with tarfile.open(src / "recording.000000.tar") as old, tarfile.open(tar_path, "w") as new:
        for m in old.getmembers():
            data = old.extractfile(m).read()
            if m.name.startswith("train1."):
                if damage == "missing":
                    continue
                if not m.name.endswith(".json"):
                    data = b"not audio " * (len(data) // 10) + b"x" * (len(data) % 10)
                    bad = f"{tar_path}:{m.name}"
            new.addfile(m, io.BytesIO(data))
    return str(dst), (bad if damage == "corrupt" else f"{dst}/cuts.000000.jsonl.gz: cut train1")


def missing_file_cuts(corpus, tmp_path) -> tuple[str, str]:
    """The 5-cut manifest with cut train1's audio path pointing at a file that does not exist."""
    missing = str(tmp_path / "gone.wav")
    rows = []
    with gzip.open(corpus["cuts5"], "rt") as f:
        for line in f:
            cut = json.loads(line)
            if cut["id"] == "train1":
                cut["recording"]["sources"][0]["source"] = missing
            rows.append(json.dumps(cut))
    path = tmp_path / "cuts.jsonl"
    path.write_text("\n".join(rows) + "\n")
    return str(path), missing


def bad_loader_kwargs(corpus, tmp_path, damage: str) -> tuple[dict, str]:
    if damage == "missing_file":
        path, bad = missing_file_cuts(corpus, tmp_path)
        return lhotse_ds("cuts_path", path, batch_size=2), bad
    path, bad = damaged_shar(corpus, tmp_path, damage)
    return lhotse_ds("shar_path", path, batch_size=2, num_workers=1 if damage == "corrupt" else 0), bad


@pytest.mark.parametrize("damage", ["missing", "corrupt", "missing_file"])
def test_bad_lhotse_items_are_skipped_counted_once_and_logged(corpus, tmp_path, caplog, damage):
    """Shar tar without a member, with a corrupt member (read in a DataLoader worker), cuts naming a missing file:
    the other 4 cuts train, the bad one is one entry of bad_samples (over 2 epochs) and one warning. Breaks if a bad
    item stops the run, is counted per epoch, or goes unreported."""
    kw, bad = bad_loader_kwargs(corpus, tmp_path, damage)
    with caplog.at_level(logging.WARNING, logger="nest_ssl.data.wrapper"):
        loader = build_dataloader(DatasetConfig(**kw, shuffle=False), seed=0)
        for _ in range(2):  # the 4 good cuts (train0, 2, 3, 4), by their durations
            assert sorted(round(n / SR, 2) for b in loader for n in b.audio_len.tolist()) == [1.0, 1.2, 1.3, 1.4]
    assert [p for p, _ in loader.bad_samples] == [bad], loader.bad_samples
    assert [r.getMessage() for r in caplog.records if "skipping bad sample" in r.getMessage()] == \
        [f"skipping bad sample {bad}: {loader.bad_samples[0][1]}"]
    if damage == "missing_file":  # the native loader's reason for the same file
        native = build_dataloader(DatasetConfig(manifest_filepath=missing_file_manifest(corpus, tmp_path, bad),
                                                sample_rate=SR, batch_size=2), seed=0)
        list(native)
        assert native.bad_samples == loader.bad_samples == [(bad, "no such file")]


def missing_file_manifest(corpus, tmp_path, missing: str) -> str:
    rows = [json.dumps({"audio_filepath": str(p) if i != 1 else missing, "duration": duration(i)})
            for i, p in enumerate(corpus["train_wavs"][:5])]
    (tmp_path / "native.json").write_text("\n".join(rows) + "\n")
    return str(tmp_path / "native.json")


@pytest.mark.parametrize("damage", ["missing", "corrupt", "missing_file"])
def test_bad_lhotse_items_beyond_max_bad_samples_raise_naming_the_file(corpus, tmp_path, damage):
    """max_bad_samples=0: the one bad item raises TooManyBadSamples naming it (a missing member when the plan is
    made, at start-up; an unreadable file when it is read); skip_bad_samples=false raises ValueError naming it.
    Breaks if the limit is not applied to Lhotse items or the error does not say which file."""
    kw, bad = bad_loader_kwargs(corpus, tmp_path, damage)
    with pytest.raises(TooManyBadSamples, match=re.escape(bad)):
        list(build_dataloader(DatasetConfig(**kw, max_bad_samples=0), seed=0))
    with pytest.raises(ValueError, match=re.escape(bad.split(": cut")[0])):
        list(build_dataloader(DatasetConfig(**kw, skip_bad_samples=False), seed=0))


def test_too_many_bad_items_at_start_up_end_pretrain_with_one_line(corpus, tmp_path):
    """A Shar missing a member over max_bad_samples=0 stops scripts/pretrain.py at start-up with one `error:` line
    naming the item and exit 1, not a traceback (fails when TooManyBadSamples is not among pretrain's stop errors)."""
    import os
    import subprocess
    import sys

    from tests.test_lhotse_train import ROOT

    shar, bad = damaged_shar(corpus, tmp_path, "missing")
    cmd = [sys.executable, "scripts/pretrain.py", "--config", "configs/nest_tiny_cpu.yaml",
           "model.train_ds.use_lhotse=true", f"model.train_ds.shar_path={shar}",
           "model.train_ds.manifest_filepath=null", "model.train_ds.max_bad_samples=0", "model.validation_ds=null",
           f"exp_manager.exp_dir={tmp_path}"]
    out = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                         timeout=120)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 1 and lines[-1].startswith("error: 1 bad samples exceed max_bad_samples=0"), out.stderr
    assert bad in lines[-1] and "Traceback" not in out.stderr
