"""Hostile model files: truncated and mutated GGUF, safetensors, llama2.c, config.json, slimswarm.json and LoRA
adapters are either read (and then run) or refused with one SlimswarmError line naming the file; never another
exception, never a big allocation."""

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hostile import (DELETE, EXTREME_INTS, JSON_VALUES, copy_folder, json_paths, json_replace, load_weights,
                     mutate_bytes, safetensors_header_span, write_tiny_gguf)
from slimswarm.errors import SlimswarmError

FUZZ = settings(max_examples=int(os.environ.get("SLIMSWARM_FUZZ_EXAMPLES", 40)), deadline=None, derandomize=True,
                suppress_health_check=list(HealthCheck), database=None)


@pytest.fixture(scope="module")
def files(stories, data_dir, tmp_path_factory):
    """Real small files of every format: stories260k as GGUF (Q8_0 + F32), llama2.c, HF safetensors, and a w8
    slimswarm checkpoint; plus a scratch folder per format for the mutants."""
    from slimswarm import load
    from slimswarm.compress.quant.apply import quantize_model
    from slimswarm.compress.recipe import load_recipe
    from slimswarm.models.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("hostile")
    torch.set_num_threads(1)
    gguf = write_tiny_gguf(stories, root / "tiny.gguf")
    w8 = load("stories260k")
    meta = quantize_model(w8.model, load_recipe("w8").quantize)
    ck = save_checkpoint(w8.model, w8.tokenizer, root / "ck", {"quantization": meta})
    hf = data_dir / "models/stories260K/hf"
    return {"root": root, "gguf": gguf, "llama2c": data_dir / "models/stories260K/llama2c/stories260K.bin",
            "hf": hf, "ck": ck, "scratch_hf": copy_folder(hf, root / "m-hf"), "scratch_ck": copy_folder(ck, root / "m-ck")}


def byte_ops(size: int, span: int):
    """Truncations anywhere; 1-4 byte flips and extreme 4/8-byte integers inside the first ``span`` bytes (the
    header, where a wrong byte changes structure rather than one weight's value)."""
    return st.one_of(
        st.tuples(st.just("truncate"), st.integers(0, size - 1)),
        st.tuples(st.just("flip"), st.lists(st.tuples(st.integers(0, span - 1), st.integers(0, 255)), min_size=1,
                                            max_size=4)),
        st.tuples(st.just("int"), st.integers(0, span - 8), st.sampled_from(EXTREME_INTS), st.sampled_from([4, 8])),
    )


def read_or_refuse(kind: str, path: Path, where: str) -> str:
    """'ok' or 'refused'; anything but a one-line SlimswarmError naming ``where`` fails the test."""
    try:
        model = load_weights(kind, path)
    except SlimswarmError as e:
        msg = str(e)
        assert "\n" not in msg and where in msg, msg
        return "refused"
    if model is not None:
        decode_two_tokens(model)  # what loads must also run: prefill, then decode steps through the C kernels
    return "ok"


def decode_two_tokens(model) -> None:
    from slimswarm.models.generate import generate_ids
    from slimswarm.models.sampling import SamplingParams

    out = generate_ids(model, [[1, 5, 9, 2]], SamplingParams(max_tokens=2), eos_ids=[])
    assert len(out[0].tokens) == 2
    model.clear_cache()


@st.composite
def json_mutation(draw, doc):
    paths = [p for p, _ in json_paths(doc) if p]
    path = draw(st.sampled_from(paths))
    value = draw(st.one_of(st.just(DELETE), st.sampled_from(JSON_VALUES),
                           st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
                                        | st.text(max_size=8), lambda c: st.lists(c, max_size=3)
                                        | st.dictionaries(st.text(max_size=4), c, max_size=3), max_leaves=6)))
    return json_replace(doc, path, value)


# ------------------------------------------------------------------------------------------------ fuzzing
def test_gguf_mutants_are_read_or_refused(files):
    raw = files["gguf"].read_bytes()
    path = files["root"] / "mutant.gguf"
    seen = {"ok": 0, "refused": 0}

    @FUZZ
    @given(byte_ops(len(raw), 8192))
    def one(op):
        path.write_bytes(mutate_bytes(raw, op))
        seen[read_or_refuse("gguf", path, str(path))] += 1

    one()
    assert seen["refused"] > 0 and sum(seen.values()) >= FUZZ.max_examples


def test_llama2c_mutants_are_read_or_refused(files):
    raw = files["llama2c"].read_bytes()
    path = files["root"] / "mutant.bin"
    seen = {"ok": 0, "refused": 0}

    @FUZZ
    @given(byte_ops(len(raw), 28))
    def one(op):
        path.write_bytes(mutate_bytes(raw, op))
        seen[read_or_refuse("llama2c", path, str(path))] += 1

    one()
    assert seen["refused"] > 0 and sum(seen.values()) >= FUZZ.max_examples


def test_safetensors_mutants_are_read_or_refused(files):
    raw = (files["hf"] / "model.safetensors").read_bytes()
    folder = files["scratch_hf"]
    seen = {"ok": 0, "refused": 0}

    @FUZZ
    @given(byte_ops(len(raw), safetensors_header_span(raw)))
    def one(op):
        (folder / "model.safetensors").write_bytes(mutate_bytes(raw, op))
        seen[read_or_refuse("hf", folder, str(folder))] += 1

    one()
    (folder / "model.safetensors").write_bytes(raw)
    assert seen["refused"] > 0


def test_config_json_mutants_are_read_or_refused(files):
    doc = json.loads((files["hf"] / "config.json").read_text())
    folder = files["scratch_hf"]
    seen = {"ok": 0, "refused": 0}

    @FUZZ
    @given(json_mutation(doc))
    def one(mutant):
        (folder / "config.json").write_text(json.dumps(mutant))
        seen[read_or_refuse("hf", folder, str(folder))] += 1

    one()
    (folder / "config.json").write_text(json.dumps(doc))
    assert seen["refused"] > 0 and seen["ok"] > 0  # some fields (dtype, use_cache ...) do not matter


def test_slimswarm_checkpoint_mutants_are_read_or_refused(files):
    raw = (files["ck"] / "model.safetensors").read_bytes()
    doc = json.loads((files["ck"] / "slimswarm.json").read_text())
    folder = files["scratch_ck"]
    seen = {"ok": 0, "refused": 0}

    @FUZZ
    @given(st.one_of(byte_ops(len(raw), safetensors_header_span(raw)).map(lambda op: ("bytes", op)),
                     json_mutation(doc).map(lambda d: ("json", d))))
    def one(m):
        (folder / "model.safetensors").write_bytes(mutate_bytes(raw, m[1]) if m[0] == "bytes" else raw)
        (folder / "slimswarm.json").write_text(json.dumps(m[1] if m[0] == "json" else doc))
        seen[read_or_refuse("slimswarm", folder, str(folder))] += 1

    one()
    assert seen["refused"] > 0


def test_lora_adapter_mutants_are_read_or_refused(files, stories):
    from slimswarm.compress.lora import LoRAConfig, add_lora, save_adapter
    from slimswarm import load

    m = load("stories260k")
    add_lora(m.model, LoRAConfig(r=4))
    clean = save_adapter(m.model, files["root"] / "adapter", LoRAConfig(r=4))
    raw = (clean / "adapter.safetensors").read_bytes()
    doc = json.loads((clean / "adapter.json").read_text())
    folder = copy_folder(clean, files["root"] / "m-adapter")
    seen = {"ok": 0, "refused": 0}

    @FUZZ
    @given(st.one_of(byte_ops(len(raw), safetensors_header_span(raw)).map(lambda op: ("bytes", op)),
                     json_mutation(doc).map(lambda d: ("json", d))))
    def one(m):
        (folder / "adapter.safetensors").write_bytes(mutate_bytes(raw, m[1]) if m[0] == "bytes" else raw)
        (folder / "adapter.json").write_text(json.dumps(m[1] if m[0] == "json" else doc))
        seen[read_or_refuse("adapter", folder, str(folder))] += 1

    one()
    assert seen["refused"] > 0 and seen["ok"] > 0


# ------------------------------------------------------------------------------------------------ regressions
# Each of these raised something other than SlimswarmError (a traceback from the CLI), or tried to allocate what
# the file claimed, before the fix named in its docstring.

def test_gguf_without_token_scores_is_a_clean_error(stories, tmp_path):
    """transformers' GGUF tokenizer converter raised KeyError('scores'); gguf_tokenizer now names the file."""
    import gguf

    from slimswarm import load

    path = write_tiny_gguf(stories, tmp_path / "noscores.gguf", quantized=False)
    r = gguf.GGUFReader(str(path))
    # rewrite without tokenizer.ggml.scores: copy every field and tensor but that one
    w = gguf.GGUFWriter(str(tmp_path / "b.gguf"), "llama")
    for name, f in r.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", "tokenizer.ggml.scores"):
            continue
        vtype = f.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            w.add_array(name, f.contents())
        else:
            w.add_key_value(name, f.contents(), vtype)
    for t in r.tensors:
        w.add_tensor(t.name, t.data.copy(), raw_shape=list(reversed(t.shape.tolist())), raw_dtype=t.tensor_type)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(SlimswarmError, match=r"b\.gguf: the embedded tokenizer cannot be read \(KeyError"):
        load(tmp_path / "b.gguf")


@pytest.mark.parametrize("field,value,words", [
    ("rope_parameters", 1.5, "rope_parameters must be an object"),  # was TypeError: 'float' object is not iterable
    ("hidden_size", 64.0, "hidden_size must be an integer >= 1"),  # was TypeError inside torch.empty
    ("eos_token_id", "2", "eos_token_id must be a list of integers"),
    ("max_position_embeddings", "512", "max_position_embeddings must be an integer >= 1"),
    ("num_hidden_layers", 2**31 - 1, "the config says 2147483647 layers, the weights hold 5"),  # was: building 2^31 layers
    ("intermediate_size", 1 << 40, "the config implies [1099511627776, 64]"),  # refused on the meta device
])
def test_config_json_fields_are_checked(files, field, value, words):
    doc = json.loads((files["hf"] / "config.json").read_text())
    folder = copy_folder(files["hf"], files["root"] / f"cfg-{field}")
    (folder / "config.json").write_text(json.dumps({**doc, field: value}))
    with pytest.raises(SlimswarmError) as e:
        load_weights("hf", folder)
    assert words in str(e.value) and str(folder) in str(e.value)


@pytest.mark.parametrize("path,value,words", [
    (("quantization", "model.layers.0.mlp.up_proj", "bits"), None, "quantization.model.layers.0.mlp.up_proj.bits"),
    (("quantization", "model.layers.0.mlp.up_proj"), [8], "quantization.model.layers.0.mlp.up_proj"),  # TypeError
    (("quantization", "model.layers.0.mlp.up_proj", "group_size"), "64", "group_size: Input should be a valid integer"),
    (("quantization", "model.nope"), {"bits": 8, "group_size": 64}, "modules do not fit the model (AttributeError"),
    (("config", "rope_theta"), [1], "rope_theta must be a positive finite number"),  # was TypeError in rope_inv_freq
    (("config", "hidden_size"), 1 << 20, "qweight has shape [64, 64] in the file, the config implies [64, 1048576]"),
    (("config", "surprise"), 1, "unexpected keyword argument 'surprise'"),
])
def test_slimswarm_json_fields_are_checked(files, path, value, words):
    doc = json.loads((files["ck"] / "slimswarm.json").read_text())
    folder = copy_folder(files["ck"], files["root"] / f"ck-{'-'.join(path)}")
    (folder / "slimswarm.json").write_text(json.dumps(json_replace(doc, path, value)))
    with pytest.raises(SlimswarmError) as e:
        load_weights("slimswarm", folder)
    assert words in str(e.value) and str(folder) in str(e.value), str(e.value)


def test_csr_indices_out_of_range_are_refused(stories, tmp_path):
    """A CSR column index past the matrix would index outside the dense weight at the first forward."""
    from safetensors.torch import load_file, save_file

    from slimswarm import load
    from slimswarm.compress.prune.sparse import SparseLinear
    from slimswarm.models.checkpoint import save_checkpoint

    m = load("stories260k")
    lin = m.model.model.layers[0].mlp.up_proj
    w = lin.weight.detach().clone()
    w[w.abs() < w.abs().median()] = 0
    m.model.model.layers[0].mlp.up_proj = SparseLinear.from_dense(w, fmt="csr")
    ck = save_checkpoint(m.model, m.tokenizer, tmp_path / "csr", {})
    assert load_weights("slimswarm", ck) is not None  # the honest file loads
    sd = load_file(str(ck / "model.safetensors"))
    sd["model.layers.0.mlp.up_proj.col"][7] = 30000
    save_file(sd, str(ck / "model.safetensors"))
    with pytest.raises(SlimswarmError, match="model.layers.0.mlp.up_proj: CSR row pointers or column indices out of"):
        load_weights("slimswarm", ck)


def test_multiline_messages_become_one_line():
    assert str(SlimswarmError("a.bin: bad\n  detail one\n\ndetail two")) == "a.bin: bad; detail one; detail two"


# ------------------------------------------------------------------------------------------------ the CLI
# One fresh process runs the CLI on each file in turn (main() returns the exit code and prints the error line),
# then reports its own peak RSS: one torch import for all of them.
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the forking parent (here pytest, which holds models),
# while VmHWM belongs to the new process image alone.
_MEASURED_CLI = ("import json, re, sys\nfrom slimswarm.cli import main\n"
                 "codes = [main(a) for a in json.loads(sys.argv[1])]\n"
                 "hwm = int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))\n"
                 "print(json.dumps([codes, hwm * 1024]))")


def _cli_runs(argvs: list[list[str]]) -> tuple[list[int], list[str], int]:
    """(exit codes, stderr lines, peak RSS bytes) of CLI runs in one fresh process."""
    p = subprocess.run([sys.executable, "-c", _MEASURED_CLI, json.dumps(argvs)], capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert p.returncode == 0, p.stderr
    codes, peak = json.loads(p.stdout.strip().splitlines()[-1])
    return codes, p.stderr.strip().splitlines(), peak


def _huge_claims(files, root: Path) -> dict[str, Path]:
    """Files whose headers claim a 2^40-element tensor, one per format."""
    out = {}
    raw = files["llama2c"].read_bytes()
    b = bytearray(raw)
    struct.pack_into("<i", b, 0, 1 << 20)  # dim = 2^20: the embedding alone is 512 x 2^20, the layers 2^40 each
    (root / "huge.bin").write_bytes(bytes(b))
    (root / "tok512.model").write_bytes((files["llama2c"].parent / "tok512.model").read_bytes())
    out["llama2c"] = root / "huge.bin"
    raw = (files["hf"] / "model.safetensors").read_bytes()
    (n,) = struct.unpack_from("<Q", raw)
    head = json.loads(raw[8 : 8 + n])
    name = "model.embed_tokens.weight"
    head[name]["shape"] = [1 << 20, 1 << 20]
    text = json.dumps(head).encode()
    folder = copy_folder(files["hf"], root / "huge-hf")
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])
    out["safetensors"] = folder
    folder = copy_folder(files["ck"], root / "huge-ck")
    doc = json.loads((folder / "slimswarm.json").read_text())
    doc["config"]["vocab_size"] = 1 << 30
    doc["config"]["hidden_size"] = 1 << 10
    (folder / "slimswarm.json").write_text(json.dumps(doc))
    out["slimswarm.json"] = folder
    import gguf

    r = gguf.GGUFReader(str(files["gguf"]))
    t = next(t for t in r.tensors if t.name == "token_embd.weight")
    b = bytearray(files["gguf"].read_bytes())
    dims_at = t.field.offset + 8 + len(t.name) + 4  # name length, name, n_dims, then the dims (uint64 each)
    struct.pack_into("<QQ", b, dims_at, 1 << 20, 1 << 20)
    (root / "huge.gguf").write_bytes(bytes(b))
    out["gguf"] = root / "huge.gguf"
    return out


def test_cli_refuses_files_claiming_2_40_elements_without_allocating(files):
    """Each header claims a 2^40-element tensor (4 TiB as float32): one line each, exit 2, and the process never
    grew past what importing torch costs (~240 MB here; under 512 MiB)."""
    claims = _huge_claims(files, files["root"])
    codes, lines, peak = _cli_runs([["generate", str(p), "hi", "--max-tokens", "1"] for p in claims.values()])
    assert codes == [2] * len(claims) and len(lines) == len(claims), lines
    for line, path in zip(lines, claims.values()):
        assert line.startswith("slimswarm: error: ") and str(path) in line, line
    assert peak < 512 << 20, peak
