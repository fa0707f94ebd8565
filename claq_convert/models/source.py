"""A Hugging Face checkpoint directory read tensor by tensor from safetensors (no full model in RAM)."""
from __future__ import annotations

import json
from pathlib import Path

import torch


class SourceError(Exception):
    """The model directory cannot be used; the message says why."""


HUB_CACHE_HINT = "download it first (huggingface-cli download NAME) or pass a model directory"


def resolve_model(model: str | Path) -> Path:
    """A model directory, or a Hugging Face hub id ("org/name") resolved from the local hub cache (offline)."""
    path = Path(model)
    if path.is_dir():
        return path
    text = str(model)
    if path.exists():
        raise SourceError(f"{text} is a file, not a model directory")
    if text.count("/") != 1 or text.startswith((".", "/")) or not all(text.split("/")):
        raise SourceError(f"{text}: no such model directory (a hub id looks like org/name)")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:
        raise SourceError(f"{text}: no such directory, and huggingface_hub is not installed to look it up") from None
    try:
        return Path(snapshot_download(text, local_files_only=True))
    except (LocalEntryNotFoundError, ValueError, OSError):
        raise SourceError(f"{text} is not in the local Hugging Face cache; {HUB_CACHE_HINT}") from None


def _check_safetensors(path: Path) -> None:
    """The header parses and the file holds every byte it declares (a truncated download fails here)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or 8 + n > size or n > 100 * 1024 * 1024:
            raise SourceError(f"{path} is not a safetensors file (bad header length); re-download it")
        try:
            header = json.loads(f.read(n))
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError, IndexError):
            raise SourceError(f"{path} has an unreadable safetensors header; re-download it") from None
    if 8 + n + end > size:
        raise SourceError(f"{path} is truncated: its header declares {8 + n + end} bytes, the file has {size}; "
                          "re-download it")


class ModelSource:
    def __init__(self, model_dir: Path):
        self.dir = Path(model_dir)
        if not (self.dir / "config.json").is_file():
            raise SourceError(f"{self.dir} is not a Hugging Face model directory (no config.json)")
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            files = {name: self.dir / f for name, f in json.loads(index.read_text())["weight_map"].items()}
            for path in set(files.values()):
                if not path.is_file():
                    raise SourceError(f"{path} is listed in the index but missing; re-download the model")
                _check_safetensors(path)
        elif (self.dir / "model.safetensors").is_file():
            from safetensors import safe_open

            path = self.dir / "model.safetensors"
            _check_safetensors(path)
            with safe_open(str(path), framework="pt") as f:
                files = {name: path for name in f.keys()}
        else:
            raise SourceError(f"{self.dir} has no model.safetensors (pickle checkpoints are not read)")
        self._handles = {}
        # names as the model's modules have them (transformers renames some checkpoint keys on load)
        from .architectures import module_name

        try:
            model_type = json.loads((self.dir / "config.json").read_text()).get("model_type")
        except (json.JSONDecodeError, AttributeError):
            raise SourceError(f"{self.dir / 'config.json'} is not a JSON object") from None
        self._stored = {module_name(model_type, name): name for name in files}  # module name -> checkpoint key
        self.files = {name: files[stored] for name, stored in self._stored.items()}

    def names(self) -> list[str]:
        return list(self.files)

    def _handle(self, name: str):
        from safetensors import safe_open

        path = self.files.get(name)
        if path is None:
            raise SourceError(f"tensor {name!r} not found in {self.dir}")
        if path not in self._handles:
            self._handles[path] = safe_open(str(path), framework="pt")
        return self._handles[path]

    def tensor(self, name: str) -> torch.Tensor:
        return self._handle(name).get_tensor(self._stored[name])

    def shape(self, name: str) -> tuple[int, ...]:
        """The stored tensor's shape, from the file's header (nothing is read)."""
        return tuple(self._handle(name).get_slice(self._stored[name]).get_shape())

    def config(self):
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(str(self.dir))


def check_checkpoint(source: ModelSource) -> None:
    """Before any work: the model's family entry fits its module graph (architectures.resolve), and the
    checkpoint holds every parameter the model has, at its shape (under the family's renames). A checkpoint
    of another layout (a mixture saved with its experts stacked) fails here in one line, not hours in."""
    from .architectures import resolve, skeleton

    config = source.config()
    model = skeleton(config, "meta")
    resolve(model, config)
    stored = set(source.names())
    for name, param in model.named_parameters():
        if name not in stored:
            raise SourceError(f"{source.dir} lacks {name}, which a {config.model_type} model has: a checkpoint "
                              "of another layout, or an incomplete one")
        if source.shape(name) != tuple(param.shape):
            raise SourceError(f"{source.dir}: {name} is {list(source.shape(name))} in the checkpoint, "
                              f"{list(param.shape)} in a {config.model_type} model of its config")
