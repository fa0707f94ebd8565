"""Calibration and evaluation windows."""
import pytest
import torch

from claq_convert import data


class CharTokenizer:
    def __call__(self, text, add_special_tokens=False, return_attention_mask=False):
        assert add_special_tokens is False
        return {"input_ids": [ord(c) % 256 for c in text]}


def test_calibration_windows_are_seeded_slices_of_the_text(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("".join(chr(97 + i % 26) for i in range(5000)))
    a = data.calibration_windows(CharTokenizer(), path, nsamples=6, seqlen=100, seed=1)
    b = data.calibration_windows(CharTokenizer(), path, nsamples=6, seqlen=100, seed=1)
    c = data.calibration_windows(CharTokenizer(), path, nsamples=6, seqlen=100, seed=2)
    assert a.shape == (6, 100) and torch.equal(a, b) and not torch.equal(a, c)
    ids = data.tokenize_file(CharTokenizer(), path)
    for row in a:  # each window is a contiguous slice
        assert torch.all((row[1:] - row[:-1]) % 26 == 1)


def test_eval_windows_are_the_first_non_overlapping_ones():
    ids = torch.arange(1000)
    w = data.eval_windows(ids, seqlen=100, nwindows=4)
    assert w.shape == (4, 100) and torch.equal(w.flatten(), torch.arange(400))
    assert data.eval_windows(ids, 100, 0).shape == (10, 100)
    assert data.eval_windows(ids, 100, 40).shape == (10, 100)
    with pytest.raises(data.DataError):
        data.eval_windows(torch.arange(50), 100, 1)


def test_short_text_is_a_clear_error(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("abc")
    with pytest.raises(data.DataError, match="fewer than one"):
        data.calibration_windows(CharTokenizer(), path, nsamples=1, seqlen=10)
