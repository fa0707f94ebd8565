"""A user's install: the wheel, installed (not editable) into a fresh venv, run from an unrelated directory."""
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def run(cmd, cwd, env=None):
    result = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_wheel_installs_and_every_command_runs_from_elsewhere(tiny_model_dir, text_file, tmp_path):
    dist = tmp_path / "dist"
    run([sys.executable, "-m", "pip", "wheel", ROOT, "--no-deps", "--no-build-isolation", "-q", "-w", dist], tmp_path)
    wheel = next(dist.glob("claq_convert-*.whl"))
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", venv], tmp_path)
    site = next((venv / "lib").glob("python*/site-packages"))
    # the dependencies (torch, transformers ...) come from this environment, not the project's own code:
    # a plain path entry, so the editable install's finder there is never activated
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    bin_dir = venv / "bin"
    run([bin_dir / "python", "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel], tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": ""}
    where = run([bin_dir / "python", "-c", "import claq_convert; print(claq_convert.__file__)"], elsewhere, env)
    assert str(venv) in where and str(ROOT) not in where
    out = elsewhere / "tiny.claq"
    # the default calibration at 6 windows: self:4, python-docs:1, python-code:1 (texts of the venv's Python)
    run([bin_dir / "claq-convert", tiny_model_dir, out, "--nsamples", "6", "--seqlen", "32"], elsewhere, env)
    inspected = run([bin_dir / "claq-inspect", out], elsewhere, env)
    assert "valid .claq" in inspected and "from self:4, python-docs:1, python-code:1" in inspected
    run([bin_dir / "claq-eval", out, "--text", text_file, "--seqlen", "32", "--windows", "2"], elsewhere, env)
    run([bin_dir / "claq-generate", out, "quick brown", "--raw", "--max-new-tokens", "3"], elsewhere, env)
