"""Loading streams one tensor at a time: the same weights as transformers' GGUF loader, and a bounded peak RSS."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SRC = str(Path(__file__).resolve().parents[1] / "src")
# What the CLI imports before it reads any weight: the runtime a model's bytes come on top of.
RUNTIME = "import torch, numpy, gguf, safetensors, transformers; from transformers import AutoTokenizer; import slimswarm.cli"


def _child_peak_rss(args: list[str]) -> int:
    """ru_maxrss (bytes) of one fresh process, read by a wrapper that runs only it (RUSAGE_CHILDREN never shrinks)."""
    wrapper = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)")
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", wrapper, *args], capture_output=True, text=True, env=env, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def test_skipped_init_restores_torch_init_functions():
    from slimswarm.models.materialize import skipped_init

    before = torch.nn.init.normal_
    with skipped_init():
        t = torch.full((4,), 7.0)
        assert torch.nn.init.normal_(t) is t and torch.equal(t, torch.full((4,), 7.0))
    assert torch.nn.init.normal_ is before


def test_streamed_load_groups_by_layer_and_reports_missing_and_unexpected(stories):
    from slimswarm.models.materialize import empty_model, layer_groups, load_streamed

    sd = stories.model.state_dict()
    groups = list(layer_groups(sd.items()))
    layer_keys = [k for k in sd if k.startswith("model.layers.")]
    assert len(groups) == len(sd) - len(layer_keys) + stories.model.config.num_hidden_layers
    model = empty_model(stories.model.config)
    partial = {k: v for k, v in sd.items() if k != "model.norm.weight"}
    missing, unexpected = load_streamed(model, iter({**partial, "extra.weight": torch.zeros(1)}.items()))
    assert missing == ["model.norm.weight"] and unexpected == ["extra.weight"]
    got = model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in partial.items())


@pytest.mark.slow
def test_streamed_gguf_weights_equal_transformers_gguf_loader(smollm2):
    """Bit-identical to what transformers' own GGUF path de-quantizes and un-permutes (an independent reader)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    cfg = smollm2.model.config
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(LlamaConfig(**cfg.to_hf()))
    ref = load_gguf_checkpoint(smollm2.source, return_tensors=True, model_to_load=skeleton)["tensors"]
    ours = smollm2.model.state_dict()
    assert len(ref) == 272 and set(ref) <= set(ours)
    different = [k for k, v in ref.items() if not torch.equal(ours[k], torch.as_tensor(v))]
    assert different == []
    assert ours["lm_head.weight"].data_ptr() == ours["model.embed_tokens.weight"].data_ptr()  # tied: one copy


@pytest.mark.slow
def test_generate_peak_rss_within_1_5x_weights_plus_kv(smollm2):
    """A fresh `slimswarm generate` on the fp32 GGUF: peak RSS above the bare runtime (torch, transformers, ...)
    stays under 1.5 x (weight bytes + KV bytes). Before streaming it was 1,291 MB peak for 538 MB of weights."""
    from slimswarm.evaluate.size import weight_bytes

    cfg = smollm2.model.config
    tokens = 16
    peak = _child_peak_rss([sys.executable, "-m", "slimswarm.cli", "generate", "smollm2-135m", "Hello, my name is",
                            "--max-tokens", str(tokens), "--no-chat"])
    runtime = _child_peak_rss([sys.executable, "-c", RUNTIME])
    prompt = len(smollm2.tokenizer.encode("Hello, my name is"))
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * (prompt + tokens) * 4
    w = weight_bytes(smollm2.model)
    assert w == 538_060_032
    assert peak - runtime <= 1.5 * (w + kv), (peak, runtime, w, kv)
