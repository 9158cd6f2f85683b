"""Validation with fewer batches than ranks (issue 25 §2): every item is validated exactly once over the ranks, and
no rank waits on a collective the others skip, for 1, 2, 3, 5 items x batch size 1-4 x 2 and 3 ranks, plain and
tarred (scatter, replicate) manifests, ddp and fsdp.

The rank plan is checked exhaustively in one process (each rank's loader built with its rank and world size, no
process group); validate() and the health all-reduce after it run in 2- and 3-rank gloo groups over a few of the
shapes (GLOO_SIZES), under ddp and fsdp, and val_loss on every rank must equal the mean batch loss over every rank's
batches computed here, and the health metrics of fsdp those of ddp. The collective timeout in the workers turns a
mismatched collective into a failure."""

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from nest_ssl.data.config import DatasetConfig
from nest_ssl.data.loader import build_dataloader
from nest_ssl.data.tarred import write_tarred_dataset
from tests.train_support import TinyModel, free_port, join_ranks, make_data, spawn_ranks, validation_worker

ITEMS, BATCH_SIZES, WORLDS, KINDS = (1, 2, 3, 5), (1, 2, 3, 4), (2, 3), ("plain", "scatter", "replicate")
ROOT = Path(__file__).resolve().parents[1]


def duration(i: int) -> float:
    return round(1.0 + 0.01 * i, 2)  # one duration per item names it in a batch (>= min_audio_len_secs)


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> dict:
    """items -> (manifest, tar dir, shards): n short wavs, and their tarred copy in min(2, n) shards."""
    out = {}
    for n in ITEMS:
        d = tmp_path_factory.mktemp(f"items{n}")
        with open(d / "m.json", "w") as f:
            for i in range(n):
                sf.write(str(d / f"u{i}.wav"), np.random.default_rng(i).uniform(-0.5, 0.5, int(duration(i) * 16000))
                         .astype(np.float32), 16000)
                f.write(f'{{"audio_filepath": "{d}/u{i}.wav", "duration": {duration(i)}}}\n')
        shards = min(2, n)
        write_tarred_dataset(str(d / "m.json"), str(d / "tar"), num_shards=shards)
        out[n] = (str(d / "m.json"), str(d / "tar"), shards)
    return out


def dataset_kwargs(corpus, kind: str, batch_size: int) -> dict:
    manifest, tar, shards = corpus
    kw = dict(manifest_filepath=manifest, sample_rate=16000, batch_size=batch_size, shuffle=False, num_workers=0)
    if kind != "plain":
        kw.update(is_tarred=True, manifest_filepath=f"{tar}/tarred_audio_manifest.json", tarred_shard_strategy=kind,
                  tarred_audio_filepaths=f"{tar}/audio__OP_0..{shards - 1}_CL_.tar")
    return kw


def all_shapes(corpora, sizes=None) -> list:
    sizes = sizes or [(n, bs) for n in ITEMS for bs in BATCH_SIZES]
    return [((n, bs, kind), dataset_kwargs(corpora[n], kind, bs)) for n, bs in sizes for kind in KINDS]


# (items, batch size) for the gloo runs (a spawned group costs seconds): a rank with no batch (1x1, 1x4, 2x4), ranks
# with one batch more than others (3x2, 5x2), the report's one-batch-for-all (5x4 on 3 ranks: 1 + 0 + 0 or so)
GLOO_SIZES = [(1, 1), (1, 4), (2, 4), (3, 2), (5, 2), (5, 4)]


def rank_batches(kw: dict, world: int) -> list:
    """Every rank's validation batches, each as a list of item durations."""
    return [[[round(x / 16000, 2) for x in b.audio_len.tolist()] for b in build_dataloader(
        DatasetConfig(**kw), rank=r, world_size=world, is_train=False)] for r in range(world)]


@pytest.mark.parametrize("world", WORLDS)
def test_every_item_is_validated_exactly_once_over_the_ranks(corpora, world):
    for (n, bs, kind), kw in all_shapes(corpora):
        batches = rank_batches(kw, world)
        seen = sorted(x for rank in batches for b in rank for x in b)
        assert seen == [duration(i) for i in range(n)], (n, bs, kind, batches)
        assert all(0 < len(b) <= bs for rank in batches for b in rank), (n, bs, kind, batches)


def reference_val_loss(kw: dict, world: int) -> float:
    """validate()'s mean over every rank's batches, computed in one process from the same plan."""
    torch.manual_seed(0)
    model = TinyModel(encoder=True).eval()
    losses = [float(model.validation_step(b)["loss"]) for r in range(world)
              for b in build_dataloader(DatasetConfig(**kw), rank=r, world_size=world, is_train=False)]
    return sum(losses) / len(losses)


@pytest.mark.slow
@pytest.mark.parametrize("world", WORLDS)
def test_validate_on_gloo_ranks_agrees_and_counts_every_batch(corpora, tmp_path, world):
    shapes = all_shapes(corpora, GLOO_SIZES)
    procs = spawn_ranks(validation_worker, world, (free_port(), shapes, str(tmp_path)))
    assert join_ranks(procs, limit=240) == [0] * world
    results = [torch.load(tmp_path / f"val_rank{r}.pt") for r in range(world)]
    for key, kw in shapes:
        want = reference_val_loss(kw, world)
        for strategy in ("ddp", "fsdp"):
            got = [res[(strategy, *key)][0] for res in results]
            assert all(math.isclose(g, want, rel_tol=1e-5) for g in got), (strategy, key, got, want)
        # the health metrics count the same items: fsdp's stand-in forwards (a rank out of batches) are not in them
        ddp, fsdp = results[0][("ddp", *key)][1], results[0][("fsdp", *key)][1]
        assert ddp.keys() == fsdp.keys() and ddp, (key, ddp, fsdp)
        assert all(math.isclose(ddp[k], fsdp[k], rel_tol=1e-4, abs_tol=1e-6) for k in ddp), (key, ddp, fsdp)


@pytest.mark.slow
def test_torchrun_with_one_validation_batch_for_two_ranks_validates_and_finishes(tmp_path):
    """The report's shape: 2 ranks, 4 validation utterances in one batch of 4 (rank 1 has none), real tiny NEST
    config through scripts/pretrain.py. It hung forever (rank 0 in the health all-reduce rank 1 skipped)."""
    data = make_data(tmp_path / "demo")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "scripts" / "pretrain.py"), "--config", str(ROOT / "configs" / "nest_tiny_cpu.yaml"),
           f"model.train_ds.manifest_filepath={data['train']}", f"model.validation_ds.manifest_filepath={data['val']}",
           "model.validation_ds.batch_size=4", "trainer.max_steps=4", "trainer.val_check_interval=2",
           "trainer.enable_progress_bar=false", "++trainer.collective_timeout=60",
           f"exp_manager.exp_dir={tmp_path}/exp"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env, cwd=tmp_path)
    assert out.returncode == 0, [line for line in out.stderr.splitlines() if "rror" in line][-5:]
    vals = [float(line.split("val_loss ")[1]) for line in out.stdout.splitlines() + out.stderr.splitlines()
            if line.startswith("step ") and ": val_loss " in line]
    assert len(vals) == 2 and all(math.isfinite(v) and v > 0 for v in vals), out.stdout + out.stderr
