"""train() with the health metrics (trainer.health, on by default) and the probe (trainer.probe) wired in: the
scalars reach TensorBoard, and exp_manager's top-k can follow probe_cer."""
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from nest_ssl import checkpoint as ckpt
from nest_ssl.data.probe_corpus import write_probe_corpus
from nest_ssl.run_config import load_config
from nest_ssl.train import train
from tests.train_support import free_port, make_data

ROOT = Path(__file__).resolve().parents[1]


def probe_overrides(corpus: dict) -> list[str]:
    return ["+trainer.probe.enabled=true", "+trainer.probe.every_n_steps=2", "+trainer.probe.steps=5",
            f"+trainer.probe.train_manifest={corpus['train']}", f"+trainer.probe.eval_manifest={corpus['eval']}",
            "exp_manager.checkpoint_callback_params.monitor=probe_cer"]


def config(data: dict, exp_dir, extra=()) -> dict:
    plain, _ = load_config(ROOT / "configs" / "nest_tiny_cpu.yaml", [
        f"model.train_ds.manifest_filepath={data['train']}", f"model.train_ds.noise_manifest={data['noise']}",
        f"model.validation_ds.manifest_filepath={data['val']}", f"model.validation_ds.noise_manifest={data['noise']}",
        f"exp_manager.exp_dir={exp_dir}", "trainer.max_steps=2", "trainer.val_check_interval=2",
        "trainer.log_every_n_steps=1", "model.train_ds.batch_size=2", "model.validation_ds.batch_size=2", *extra])
    return plain


@pytest.mark.slow
def test_health_and_probe_scalars_reach_tensorboard_and_top_k_follows_probe_cer(tmp_path):
    data = make_data(tmp_path / "demo")
    corpus = write_probe_corpus(tmp_path / "probe", num_train=8, num_eval=4, seed=0)
    result = train(config(data, tmp_path / "run", probe_overrides(corpus)))
    run = Path(result["log_dir"])
    events = EventAccumulator(str(next(run.glob("version_0")))).Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ("health/masked_acc_0", "health/unmasked_acc_1", "health/target_perplexity_0",
                "health/mean_pred_entropy_0", "health/frame_var_final", "health/eff_rank",
                "health/grad_norm/encoder.layers.1", "health/grad_norm/decoder", "val_health/masked_acc_0",
                "probe_cer", "probe_wer", "probe/layer_weight_0"):
        assert tag in tags, tag
    assert len(events.Scalars("health/masked_acc_0")) == 2  # every log step
    top = [p for p in (run / "checkpoints").glob("*.ckpt") if not p.name.endswith("-last.ckpt")]
    assert len(top) == 1 and "probe_cer=" in top[0].name
    state = ckpt.load(top[0])["train_state"]
    assert 0.0 <= state["last_probe"]["probe_cer"] and state["topk"][0][0] == state["last_probe"]["probe_cer"]


def test_monitoring_a_probe_score_needs_the_probe(tmp_path):
    data = make_data(tmp_path / "demo")
    with pytest.raises(ValueError, match="trainer.probe.enabled"):
        train(config(data, tmp_path / "run", ["exp_manager.checkpoint_callback_params.monitor=probe_cer"]))


def _rank(rank: int, port: int, cfg: dict, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.save(train(cfg)["probe"], f"{out}/probe_rank{rank}.pt")


@pytest.mark.slow
def test_two_ranks_share_rank_zeros_probe_scores(tmp_path):
    """Rank 0 probes alone; the broadcast gives every rank the same scores, so top-k decisions agree."""
    data = make_data(tmp_path / "demo")
    corpus = write_probe_corpus(tmp_path / "probe", num_train=8, num_eval=4, seed=0)
    cfg = config(data, tmp_path / "run", probe_overrides(corpus))
    mp.spawn(_rank, args=(free_port(), cfg, str(tmp_path)), nprocs=2, join=True)
    scores = [torch.load(tmp_path / f"probe_rank{r}.pt") for r in range(2)]
    assert scores[0] == scores[1] and "probe_cer" in scores[0]
