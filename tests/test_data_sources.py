"""The loader's shape: one source module per input kind behind `build(cfg, ctx)`, picked by data/loader.py, and
data flowing one way (no source imports the picker)."""
import ast
import sys
import types
from pathlib import Path

import pytest

from nest_ssl.data import loader, manifest_source, tarred_source
from nest_ssl.data.config import DatasetConfig
from nest_ssl.data.source import SourceContext

DATA = Path(loader.__file__).parent
SOURCES = sorted(p for p in DATA.glob("*_source.py"))


def test_each_source_module_has_build():
    assert {p.stem for p in SOURCES} >= {"manifest_source", "tarred_source"}
    for mod in (manifest_source, tarred_source):
        assert callable(mod.build)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.stem)
def test_no_source_imports_the_picker(path):
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            imported.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module or "")
            imported.update(f"{node.module}.{a.name}" for a in node.names)
    assert "nest_ssl.data.loader" not in imported, f"{path.name} imports nest_ssl.data.loader"


@pytest.mark.parametrize("kw, expected", [
    (dict(manifest_filepath="m.json"), "nest_ssl.data.manifest_source"),
    (dict(manifest_filepath="m.json", is_concat=True), "nest_ssl.data.manifest_source"),
    (dict(manifest_filepath="m.json", is_tarred=True, tarred_audio_filepaths="a.tar"), "nest_ssl.data.tarred_source"),
    (dict(manifest_filepath="m.json", use_lhotse=True), "nest_ssl.data.lhotse_source"),
    (dict(manifest_filepath="m.json", use_lhotse=True, is_tarred=True), "nest_ssl.data.lhotse_source"),
])
def test_picker_selects_the_source_for_the_config(monkeypatch, kw, expected):
    fake = types.ModuleType("nest_ssl.data.lhotse_source")  # not written yet: the picker only has to import it
    monkeypatch.setitem(sys.modules, "nest_ssl.data.lhotse_source", fake)
    assert loader.source_module(DatasetConfig(**kw)).__name__ == expected


@pytest.mark.parametrize("is_train, where", [(True, "model.train_ds"), (False, "model.validation_ds")])
def test_build_dataloader_hands_the_validated_config_and_context_to_the_source(monkeypatch, is_train, where):
    calls = []
    monkeypatch.setattr(manifest_source, "build", lambda c, ctx: calls.append((c, ctx)) or "loader")
    cfg, aug = DatasetConfig(manifest_filepath="m.json"), object()
    out = loader.build_dataloader(cfg, rank=1, world_size=3, seed=5, augmentor=aug, is_train=is_train)
    assert out == "loader"
    assert calls == [(cfg, SourceContext(where, 1, 3, 5, is_train, aug))]


def test_build_dataloader_validates_before_picking(monkeypatch):
    monkeypatch.setattr(manifest_source, "build", lambda c, ctx: pytest.fail("built an invalid config"))
    with pytest.raises(ValueError, match="model.train_ds.batch_size"):
        loader.build_dataloader(DatasetConfig(manifest_filepath="m.json", batch_size=0))
