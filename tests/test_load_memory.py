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


def _child_peak_rss(args: list[str], extra_env: dict[str, str] | None = None) -> int:
    """ru_maxrss (bytes) of one fresh process, read by a wrapper that runs only it (RUSAGE_CHILDREN never shrinks;
    it is the largest of the process and its own children: a compiler or the tokenizer converter, not their sum)."""
    wrapper = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)")
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1",
           **(extra_env or {})}
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


_LOAD_ANON = """
import sys, torch, slimswarm.cli
from slimswarm.models import gguf
from slimswarm.models.load import build_model, smollm2_gguf_path
def anon():
    return int(next(l for l in open('/proc/self/status') if l.startswith('RssAnon')).split()[1]) * 1024
p = smollm2_gguf_path()
cfg, table = gguf.open_gguf(p)
before = anon()
model = build_model(cfg, gguf.gguf_weights(p, table, cfg, torch.float32), str(p), torch.float32,
                    shapes=gguf.gguf_shapes(table))
print(anon() - before, sum(t.numel() * t.element_size() for t in {t.data_ptr(): t for t in model.state_dict().values()}.values()),
      sorted(m for m in ('sympy', 'torch._dynamo', 'gguf', 'transformers') if m in sys.modules))
"""


@pytest.mark.slow
def test_gguf_load_grows_anonymous_memory_by_the_weights_and_little_more(smollm2):
    """Loading the fp32 GGUF in a fresh process: private memory grows by the weights + at most 8 MB. Before: the
    shape check's meta skeleton imported sympy and torch._dynamo (+70 MB), and the C heap kept the load's freed
    temporaries resident (+0-42 MB, varying from run to run); now ~1 MB beyond the weights."""
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    for _ in range(2):  # the heap's leftovers varied between runs: two fresh processes
        out = subprocess.run([sys.executable, "-c", _LOAD_ANON], capture_output=True, text=True, env=env, check=True)
        grown, weights, modules = out.stdout.strip().split(" ", 2)
        assert int(weights) == 538_060_032
        assert int(grown) <= int(weights) + 8_000_000, (int(grown) - int(weights)) / 1e6
        assert modules == "[]"  # no meta kernels, no gguf package (its formats are read by torch ops here)


# What `slimswarm generate` imports before it reads weights (no transformers: the tokenizer is replayed).
CLI_RUNTIME = "import torch, numpy, safetensors, tokenizers; import slimswarm.cli; slimswarm.cli.build_parser()"
# Runs one command and samples, every millisecond, the anonymous resident memory (RssAnon: heap, mmap'd
# allocations, copy-on-write pages of libraries) of it and of each of its children; prints the largest one process
# reached, then ru_maxrss (anonymous + file-backed) of the largest.
_ANON_PEAK = """
import json, os, resource, subprocess, sys, time
def anon(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith("RssAnon"))
    except (OSError, StopIteration):
        return 0
def tree(pid):
    out = [pid]
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            for c in f.read().split():
                out += tree(int(c))
    except OSError:
        pass
    return out
p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)
peak = 0
while p.poll() is None:
    peak = max([peak] + [anon(q) for q in tree(p.pid)])
    time.sleep(0.001)
print(json.dumps({"anon": peak, "maxrss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
                  "rc": p.returncode}))
"""


@pytest.mark.slow
def test_generate_peak_memory_within_1_5x_weights_plus_kv_including_the_runtime(smollm2, tmp_path):
    """Issue #11's goal, torch and the tokenizer included: a fresh fp32 `slimswarm generate` keeps its anonymous
    memory (weights, KV, buffers, torch's own heap: 146 MiB after `import torch`, the tokenizer) under 1.5 x (weight
    bytes + KV bytes) (812 MB here), on its first run (nothing cached: the kernels compile and transformers converts
    the GGUF tokenizer in child processes, each counted on its own) and on the next (both cached). The first run
    took +85 MB while the conversion ran in-process.

    Not bounded here: the file-backed pages of shared libraries (libtorch's code), which the page cache holds for
    every process and whose mapped count depends on how the files sit in it: the same process mapped 95 MiB of them
    once the install had settled (ru_maxrss 807 MB, under the bound) and 154-158 MiB within minutes of a
    `pip install` of torch (freshly written files sit in large page-cache folios, mapped whole; 870 MB), which is
    how CI measured 877-891 MB on a clean clone."""
    import json

    from slimswarm.evaluate.size import weight_bytes

    cfg = smollm2.model.config
    tokens = 64
    prompt = len(smollm2.tokenizer.encode("Hello, my name is"))
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * (prompt + tokens) * 4
    w_kv = weight_bytes(smollm2.model) + kv
    bound = 1.5 * w_kv
    cache = tmp_path / "cache"  # empty: not the user's cache, whatever earlier tests or runs left there
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1",
           "SLIMSWARM_CACHE": str(cache)}
    def peak(*args):
        out = subprocess.run([sys.executable, "-c", _ANON_PEAK, sys.executable, *args], capture_output=True, text=True,
                             env=env, check=True)
        got = json.loads(out.stdout.strip().splitlines()[-1])
        assert got["rc"] == 0 and "warning" not in out.stderr, (args, out.stderr)  # native step on, tokenizer in a child
        assert got["anon"] < got["maxrss"]
        return got

    runtime = peak("-c", CLI_RUNTIME)["anon"]  # torch's heap and the rest the CLI holds before any weight
    for run in ("first", "cached"):
        got = peak("-m", "slimswarm.cli", "generate", "smollm2-135m", "Hello, my name is", "--max-tokens", str(tokens),
                   "--no-chat")
        assert got["anon"] <= bound, (run, got["anon"] / 1e6, got["maxrss"] / 1e6, bound / 1e6)
        # Above the runtime, the weights + KV + 10% at most (buffers, the tokenizer): +3% measured here; an
        # in-process tokenizer conversion (+85 MB) or a second copy of any large weight fails this line.
        assert got["anon"] - runtime <= 1.1 * w_kv, (run, (got["anon"] - runtime) / 1e6, runtime / 1e6)
        assert any(cache.rglob("replay.json")) and any(cache.rglob("decode-*.so"))


def test_gguf_block_sizes_we_know_are_ggmls():
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    from slimswarm.models.gguf_header import KNOWN_TYPES

    for value, (name, block, size) in KNOWN_TYPES.items():
        q = GGMLQuantizationType(value)
        assert (q.name, *GGML_QUANT_SIZES[q]) == (name, block, size)


@pytest.mark.parametrize("kind", ["F32", "F16", "Q8_0", "Q4_1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_dequantization_is_bit_identical_to_gguf_quants(kind, dtype, tmp_path):
    """Our torch de-quantization of each format it handles equals gguf.quants' numpy one, bit for bit, through
    the chunked reader (rows split across chunks) and for a bf16 target."""
    import numpy as np
    from gguf.constants import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    from slimswarm.models import gguf as G
    from slimswarm.models.gguf_header import GGMLType, GGUFTensor

    g = torch.Generator().manual_seed(1)
    x = (torch.randn(96, 256, generator=g) * torch.logspace(-3, 1, 96)[:, None]).numpy()
    q = GGMLQuantizationType[kind]
    raw = np.ascontiguousarray(x if kind == "F32" else x.astype(np.float16) if kind == "F16" else quantize(x, q))
    path = tmp_path / "t.bin"
    path.write_bytes(b"\0" * 7 + raw.tobytes())
    ref = torch.from_numpy(np.asarray(dequantize(raw.view(np.uint8).reshape(96, -1), q), dtype=np.float32).copy())
    t = GGUFTensor("blk.0.ffn_up.weight", GGMLType(q.value, kind), (96, 256), 7, raw.nbytes)
    chunk = G.CHUNK_BYTES
    try:
        G.CHUNK_BYTES = raw.nbytes // 5  # several chunks, the last one short
        with open(path, "rb") as f:
            got = G._dequantized(f, t, dtype, path, bytearray(16))
    finally:
        G.CHUNK_BYTES = chunk
    assert got.dtype == dtype and torch.equal(got, ref.to(dtype))


def test_replaced_kv_cache_is_freed_even_after_a_native_step(stories):
    """setup_cache drops the old cache before allocating the new one, and the native step does not keep it alive."""
    import gc
    import weakref

    from slimswarm.kernels import native
    from slimswarm.models.generate import generate_ids
    from slimswarm.models.sampling import SamplingParams

    model = stories.model
    generate_ids(model, [[1, 2, 3]], SamplingParams(max_tokens=3))
    old = weakref.ref(model.model.layers[0].self_attn.cache)
    if native.step_for(model) is not None:  # a machine with the C step: it has bound the cache above
        assert native.step_for(model)._caches is not None
    model.setup_cache(2, 64)
    gc.collect()
    assert old() is None


def test_load_without_tokenizer_for_callers_that_never_read_text(data_dir):
    """`slimswarm bench` feeds token ids: its load builds no tokenizer (~15 MB resident, ~40 MB while built)."""
    from slimswarm import load

    for ref in ("stories260k", "stories260k-llama2c"):
        bare = load(ref, load_tokenizer=False)
        assert bare.tokenizer is None and bare.model.config.vocab_size == 512
