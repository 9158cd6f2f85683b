"""What a run directory guarantees: nothing outside it is deleted, nothing of a previous run is overwritten, leaks
of killed saves are cleaned, a finished run is left alone, a full disk is a clear error, the last line says what
was done."""

import errno
import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from nest_ssl import checkpoint as ckpt
from tests.train_support import make_data, run_config, train_tiny


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("demo"))


def snapshot(root: Path) -> dict:
    """{relative path: (sha1, mtime_ns)} of every file under root."""
    return {str(p.relative_to(root)): (hashlib.sha1(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def ckpts(exp) -> list[str]:
    return sorted(p.name for p in Path(exp, "tiny", "checkpoints").iterdir())


def cfg_with(data, exp, mode="min", **kw):
    cfg = run_config(data, exp, **kw)
    cfg["exp_manager"]["checkpoint_callback_params"]["mode"] = mode
    return cfg


# ---- 1. a copied run never deletes the original's files --------------------------------------------------------


def test_resuming_a_copied_run_never_touches_the_original(data, tmp_path):
    ref = train_tiny(cfg_with(data, tmp_path / "ref", max_steps=4, val_every=2))
    vals = [float(n.split("val_loss=")[1].split("-")[0]) for n in ckpts(tmp_path / "ref") if "-last" not in n]
    # choose the mode under which step 4 beats step 2, so the copy's resume must drop the step-2 top-k file
    val2 = train_tiny(cfg_with(data, tmp_path / "probe", max_steps=2, val_every=2))["val_loss"]
    mode = "min" if ref["val_loss"] < val2 else "max"
    assert vals and val2 != ref["val_loss"]

    train_tiny(cfg_with(data, tmp_path / "a", mode, max_steps=2, val_every=2))
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    before = snapshot(tmp_path / "a")
    train_tiny(cfg_with(data, tmp_path / "b", mode, max_steps=4, val_every=2))
    assert snapshot(tmp_path / "a") == before
    assert not any("step=2" in n for n in ckpts(tmp_path / "b"))  # the copy's own old best was replaced
    state = ckpt.load(next(Path(tmp_path, "b", "tiny", "checkpoints").glob("*-last.ckpt")))
    assert all("/" not in name for _, name in state["train_state"]["topk"])  # stored relative to the checkpoint dir


# ---- 2. unreadable checkpoints: an error listing each, or an explicit fresh start that overwrites nothing ---------


def break_all(exp) -> list[Path]:
    files = sorted(Path(exp, "tiny", "checkpoints").glob("*.ckpt"))
    for p in files:
        p.write_bytes(p.read_bytes()[:100])
    return files


def test_all_checkpoints_unreadable_is_an_error_listing_each(data, tmp_path):
    train_tiny(cfg_with(data, tmp_path, max_steps=2, val_every=2))
    files = break_all(tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match="none of the 2 checkpoints .* can be read") as err:
        train_tiny(cfg_with(data, tmp_path, max_steps=4, val_every=2))
    assert all(f"{p.name}: " in str(err.value) for p in files)
    assert "resume_ignore_unreadable" in str(err.value)
    assert snapshot(tmp_path) == before


def test_explicit_fresh_start_overwrites_nothing(data, tmp_path):
    train_tiny(cfg_with(data, tmp_path, max_steps=2, val_every=2))
    break_all(tmp_path)
    nemo = Path(tmp_path, "tiny", "checkpoints", "tiny.nemo")
    nemo.write_bytes(b"the previous run's best model")
    before = {h for h, _ in snapshot(nemo.parent).values()}
    cfg = cfg_with(data, tmp_path, max_steps=2, val_every=2)
    cfg["exp_manager"]["resume_ignore_unreadable_checkpoints"] = True
    res = train_tiny(cfg)
    assert res["step"] == 2 and len(res["losses"]) == 2  # started from step 0
    assert before <= {h for h, _ in snapshot(nemo.parent).values()}  # every old checkpoint's bytes are still there
    assert len(list(nemo.parent.glob("unreadable-*/*"))) == 3


# ---- 3. stale temp files and top-k extras left by kill -9 ----------------------------------------------------------


def test_startup_removes_our_stale_temp_files_and_prunes_topk_extras(data, tmp_path):
    train_tiny(cfg_with(data, tmp_path, max_steps=2, val_every=2))
    d = Path(tmp_path, "tiny", "checkpoints")
    (top,) = [p for p in d.glob("*.ckpt") if not p.name.endswith("-last.ckpt")]
    stale = [d / f"{top.name}.4242.tmp", d / "tiny--val_loss=0.100-step=9-last.ckpt.77.tmp", d / "tiny.nemo.tmp"]
    extra = d / "tiny--val_loss=0.001-step=1.ckpt"  # a top-k file a killed save never got to delete
    for p in [*stale, extra]:
        shutil.copy(top, p)
    keep = [d / "notes.txt", d / "my_backup.ckpt.tmp", d / "pretrained.ckpt"]  # not names we write
    for p in keep:
        p.write_text("user file")
    train_tiny(cfg_with(data, tmp_path, max_steps=4, val_every=2))
    assert not any(p.exists() for p in [*stale, extra])
    assert all(p.read_text() == "user file" for p in keep)
    ours = [n for n in ckpts(tmp_path) if n.startswith("tiny--")]
    assert len([n for n in ours if not n.endswith("-last.ckpt")]) == 1 and len(ours) == 2  # save_top_k: 1, last


# ---- 4. a finished run is left alone ------------------------------------------------------------------------------


def test_rerunning_a_finished_run_touches_nothing(data, tmp_path, capsys):
    cfg = cfg_with(data, tmp_path, max_steps=3, val_every=2)
    train_tiny(cfg)
    before = snapshot(tmp_path)
    capsys.readouterr()
    res = train_tiny(cfg)
    assert res["exit_code"] == 0 and res["step"] == 3 and res["losses"] == []
    assert "already at max_steps 3" in capsys.readouterr().out
    assert snapshot(tmp_path) == before


# ---- 5. disk full -------------------------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("needs permission to mount a small tmpfs (root)")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


def test_disk_full_is_a_clear_error_that_keeps_the_previous_checkpoints(data, tmp_path, small_disk):
    cfg = cfg_with(data, tmp_path, max_steps=2, val_every=2)
    cfg["exp_manager"]["checkpoint_callback_params"]["dirpath"] = str(small_disk)
    train_tiny(cfg)
    before = snapshot(small_disk)
    free = shutil.disk_usage(small_disk).free
    (small_disk / "filler").write_bytes(b"x" * (free - 8192))  # leave less than one checkpoint
    cfg["trainer"]["max_steps"] = 4
    expected = f"no space left on device writing {small_disk}/.*-last.ckpt \\(needs ~"
    with pytest.raises(ckpt.DiskFullError, match=expected) as err:
        train_tiny(cfg)
    assert err.value.errno == errno.ENOSPC
    after = snapshot(small_disk)
    assert not [n for n in after if n.endswith(".tmp")]  # the partial file is gone
    assert {k: v for k, v in after.items() if k != "filler"} == before  # the previous checkpoints are untouched
    assert ckpt.load(small_disk / next(n for n in before if n.endswith("-last.ckpt")))["global_step"] == 2


def test_pretrain_exits_with_the_disk_full_code(monkeypatch, capsys):
    import runpy

    def full(plain):
        raise ckpt.DiskFullError(errno.ENOSPC, "no space left on device writing /x/y.ckpt (needs ~3 MB, 0 MB free)")

    monkeypatch.setattr("nest_ssl.train.train", full)
    main = runpy.run_path(str(Path(__file__).resolve().parents[1] / "scripts" / "pretrain.py"))["main"]
    rc = main(["--config", "configs/nest_tiny_cpu.yaml", "model.train_ds.manifest_filepath=a.json",
               "model.validation_ds.manifest_filepath=b.json"])
    assert rc == ckpt.DISK_FULL_EXIT_CODE and rc not in (0, 1, 75)
    assert "no space left on device writing /x/y.ckpt" in capsys.readouterr().err


# ---- 8. the last line says what was done; the final checkpoint's name is true ------------------------------------


def test_final_summary_and_a_truthful_last_checkpoint_name(data, tmp_path, capsys):
    res = train_tiny(cfg_with(data, tmp_path, max_steps=5, val_every=2))  # last val at step 4
    last = next(n for n in ckpts(tmp_path) if n.endswith("-last.ckpt"))
    assert last == f"tiny--val_loss={res['val_loss']:.3f}-step=5-last.ckpt"
    state = ckpt.load(Path(tmp_path, "tiny", "checkpoints", last))
    assert state["global_step"] == 5
    final = capsys.readouterr().out.strip().splitlines()[-1]
    assert final.startswith("done: 5 steps") and last in final and f"val_loss {res['val_loss']:.4f}" in final
    assert torch.isfinite(torch.tensor(res["val_loss"]))


def test_an_unreadable_resume_from_checkpoint_is_a_config_error_naming_the_key(data, tmp_path):
    bad = tmp_path / "cut.ckpt"
    bad.write_bytes(b"PK\x03\x04 truncated")
    for path, why in ((bad, "cannot be read"), (tmp_path / "none.ckpt", "no such file")):
        cfg = cfg_with(data, tmp_path / "exp", max_steps=2, val_every=2)
        cfg["exp_manager"]["resume_from_checkpoint"] = str(path)
        with pytest.raises(ValueError, match=f"exp_manager.resume_from_checkpoint='{path}'.*{why}"):
            train_tiny(cfg)
