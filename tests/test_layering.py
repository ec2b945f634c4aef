"""Pure tensor/control code never imports Ray (walks the ASTs of the Ray-free packages)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RAY_FREE = [
    ROOT / "kernels" / "lora_kernels",
    ROOT / "lora_cluster" / "model",
    ROOT / "lora_cluster" / "adapters",
    ROOT / "lora_cluster" / "engine",
    ROOT / "lora_cluster" / "testing",
]
LEAVES = ["errors.py", "config.py", "api_types.py"]
# lower layers must not import higher ones
FORBIDDEN_UP = {
    "lora_kernels": ("lora_cluster",),
    "lora_cluster.model": ("lora_cluster.adapters", "lora_cluster.engine", "lora_cluster.cluster"),
    "lora_cluster.adapters": ("lora_cluster.engine", "lora_cluster.cluster"),
    "lora_cluster.engine": ("lora_cluster.cluster", "lora_cluster.cli", "deploy"),
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _files() -> list[Path]:
    files = [p for d in RAY_FREE if d.exists() for p in d.rglob("*.py")]
    files += [ROOT / "lora_cluster" / leaf for leaf in LEAVES]
    return files


def test_ray_free_packages_do_not_import_ray() -> None:
    offenders = [
        f"{path.relative_to(ROOT)}: {name}"
        for path in _files()
        for name in _imports(path)
        if name == "ray" or name.startswith("ray.")
    ]
    assert not offenders, offenders


def test_imports_point_one_way() -> None:
    offenders = []
    for path in _files():
        rel = path.relative_to(ROOT).with_suffix("")
        parts = rel.parts[1:] if rel.parts[0] == "kernels" else rel.parts
        module = ".".join(parts)
        for layer, banned in FORBIDDEN_UP.items():
            if module == layer or module.startswith(layer + "."):
                offenders += [f"{module} imports {name}" for name in _imports(path)
                              if any(name == b or name.startswith(b + ".") for b in banned)]
    assert not offenders, offenders
