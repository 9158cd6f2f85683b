"""Batch-plan parity with NeMo 2.6.2's Lhotse sampler: the cut ids of every batch, 2 epochs, per case.

For a small generated corpus (a cuts manifest and a Shar directory written by lhotse's own writers, NeMo tarred
shards of the same files written by ours), each case builds NeMo's sampler (`get_lhotse_sampler_from_config`,
nemo/collections/common/data/lhotse/dataloader.py) and nest_ssl's plan (`build_dataloader(DatasetConfig(
use_lhotse=True, ...))`, `loader.sampler.epoch_batches()`) from the same keys (shuffle true unless the case says
otherwise), and prints per case and epoch whether the batches are identical, or the first difference.

NeMo's side runs with `concurrent_bucketing: false` (its default, true, fills the bucket buffer from a background
thread, so its batches are not reproducible) and `force_finite: true` (Shar: one pass, no `.repeat()`).
Two ranks are compared for the cuts manifest only: that is NeMo's map-style path, where the sampler splits the
batches by rank; for Shar and NeMo tarred NeMo puts one whole sampler in every DataLoader worker
(IterableDatasetWrapper, rank 0 of 1), so there is no rank split to compare. Lhotse's `<id>_dup<k>` copies (a
last round with fewer cuts than ranks) are compared as the cut they copy. Runs only where `nemo` is importable:

    python scripts/compare_nemo_lhotse.py [--files 60] [--shard_seed 1234]
"""
import argparse
import importlib.util
import json
import logging
import math
import os
import re
import sys
import tempfile

import numpy as np
import soundfile as sf

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from nest_ssl.data.config import DatasetConfig  # noqa: E402
from nest_ssl.data.loader import build_dataloader  # noqa: E402
from nest_ssl.data.tarred import write_tarred_dataset  # noqa: E402

SR = 16000
BINS = [3.0, 6.0, 9.0]  # the longest cuts (up to 12 s) lie past the last bin
CASES = {  # name -> the sampler keys of that case (shared by both sides)
    "no_bucketing": dict(use_bucketing=False, batch_duration=20.0),
    "bucketing_batch_duration": dict(use_bucketing=True, bucket_duration_bins=BINS, batch_duration=20.0),
    "bucketing_bucket_batch_size": dict(use_bucketing=True, bucket_duration_bins=BINS, bucket_batch_size=[6, 4, 2]),
    "no_shuffle": dict(use_bucketing=False, batch_duration=20.0, shuffle=False),
}


def write_corpus(root: str, n: int, shard_size: int) -> dict[str, dict]:
    """n WAV files of 1-12 s -> per input kind, its keys: a cuts manifest and a Shar directory written by lhotse's
    own writers, NeMo tarred shards (our writer, data/tarred.py) of the same files."""
    from lhotse import CutSet, Recording
    from lhotse.shar import SharWriter

    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        p = os.path.join(root, f"u{i:03d}.wav")
        sf.write(p, np.zeros(int(round(rng.uniform(1.0, 12.0), 2) * SR), np.float32), SR)
        paths.append(p)
    cuts = CutSet.from_cuts([Recording.from_file(p).to_cut() for p in paths])
    cuts_path, shar = os.path.join(root, "cuts.jsonl.gz"), os.path.join(root, "shar")
    cuts.to_file(cuts_path)
    os.makedirs(shar)
    with SharWriter(shar, fields={"recording": "wav"}, shard_size=shard_size) as w:
        for c in cuts:
            w.write(c)
    manifest = os.path.join(root, "m.json")
    with open(manifest, "w") as f:
        f.writelines(json.dumps({"audio_filepath": c.recording.sources[0].source, "duration": c.duration}) + "\n"
                     for c in cuts)
    tars = write_tarred_dataset(manifest, os.path.join(root, "tarred"), math.ceil(n / shard_size))
    return {"cuts": dict(cuts_path=cuts_path), "shar": dict(shar_path=shar),
            "nemo_tarred": dict(manifest_filepath=os.path.join(root, "tarred", "tarred_audio_manifest.json"),
                                tarred_audio_filepaths=tars)}


def name(cut_id: str) -> str:
    """A cut's file stem: the cut id of a cuts manifest or Shar, the tar member name (u007.wav) of NeMo tarred."""
    return os.path.splitext(os.path.basename(cut_id))[0]


def nemo_batches(keys: dict, rank: int, world_size: int, epochs: int) -> list[list[list[str]]]:
    from nemo.collections.common.data.lhotse.dataloader import (
        get_lhotse_sampler_from_config,
        make_structured_with_schema_warnings,
    )
    from omegaconf import OmegaConf

    conf = make_structured_with_schema_warnings(OmegaConf.create(dict(keys, concurrent_bucketing=False,
                                                                      force_finite=True)))
    sampler, _ = get_lhotse_sampler_from_config(conf, global_rank=rank, world_size=world_size)
    out = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        out.append([[name(re.sub(r"_dup\d+$", "", c.id)) for c in batch] for batch in sampler])  # see below
    return out


# A last round with fewer cuts than ranks is dealt by copying cuts, which lhotse renames `<id>_dup<k>`
# (lhotse.dataset.sampling.base.mark_as_duplicate); our plan keeps the entry index (LhotsePlan.repeated counts
# them), so NeMo's ids are compared without that suffix.
def ours_batches(keys: dict, rank: int, world_size: int, epochs: int) -> list[list[list[str]]]:
    loader = build_dataloader(DatasetConfig(**dict(dict(use_lhotse=True, manifest_filepath=None), **keys)), rank=rank,
                              world_size=world_size, seed=0)
    ids = [name(e.where.split(": cut ", 1)[1] if ": cut " in e.where else e.audio_filepath.rsplit(":", 1)[1])
           for e in loader.dataset.entries]  # entry index -> the cut id (a NeMo tarred row: its tar member)
    out = []
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        out.append([[ids[i] for i in batch] for batch in loader.sampler.epoch_batches()])
    return out


def first_difference(a: list[list[str]], b: list[list[str]]) -> str:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return f"batch {i}: nemo {x} vs nest_ssl {y}"
    return f"batch counts: nemo {len(a)}, nest_ssl {len(b)}"


def compare(args) -> list[tuple]:
    rows = []
    with tempfile.TemporaryDirectory() as root:
        for source, data in write_corpus(root, args.files, math.ceil(args.files / args.shards)).items():
            for case, sampling in CASES.items():
                for world_size in (1, 2) if source == "cuts" else (1,):
                    keys = dict(dict(data, batch_size=None, shuffle=True, shard_seed=args.shard_seed, seed=0,
                                     num_workers=0), **sampling)
                    for rank in range(world_size):
                        ours = ours_batches(keys, rank, world_size, args.epochs)
                        nemo = nemo_batches(keys, rank, world_size, args.epochs)
                        for epoch in range(args.epochs):
                            same = nemo[epoch] == ours[epoch]
                            rows.append((source, case, world_size, rank, epoch, len(nemo[epoch]),
                                         len(ours[epoch]), sum(map(len, nemo[epoch])),
                                         sum(map(len, ours[epoch])),
                                         "identical" if same else first_difference(nemo[epoch], ours[epoch])))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=60)
    ap.add_argument("--shards", type=int, default=4, help="Shar shards")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--shard_seed", type=int, default=1234)
    args = ap.parse_args(argv)
    if importlib.util.find_spec("nemo") is None:
        print("compare_nemo_lhotse: skipped: `nemo` is not importable (this comparison needs NeMo 2.6.2)")
        return 0
    logging.disable(logging.WARNING)  # NeMo's and our start-up notes; the table is the output
    rows = compare(args)
    print(f"{'input':11} {'case':28} {'W':>1} {'rank':>4} {'epoch':>5} {'batches nemo/ours':>17} "
          f"{'cuts nemo/ours':>14}  result")
    for src, case, w, r, e, bn, bo, cn, co, result in rows:
        print(f"{src:11} {case:28} {w:>1} {r:>4} {e:>5} {f'{bn}/{bo}':>17} {f'{cn}/{co}':>14}  {result}")
    return 0 if all(r[-1] == "identical" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
