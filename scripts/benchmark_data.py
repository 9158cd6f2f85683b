"""Data-pipeline throughput: audio-seconds per wall-second and per CPU-second, compared with NeMo's CPU anchors.

Synthetic corpus like the one NeMo's CPU anchor figures were measured on: 200 speech-like files of 2-20 s (skewed
short), 20 noise files of 5-30 s, 16 kHz mono, batch 8, the NEST batch augmentor. Stages are timed separately
(decode+noise = dataset __getitem__, collate, augmentation) and end to end through build_dataloader with 0/1/2
workers, for WAV and FLAC.

    python scripts/benchmark_data.py [--files 200] [--workers 0,1,2] [--formats wav,flac] [--json OUT]
"""
import argparse
import json
import os
import random
import resource
import sys
import tempfile
import time

import numpy as np
import soundfile as sf
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from nest_ssl import cli  # noqa: E402
from nest_ssl.data.augmentation import (  # noqa: E402
    MultiSpeakerNoiseAugmentation,
    MultiSpeakerNoiseAugmentationConfig,
    TorchMultiSpeakerNoiseAugmentation,
)
from nest_ssl.data.config import DatasetConfig  # noqa: E402
from nest_ssl.data.loader import build_dataloader  # noqa: E402

NEST_AUG = dict(prob=0.5, noise_ratio=0.5, min_r_speech=-5.0, max_r_speech=5.0, min_r_noise=-5.0, max_r_noise=20.0,
                min_mix_rate=0.5, max_mix_rate=0.5, min_num_segments=1, max_num_segments=1, min_num_speakers=1,
                max_num_speakers=1)
NEMO_ANCHORS = {("flac", 0): 225, ("flac", 2): 367, ("wav", 0): 283, ("wav", 2): 491}  # audio-s per wall-s
SR = 16000


def speech_like(rng, secs):
    n = int(secs * SR)
    t = np.arange(n) / SR
    env = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(2, 6) * t) ** 2  # syllable-rate envelope
    x = np.sin(2 * np.pi * rng.uniform(100, 250) * t) * 0.3 + rng.normal(0, 0.05, n)
    return (x * env).astype(np.float32)


def make_corpus(root, fmt, n_files, n_noise, seed=0):
    rng = np.random.default_rng(seed)
    rows, noise, total = [], [], 0.0
    for name, count, lo, hi, out in (("s", n_files, 2, 20, rows), ("n", n_noise, 5, 30, noise)):
        for i in range(count):
            d = round(lo + (hi - lo) * rng.uniform() ** 1.7, 3) if name == "s" else round(rng.uniform(lo, hi), 3)
            p = os.path.join(root, f"{name}{i}.{fmt}")
            sf.write(p, speech_like(rng, d), SR)
            out.append({"audio_filepath": p, "duration": d})
            total += d if name == "s" else 0
    paths = []
    for rowset, tag in ((rows, "train"), (noise, "noise")):
        paths.append(os.path.join(root, f"{tag}.json"))
        with open(paths[-1], "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rowset)
    return paths[0], paths[1], total


def cpu_seconds():
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def timed(fn):
    w, c = time.perf_counter(), cpu_seconds()
    out = fn()
    return out, time.perf_counter() - w, cpu_seconds() - c


def bench_format(fmt, args, aug):
    with tempfile.TemporaryDirectory() as root:
        train, noise, total = make_corpus(root, fmt, args.files, args.noise_files)
        cfg = DatasetConfig(manifest_filepath=train, noise_manifest=noise, batch_size=8, shuffle=True,
                            min_duration=1.0, max_duration=60.0)
        loader = build_dataloader(cfg, seed=0, augmentor=None)
        ds, collate = loader.dataset, loader.collate
        batches = list(loader.sampler)
        items, w, c = timed(lambda: {i: ds[i] for b in batches for i in b})
        secs = sum(int(x.audio_len) for x in items.values()) / SR
        rows = [(fmt, "decode+noise", 0, secs / w, secs / c)]
        collated, w, c = timed(lambda: [collate([items[i] for i in b])[0] for b in batches])
        rows.append((fmt, "collate", 0, secs / w, secs / c))
        rr = random.Random(0)
        _, w, c = timed(lambda: [aug(b, rr) for b in collated])
        rows.append((fmt, "augmentation", 0, secs / w, secs / c))
        taug = TorchMultiSpeakerNoiseAugmentation(aug.cfg)  # the augment_on_device path, timed here on CPU
        g = torch.Generator().manual_seed(0)
        _, w, c = timed(lambda: [taug(b, g) for b in collated])
        rows.append((fmt, "aug (torch)", 0, secs / w, secs / c))
        for nw in args.workers:
            cfg.num_workers = nw
            full = build_dataloader(cfg, seed=0, augmentor=aug)
            n, w, c = timed(lambda ld=full: sum(int(b.audio_len.sum()) for b in ld) / SR)
            rows.append((fmt, "end-to-end", nw, n / w, n / c))
        return rows, total


def main(argv=None):
    ap = cli.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=200)
    ap.add_argument("--noise_files", type=int, default=20)
    ap.add_argument("--workers", default="0,1,2")
    ap.add_argument("--formats", default="wav,flac")
    ap.add_argument("--json", help="append results as JSON lines here")
    args = ap.parse_args(argv)
    return cli.run(lambda: bench(args), args.debug)


def bench(args) -> int:
    args.workers = [int(x) for x in args.workers.split(",")]
    torch.set_num_threads(1)  # one core per process, as in the NeMo anchors (audio-s per CPU-s comparable)
    aug = MultiSpeakerNoiseAugmentation(MultiSpeakerNoiseAugmentationConfig(**NEST_AUG))
    print(f"{'format':6} {'stage':14} {'workers':>7} {'audio-s/wall-s':>15} {'audio-s/CPU-s':>14} {'vs NeMo':>8}")
    for fmt in args.formats.split(","):
        rows, total = bench_format(fmt, args, aug)
        for f, stage, nw, per_wall, per_cpu in rows:
            ref = NEMO_ANCHORS.get((f, nw)) if stage == "end-to-end" else None
            ratio = f"{per_wall / ref:.2f}x" if ref else ""
            print(f"{f:6} {stage:14} {nw:>7} {per_wall:15.0f} {per_cpu:14.0f} {ratio:>8}")
            if args.json:
                with open(args.json, "a") as fh:
                    fh.write(json.dumps(dict(format=f, stage=stage, workers=nw, audio_s_per_wall_s=per_wall,
                                             audio_s_per_cpu_s=per_cpu, nemo_anchor=ref, corpus_s=total)) + "\n")


if __name__ == "__main__":
    sys.exit(main())
