"""Training through the Lhotse source (`use_lhotse: true`, issue 29's "Done when"): NeMo's NEST YAML on a Shar
directory through scripts/pretrain.py; kill -9 mid-epoch and inside a checkpoint save, resumed bit-exact; 2 gloo
ranks: equal batches per epoch with every cut used, a run that finishes and a kill -9 + resume that is bit-exact;
validation on 2 ranks counting every item once (a rank without a batch included).

The corpus is N short random-noise WAVs of distinct durations, as a NeMo manifest, a lhotse cuts manifest and a Shar
directory (lhotse's own writers). Item ids are cut positions: cut i is `train{i}.wav`, sample id `str(i)`.
tests/test_lhotse_bad_data.py has the bad-data half (damaged Shar members, missing files)."""
import collections
import dataclasses
import io
import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from nest_ssl import checkpoint as ckpt
from nest_ssl.data.config import DatasetConfig
from nest_ssl.data.loader import build_dataloader
from tests.test_train_subprocess import lasts, start, wait_for
from tests.train_support import (
    TinyModel,
    free_port,
    join_ranks,
    run_config,
    sequential_worker,
    spawn_ranks,
    train_tiny,
    validation_worker,
)

ROOT = Path(__file__).resolve().parents[1]
N, SR = 15, 16000  # 15 cuts: a multiple of neither the batch sizes nor the world size


def duration(i: int) -> float:
    return round(1.0 + 0.1 * i, 2)  # >= 1.0 s: NeMo's YAML drops shorter cuts (min_duration 1.0)


def write_cuts(wavs: list[Path], path: Path) -> str:
    from lhotse import CutSet, Recording

    cuts = CutSet.from_cuts([Recording.from_file(str(p)).to_cut() for p in wavs])
    cuts.to_file(str(path))
    return str(path)


def write_shar(cuts_path: str, shar_dir: Path, shard_size: int = 4) -> str:
    from lhotse import CutSet
    from lhotse.shar import SharWriter

    shar_dir.mkdir()
    with SharWriter(str(shar_dir), fields={"recording": "flac"}, shard_size=shard_size) as w:
        for cut in CutSet.from_file(cuts_path):
            w.write(cut)
    return str(shar_dir)


def write_wavs(root: Path, name: str, n: int) -> tuple[list[Path], str]:
    """n noise WAVs `<name><i>.wav` of duration(i) seconds and their NeMo manifest `<name>.json`."""
    wavs = [root / f"{name}{i}.wav" for i in range(n)]
    for i, p in enumerate(wavs):
        x = np.random.default_rng([len(name), i]).uniform(-0.5, 0.5, int(duration(i) * SR)).astype(np.float32)
        sf.write(str(p), x, SR)
    (root / f"{name}.json").write_text("".join(json.dumps({"audio_filepath": str(p), "duration": duration(i)}) + "\n"
                                               for i, p in enumerate(wavs)))
    return wavs, str(root / f"{name}.json")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    """train: N cuts (NeMo manifest, cuts, Shar in shards of 4); shar5/cuts<n>: the first n cuts; val: 3 cuts;
    noise: 2 files."""
    root = tmp_path_factory.mktemp("lhotse")
    out = {}
    for name, n in (("train", N), ("val", 3), ("noise", 2)):
        out[f"{name}_wavs"], out[name] = write_wavs(root, name, n)
    for n in (1, 3, 5, N):
        out[f"cuts{n}"] = write_cuts(out["train_wavs"][:n], root / f"cuts{n}.jsonl.gz")
    out["val_cuts"] = write_cuts(out["val_wavs"], root / "val_cuts.jsonl.gz")
    out["shar"] = write_shar(out[f"cuts{N}"], root / "shar")
    out["shar5"] = write_shar(out["cuts5"], root / "shar5")
    return out


def lhotse_ds(source: str, path: str, **kw) -> dict:
    """DatasetConfig kwargs of a use_lhotse section reading `path` (source: shar_path or cuts_path)."""
    return {"use_lhotse": True, "manifest_filepath": None, source: path, "sample_rate": SR, "num_workers": 0, **kw}


# ---- 1. NeMo's own YAML on a Shar directory, through scripts/pretrain.py ----
# The model override README's SLURM trial runs the XL YAML with on CPU (2 layers, d_model 64; 2 heads as nest_tiny)
SHRINK = ["model.encoder.n_layers=2", "model.encoder.d_model=64", "model.encoder.n_heads=2"]


@pytest.mark.slow
def test_nemo_nest_yaml_trains_on_shar_and_validates_on_cuts_through_pretrain(corpus, tmp_path):
    """configs/nest_fast-conformer.yaml as shipped, use_lhotse switched on by overrides alone; 3 steps, one per epoch
    (15 cuts, batch 8, drop_last), 2 DataLoader workers (cpu_run's cap), validation on a cuts
    manifest. Its val_loss must equal the native manifest loader's over the same 3 files at the same weights:
    breaks if Lhotse validation drops, repeats or misreads an item, or the run fails / writes no checkpoint."""
    from nest_ssl import train
    from nest_ssl.data.loader import build_loader
    from nest_ssl.distributed import DistInfo
    from nest_ssl.nemo_compat import build_model
    from nest_ssl.run_config import build_run_config

    cmd = [sys.executable, "scripts/pretrain.py", "--config", "configs/nest_fast-conformer.yaml",
           "model.train_ds.use_lhotse=true", f"model.train_ds.shar_path={corpus['shar']}",
           "model.train_ds.manifest_filepath=null", "model.validation_ds.use_lhotse=true",
           f"model.validation_ds.cuts_path={corpus['val_cuts']}", "model.validation_ds.manifest_filepath=null",
           *SHRINK, "trainer.max_steps=3", "trainer.val_check_interval=3", "trainer.log_every_n_steps=1",
           f"exp_manager.exp_dir={tmp_path}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    losses = [float(m) for m in re.findall(r"^step \d+/3 \| loss (\S+)", out.stdout, flags=re.M)]
    assert len(losses) == 3 and all(math.isfinite(x) and x > 0 for x in losses), out.stdout
    (last,) = tmp_path.glob("*/checkpoints/*-last.ckpt")
    saved = ckpt.load(last)
    assert saved["global_step"] == 3 and saved["epoch"] == 2  # the third epoch: the Shar was read 3 times
    val = saved["train_state"]["last_val"]
    assert f"step 3: val_loss {val:.4f}" in out.stdout, out.stdout

    run = build_run_config(saved["config"])
    model = build_model(saved["config"]["model"])
    model.load_state_dict(saved["state_dict"])
    native = dataclasses.replace(run.model.validation_ds, use_lhotse=False, cuts_path=None, num_workers=0,
                                 manifest_filepath=corpus["val"])
    loader, mix = build_loader(native, seed=run.seed, is_train=False)
    want = train.validate(train.TrainStep(model), loader, DistInfo(0, 0, 1, torch.device("cpu")), run.seed, None,
                          device_mix=mix)
    assert val == pytest.approx(want, rel=1e-6)  # the same float32 math in another process: equal to rounding


# ---- 2. one rank: kill -9 mid-epoch, and inside a save ----
def lhotse_run(corpus, exp, max_steps: int = 12) -> dict:
    """run_config (TinyModel, batch 2, a checkpoint every 3 steps) with its train_ds read from the Shar through
    Lhotse: bucketing (2 buckets) and shuffling on, noise from the native noise manifest."""
    cfg = run_config(corpus, exp, batch_size=2, max_steps=max_steps, val_every=3)
    cfg["model"]["train_ds"].update(lhotse_ds("shar_path", corpus["shar"], use_bucketing=True, num_buckets=2,
                                              shuffle=True))
    return cfg


def assert_mid_epoch(saved: dict, world: int = 1) -> None:
    """The checkpoint a resume starts from is inside an epoch: some of that epoch's batches seen, some not."""
    loader = build_dataloader(DatasetConfig(**saved["config"]["model"]["train_ds"]), world_size=world,
                              seed=saved["config"]["seed"])
    loader.set_epoch(saved["loader"]["epoch"])
    assert 0 < saved["loader"]["start"] < len(loader), (saved["loader"], len(loader))


@pytest.fixture(scope="module")
def full_run(corpus, tmp_path_factory) -> tuple[dict, Path]:
    """The uninterrupted 1-rank run both kill tests are compared with."""
    exp = tmp_path_factory.mktemp("full")
    return train_tiny(lhotse_run(corpus, exp)), exp


def assert_resumed_bit_exact(corpus, full_run, exp) -> None:
    full, full_exp = full_run
    rest = train_tiny(lhotse_run(corpus, exp))
    assert 0 < len(rest["losses"]) < 12
    assert rest["losses"] == full["losses"][12 - len(rest["losses"]):]
    a, b = ckpt.load(lasts(full_exp)[0])["state_dict"], ckpt.load(lasts(exp)[0])["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_kill9_mid_epoch_then_resume_is_bit_exact(corpus, full_run, tmp_path):
    """Shar, bucketing, shuffling: 8 batches per epoch, checkpoints every 3 steps and at the epoch's end, killed
    after step 3 or 6 (both mid-epoch, asserted). Breaks if the resumed plan differs from the killed one (another
    shuffle or bucket order, a restart of the epoch, a skipped or repeated batch)."""
    proc = start(lhotse_run(corpus, tmp_path / "b"), tmp_path, sleep=0.25)
    wait_for(lambda: any("step=3" in p.name or "step=6" in p.name for p in lasts(tmp_path / "b")), proc)
    proc.kill()  # SIGKILL: no handler runs
    proc.wait()
    assert_mid_epoch(ckpt.load(lasts(tmp_path / "b")[0]))
    assert_resumed_bit_exact(corpus, full_run, tmp_path / "b")


def half_then_kill(real, step: int):
    """checkpoint's write function, except that the checkpoint of `step` is written halfway and the process then
    SIGKILLs itself: the temp file is half written and never renamed."""
    def write(obj, f):
        if obj.get("global_step") == step:
            buf = io.BytesIO()
            torch.save(obj, buf)
            f.write(buf.getvalue()[: buf.tell() // 2])
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        real(obj, f)
    return write


def killed_in_save(rank: int, world: int, cfg: dict, step: int) -> None:
    """train_tiny(cfg), SIGKILLed halfway through writing the checkpoint of `step` (the monkeypatched write is
    checkpoint.atomic_save's)."""
    torch.set_num_threads(1)
    ckpt._save_reporting_write_errors = half_then_kill(ckpt._save_reporting_write_errors, step)
    train_tiny(cfg)


@pytest.mark.slow
def test_kill9_inside_a_save_then_resume_is_bit_exact(corpus, full_run, tmp_path):
    """Killed while writing step 6's checkpoint: the step-3 one (mid-epoch) stays the resume point, the half-written
    temp file is removed at start-up. Breaks if a torn write can be picked up or replace the previous checkpoint, or
    the resume is not exact."""
    procs = spawn_ranks(killed_in_save, 1, (lhotse_run(corpus, tmp_path / "b"), 6))
    assert join_ranks(procs, limit=120) == [-signal.SIGKILL]
    ckpt_dir = tmp_path / "b" / "tiny" / "checkpoints"
    assert [p.name for p in ckpt_dir.glob("*.tmp")], list(ckpt_dir.iterdir())  # the kill was inside the write
    (last,) = lasts(tmp_path / "b")
    saved = ckpt.load(last)
    assert saved["global_step"] == 3
    assert_mid_epoch(saved)
    assert_resumed_bit_exact(corpus, full_run, tmp_path / "b")
    assert not list(ckpt_dir.glob("*.tmp"))


# ---- 3. two ranks: the plan, a run, kill -9 + resume ----
def rank_ids(kw: dict, world: int, is_train: bool = True, epochs: int = 1) -> list[list[list[list[int]]]]:
    """[rank][epoch] -> that epoch's batches (lists of item ids), each rank's loader built alone."""
    out = []
    for r in range(world):
        loader = build_dataloader(DatasetConfig(**kw, return_sample_id=True), rank=r, world_size=world,
                                  is_train=is_train)
        out.append([])
        for _ in range(epochs):
            planned = len(loader)  # the count the training loop steps by (the coming epoch's own)
            out[-1].append([[int(i) for i in b.sample_id] for b in loader])
            assert len(out[-1][-1]) == planned
    return out


@pytest.mark.parametrize("bucketing", [False, True])
@pytest.mark.parametrize("limit", [{"batch_size": 2}, {"batch_size": 4}, {"batch_size": None, "batch_duration": 4.0}],
                         ids=["2_cuts", "4_cuts", "4_seconds"])
@pytest.mark.parametrize("n", [5, N])
def test_two_ranks_get_equal_batches_and_every_cut_each_epoch(corpus, n, limit, bucketing):
    """Shar with 5 and 15 cuts, batches by count and by duration, 3 epochs: both ranks have len(loader) batches,
    and every cut is in one of them once per epoch. lhotse repeats a cut only when an epoch's last round holds
    fewer cuts than ranks (then it deals them one per rank, copying the first: 5 cuts in batches of 2 end with one
    cut for two ranks). Duration batches number 4, 5, 5 on the 3 epochs of 15 cuts with bucketing.
    Breaks if a rank has a batch more than the other (a hang at the next collective), a cut is lost (an epoch cut
    to epoch 0's count) or repeated otherwise, or a repeated cut's id ('3_dup0') cannot be read."""
    kw = lhotse_ds("shar_path", corpus["shar" if n == N else "shar5"], shuffle=True, use_bucketing=bucketing,
                   num_buckets=2, min_duration=0.5, max_duration=4.0, **limit)
    ranks = rank_ids(kw, 2, epochs=3)
    for e, batches in enumerate(zip(*ranks)):
        assert len(batches[0]) == len(batches[1]) > 0, (e, batches)
        seen = collections.Counter(i for r in batches for b in r for i in b)
        assert sorted(seen) == list(range(n)), (e, batches)
        if seen.total() > n:  # only the last round, one cut per rank, fewer distinct cuts than ranks
            last = [r[-1] for r in batches]
            assert all(len(b) == 1 for b in last) and len({b[0] for b in last}) < 2, (e, batches)
            assert seen.total() == n + 1, (e, batches)
    if (n, limit) == (5, {"batch_size": 2}):  # the corner case does come up
        assert sum(len(b) for r in ranks for e in r for b in e) > 3 * n, ranks
    if (n, limit.get("batch_duration"), bucketing) == (N, 4.0, True):  # and the epochs do differ in length
        assert len({len(e) for e in ranks[0]}) > 1, ranks


def test_epochs_of_different_lengths_are_each_trained_to_their_end(corpus, tmp_path):
    """Duration batches (batch_duration 4 s, bucketing): the 3 epochs' plans hold different numbers of batches, and a
    max_epochs=3 run makes one optimizer step per planned batch. Breaks if an epoch is cut to epoch 0's count (its
    last cuts unused) or the loop runs past an epoch's plan."""
    cfg = lhotse_run(corpus, tmp_path, max_steps=-1)
    cfg["trainer"].update(max_epochs=3, val_check_interval=1.0)
    cfg["model"]["train_ds"].update(batch_size=None, batch_duration=4.0)
    plan = build_dataloader(DatasetConfig(**cfg["model"]["train_ds"]), seed=cfg["seed"]).sampler
    counts = []
    for e in range(3):
        plan.set_epoch(e)
        counts.append(len(plan.epoch_batches()))
    assert len(set(counts)) > 1, counts
    result = train_tiny(cfg)
    assert (result["step"], result["epoch"]) == (sum(counts), 3), counts


KILL_SAVE = 4  # the 2-rank kill: rank 0 inside the step-4 checkpoint's write (2 ranks validate at 3, 4, 7, 8: the
# epoch has 4 batches per rank); step 3's (mid-epoch) stays the last complete one


def full_then_killed(rank: int, world: int, ports: list, cfgs: list, shapes: list, out: str) -> None:
    """On each rank: run cfgs[0] to its end, validate `shapes` under ddp and fsdp (validation_worker), then run
    cfgs[1], in which rank 0 (the checkpoint writer) SIGKILLs itself halfway through writing step KILL_SAVE's
    checkpoint; rank 1 then loses its peer in the next collective."""
    sequential_worker(rank, world, ports[:1], cfgs[:1], out)
    validation_worker(rank, world, ports[1], shapes, out)
    if rank == 0:
        ckpt._save_reporting_write_errors = half_then_kill(ckpt._save_reporting_write_errors, KILL_SAVE)
    sequential_worker(rank, world, ports[2:], cfgs[1:], out)


# validation shapes (name, cuts, batch size): 3 cuts in 2 batches for 2 ranks; 1 cut: rank 1 has no batch;
# 5 cuts in 3 batches: rank 0 has one more
VAL_SHAPES = [("3x2", 3, 2), ("1x2", 1, 2), ("5x2", 5, 2)]


def val_kwargs(corpus, cuts: int, batch_size: int) -> dict:
    return lhotse_ds("cuts_path", corpus[f"cuts{cuts}"], batch_size=batch_size, shuffle=False)


@pytest.fixture(scope="module")
def two_ranks(corpus, tmp_path_factory) -> tuple[Path, dict, dict]:
    """One 2-rank gloo group: the uninterrupted run (exp a), validation, the killed run (exp b); then a second group
    resumes exp b. Each group must end within its deadline (a hang fails the tests, never blocks them)."""
    out = tmp_path_factory.mktemp("ddp")
    cfgs = [lhotse_run(corpus, out / e, max_steps=8) for e in ("a", "b")]  # 4 batches per rank and epoch
    shapes = [((name,), val_kwargs(corpus, n, bs)) for name, n, bs in VAL_SHAPES]
    procs = spawn_ranks(full_then_killed, 2, ([free_port() for _ in range(3)], cfgs, shapes, str(out)))
    codes = join_ranks(procs, limit=240)
    torn = [p.name for p in (out / "b" / "tiny" / "checkpoints").glob("*.tmp")]  # before the resume tidies them
    killed = ckpt.load(lasts(out / "b")[0])
    (out / "resume").mkdir()
    procs = spawn_ranks(sequential_worker, 2, ([free_port()], cfgs[1:], str(out / "resume")))
    return out, {"codes": codes, "torn": torn, "resumed_codes": join_ranks(procs, limit=240)}, killed


@pytest.mark.slow
def test_two_rank_lhotse_run_finishes_with_equal_steps_on_both_ranks(two_ranks):
    """Breaks if a rank runs out of batches before the other (a hang caught by the deadline) or the run fails."""
    out, codes, _ = two_ranks
    losses = [torch.load(out / f"run0_losses_rank{r}.pt") for r in range(2)]
    assert len(losses[0]) == len(losses[1]) == 8 and all(math.isfinite(x) for r in losses for x in r)
    assert losses[0] != losses[1]  # each rank trained on its own batches
    assert ckpt.load(lasts(out / "a")[0])["global_step"] == 8


@pytest.mark.slow
def test_two_rank_kill9_inside_a_save_then_resume_is_bit_exact(two_ranks):
    """Rank 0 killed halfway through writing step 4's checkpoint (the torn temp file is there), rank 1 stops when
    its peer is gone; resumed from step 3 (mid-epoch, asserted) on 2 ranks: each rank's losses and the final
    weights equal the uninterrupted 2-rank run's. Breaks if the torn write is picked up or replaces step 3's, or a
    rank resumes at another batch of its plan."""
    out, codes, killed = two_ranks
    assert codes["codes"][0] == -signal.SIGKILL and codes["codes"][1] != 0, codes
    assert codes["torn"], codes  # the kill was inside the write
    assert codes["resumed_codes"] == [0, 0], codes
    assert killed["global_step"] == 3
    assert_mid_epoch(killed, world=2)
    for r in range(2):
        full = torch.load(out / f"run0_losses_rank{r}.pt")
        rest = torch.load(out / "resume" / f"run0_losses_rank{r}.pt")
        assert len(rest) == 5 and rest == full[3:], (r, rest, full)
    a, b = (ckpt.load(lasts(out / e)[0])["state_dict"] for e in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---- 4. validation on 2 ranks ----
@pytest.mark.parametrize("batch_size", [1, 2, 4])
@pytest.mark.parametrize("cuts", [1, 3, 5])
def test_lhotse_validation_counts_every_item_once_over_two_ranks(corpus, cuts, batch_size):
    """Breaks if an item is validated on both ranks or on none (the sum over ranks != the cut count)."""
    ranks = [r[0] for r in rank_ids(val_kwargs(corpus, cuts, batch_size), 2, is_train=False)]
    assert sorted(i for r in ranks for b in r for i in b) == list(range(cuts)), ranks
    if cuts == 1:
        assert [len(r) for r in ranks] == [1, 0]  # rank 1 has no validation batch


@pytest.mark.slow
def test_lhotse_validation_on_two_gloo_ranks_agrees_and_does_not_hang(corpus, two_ranks):
    """validate() in the 2-rank group (ddp and fsdp) equals the mean batch loss over both ranks' plans computed
    here, for a rank with no batch (1x2) and ranks with unequal batches (3x2, 5x2). Breaks if a rank waits on a
    collective the other skips (the group's deadline), or a batch is counted twice or not at all."""
    out, codes, _ = two_ranks
    results = [torch.load(out / f"val_rank{r}.pt") for r in range(2)]
    for name, n, bs in VAL_SHAPES:
        torch.manual_seed(0)
        model = TinyModel(encoder=True).eval()
        kw = val_kwargs(corpus, n, bs)
        losses = [float(model.validation_step(b)["loss"]) for r in range(2)
                  for b in build_dataloader(DatasetConfig(**kw), rank=r, world_size=2, is_train=False)]
        want = sum(losses) / len(losses)
        for strategy in ("ddp", "fsdp"):
            got = [res[(strategy, name)][0] for res in results]
            assert all(math.isclose(g, want, rel_tol=1e-5) for g in got), (strategy, name, got, want)
