"""Data-pipeline throughput: audio-seconds per wall-second and per CPU-second, compared with NeMo's CPU anchors.

Synthetic corpus like the one NeMo's CPU anchor figures were measured on: 200 speech-like files of 2-20 s (skewed
short), 20 noise files of 5-30 s, 16 kHz mono, batch 8, the NEST batch augmentor. Two tables, for WAV and FLAC:

stages: decode+noise (dataset __getitem__), collate and augmentation timed separately, and end to end through
  build_dataloader with 0/1/2 workers.
paths: the same files through each data path, one epoch each, end to end: `manifest` (native loader),
  `tarred` (native tarred loader; shards from our writer, shuffle_n as nest_fast-conformer.yaml), `lhotse_cuts`
  (use_lhotse over a lhotse cuts manifest of the files) and `lhotse_shar` (use_lhotse over Shar written from those
  cuts, audio in the corpus's format), and `nemo_cuts` / `nemo_shar` (NeMo's own Lhotse loader and SSL dataset,
  only where `nemo` is importable). Repeats are interleaved (repeat 1 of every path and worker count, then repeat
  2, ..., the path order rotated each time) so that a busy machine slows every path alike; items/s and audio-s/s
  are medians over the repeats, `items` is the count per epoch (the corpus size unless a path drops or repeats
  items), `setup` builds the loader (reads the metadata), `worker RSS` is the largest peak resident set (VmHWM)
  of any DataLoader worker and `private` the largest private memory (smaps_rollup) a worker held, both read from
  /proc after every batch (Linux; "-" without workers). A forked worker's RSS includes the pages it shares with
  the main process, so it follows the main process's size; `private` is what the path costs per worker.

    python scripts/benchmark_data.py [--files 200] [--workers 0,1,2] [--formats wav,flac] [--tables stages,paths]
        [--paths manifest,tarred,lhotse_cuts,lhotse_shar,nemo_cuts,nemo_shar] [--repeats 3] [--json OUT]
"""
import argparse
import collections
import functools
import glob
import importlib.util
import json
import math
import os
import random
import resource
import statistics
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
from nest_ssl.data.tarred import write_tarred_dataset  # noqa: E402

NEST_AUG = dict(prob=0.5, noise_ratio=0.5, min_r_speech=-5.0, max_r_speech=5.0, min_r_noise=-5.0, max_r_noise=20.0,
                min_mix_rate=0.5, max_mix_rate=0.5, min_num_segments=1, max_num_segments=1, min_num_speakers=1,
                max_num_speakers=1)
NEMO_ANCHORS = {("flac", 0): 225, ("flac", 2): 367, ("wav", 0): 283, ("wav", 2): 491}  # audio-s per wall-s
SR = 16000
PATHS = ("manifest", "tarred", "lhotse_cuts", "lhotse_shar", "nemo_cuts", "nemo_shar")
NEST_SHUFFLE_N = 2048  # nest_fast-conformer.yaml's train_ds.shuffle_n


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


def bench_stages(train, noise, fmt, args, aug):
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
    return rows


def write_inputs(root, fmt, train, shards) -> dict[str, dict]:
    """The corpus as each path reads it -> per path, the data keys of its config section: tarred shards (our
    writer), a cuts manifest (lhotse's Recording.from_file per file) and Shar written from those cuts (lhotse's
    SharWriter, the corpus's audio format, as many shards as the tarred set)."""
    from lhotse import CutSet, Recording
    from lhotse.shar import SharWriter

    tars = write_tarred_dataset(train, os.path.join(root, "tarred"), shards)
    with open(train) as f:
        files = [json.loads(row)["audio_filepath"] for row in f]
    cuts = CutSet.from_cuts([Recording.from_file(p).to_cut() for p in files])
    cuts_path, shar = os.path.join(root, "cuts.jsonl.gz"), os.path.join(root, "shar")
    cuts.to_file(cuts_path)
    os.makedirs(shar)
    with SharWriter(shar, fields={"recording": fmt}, shard_size=math.ceil(len(files) / shards)) as w:
        for c in cuts:
            w.write(c)
    lhotse = dict(use_lhotse=True, manifest_filepath=None, shard_seed=0)
    return {"manifest": dict(manifest_filepath=train),
            "tarred": dict(manifest_filepath=os.path.join(root, "tarred", "tarred_audio_manifest.json"),
                           is_tarred=True, tarred_audio_filepaths=",".join(tars), shuffle_n=NEST_SHUFFLE_N),
            "lhotse_cuts": dict(lhotse, cuts_path=cuts_path), "lhotse_shar": dict(lhotse, shar_path=shar)}


def _kib(path: str, keys: tuple[str, ...]) -> int | None:
    """The sum of the `key: N kB` lines of a /proc file; None once the process has exited."""
    try:
        with open(path) as f:
            return sum(int(line.split()[1]) for line in f if line.split(":")[0] in keys)
    except (FileNotFoundError, ProcessLookupError):  # a worker that exited since the listing
        return None


def worker_memory(peak: dict[int, list[float]]) -> None:
    """For each child process (a DataLoader worker), by pid: its peak resident set (VmHWM, MiB) and the largest
    private memory sampled so far (Private_Clean + Private_Dirty of smaps_rollup, MiB). A forked worker's resident
    set starts with every page it shares with the main process; the private part is what the worker alone holds."""
    for children in glob.glob(f"/proc/{os.getpid()}/task/*/children"):
        with open(children) as f:
            pids = [int(p) for p in f.read().split()]
        for pid in pids:
            hwm = _kib(f"/proc/{pid}/status", ("VmHWM",))
            private = _kib(f"/proc/{pid}/smaps_rollup", ("Private_Clean", "Private_Dirty"))
            if hwm is not None and private is not None:
                old = peak.get(pid, [0.0, 0.0])
                peak[pid] = [max(old[0], hwm / 1024), max(old[1], private / 1024)]


def one_epoch(make_loader, workers: int) -> dict:
    """Build a loader and read one epoch: items, audio seconds, setup wall seconds, the epoch's wall and CPU
    seconds (setup excluded), and the largest worker peak RSS and private memory (None without workers)."""
    w0 = time.perf_counter()
    loader = make_loader()
    w1, c1 = time.perf_counter(), cpu_seconds()
    items, secs, peak = 0, 0.0, {}
    for b in loader:
        items += len(b.audio_len)
        secs += int(b.audio_len.sum()) / SR
        if workers:
            worker_memory(peak)
    wall = time.perf_counter() - w1
    persistent = getattr(loader, "_iterator", None)  # NeMo's Shar loader keeps its workers (persistent_workers)
    if persistent is not None:
        persistent._shutdown_workers()  # join them: a worker's CPU time reaches RUSAGE_CHILDREN only once joined
    cpu = cpu_seconds() - c1
    return dict(items=items, audio_s=secs, setup_s=w1 - w0, wall_s=wall, cpu_s=cpu,
                rss=max(v[0] for v in peak.values()) if peak else None,
                private=max(v[1] for v in peak.values()) if peak else None)


def nemo_loader(data: dict, common: dict, noise: str, workers: int):
    """NeMo's own Lhotse path for NEST (EncDecDenoiseMaskedTokenPredModel's use_lhotse branch): NeMo's loader from
    a config and its LhotseAudioNoiseDataset. Runs only where `nemo` is importable."""
    from nemo.collections.asr.data import ssl_dataset
    from nemo.collections.common.data.lhotse import get_lhotse_dataloader_from_config
    from omegaconf import OmegaConf

    aug = {"_target_": "nemo.collections.asr.modules.ssl_modules.MultiSpeakerNoiseAugmentation", **NEST_AUG}
    keys = {k: v for k, v in data.items() if k in ("cuts_path", "shar_path")}
    conf = OmegaConf.create(dict(common, **keys, use_lhotse=True, num_workers=workers, sample_rate=SR,
                                 noise_manifest=noise, batch_augmentor=aug, shard_seed=0, seed=0,
                                 force_finite=True))  # one pass: NeMo repeats Shar inputs without end otherwise
    dataset = ssl_dataset.LhotseAudioNoiseDataset(noise_manifest=noise, batch_augmentor_cfg=conf.batch_augmentor)
    return get_lhotse_dataloader_from_config(conf, global_rank=0, world_size=1, dataset=dataset)


def bench_paths(root, train, noise, n_files, fmt, args, aug) -> list[dict]:
    inputs = write_inputs(root, fmt, train, args.shards)
    common = dict(batch_size=8, shuffle=True, min_duration=1.0, max_duration=60.0)
    makers = {}
    for name in args.paths:
        if name.startswith("nemo_"):
            data = inputs["lhotse_" + name.split("_", 1)[1]]
            makers[name] = lambda nw, d=data: nemo_loader(d, common, noise, nw)
        else:
            makers[name] = lambda nw, d=inputs[name]: build_dataloader(
                DatasetConfig(**common, **d, noise_manifest=noise, num_workers=nw), seed=0, augmentor=aug)
    runs = collections.defaultdict(list)
    names = list(makers)
    for r in range(args.repeats):
        order = names[r % len(names):] + names[: r % len(names)]  # interleaved, rotated: no path always goes first
        for nw in args.workers:
            for name in order:
                runs[name, nw].append(one_epoch(functools.partial(makers[name], nw), nw))
    rows = [dict(table="paths", format=fmt, path=name, workers=nw, corpus_items=n_files, **summary(rs))
            for (name, nw), rs in runs.items()]
    return sorted(rows, key=lambda x: (names.index(x["path"]), x["workers"]))


def summary(runs: list[dict]) -> dict:
    """Medians over the repeats; every repeat's item count (one value unless they disagree); the largest memory."""
    def med(key):
        return statistics.median(key(x) for x in runs)

    rss = [x["rss"] for x in runs if x["rss"] is not None]
    private = [x["private"] for x in runs if x["private"] is not None]
    return dict(items=sorted({x["items"] for x in runs}), setup_s=med(lambda x: x["setup_s"]),
                items_per_s=med(lambda x: x["items"] / x["wall_s"]),
                audio_s_per_wall_s=med(lambda x: x["audio_s"] / x["wall_s"]),
                audio_s_per_cpu_s=med(lambda x: x["audio_s"] / x["cpu_s"]),
                worker_peak_rss_mib=max(rss) if rss else None,
                worker_private_mib=max(private) if private else None, repeats=len(runs))


def main(argv=None):
    ap = cli.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=200)
    ap.add_argument("--noise_files", type=int, default=20)
    ap.add_argument("--workers", default="0,1,2")
    ap.add_argument("--formats", default="wav,flac")
    ap.add_argument("--tables", default="stages,paths")
    ap.add_argument("--paths", default=",".join(PATHS))
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats per path and worker count")
    ap.add_argument("--shards", type=int, default=4, help="tar shards (tarred) and Shar shards")
    ap.add_argument("--json", help="append results as JSON lines here")
    args = ap.parse_args(argv)
    return cli.run(lambda: bench(args), args.debug)


def _choices(value: str, allowed, flag: str) -> list[str]:
    got = [x for x in value.split(",") if x]
    bad = [x for x in got if x not in allowed]
    if bad:
        raise ValueError(f"{flag} {','.join(bad)}: unknown; allowed: {', '.join(allowed)}")
    return got


def bench(args) -> int:
    args.workers = [int(x) for x in args.workers.split(",")]
    tables = _choices(args.tables, ("stages", "paths"), "--tables")
    args.paths = _choices(args.paths, PATHS, "--paths")
    if args.repeats < 1 or args.shards < 1 or args.shards > args.files:
        raise ValueError(f"--repeats {args.repeats} must be >= 1 and --shards {args.shards} in [1, --files]")
    if importlib.util.find_spec("nemo") is None and any(p.startswith("nemo_") for p in args.paths):
        skipped = [p for p in args.paths if p.startswith("nemo_")]
        print(f"{', '.join(skipped)}: skipped: `nemo` is not importable (NeMo's own Lhotse path needs NeMo)")
        args.paths = [p for p in args.paths if p not in skipped]
    if any(p.startswith("nemo_") for p in args.paths):  # import NeMo (~10 s) before the clock: not the first setup
        importlib.import_module("nemo.collections.asr.data.ssl_dataset")
        importlib.import_module("nemo.collections.common.data.lhotse")
    torch.set_num_threads(1)  # one core per process, as in the NeMo anchors (audio-s per CPU-s comparable)
    aug = MultiSpeakerNoiseAugmentation(MultiSpeakerNoiseAugmentationConfig(**NEST_AUG))
    for fmt in args.formats.split(","):
        with tempfile.TemporaryDirectory() as root:
            train, noise, total = make_corpus(root, fmt, args.files, args.noise_files)
            if "stages" in tables:
                print_stages(bench_stages(train, noise, fmt, args, aug), total, args.json)
            if "paths" in tables and args.paths:
                print_paths(bench_paths(root, train, noise, args.files, fmt, args, aug), args.json)
    return 0


def print_stages(rows, total, out):
    print(f"{'format':6} {'stage':14} {'workers':>7} {'audio-s/wall-s':>15} {'audio-s/CPU-s':>14} {'vs NeMo':>8}")
    for f, stage, nw, per_wall, per_cpu in rows:
        ref = NEMO_ANCHORS.get((f, nw)) if stage == "end-to-end" else None
        ratio = f"{per_wall / ref:.2f}x" if ref else ""
        print(f"{f:6} {stage:14} {nw:>7} {per_wall:15.0f} {per_cpu:14.0f} {ratio:>8}")
        if out:
            with open(out, "a") as fh:
                fh.write(json.dumps(dict(table="stages", format=f, stage=stage, workers=nw,
                                         audio_s_per_wall_s=per_wall, audio_s_per_cpu_s=per_cpu, nemo_anchor=ref,
                                         corpus_s=total)) + "\n")


def print_paths(rows, out):
    print(f"{'format':6} {'path':12} {'workers':>7} {'items':>7} {'setup s':>8} {'items/s':>8} {'audio-s/s':>10} "
          f"{'audio-s/CPU-s':>14} {'worker RSS MiB':>15} {'private MiB':>12}")
    for x in rows:
        items = "/".join(str(n) for n in x["items"])  # one number unless the repeats disagree
        rss, private = (f"{x[k]:.0f}" if x[k] is not None else "-" for k in ("worker_peak_rss_mib",
                                                                               "worker_private_mib"))
        print(f"{x['format']:6} {x['path']:12} {x['workers']:>7} {items:>7} {x['setup_s']:8.2f} "
              f"{x['items_per_s']:8.1f} {x['audio_s_per_wall_s']:10.0f} {x['audio_s_per_cpu_s']:14.0f} {rss:>15} "
              f"{private:>12}")
        if out:
            with open(out, "a") as fh:
                fh.write(json.dumps(x) + "\n")


if __name__ == "__main__":
    sys.exit(main())
