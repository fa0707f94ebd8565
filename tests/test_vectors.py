"""formats/vectors: the committed files are what make_vectors.py writes; every rule of the two specs' validation
sections has a bad vector, and the readers refuse each with exactly its category and rule; good vectors decode."""
import importlib.util
import json
import re
import struct
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from claq_convert.format import gguf_ext, reader

ROOT = Path(__file__).resolve().parents[1]
VECTORS = ROOT / "formats" / "vectors"
SPECS = {"CLAQ": ROOT / "formats" / "claq-v2.md", "GGUF": ROOT / "formats" / "gguf-claq.md"}
BAD_DIRS = {"CLAQ": VECTORS / "bad", "GGUF": VECTORS / "gguf" / "bad"}
CATEGORIES = {c.__name__: c for c in (reader.TruncatedFile, reader.BadMagic, reader.UnsupportedVersion,
                                      reader.BadHeader, reader.BadLayout, reader.ChecksumMismatch,
                                      reader.BadTensorData, reader.BadFileData, gguf_ext.GgufLimitError)}
RULE_ROW = re.compile(r"^\| ((?:CLAQ|GGUF)-[A-Z]\d\d) \| (.+) \| `(\w+)` \|$")
RULE_ID = re.compile(r"\b(?:CLAQ|GGUF)-[A-Z]\d\d\b")
# Rules no file can break alone: an offset that is not a multiple of 64 (L01, checked with the header) is also
# out of place (L02 or L03); a non-finite grid value (T03) makes the column's decoded entries non-finite (T05).
NEVER_ALONE = {"CLAQ-L01", "CLAQ-T03"}


def load_generator():
    spec = importlib.util.spec_from_file_location("make_vectors", VECTORS / "make_vectors.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def spec_rules(prefix: str) -> dict[str, str]:
    """rule id -> category, from the rule tables of the spec's validation section."""
    rules = {}
    for line in SPECS[prefix].read_text().splitlines():
        match = RULE_ROW.match(line)
        if match:
            assert match.group(1) not in rules, f"{match.group(1)} defined twice"
            rules[match.group(1)] = match.group(3)
    return rules


RULES = {prefix: spec_rules(prefix) for prefix in SPECS}
EXPECTED = {prefix: json.loads((BAD_DIRS[prefix] / "expected.json").read_text()) for prefix in SPECS}
BAD_CASES = [(prefix, name) for prefix in SPECS for name, e in EXPECTED[prefix].items() if not e.get("large")]
LARGE_CASES = [(prefix, name) for prefix in SPECS for name, e in EXPECTED[prefix].items() if e.get("large")]


def open_vector(path: Path):
    return gguf_ext.GgufClaqFile(path) if path.suffix == ".gguf" else reader.ClaqFile(path)


def read_everything(path: Path) -> None:
    """Open, validate (checksums, contents, padding / ggml limits), decode every tensor, read every file."""
    with open_vector(path) as f:
        f.validate()
        for name in f.tensors:
            f.decode(name)
        for name in f.files:
            f.file(name)


def refusal(path: Path) -> reader.ClaqFormatError:
    with pytest.raises(reader.ClaqFormatError) as caught:
        read_everything(path)
    return caught.value


# ------------------------------------------------------------------------------------ generation

def test_committed_vectors_are_regenerated_byte_for_byte(tmp_path):
    load_generator().write_all(tmp_path)
    suffixes = (".claq", ".gguf", ".json")
    committed = sorted(p.relative_to(VECTORS) for p in VECTORS.rglob("*") if p.suffix in suffixes)
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert committed == fresh
    for rel in committed:
        assert (VECTORS / rel).read_bytes() == (tmp_path / rel).read_bytes(), rel


def test_committed_vectors_are_small():
    sizes = {p.name: p.stat().st_size for p in VECTORS.rglob("*") if p.suffix in (".claq", ".gguf")}
    assert max(sizes.values()) < 16384, max(sizes.items(), key=lambda kv: kv[1])


# ------------------------------------------------------------------------------------ rules

@pytest.mark.parametrize("prefix", sorted(SPECS))
def test_the_spec_numbers_its_rules(prefix):
    rules = RULES[prefix]
    assert len(rules) >= (60 if prefix == "CLAQ" else 40)
    assert set(rules.values()) <= set(CATEGORIES)
    text = SPECS[prefix].read_text()
    mentioned = set(RULE_ID.findall(text))
    own = {r for r in mentioned if r.startswith(prefix)}
    assert own == set(rules), own ^ set(rules)          # no id is mentioned that the tables do not define
    assert mentioned - own <= set(RULES["CLAQ"])         # the GGUF spec refers to CLAQ rules that exist


@pytest.mark.parametrize("prefix", sorted(SPECS))
def test_every_rule_has_a_bad_vector_and_every_vector_names_a_rule(prefix):
    known = {**RULES["CLAQ"], **RULES[prefix]}  # GGUF vectors may break a CLAQ rule the GGUF spec applies
    vectors = EXPECTED[prefix]
    for name, e in vectors.items():
        assert set(e) <= {"category", "rule", "also", "note", "large"} and e["note"], name
        assert e["rule"] in known, (name, e["rule"])
        assert e["category"] == known[e["rule"]], (name, e["category"], known[e["rule"]])
        assert set(e.get("also", ())) <= set(known) and e["rule"] not in e.get("also", ()), name
        assert name.endswith(".gguf" if prefix == "GGUF" else ".claq")
    covered = {e["rule"] for e in vectors.values()}
    assert set(RULES[prefix]) <= covered, sorted(set(RULES[prefix]) - covered)
    alone = {e["rule"] for e in vectors.values() if not e.get("also")}
    assert set(RULES[prefix]) - alone == (NEVER_ALONE if prefix == "CLAQ" else set())


def test_the_readers_raise_exactly_the_rules_of_the_specs():
    """Every rule id in the readers' source is one of a spec's, and every spec rule is raised somewhere."""
    folder = ROOT / "claq_convert" / "format"
    source = "".join((folder / f).read_text() for f in ("reader.py", "rice.py", "huffman.py", "gguf_ext.py"))
    raised = set(RULE_ID.findall(source))
    defined = set(RULES["CLAQ"]) | set(RULES["GGUF"])
    assert raised == defined, (raised - defined, defined - raised)


@pytest.mark.parametrize("prefix,name", BAD_CASES, ids=lambda x: x)
def test_bad_vectors_fail_with_their_category_and_rule(prefix, name):
    e = EXPECTED[prefix][name]
    error = refusal(BAD_DIRS[prefix] / name)
    assert type(error) is CATEGORIES[e["category"]], (type(error).__name__, str(error))
    assert error.rule == e["rule"], str(error)
    message = str(error)
    assert message.endswith(f"[{e['category']} {e['rule']}]") and "\n" not in message and len(message) < 400


@pytest.fixture(scope="module")
def large_vectors(tmp_path_factory) -> dict:
    return load_generator().write_large(tmp_path_factory.mktemp("large-vectors"))


@pytest.mark.parametrize("prefix,name", LARGE_CASES, ids=lambda x: x)
def test_size_cap_vectors_fail_with_their_category_and_rule(large_vectors, prefix, name):
    e = EXPECTED[prefix][name]
    error = refusal(large_vectors[name])
    assert type(error) is CATEGORIES[e["category"]] and error.rule == e["rule"], str(error)


def test_size_cap_vectors_break_nothing_but_the_cap(large_vectors, monkeypatch, tmp_path):
    """With the cap raised, the 64 MiB header is a valid file, and the 8 Mi-item array passes the walk of the
    header; the same file with a 1-item array is valid. (gguf-py takes ~10 us an item, the cap's reason, so the
    big array is not read through it; the 256 MiB string is left out for the same reason.)"""
    monkeypatch.setattr(reader.spec, "MAX_HEADER_BYTES", 1 << 27)
    read_everything(large_vectors["p04_header_over_cap.claq"])
    monkeypatch.setattr(gguf_ext, "MAX_KV_ARRAY_ITEMS", 1 << 24)
    assert gguf_ext.scan_gguf(large_vectors["s09_array_items_over_cap.gguf"]).kv_types["claq.file.big"] == (9, 0)
    generator = load_generator()
    small = tmp_path / "one_item.gguf"
    one_item = struct.pack("<IQB", generator.GV["UINT8"], 1, 0)
    small.write_bytes(generator.join(generator.gguf(extra=[("claq.file.big", generator.GV["ARRAY"], one_item)])))
    read_everything(small)
    with gguf_ext.GgufClaqFile(small) as g:
        assert g.file("big") == b"\0"


def test_claq_inspect_prints_the_category_and_rule():
    from claq_convert.cli import inspect_cmd

    result = CliRunner().invoke(inspect_cmd, [str(BAD_DIRS["CLAQ"] / "h07_kind.claq")])
    assert result.exit_code == 1 and "[BadHeader CLAQ-H07]" in result.output, result.output


# ------------------------------------------------------------------------------------ good vectors

@pytest.mark.parametrize("path", sorted(VECTORS.glob("*.claq")) + sorted((VECTORS / "gguf").glob("*.gguf")),
                         ids=lambda p: p.name)
def test_valid_vectors_decode_to_their_expected_values(path):
    expected = json.loads(path.with_suffix(".json").read_text())
    with open_vector(path) as f:
        f.validate()
        assert sorted(f.tensors) == sorted(expected["tensors"])
        for name, values in expected["tensors"].items():
            decoded = f.decode(name)
            assert decoded.dtype == np.float32 and np.array_equal(decoded, np.array(values, np.float32)), name
        assert sorted(f.files) == sorted([*expected["files"], *expected.get("files_hex", {})])
        for name, text in expected["files"].items():
            assert f.file(name).decode() == text
        for name, hexed in expected.get("files_hex", {}).items():
            assert f.file(name) == bytes.fromhex(hexed)


def test_good_vectors_reach_the_rules_boundaries():
    """The boundary vector holds the largest values the rules allow: an 8-bit column, a 255-byte file name,
    JSON 64 deep with integers at both ends of their range, a column whose every row is an outlier."""
    with reader.ClaqFile(VECTORS / "v2_boundaries.claq") as cf:
        assert {n: t["shape"] for n, t in cf.tensors.items()} == {"": [3, 2], "ctl\n\u0001": [2, 2]}
        assert int(cf.sections("")["bit_widths"].max()) == 8 and "codes_8" in cf.tensors[""]["sections"]
        assert max(len(n.encode()) for n in cf.files) == 255
        limits = cf.metadata["conversion"]["limits"]
        assert limits["int_max"] == 2 ** 64 - 1 and limits["int_min"] == -2 ** 63
        depth, node = 4, limits["deep"]  # root, metadata, conversion, limits
        while node is not None:
            depth, node = depth + 1, (node[0] if node else None)
        assert depth == 64
        assert list(cf.sections("")["outlier_counts"]) == [3, 0]
    with reader.ClaqFile(VECTORS / "v2_empty.claq") as cf:
        assert cf.size == cf.data_start and not cf.tensors and not cf.files
