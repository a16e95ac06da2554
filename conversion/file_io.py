"""What every weight file shares: the extensions, which framework a path belongs to, and atomic writes.

Writing goes to a temporary file in the destination folder, renamed into place only once complete, so a failure
leaves no file behind.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from conversion.errors import WeightFileError

KERAS_SUFFIXES = (".keras", ".weights.h5", ".h5")
TORCH_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors")  # .ckpt: Lightning; .bin: transformers' weights
# A Hugging Face transformers folder (save_pretrained): its config and one of its weight files.
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
# The head a file that records none gets by default: softmax for the book's (Keras weights, the twin's state dicts),
# logits for torchvision's, timm's and transformers' layouts. None asks for logits everywhere.
HEAD_AUTO = "auto"


def is_huggingface_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder transformers' ``save_pretrained`` wrote (config.json and a weight file)."""
    path = Path(path)
    return path.is_dir() and (path / "config.json").is_file() and any((path / name).is_file() for name in HF_WEIGHTS)


def file_kind(path: str | os.PathLike) -> str:
    """'keras', 'torch' or 'huggingface' (a save_pretrained folder, or a destination without an extension)."""
    path = Path(path)
    if is_huggingface_folder(path) or (not path.suffix and not path.is_file()):
        return "huggingface"
    if path.name.endswith(KERAS_SUFFIXES):
        return "keras"
    if path.name.endswith(TORCH_SUFFIXES):
        return "torch"
    raise WeightFileError(
        f"{path}: unknown extension; expected one of {', '.join(KERAS_SUFFIXES + TORCH_SUFFIXES)}, or a Hugging Face "
        "folder"
    )


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same suffixes); rename it to ``path`` only on success."""
    path = Path(path)
    if not path.parent.is_dir():
        raise WeightFileError(f"{path}: the folder {path.parent} does not exist")
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".weights.h5") else path.suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    tmp.unlink()  # some writers (Keras) refuse to overwrite; they create it themselves
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def require_file(path: Path, suffixes: tuple[str, ...]) -> None:
    """Refuse ``path`` unless it exists and ends with one of ``suffixes``."""
    if not path.name.endswith(suffixes):
        raise WeightFileError(f"{path}: expected a {', '.join(suffixes[:-1])} or {suffixes[-1]} file")
    if not path.is_file():
        raise WeightFileError(f"{path}: no such file")


def check_source(path: str | os.PathLike, kind: str | None = None) -> None:
    """Refuse a source that cannot be read: the wrong extension for ``kind`` ('keras' or 'torch'; None: by its
    extension), or no such file or Hugging Face folder. Light, so that the command answers a typo before loading
    TensorFlow and torch (the loaders check again)."""
    path = Path(path)
    kind = kind or file_kind(path)
    if kind == "keras":
        require_file(path, KERAS_SUFFIXES)
    elif path.is_dir() or (kind == "huggingface" and not path.suffix):
        if not path.is_dir():
            raise WeightFileError(f"{path}: no such file or folder")
        if not is_huggingface_folder(path):
            raise WeightFileError(f"{path}: a folder without config.json and {' or '.join(HF_WEIGHTS)}")
    else:
        require_file(path, TORCH_SUFFIXES)


def check_destination(dst: str | os.PathLike, keras_hub: bool = False) -> None:
    """Refuse a conversion's destination that cannot be written: an unknown extension, a missing folder, or a
    keras-hub model to anything but .keras."""
    file_kind(dst)
    if not Path(dst).parent.is_dir():
        raise WeightFileError(f"{dst}: the folder {Path(dst).parent} does not exist")
    if keras_hub and Path(dst).suffix != ".keras":
        raise WeightFileError(f"{dst}: keras-hub's models are written as .keras files; expected a .keras destination")


def first_line(error: BaseException) -> str:
    """An exception's first line, for a one-line error."""
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:160]
