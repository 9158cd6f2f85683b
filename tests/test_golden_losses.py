"""Golden losses: 8 training steps of configs/nest_tiny_cpu.yaml (1 thread, seed 0) must reproduce
tests/assets/losses/nest_tiny_cpu.txt bit for bit, so a refactor that must not change the math cannot.

A change that is meant to alter the numbers rewrites the file on purpose:

    PYTHONPATH=. python tests/test_golden_losses.py     # prints and writes the new losses
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "assets" / "losses" / "nest_tiny_cpu.txt"
STEPS = 8


def golden_run(root: Path) -> list[float]:
    """Train losses of STEPS optimizer steps on the demo corpus (16 files, batch 4: two epochs), no validation or
    checkpoint files (they do not change the train losses; leaving them out keeps the test fast)."""
    from nest_ssl.run_config import load_config
    from nest_ssl.train import train
    from tests.train_support import make_data

    data = make_data(root / "data")
    plain, _ = load_config(ROOT / "configs" / "nest_tiny_cpu.yaml", [
        f"model.train_ds.manifest_filepath={data['train']}", f"model.train_ds.noise_manifest={data['noise']}",
        "~model.validation_ds", f"exp_manager.exp_dir={root / 'exp'}", f"trainer.max_steps={STEPS}",
        "exp_manager.create_checkpoint_callback=false", "exp_manager.create_tensorboard_logger=false",
        "exp_manager.resume_if_exists=false", "trainer.enable_progress_bar=false", "++seed=0"])
    torch.set_num_threads(1)
    return train(plain)["losses"]


def read_golden() -> list[float]:
    return [float(line) for line in GOLDEN.read_text().split()]


def test_tiny_cpu_train_losses_equal_the_golden_file(tmp_path):
    losses = golden_run(tmp_path)
    assert len(losses) == STEPS
    assert losses == read_golden()  # exact: repr() round-trips every float


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        values = golden_run(Path(tmp))
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    GOLDEN.write_text("".join(f"{v!r}\n" for v in values))
    print("\n".join(map(repr, values)))
    sys.exit(0)
