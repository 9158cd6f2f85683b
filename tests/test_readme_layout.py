"""README's Layout section names every module of the package and the kernels, and names no file that is gone."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def layout_block() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    return section.split("```", 2)[1]


def words(block: str) -> set[str]:
    return set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", block))


def test_every_module_is_named():
    block = layout_block()
    named = words(block)
    missing = []
    for top in ("nest_ssl", "kernels"):
        for path in sorted((ROOT / top).rglob("*.py")):
            if path.name == "__init__.py" or "kernels" in path.relative_to(ROOT).parts[1:]:
                continue  # nest_ssl/kernels is the symlink to kernels/, checked once as kernels/
            if path.stem not in named:
                missing.append(str(path.relative_to(ROOT)))
    for sub in sorted(p for p in (ROOT / "nest_ssl").iterdir() if p.is_dir() and not p.is_symlink()):
        if sub.name != "__pycache__" and f"{sub.name}/" not in block:
            missing.append(f"nest_ssl/{sub.name}/")
    assert not missing, f"README Layout does not name: {missing}"


def test_no_named_file_is_gone():
    block = layout_block()
    gone = []
    for name in sorted(set(re.findall(r"[A-Za-z_/]+\.(?:py|sh)", block))):
        candidates = [ROOT / name, ROOT / "nest_ssl" / name, ROOT / "kernels" / name, ROOT / "scripts" / name]
        if not any(c.is_file() for c in candidates):
            gone.append(name)
    assert not gone, f"README Layout names files that do not exist: {gone}"
