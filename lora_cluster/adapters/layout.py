"""Where a PEFT adapter's files are inside its directory.

``save_pretrained`` writes ``adapter_config.json`` + ``adapter_model.safetensors`` (or the
legacy ``adapter_model.bin``) into the directory, or — for a non-default adapter name — into
a subfolder named after it. Both layouts are accepted.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lora_cluster.adapters.config import CONFIG_FILE
from lora_cluster.errors import AdapterNotFoundError

SAFETENSORS_FILE = "adapter_model.safetensors"
BIN_FILE = "adapter_model.bin"


@dataclass(frozen=True)
class AdapterFiles:
    """The config and weights files of one adapter."""

    directory: Path
    config: Path
    weights: Path

    @property
    def is_safetensors(self) -> bool:
        return self.weights.name == SAFETENSORS_FILE


def _adapter_dir(root: Path, subfolder: str | None) -> Path:
    if (root / CONFIG_FILE).is_file():
        return root
    if subfolder and (root / subfolder / CONFIG_FILE).is_file():
        return root / subfolder
    inner = sorted(p for p in root.iterdir() if (p / CONFIG_FILE).is_file())
    if len(inner) == 1:
        return inner[0]
    if inner:
        raise AdapterNotFoundError(
            f"{root}: no {CONFIG_FILE}, and several adapter subfolders "
            f"({', '.join(p.name for p in inner)}); name one of them", file=str(root))
    raise AdapterNotFoundError(f"{root}: no {CONFIG_FILE} (is it a PEFT adapter directory?)",
                               file=str(root / CONFIG_FILE))


def locate_adapter_files(adapter_dir: str | Path, subfolder: str | None = None) -> AdapterFiles:
    """The files of the adapter in ``adapter_dir`` (or its ``subfolder``, PEFT's layout for
    non-default adapter names; a single adapter subfolder is found without the name)."""
    root = Path(adapter_dir)
    if not root.exists():
        raise AdapterNotFoundError(f"{root}: adapter directory does not exist", file=str(root))
    if not root.is_dir():
        raise AdapterNotFoundError(f"{root}: not a directory", file=str(root))
    directory = _adapter_dir(root, subfolder)
    for name in (SAFETENSORS_FILE, BIN_FILE):
        if (directory / name).is_file():
            return AdapterFiles(directory, directory / CONFIG_FILE, directory / name)
    raise AdapterNotFoundError(
        f"{directory}: no {SAFETENSORS_FILE} (or {BIN_FILE}) next to {CONFIG_FILE}",
        file=str(directory / SAFETENSORS_FILE))
