"""formats/vectors: the committed files are what make_vectors.py writes, and the reader agrees with them."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from claq_convert import reader

VECTORS = Path(__file__).resolve().parents[1] / "formats" / "vectors"


def load_generator():
    spec = importlib.util.spec_from_file_location("make_vectors", VECTORS / "make_vectors.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_vectors_are_regenerated_byte_for_byte(tmp_path):
    load_generator().write_all(tmp_path)
    committed = sorted(p.relative_to(VECTORS) for p in VECTORS.rglob("*") if p.suffix in (".claq", ".json"))
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert committed == fresh
    for rel in committed:
        assert (VECTORS / rel).read_bytes() == (tmp_path / rel).read_bytes(), rel


@pytest.mark.parametrize("path", sorted(VECTORS.glob("*.claq")), ids=lambda p: p.stem)
def test_valid_vectors_decode_to_their_expected_values(path):
    expected = json.loads(path.with_suffix(".json").read_text())
    with reader.ClaqFile(path) as cf:
        cf.validate()
        assert sorted(cf.tensors) == sorted(expected["tensors"])
        for name, values in expected["tensors"].items():
            assert np.array_equal(cf.decode(name), np.array(values, np.float32)), name
        for name, text in expected["files"].items():
            assert cf.file(name).decode() == text


EXPECTED_ERRORS = json.loads((VECTORS / "bad" / "expected.json").read_text())


@pytest.mark.parametrize("name,error", sorted(EXPECTED_ERRORS.items()))
def test_invalid_vectors_raise_their_error(name, error):
    with pytest.raises(getattr(reader, error)):
        with reader.ClaqFile(VECTORS / "bad" / name) as cf:
            cf.validate()
