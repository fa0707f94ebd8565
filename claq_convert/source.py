"""A Hugging Face checkpoint directory read tensor by tensor from safetensors (no full model in RAM)."""
from __future__ import annotations

import json
from pathlib import Path

import torch


class SourceError(Exception):
    """The model directory cannot be used; the message says why."""


class ModelSource:
    def __init__(self, model_dir: Path):
        self.dir = Path(model_dir)
        if not (self.dir / "config.json").is_file():
            raise SourceError(f"{self.dir} is not a Hugging Face model directory (no config.json)")
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            self.files = {name: self.dir / f for name, f in json.loads(index.read_text())["weight_map"].items()}
        elif (self.dir / "model.safetensors").is_file():
            from safetensors import safe_open

            path = self.dir / "model.safetensors"
            with safe_open(str(path), framework="pt") as f:
                self.files = {name: path for name in f.keys()}
        else:
            raise SourceError(f"{self.dir} has no model.safetensors (pickle checkpoints are not read)")
        self._handles = {}
        # names as the model's modules have them (transformers renames some checkpoint keys on load)
        from .architectures import module_names

        try:
            model_type = json.loads((self.dir / "config.json").read_text()).get("model_type")
        except (json.JSONDecodeError, AttributeError):
            raise SourceError(f"{self.dir / 'config.json'} is not a JSON object") from None
        renames = module_names(model_type)
        self._stored = {}
        for name in list(self.files):
            module = next((new + name[len(old):] for old, new in renames.items() if name.startswith(old)), name)
            self._stored[module] = name
            self.files[module] = self.files.pop(name)

    def names(self) -> list[str]:
        return list(self.files)

    def tensor(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        path = self.files.get(name)
        if path is None:
            raise SourceError(f"tensor {name!r} not found in {self.dir}")
        if path not in self._handles:
            self._handles[path] = safe_open(str(path), framework="pt")
        return self._handles[path].get_tensor(self._stored[name])

    def config(self):
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(str(self.dir))
