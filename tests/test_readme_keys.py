"""Every config key README documents is settable as README writes it: a plain `a.b=v` override, no `+`."""
import re
from pathlib import Path

import pytest

from nest_ssl.config import apply_overrides, load_yaml
from nest_ssl.run_config import schema_keys

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
# Python examples name attributes (`model.encoder.load_state_dict`), not config keys.
README_PROSE = re.sub(r"```python\n.*?```", "", README, flags=re.S)
FILE_SUFFIXES = ("py", "nemo", "yaml", "ckpt", "json", "md", "safetensors")


def dotted_keys() -> list[str]:
    """`model.x.y`, `trainer.x`, `exp_manager.x` anywhere in README (file names such as exp_manager.py excluded)."""
    keys = {m.rstrip(".") for m in re.findall(r"\b(?:model|trainer|exp_manager)\.[A-Za-z_][\w.]*", README_PROSE)}
    return sorted(k for k in keys if k.rsplit(".", 1)[-1] not in FILE_SUFFIXES)


def data_option_names() -> list[str]:
    """The snake_case option names of README's "**Data options** (`model.train_ds`)" paragraph."""
    para = re.search(r"\*\*Data options\*\* \(`model\.train_ds`\):(.*?)\n\n", README, re.S)
    assert para, "README lost its Data options paragraph"
    names = re.findall(r"`([a-z][a-z0-9]*_[a-z0-9_]*)(?::[^`]*)?`", para.group(1))
    return sorted(set(names))


@pytest.mark.parametrize("key", dotted_keys() + [f"model.train_ds.{n}" for n in data_option_names()])
@pytest.mark.parametrize("config", ["nest_fast-conformer.yaml", "nest_tiny_cpu.yaml"])
def test_every_key_readme_documents_is_settable_without_plus(key, config):
    tree = load_yaml(ROOT / "configs" / config)
    out = apply_overrides(tree, [f"{key}=1"], schema_keys)
    node = out
    for part in key.split("."):
        node = node[part]
    assert node == 1


def test_readme_documents_the_data_options():
    # the parse above must find what it is meant to check (otherwise the test above checks nothing)
    assert {"skip_bad_samples", "max_bad_samples", "duration_tolerance", "batch_duration"} <= set(data_option_names())
    assert "model.train_ds.noise_manifest" in dotted_keys()


# Files README names as what a command writes (they appear when it runs), not as something in the repository.
WRITTEN_BY_COMMANDS = {"feats/features_manifest.json", "feats/features_failed.json", "kernels/results/bench.csv"}


def test_every_file_readme_cites_is_in_the_repository():
    cited = set(re.findall(r"`([^`\s]+/[^`\s]+\.(?:md|py|yaml|sh|json|txt|csv))`", README))
    assert len(cited) > 20  # the pattern finds README's citations
    assert sorted(p for p in cited - WRITTEN_BY_COMMANDS if not (ROOT / p).exists()) == []
