"""Every override the shipped commands pass (the sbatch files, the Makefile's recipes, README's bash blocks) parses
and validates on every shipped config: issue 30's XL script stopped at start-up on `no such key`."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from nest_ssl.run_config import load_config

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
SOURCES = [*sorted((ROOT / "scripts" / "slurm").glob("*.sbatch")), ROOT / "Makefile", ROOT / "README.md"]
# a value for each shell / make variable the commands pass; a new variable fails the test until it is added here
SAMPLE = {"SLURM_NNODES": "2", "EXP_DIR": "/tmp/nest_exp", "DEMO_DIR": "demo_out"}
# Hydra's forms: a.b=v, +a=v, ++a.b=v, ~a.b (a top-level key needs +/~ here: NAME=v is a shell variable)
OVERRIDE = re.compile(r"(\+\+|\+)\w+(\.\w+)*=.*|~\w+(\.\w+)*|\w+(\.\w+)+=.*")
VARIABLE = re.compile(r"\$(\((\w+)\)|\{(\w+)\}|(\w+))")


def command_lines(path: Path) -> list[str]:
    """Logical command lines (backslash continuations joined): README's bash blocks, else the file's non-comment
    lines."""
    text = path.read_text()
    if path.suffix == ".md":
        text = "\n".join(re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M))
    lines = re.sub(r"\\\n", " ", text).splitlines()
    return [line for line in lines if not line.lstrip().startswith("#")]


def substitute(token: str, where: str) -> str:
    def value(m: re.Match) -> str:
        name = next(g for g in m.groups()[1:] if g)
        if name not in SAMPLE:
            pytest.fail(f"{where}: add a sample value for ${name} to SAMPLE")
        return SAMPLE[name]
    return VARIABLE.sub(value, token)


def shipped_commands() -> list[tuple[str, list[str]]]:
    """(where, the overrides one command passes) for every shipped command that passes any."""
    out = []
    for path in SOURCES:
        for line in command_lines(path):
            tokens = shlex.split(line, comments=True)
            where = f"{path.relative_to(ROOT)}: {line.strip()[:60]}"
            overrides = [substitute(t, where) for t in tokens if OVERRIDE.fullmatch(t)]
            if overrides:
                out.append((where, overrides))
    return out


COMMANDS = shipped_commands()


def test_the_commands_are_found():
    """The extraction sees the overrides that broke the XL script (so the test below cannot pass vacuously)."""
    keys = {o.split("=")[0] for _, ovs in COMMANDS for o in ovs}
    assert {"trainer.activation_checkpointing", "exp_manager.checkpoint_callback_params.async_save",
            "exp_manager.resume_if_exists", "trainer.num_nodes", "model.train_ds.noise_manifest", "+seed"} <= keys
    assert sum(w.startswith("scripts/slurm/") for w, _ in COMMANDS) == 3, COMMANDS  # 2 launches + the XL exec


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_every_shipped_override_parses_on_every_config(config):
    for where, overrides in COMMANDS:
        try:
            load_config(config, overrides)
        except ValueError as e:
            pytest.fail(f"{config.name} with the overrides of {where}: {e}")
