"""nest_ssl/cpu_run.py: on a CPU, pretrain.py chooses the thread count and the loader settings on purpose and says so
in one line each."""
import os
import warnings
from pathlib import Path

import pytest
import torch

from nest_ssl import cpu_run
from nest_ssl.run_config import load_config

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = ["model.train_ds.manifest_filepath=a.json", "model.validation_ds.manifest_filepath=b.json"]


def test_a_gpu_recipe_on_cpu_gets_one_line_saying_what_changed(monkeypatch):
    monkeypatch.setattr(cpu_run, "usable_cpus", lambda: 2)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    plain, _ = load_config(ROOT / "configs" / "nest_fast-conformer.yaml", MANIFESTS)  # 8 workers, pin_memory
    line = cpu_run.adjust_loaders(plain)
    assert line.startswith("CPU run: ") and "\n" not in line
    assert "model.train_ds.num_workers 8 -> 2" in line and "model.train_ds.pin_memory true -> false" in line
    assert plain["model"]["train_ds"]["num_workers"] == 2 and plain["model"]["train_ds"]["pin_memory"] is False
    assert cpu_run.adjust_loaders(plain) is None  # nothing left to change: nothing said
    tiny, _ = load_config(ROOT / "configs" / "nest_tiny_cpu.yaml", MANIFESTS)
    assert cpu_run.adjust_loaders(tiny) is None


def test_threads_are_the_usable_cpus_per_local_process_unless_omp_num_threads_is_set(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setattr(cpu_run, "usable_cpus", lambda: 4)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    try:
        line = cpu_run.pick_threads()
        assert torch.get_num_threads() == 2
        assert line.startswith("CPU run: 2 intra-op thread(s) = 4 usable CPU(s) / 2 process(es)")
        assert "OMP_NUM_THREADS" in line  # how to change it
        torch.set_num_threads(3)
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        assert cpu_run.pick_threads() == "CPU run: 3 intra-op thread(s), from OMP_NUM_THREADS=3"
        assert torch.get_num_threads() == 3  # the user's setting is kept
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path")
def test_pretrain_on_cpu_says_threads_and_loader_changes_and_torch_does_not_warn(tmp_path, capsys):
    import runpy

    from tests.train_support import make_data

    data = make_data(tmp_path / "data")
    main = runpy.run_path(str(ROOT / "scripts" / "pretrain.py"))["main"]
    before = torch.get_num_threads()
    argv = ["--config", str(ROOT / "configs" / "nest_tiny_cpu.yaml"), f"exp_manager.exp_dir={tmp_path / 'exp'}",
            "trainer.max_steps=1", f"model.train_ds.manifest_filepath={data['train']}",
            f"model.validation_ds.manifest_filepath={data['val']}", "model.train_ds.pin_memory=true",
            f"model.train_ds.num_workers={cpu_run.usable_cpus() + 6}"]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    said = [line for line in out if line.startswith("CPU run: ")]
    assert len(said) == 2 and "intra-op thread" in said[0] and "pin_memory true -> false" in said[1], out
    assert not [w for w in seen if "pin_memory" in str(w.message) or "worker processes" in str(w.message)]
    assert torch.get_num_threads() == before
    assert os.environ.get("LOCAL_WORLD_SIZE") is None
