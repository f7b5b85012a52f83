"""Perplexity, KL, sizes and speed measurements on the real models, against the reference figures."""

import pytest
import torch

from slimswarm.errors import SlimswarmError
from slimswarm.evaluate.kl import kl_divergence
from slimswarm.evaluate.perplexity import document_perplexity, perplexity
from slimswarm.evaluate.size import decode_bytes_per_token, disk_bytes, weight_bytes
from slimswarm.evaluate.speed import measure_bandwidth, speed_report
from slimswarm.models.generate import generate
from slimswarm.models.sampling import SamplingParams


def _stories(data_dir):
    text = (data_dir / "text/tinystories-sample.txt").read_text()
    return [d.strip() for d in text.split("<|endoftext|>") if d.strip()]


def test_stories260k_perplexity_story_by_story_matches_the_reference(stories, data_dir):
    r = document_perplexity(stories.model, stories.tokenizer, _stories(data_dir), 512)
    assert r.tokens == 1806
    assert 3.55 <= r.perplexity <= 3.85


def test_stories260k_greedy_continuation_matches_the_data_readme(stories):
    c = generate(stories.model, stories.tokenizer, ["Once upon a time"], SamplingParams(max_tokens=30))[0]
    expected = ", there was a little girl named Lily. She loved to play outside in the park."
    assert c.text.startswith(expected)


def test_windowed_perplexity_counts_exact_tokens(stories, data_dir):
    text = (data_dir / "text/tinystories-sample.txt").read_text()
    n = len(stories.tokenizer.encode(text))
    r = perplexity(stories.model, stories.tokenizer, text, window=256)
    assert r.windows == n // 256 and r.tokens == r.windows * 255
    assert 2.0 < r.perplexity < 20.0


def test_text_shorter_than_one_window_is_a_clear_error(stories):
    with pytest.raises(SlimswarmError, match="shorter than one window of 512"):
        perplexity(stories.model, stories.tokenizer, "Once upon a time", window=512, source="tiny.txt")


def test_kl_is_zero_to_itself_and_grows_with_weight_noise(stories, data_dir):
    from slimswarm import load

    text = (data_dir / "text/tinystories-sample.txt").read_text()
    same = kl_divergence(stories.model, stories.model, stories.tokenizer, text, window=256)
    assert same["kl"] == pytest.approx(0.0, abs=1e-6) and same["top1_agreement"] == 1.0
    noisy = load("stories260k")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in noisy.model.named_parameters():
            if name.endswith("proj.weight"):
                p.add_(torch.randn(p.shape, generator=g) * p.std() * 0.3)
    r = kl_divergence(stories.model, noisy.model, stories.tokenizer, text, window=256)
    assert 0.001 < r["kl"] < 5 and r["top1_agreement"] < 1.0


def test_weight_and_disk_bytes_of_stories260k(stories, data_dir):
    # 260,032 fp32 parameters with tied embeddings, counted once.
    assert stories.model.num_parameters() == 260_032
    assert weight_bytes(stories.model) == 260_032 * 4
    assert decode_bytes_per_token(stories.model) == 260_032 * 4
    assert disk_bytes(data_dir / "models/stories260K/hf") > 260_032 * 4


def test_bandwidth_and_speed_report_are_consistent(stories):
    bw = measure_bandwidth(mb=256, repeats=2)
    assert 0.5 < bw < 2000
    r = speed_report(stories.model, bandwidth_gb_s=bw, new_tokens=8)
    assert r["roofline_tokens_per_s"] == pytest.approx(bw * 1e9 / (260_032 * 4))
    assert r["roofline_fraction"] == pytest.approx(r["decode_tokens_per_s"] / r["roofline_tokens_per_s"])
    assert r["decode_tokens_per_s"] > 0 and r["decode_tokens_per_s_batch8"] > 0 and r["prefill_tokens_per_s"] > 0
    assert r["peak_rss_bytes"] > 50 * 2**20


@pytest.mark.slow
def test_smollm2_wikitext2_perplexity_within_one_percent_of_reference(smollm2, data_dir):
    text = (data_dir / "text/wikitext-2-raw-test.txt").read_text()
    r = perplexity(smollm2.model, smollm2.tokenizer, text, window=1024, max_tokens=32768)
    assert r.tokens == 32 * 1023
    assert abs(r.perplexity - 24.01) / 24.01 < 0.01
