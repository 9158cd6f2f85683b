"""Sharded (DCP) checkpoints of a 2-process FSDP run: kill -9 inside a save, resume from the last complete one
bit-exact; an asynchronous save holds the state of the moment it was asked for; conversion to one file and .nemo;
another world size is refused with the way out."""
import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from nest_ssl import dcp_checkpoint
from tests.fsdp_support import dcp_worker
from tests.train_support import free_port


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("dcp")
    with pytest.raises(mp.ProcessExitedException):  # every rank kills itself inside the second save
        mp.spawn(dcp_worker, args=(2, free_port(), str(out), ["crash"]), nprocs=2, join=True)
    crashed = sorted(p.name for p in (out / "run").iterdir())
    mp.spawn(dcp_worker, args=(2, free_port(), str(out), ["reference", "resume"]), nprocs=2, join=True)
    return out, crashed


def _weights(npz) -> dict:
    return {k[2:]: npz[k] for k in npz.files if k.startswith("w/")}


@pytest.mark.slow
def test_kill_during_save_then_resume_is_bit_exact(runs):
    out, crashed = runs
    assert crashed == ["tiny-step=2-last.dcp", "tiny-step=3-last.dcp.tmp"]  # the killed save was never committed
    assert dcp_checkpoint.latest(out / "run").name == "tiny-step=2-last.dcp"
    for rank in range(2):  # each rank's losses of steps 2, 3 (dropout on) and rank 0's final weights
        ref, got = np.load(out / f"reference-rank{rank}.npz"), np.load(out / f"resume-rank{rank}.npz")
        np.testing.assert_array_equal(got["losses"], ref["losses"][2:])
    ref_w, got_w = _weights(np.load(out / "reference-rank0.npz")), _weights(np.load(out / "resume-rank0.npz"))
    assert ref_w.keys() == got_w.keys()
    for k in ref_w:
        np.testing.assert_array_equal(got_w[k], ref_w[k], err_msg=k)


@pytest.mark.slow
def test_async_save_holds_the_state_when_it_was_asked_for(runs, tmp_path):
    """Written while the next step trained: it equals the step-2 snapshot and the crash run's synchronous save."""
    out, _ = runs
    snapshot = _weights(np.load(out / "snapshot2-rank0.npz"))
    for run in ("ref", "run"):
        single = torch.load(dcp_checkpoint.to_single_file(out / run / "tiny-step=2-last.dcp", tmp_path / f"{run}.ckpt"),
                            weights_only=True)
        assert single["global_step"] == 2 and single["written_by_world_size"] == 2
        assert single["state_dict"].keys() == {k[len("model."):] for k in snapshot}
        for k, v in single["state_dict"].items():
            np.testing.assert_array_equal(v.float().numpy(), snapshot["model." + k], err_msg=k)


@pytest.mark.slow
def test_single_file_conversion_loads_in_one_process_and_exports_nemo(runs, tmp_path):
    from nest_ssl import export
    from tests.fsdp_support import build

    out, _ = runs
    path = dcp_checkpoint.to_single_file(out / "ref" / "tiny-step=2-last.dcp", tmp_path / "one.ckpt")
    single = torch.load(path, weights_only=True)
    model = build("batch_norm", 0.1)
    model.load_state_dict(single["state_dict"], strict=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, eps=1e-4)
    opt.load_state_dict(single["optimizer"])  # torch's own form, one entry per trainable parameter
    assert len(opt.state) == sum(p.requires_grad for p in model.parameters())
    assert all(int(s["step"]) == 2 for s in opt.state.values())
    nemo = export.save_nemo(export.load_pretrained(path), single["config"]["model"], tmp_path / "m.nemo")
    back = export.load_pretrained(nemo)
    for k, v in single["state_dict"].items():
        torch.testing.assert_close(back.state_dict()[k], v, rtol=0, atol=0, msg=k)


@pytest.mark.slow
def test_export_script_takes_a_dcp_directory(runs, tmp_path):
    import runpy
    from pathlib import Path

    from nest_ssl import export

    main = runpy.run_path(str(Path(__file__).parents[1] / "scripts" / "export.py"))["main"]
    out, _ = runs
    dcp_dir = out / "run" / "tiny-step=2-last.dcp"
    assert main([str(dcp_dir), "--out", str(tmp_path / "m.nemo"), "--format", "nemo"]) == 0
    assert main([str(dcp_dir), "--out", str(tmp_path / "m.ckpt"), "--format", "ckpt"]) == 0
    cfg, state = export.read_checkpoint(dcp_dir)
    nemo_cfg, nemo_state = export.read_checkpoint(tmp_path / "m.nemo")
    assert cfg["encoder"]["n_layers"] == nemo_cfg["encoder"]["n_layers"] == 2
    for k, v in state.items():
        torch.testing.assert_close(nemo_state[k], v, rtol=0, atol=0, msg=k)
    assert torch.load(tmp_path / "m.ckpt", weights_only=True)["global_step"] == 2
    if hf_available():  # the Hugging Face export reads the same directory (the hf extra is in dev)
        assert main([str(dcp_dir), "--out", str(tmp_path / "hf"), "--format", "hf", "--verify", "1"]) == 0
        assert "training step: 2" in (tmp_path / "hf" / "README.md").read_text()


def hf_available() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def test_another_world_size_is_refused(runs):
    out, _ = runs
    with pytest.raises(ValueError, match="written by 2 processes; this run has 1.*init_from_ckpt"):
        dcp_checkpoint.load(out / "run" / "tiny-step=2-last.dcp", torch.nn.Linear(1, 1), None)


def test_incomplete_directory_is_not_a_checkpoint(tmp_path):
    (tmp_path / "x.dcp.tmp").mkdir()
    (tmp_path / "y.dcp").mkdir()  # no metadata: a copy cut short
    assert dcp_checkpoint.latest(tmp_path) is None
    with pytest.raises(FileNotFoundError, match="not a complete DCP checkpoint"):
        dcp_checkpoint.read_train_state(tmp_path / "y.dcp")
