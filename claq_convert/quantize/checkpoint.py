"""Resumable conversions: the finished work of a conversion kept beside its output, one atomic step a layer.

A conversion to OUT keeps the directory OUT.resume/ (`checkpoint_dir`) while it runs:

    manifest.json        the fingerprint: everything that determines the output (convert.fingerprint)
    calibration.npz      the calibration token ids (self-sampled windows take minutes to make again) and
                         their sha256 in the manifest
    allocation.json      --bpw only: the per-weight targets and the allocation's record
    row_weights.npz      --row-weights fisher: each block linear's row weights (sensitivity.row_weights)
    layer-00000/ ...     one per finished decoder layer: 0000.npz, 0001.npz ... every field of each
                         QuantizedWeight in the order the pipeline yielded them; the newest layer also
                         holds states.npz, the calibration hidden states after it (the next layer's inputs),
                         and for a model whose layers store keys and values for later ones (Gemma 4's
                         shared KV) shared.npz, what the finished layers stored (pipeline.shared_state)
    end/0000.npz ...     the head, an untied input embedding and other token tables, each saved when done
    pending/             the layer in progress: thrown away on resume
    budget/              --bpw: the weights the budget pass narrowed (SavedResults); thrown away on
                         resume, since the pass is made again from the saved results

A layer appears by one rename (pending/ -> layer-N/) once its results and output states are on disk, so
an interrupt at any point leaves a layer either complete or absent. Every file is written under a
temporary name, fsynced, then renamed. The conversion removes the directory once OUT is written.

Results are saved generically, field by field of the QuantizedWeight dataclass (arrays losslessly in
.npz, everything else as tagged JSON), so fields added to the quantizer travel without changes here.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import MutableMapping
from pathlib import Path
from typing import Iterator, NamedTuple, Optional

import numpy as np
import torch

from .gptq import QuantizedWeight

MANIFEST = "manifest.json"
PENDING = "pending"
END = "end"
BUDGET = "budget"
STATES = "states.npz"
SHARED = "shared.npz"
LAYER_PREFIX = "layer-"
FORMAT = 1  # of the checkpoint directory itself


class CheckpointError(ValueError):
    """The checkpoint cannot be used (made with other settings, damaged, or in the way); the message says why."""


def checkpoint_dir(out: Path) -> Path:
    """Where the conversion to `out` keeps its finished work: OUT.resume/ beside it."""
    out = Path(out)
    return out.with_name(out.name + ".resume")


# --------------------------------------------------------------------------- atomic files
def _fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_atomic(path: Path, write) -> None:
    """write(file object) into a temporary beside `path`, fsync, rename: `path` is whole or absent."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _write_json(path: Path, value) -> None:
    # keys in their order: a record read back goes into the output file, where order is bytes
    _write_atomic(path, lambda f: f.write(json.dumps(value, indent=1).encode()))


# --------------------------------------------------------------------------- QuantizedWeight <-> npz
def _encode(value, arrays: dict):
    """A JSON node for `value`; arrays (and NumPy scalars, as 0-d arrays) go to `arrays` under their key."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, (np.ndarray, np.generic)):
        key = f"a{len(arrays)}"
        arrays[key] = np.asarray(value)
        return {"$array": key, "scalar": isinstance(value, np.generic)}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (tuple, list)):
        items = [_encode(v, arrays) for v in value]
        return {"$tuple": items} if isinstance(value, tuple) else items
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {"$dict": {k: _encode(v, arrays) for k, v in value.items()}}
    raise TypeError(f"a {type(value).__name__} cannot be saved in a checkpoint")


def _decode(node, arrays):
    if isinstance(node, list):
        return [_decode(v, arrays) for v in node]
    if not isinstance(node, dict):
        return node
    if "$array" in node:
        array = arrays[node["$array"]]
        return array[()] if node["scalar"] else array
    if "$tuple" in node:
        return tuple(_decode(v, arrays) for v in node["$tuple"])
    return {k: _decode(v, arrays) for k, v in node["$dict"].items()}


def save_result(path: Path, name: str, result: QuantizedWeight) -> None:
    """Every field of `result` (whatever fields the dataclass has), losslessly, atomically."""
    arrays: dict[str, np.ndarray] = {}
    fields = {f.name: _encode(getattr(result, f.name), arrays) for f in dataclasses.fields(result)}
    meta = json.dumps({"name": name, "fields": fields})  # floats as repr: exact
    arrays["__meta__"] = np.frombuffer(meta.encode(), np.uint8)
    _write_atomic(path, lambda f: np.savez(f, **arrays))


def load_result(path: Path) -> tuple[str, QuantizedWeight]:
    with np.load(path, allow_pickle=False) as npz:
        arrays = {key: npz[key] for key in npz.files}
    meta = json.loads(arrays.pop("__meta__").tobytes())
    known = {f.name for f in dataclasses.fields(QuantizedWeight)}
    if set(meta["fields"]) - known:
        raise CheckpointError(f"{path} holds fields {sorted(set(meta['fields']) - known)} this version's "
                              "QuantizedWeight lacks; delete the checkpoint to start over")
    return meta["name"], QuantizedWeight(**{k: _decode(v, arrays) for k, v in meta["fields"].items()})


def _result_name(path: Path) -> str:
    with np.load(path, allow_pickle=False) as npz:  # reads only the small __meta__ member
        return json.loads(npz["__meta__"].tobytes())["name"]


# --------------------------------------------------------------------------- hidden states
def _save_states(path: Path, states: list[torch.Tensor]) -> None:
    # float32 in the pipeline; written chunk by chunk by np.savez, so no second copy in memory
    _write_atomic(path, lambda f: np.savez(f, **{str(i): s.detach().cpu().numpy() for i, s in enumerate(states)}))


def _load_states(path: Path, device) -> list[torch.Tensor]:
    with np.load(path, allow_pickle=False) as npz:
        return [torch.from_numpy(npz[str(i)]).to(device) for i in range(len(npz.files))]


def _save_shared(path: Path, shared: list[list[dict]]) -> None:
    """pipeline.shared_state's value: per batch and mapping, key -> a tensor or a tuple of tensors; the
    arrays as "0", "1" ..., and "index" (JSON: [batch, mapping, key, tensors, tuple or not] in order)."""
    arrays, index = {}, []
    for batch, mappings in enumerate(shared):
        for m, mapping in enumerate(mappings):
            for key, value in mapping.items():
                tensors = value if isinstance(value, tuple) else (value,)
                index.append([batch, m, key, len(tensors), isinstance(value, tuple)])
                for t in tensors:
                    arrays[str(len(arrays))] = t.detach().cpu().numpy()
    arrays["index"] = np.array(json.dumps([[len(m) for m in shared], index]))
    _write_atomic(path, lambda f: np.savez(f, **arrays))


def _load_shared(path: Path, device) -> list[list[dict]]:
    with np.load(path, allow_pickle=False) as npz:
        counts, index = json.loads(str(npz["index"]))
        shared = [[{} for _ in range(count)] for count in counts]
        at = 0
        for batch, m, key, n, is_tuple in index:
            tensors = tuple(torch.from_numpy(npz[str(at + j)]).to(device) for j in range(n))
            shared[batch][m][key] = tensors if is_tuple else tensors[0]
            at += n
    return shared


# --------------------------------------------------------------------------- fingerprints
def _flatten(value, prefix: str = "") -> dict:
    if isinstance(value, dict) and value:
        out = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def differences(saved: dict, now: dict) -> list[str]:
    """'key: was A, now B' for each leaf where two fingerprints differ."""
    a, b = _flatten(saved), _flatten(now)
    missing = object()
    return [f"{key}: was {a.get(key, 'absent')!r}, now {b.get(key, 'absent')!r}"
            for key in sorted(set(a) | set(b)) if a.get(key, missing) != b.get(key, missing)]


def _sha256(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


class Finished(NamedTuple):
    """What a checkpoint holds: decoder layers done, the inputs of the next layer, head/embedding names done,
    and what the finished layers stored for later ones (None for most models)."""
    layers: int
    states: Optional[list[torch.Tensor]]
    ends: tuple[str, ...]
    shared: Optional[list[list[dict]]] = None


class Checkpoint:
    """The checkpoint directory of one conversion. `open` checks or writes its fingerprint."""

    def __init__(self, path: Path, resumed: bool):
        self.path = Path(path)
        self.resumed = resumed  # an existing checkpoint was found and matched
        self._pending = 0       # results saved into pending/ for the layer in progress
        self._ends = len(self._end_paths())

    @classmethod
    def open(cls, path: Path, fingerprint: dict, resume: bool) -> "Checkpoint":
        """Continue the checkpoint at `path` (resume: its fingerprint must equal `fingerprint`) or start one.

        Without `resume` an existing checkpoint is refused, never overwritten: it may hold hours of work.
        With `resume` and none there, the conversion starts from the beginning.
        """
        path = Path(path)
        fingerprint = json.loads(json.dumps(fingerprint))  # as it reads back from disk
        manifest = path / MANIFEST
        if path.exists() and not resume:
            raise CheckpointError(f"{path} holds an interrupted conversion to this output; pass --resume to "
                                  "continue it, or delete it to start over")
        if path.exists():
            try:
                saved = json.loads(manifest.read_text())
            except (OSError, ValueError):
                raise CheckpointError(f"{path} has no readable {MANIFEST}; delete it to start over") from None
            if not isinstance(saved, dict) or saved.get("format") != FORMAT:
                raise CheckpointError(f"{path} is not a checkpoint this version reads; delete it to start over")
            diff = differences(saved.get("fingerprint", {}), fingerprint)
            if diff:
                more = f" (and {len(diff) - 3} more)" if len(diff) > 3 else ""
                raise CheckpointError(f"cannot resume from {path}: it was made with other settings: "
                                      f"{'; '.join(diff[:3])}{more}; rerun with its settings, or delete it "
                                      "to start over")
            checkpoint = cls(path, resumed=True)
            checkpoint._clean()
            return checkpoint
        path.mkdir()
        _write_json(manifest, {"format": FORMAT, "fingerprint": fingerprint})
        return cls(path, resumed=False)

    def _clean(self) -> None:
        """Drop what an interrupt left half done or what is made again: the layer in progress, the budget
        pass's narrowed weights, temporary files."""
        shutil.rmtree(self.path / PENDING, ignore_errors=True)
        shutil.rmtree(self.path / BUDGET, ignore_errors=True)
        for tmp in self.path.rglob("*.tmp"):
            tmp.unlink(missing_ok=True)

    def _manifest(self) -> dict:
        return json.loads((self.path / MANIFEST).read_text())

    # -- calibration, allocation and row weights: made once, reused on resume
    def calibration(self) -> Optional[torch.Tensor]:
        path = self.path / "calibration.npz"
        if not path.is_file():
            return None
        with np.load(path, allow_pickle=False) as npz:
            ids = npz["ids"]
        if _sha256(ids) != self._manifest().get("calibration_sha256"):
            raise CheckpointError(f"{path} does not match its recorded hash; delete the checkpoint to start over")
        return torch.from_numpy(ids)

    def save_calibration(self, ids: torch.Tensor) -> None:
        """Keep the token ids; a checkpoint that has them must be resumed with these very ids."""
        array = ids.cpu().numpy()
        manifest = self._manifest()
        known = manifest.get("calibration_sha256")
        if known is not None and known != _sha256(array):
            raise CheckpointError(f"cannot resume from {self.path}: the calibration token ids differ from the "
                                  "ones it was made with; delete it to start over")
        if known is None:
            _write_atomic(self.path / "calibration.npz", lambda f: np.savez(f, ids=array))
            _write_json(self.path / MANIFEST, {**manifest, "calibration_sha256": _sha256(array)})

    def allocation(self) -> Optional[tuple[dict, dict]]:
        path = self.path / "allocation.json"
        if not path.is_file():
            return None
        saved = json.loads(path.read_text())
        return saved["targets"], saved["record"]

    def save_allocation(self, targets: dict, record: dict) -> None:
        _write_json(self.path / "allocation.json", {"targets": targets, "record": record})

    def row_weights(self) -> Optional[dict[str, np.ndarray]]:
        path = self.path / "row_weights.npz"
        if not path.is_file():
            return None
        with np.load(path, allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files}

    def save_row_weights(self, weights: dict[str, np.ndarray]) -> None:
        _write_atomic(self.path / "row_weights.npz", lambda f: np.savez(f, **weights))

    # -- quantized results
    def _layer_dirs(self) -> list[Path]:
        """layer-00000, layer-00001 ... in order (a checkpoint only ever holds a prefix of the layers)."""
        found = sorted(p for p in self.path.glob(LAYER_PREFIX + "*") if p.is_dir())
        for index, path in enumerate(found):
            if path.name != f"{LAYER_PREFIX}{index:05d}":
                raise CheckpointError(f"{self.path} misses layer {index}; delete it to start over")
        return found

    def finished(self, device="cpu") -> Finished:
        """The finished work, with the hidden states after the last finished layer on `device`."""
        layers = self._layer_dirs()
        states = None
        if layers:
            if not (layers[-1] / STATES).is_file():
                raise CheckpointError(f"{layers[-1]} lacks its hidden states; delete the checkpoint to start over")
            states = _load_states(layers[-1] / STATES, device)
        shared = _load_shared(layers[-1] / SHARED, device) if layers and (layers[-1] / SHARED).is_file() else None
        ends = tuple(_result_name(path) for path in self._end_paths())
        return Finished(len(layers), states, ends, shared)

    def _end_paths(self) -> list[Path]:
        directory = self.path / END
        return sorted(directory.glob("*.npz")) if directory.is_dir() else []

    def _result_paths(self) -> list[Path]:
        """The file of every saved result, in the order the pipeline yielded them."""
        layers = [path for directory in self._layer_dirs() for path in sorted(directory.glob("[0-9]*.npz"))]
        return layers + self._end_paths()

    def results(self) -> Iterator[tuple[str, QuantizedWeight]]:
        """Every saved (name, result), in the order the pipeline yielded them, one in memory at a time."""
        for path in self._result_paths():
            yield load_result(path)

    def result_names(self) -> list[str]:
        """The name of every saved result, in order (each file's small __meta__ member read, not its arrays)."""
        return [_result_name(path) for path in self._result_paths()]

    def saved_results(self) -> "SavedResults":
        """Every saved result by name, read from its file when asked (SavedResults)."""
        return SavedResults(self.path / BUDGET, {_result_name(path): path for path in self._result_paths()})

    def save_result(self, name: str, result: QuantizedWeight, end: bool = False) -> None:
        """A result of the layer in progress (kept once the layer finishes), or (end) of the head/embedding."""
        if end:
            (self.path / END).mkdir(exist_ok=True)
            save_result(self.path / END / f"{self._ends:04d}.npz", name, result)
            self._ends += 1
            return
        pending = self.path / PENDING
        pending.mkdir(exist_ok=True)
        save_result(pending / f"{self._pending:04d}.npz", name, result)
        self._pending += 1

    def finish_layer(self, index: int, states: list[torch.Tensor], shared: Optional[list[list[dict]]] = None) -> None:
        """Layer `index` is done and `states` are its outputs (`shared`: what the layers so far stored for later
        ones, pipeline.shared_state's): make it part of the checkpoint in one rename."""
        done = len(self._layer_dirs())
        if index != done:
            raise CheckpointError(f"layer {index} finished, but the checkpoint holds {done} layers")
        pending = self.path / PENDING
        pending.mkdir(exist_ok=True)
        _save_states(pending / STATES, states)
        if shared is not None:
            _save_shared(pending / SHARED, shared)
        _fsync_dir(pending)
        os.replace(pending, self.path / f"{LAYER_PREFIX}{index:05d}")
        _fsync_dir(self.path)
        self._pending = 0
        if index:  # only the newest layer's outputs (and shared state, which holds all there is) are ever needed
            for name in (STATES, SHARED):
                (self.path / f"{LAYER_PREFIX}{index - 1:05d}" / name).unlink(missing_ok=True)

    def empty(self) -> bool:
        """Whether it holds nothing but its manifest (no work worth resuming)."""
        return all(p.name in (MANIFEST, PENDING) for p in self.path.iterdir()) if self.path.is_dir() else True

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


class SavedResults(MutableMapping):
    """name -> QuantizedWeight, each read from the checkpoint's file when asked, in the pipeline's order.

    The --bpw budget pass needs every weight before any is written; held in memory they would take a
    byte a parameter (7.4 GiB for a 7B), while the checkpoint already has each on disk. A result set
    here (a narrowed weight) is saved under `scratch` and read from there from then on.
    """

    def __init__(self, scratch: Path, paths: dict[str, Path]):
        self._scratch = Path(scratch)
        self._paths = dict(paths)
        self._written = 0

    def __getitem__(self, name: str) -> QuantizedWeight:
        return load_result(self._paths[name])[1]

    def __setitem__(self, name: str, result: QuantizedWeight) -> None:
        self._scratch.mkdir(exist_ok=True)
        path = self._scratch / f"{self._written:04d}.npz"
        save_result(path, name, result)
        self._written += 1
        previous = self._paths.get(name)
        self._paths[name] = path
        if previous is not None and previous.parent == self._scratch:
            previous.unlink(missing_ok=True)  # an earlier narrowing of the same weight

    def __delitem__(self, name: str) -> None:
        del self._paths[name]

    def __iter__(self):
        return iter(self._paths)

    def __len__(self) -> int:
        return len(self._paths)
