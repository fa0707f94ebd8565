"""The command-line tools through click's CliRunner: exit codes, one-line errors, JSON records."""
import json

import numpy as np
import pytest

from click.testing import CliRunner

from claq_convert.cli import convert_cmd, eval_cmd


def test_convert_dry_run_with_eval_writes_a_record(tiny_model_dir, text_file, tmp_path):
    out = tmp_path / "run.json"
    result = CliRunner().invoke(convert_cmd, [str(tiny_model_dir), "--dry-run", "--bits", "2.2", "--outlier-bits",
                                              "0.3", "--calib", str(text_file), "--nsamples", "4", "--seqlen", "32",
                                              "--eval", "--json", str(out)])
    assert result.exit_code == 0, result.output
    record = json.loads(out.read_text())
    assert record["quant"]["bits"] == 2.2 and record["calibration"]["nsamples"] == 4
    assert len(record["tensors"]) == 15 and "model.embed_tokens.weight" in record["tensors"]  # 14 linears, tied head
    s = record["summary"]
    assert s["stored_bytes"] == sum(t["stored_bytes"] for t in record["tensors"].values())
    assert s["honest_bpw"] > s["nominal_bits"]  # codebooks, bit maps and outliers cost bits
    assert s["outliers"] > 0
    before, after = record["ppl_before"]["wikitext"], record["ppl_after"]["wikitext"]
    assert after["ppl"] > 1 and before["tokens"] == after["tokens"]
    assert "honest" in result.output and "ppl on wikitext: before" in result.output


def test_convert_errors_are_one_line(tiny_model_dir, tmp_path):
    runner = CliRunner()
    r = runner.invoke(convert_cmd, [str(tiny_model_dir), "--dry-run", "--method", "gptq", "--bits", "2.5"])
    assert r.exit_code == 1 and "CLAQ features" in r.output and "Traceback" not in r.output
    r = runner.invoke(convert_cmd, [str(tiny_model_dir), "--dry-run", "--ap-bits", "two,four"])
    assert r.exit_code == 2 and "LOW,HIGH" in r.output
    r = runner.invoke(convert_cmd, [str(tiny_model_dir)])
    assert r.exit_code == 2 and "--dry-run" in r.output
    r = runner.invoke(convert_cmd, [str(tmp_path), "--dry-run"])
    assert r.exit_code == 1 and "config.json" in r.output
    r = runner.invoke(convert_cmd, [str(tiny_model_dir), "--dry-run", "--calib", str(tmp_path / "none.txt")])
    assert r.exit_code == 1 and "not a file" in r.output and "Traceback" not in r.output


def test_eval_prints_ppl_and_writes_json(tiny_model_dir, text_file, tmp_path):
    out = tmp_path / "ppl.json"
    r = CliRunner().invoke(eval_cmd, [str(tiny_model_dir), "--text", str(text_file), "--seqlen", "32",
                                      "--windows", "3", "--json", str(out)])
    assert r.exit_code == 0, r.output
    record = json.loads(out.read_text())
    assert record["windows"] == 3 and record["tokens"] == 3 * 31 and "machine" in record
    assert r.stdout.startswith("ppl ")


def test_raw_tensors_keep_their_dtype_or_the_one_asked_for(tiny_model_dir, text_file, tmp_path):
    from claq_convert.cli import inspect_cmd
    from claq_convert.format.reader import ClaqFile

    runner = CliRunner()
    for flag, expected in ((None, "F32"), ("bf16", "BF16")):
        out = tmp_path / f"m-{expected}.claq"
        args = [str(tiny_model_dir), str(out), "--bits", "3", "--calib", str(text_file), "--nsamples", "2",
                "--seqlen", "16"] + (["--raw-dtype", flag] if flag else [])
        r = runner.invoke(convert_cmd, args)
        assert r.exit_code == 0, r.output
        with ClaqFile(out) as cf:
            raw = [t for t in cf.tensors.values() if t["kind"] == "raw"]
            assert raw and all(t["sections"]["data"]["dtype"] == expected for t in raw)  # the norms
            params = sum(int(np.prod(t["shape"])) for t in cf.tensors.values())
        summary = json.loads(runner.invoke(inspect_cmd, [str(out), "--json"]).output)
        assert summary["parameters"] == params
        assert summary["file_bits_per_parameter"] == pytest.approx(out.stat().st_size * 8 / params)
        assert "bits per parameter (whole file)" in runner.invoke(inspect_cmd, [str(out)]).output


def test_codebook_option_chooses_the_storage(tiny_model_dir, text_file, tmp_path):
    from claq_convert.format import reader
    from claq_convert.cli import convert_cmd

    def storage(tensor: dict) -> str:  # grid levels are coded (format v3) where that is shorter
        sections = tensor["sections"]
        return "coded" if "codebook_rice" in sections else sections["codebooks"]["dtype"]

    for codebook, kinds in (("f16", {"F16"}), ("grid", {"coded", "U8"})):  # U8 where coding saves nothing
        out = tmp_path / f"{codebook}.claq"
        r = CliRunner().invoke(convert_cmd, [str(tiny_model_dir), str(out), "--calib", str(text_file), "--nsamples", "2",
                                             "--seqlen", "32", "--codebook", codebook])
        assert r.exit_code == 0, r.output
        with reader.ClaqFile(out) as cf:
            cf.validate()
            found = {storage(t) for t in cf.tensors.values() if t["kind"] == "claq"}
            assert found <= kinds and found & kinds - {"U8"}


def test_default_is_the_measured_allocation_and_bits_the_fixed_rule(tiny_model_dir, text_file, tmp_path):
    from claq_convert.cli import DEFAULT_BPW

    common = ["--dry-run", "--calib", str(text_file), "--nsamples", "2", "--seqlen", "32"]
    records = {}
    for name, extra in (("default", []), ("bits", ["--bits", "4"])):
        out = tmp_path / f"{name}.json"
        r = CliRunner().invoke(convert_cmd, [str(tiny_model_dir), *common, *extra, "--json", str(out)])
        assert r.exit_code == 0, r.output
        records[name] = json.loads(out.read_text())
    default, fixed = records["default"], records["bits"]
    assert default["quant"]["bpw"] == DEFAULT_BPW and default["allocation"]["unit"] == "column"
    assert default["allocation"]["allocated_bytes"] <= default["allocation"]["budget_bytes"]
    assert default["summary"]["honest_bpw"] <= DEFAULT_BPW
    assert fixed["quant"]["bpw"] is None and "allocation" not in fixed
    assert fixed["quant"]["bits"] == default["quant"]["bits"] == 4.0  # the head's target: 4 + 2 bits either way
