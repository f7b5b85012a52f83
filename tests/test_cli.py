"""The CLI: JSON fields, and bad input as one clear line with exit code 2 and no traceback."""

import json
import shutil
import subprocess
import sys

import pytest

from slimswarm.models.load import smollm2_gguf_path


def run(*args):
    p = subprocess.run([sys.executable, "-m", "slimswarm.cli", *map(str, args)], capture_output=True, text=True,
                       timeout=600)
    return p.returncode, p.stdout, p.stderr


def assert_clean_error(rc, err, *words):
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("slimswarm: error:"), err
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0]


def test_eval_json_on_stories260k(data_dir):
    rc, out, err = run("eval", "stories260k", "--text", data_dir / "text/tinystories-sample.txt", "--window", "512",
                       "--json")
    assert rc == 0, err
    row = json.loads(out)
    assert {"perplexity", "tokens", "window", "weight_bytes"} <= row.keys()
    assert row["window"] == 512 and row["tokens"] == 3 * 511 and row["weight_bytes"] == 260_032 * 4


def test_eval_story_by_story_and_kl_to_itself(data_dir):
    rc, out, err = run("eval", "stories260k-llama2c", "--text", data_dir / "text/tinystories-sample.txt",
                       "--doc-sep", "<|endoftext|>", "--window", "512", "--kl-to", "stories260k", "--json")
    assert rc == 0, err
    row = json.loads(out)
    assert row["tokens"] == 1806 and 3.55 <= row["perplexity"] <= 3.85
    assert row["kl"] < 1e-6


def test_bench_json_fields(tmp_path):
    rc, out, err = run("bench", "stories260k", "--new-tokens", "8", "--json", "--out", tmp_path / "b")
    assert rc == 0, err
    row = json.loads(out)
    for k in ("prefill_tokens_per_s", "decode_tokens_per_s", "decode_tokens_per_s_batch8", "bandwidth_gb_s",
              "roofline_fraction", "peak_rss_bytes"):
        assert row[k] > 0
    assert (tmp_path / "b.json").exists() and (tmp_path / "b.md").exists() and (tmp_path / "b.png").stat().st_size > 1000


def test_generate_prints_the_readme_continuation():
    rc, out, err = run("generate", "stories260k", "Once upon a time", "--max-tokens", "20")
    assert rc == 0, err
    assert out.startswith("Once upon a time, there was a little girl named Lily.")


def test_missing_path_and_unknown_name(tmp_path):
    rc, _, err = run("eval", tmp_path / "nothing-here")
    assert_clean_error(rc, err, "nothing-here")
    rc, _, err = run("eval", "llama-9000")
    assert_clean_error(rc, err, "llama-9000", "smollm2-135m")


def test_unsupported_architecture_is_named(tmp_path):
    (tmp_path / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}')
    rc, _, err = run("eval", tmp_path)
    assert_clean_error(rc, err, "GPT2LMHeadModel")


def test_truncated_safetensors(tmp_path, data_dir):
    src = data_dir / "models/stories260K/hf"
    dst = tmp_path / "hf"
    shutil.copytree(src, dst)
    data = (src / "model.safetensors").read_bytes()
    (dst / "model.safetensors").write_bytes(data[: len(data) // 2])
    rc, _, err = run("eval", dst)
    assert_clean_error(rc, err, "model.safetensors")


def test_truncated_llama2c(tmp_path, data_dir):
    src = data_dir / "models/stories260K/llama2c"
    (tmp_path / "m.bin").write_bytes((src / "stories260K.bin").read_bytes()[:300_000])
    shutil.copy(src / "tok512.model", tmp_path)
    rc, _, err = run("eval", tmp_path / "m.bin")
    assert_clean_error(rc, err, "m.bin", "truncated")


@pytest.mark.parametrize("cut", [10, 3_000_000])
def test_truncated_or_corrupt_gguf(tmp_path, cut):
    (tmp_path / "m.gguf").write_bytes(smollm2_gguf_path().read_bytes()[:cut])
    rc, _, err = run("eval", tmp_path / "m.gguf")
    assert_clean_error(rc, err, "m.gguf")


def test_text_shorter_than_one_window(tmp_path):
    (tmp_path / "t.txt").write_text("Once upon a time")
    rc, _, err = run("eval", "stories260k", "--text", tmp_path / "t.txt", "--window", "256")
    assert_clean_error(rc, err, "t.txt", "shorter than one window")


def test_missing_text_file(tmp_path):
    rc, _, err = run("eval", "stories260k", "--text", tmp_path / "nope.txt")
    assert_clean_error(rc, err, "nope.txt")
