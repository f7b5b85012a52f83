"""The replayed tokenizer (tokenizers alone, no transformers) gives transformers' ids, text and chat prompts."""

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from slimswarm.models.tokenizer import HFTokenizer, ReplayedTokenizer

SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    """An empty tokenizer cache, so each test sees transformers convert first (in-process: these tests compare the
    replay with that very tokenizer) and the replay load after it."""
    monkeypatch.setenv("SLIMSWARM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("SLIMSWARM_TOKENIZER_CHILD", "0")
    return tmp_path / "cache"


def _texts(data_dir) -> list[str]:
    wiki = (data_dir / "text/wikitext-2-raw-test.txt").read_text(encoding="utf-8")
    gsm = [json.loads(line) for line in (data_dir / "tasks/gsm8k/test.jsonl").read_text().splitlines()[:150]]
    return ([wiki[i : i + 1500] for i in range(0, 150_000, 1500)] + [g["question"] for g in gsm]
            + [g["answer"] for g in gsm]
            + ["", " ", "  two  spaces\t\ttabs\n\nnewlines ", "émoji 🤖 ü ß 中文 ١٢٣", "<|im_start|>user\nhi<|im_end|>",
               "</s> <s> <unk> special-looking text"])


def _chats(data_dir) -> list[list[dict]]:
    gsm = [json.loads(line) for line in (data_dir / "tasks/gsm8k/test.jsonl").read_text().splitlines()[:3]]
    return [
        [{"role": "user", "content": "Hello"}],
        [{"role": "system", "content": "Answer with a number."}, {"role": "user", "content": gsm[0]["question"]},
         {"role": "assistant", "content": gsm[0]["answer"]}, {"role": "user", "content": gsm[1]["question"]}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "x", "name": None}],
        [{"role": "user", "content": gsm[2]["question"]}, {"role": "assistant", "content": "Let me think."},
         {"role": "user", "content": "Go on, {{ not a template }} {% raw %}"}],
    ]


def _assert_same(replayed: ReplayedTokenizer, ref: HFTokenizer, data_dir) -> int:
    """Every answer of ``replayed`` equals transformers' (``ref`` wraps the transformers tokenizer). Returns the
    number of ids compared."""
    assert (replayed.bos_id, replayed.eos_ids, replayed.pad_id, replayed._adds_bos, replayed.vocab_size) == (
        ref.bos_id, ref.eos_ids, ref.pad_id, ref._adds_bos, ref.vocab_size)
    assert replayed.chat_template == ref.chat_template
    n = 0
    for text in _texts(data_dir):
        ids = ref.encode(text)
        assert replayed.encode(text) == ids, text[:80]
        assert replayed.encode(text, bos=True) == ref.encode(text, bos=True)
        assert replayed.encode(text, bos=False) == ref.encode(text, bos=False)
        assert replayed.decode(ids) == ref.decode(ids)
        n += len(ids)
    rng = random.Random(0)
    specials = [i for i in (ref.bos_id, *ref.eos_ids, ref.pad_id, 0) if i is not None]
    for _ in range(200):  # arbitrary ids, special ones among them (skipped on decode)
        ids = [rng.randrange(ref.vocab_size) for _ in range(24)] + rng.sample(specials, len(specials))
        rng.shuffle(ids)
        assert replayed.decode(ids) == ref.decode(ids)
    for chat in _chats(data_dir):
        assert replayed.chat(chat) == ref.chat(chat)
    return n


def test_gguf_tokenizer_is_replayed_with_transformers_answers(own_cache, data_dir):
    from slimswarm.models import gguf
    from slimswarm.models.load import smollm2_gguf_path

    path = smollm2_gguf_path()
    cfg, _ = gguf.open_gguf(path)
    first = gguf.gguf_tokenizer(path, cfg)  # transformers converts the GGUF vocabulary, the cache is written
    assert type(first) is HFTokenizer
    replayed = gguf.gguf_tokenizer(path, cfg)
    assert type(replayed) is ReplayedTokenizer and replayed._hf is None  # transformers not even loaded
    assert replayed.chat_template and "<|im_start|>" in replayed.chat([{"role": "user", "content": "hi"}])
    n = _assert_same(replayed, HFTokenizer(first.hf, cfg.eos_token_id), data_dir)
    assert n > 40_000
    assert replayed.hf.encode("a b", add_special_tokens=False) == replayed.encode("a b", bos=False)  # lazy .hf


def test_hf_folder_tokenizer_is_replayed_with_transformers_answers(own_cache, data_dir, stories):
    """stories260K's LlamaTokenizer: transformers rebuilds its pipeline in Python, the cache holds what it built."""
    from slimswarm.models.hf import read_hf_tokenizer

    folder = data_dir / "models/stories260K/hf"
    cfg = stories.model.config
    first = read_hf_tokenizer(folder, cfg)
    replayed = read_hf_tokenizer(folder, cfg)
    assert type(first) is HFTokenizer and type(replayed) is ReplayedTokenizer
    assert replayed.chat_template is None  # a plain transcript, as HFTokenizer writes it
    _assert_same(replayed, first, data_dir)


def test_folder_without_tokenizer_json_goes_through_transformers(own_cache, smollm2, tmp_path):
    """A GPT-2 style folder (vocab.json + merges.txt, SmolLM2's BPE): no tokenizer.json, so nothing to replay."""
    from slimswarm.models.hf import read_hf_tokenizer

    model = json.loads(smollm2.tokenizer.hf.backend_tokenizer.to_str())["model"]
    folder = tmp_path / "gpt2_style"
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps(model["vocab"]))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(
        m if isinstance(m, str) else " ".join(m) for m in model["merges"]) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GPT2Tokenizer",
                                                              "eos_token": "<|endoftext|>"}))
    for _ in range(2):
        tok = read_hf_tokenizer(folder, smollm2.model.config)
        assert type(tok) is HFTokenizer
    text = "Hello world, how are you?"
    assert tok.encode(text) == tok.hf.encode(text, add_special_tokens=False) == smollm2.tokenizer.encode(text)
    assert not any(own_cache.rglob("replay.json"))


def test_damaged_cache_is_rebuilt(own_cache, data_dir, stories):
    from slimswarm.models.hf import read_hf_tokenizer

    folder = data_dir / "models/stories260K/hf"
    read_hf_tokenizer(folder, stories.model.config)
    (backend,) = own_cache.rglob("replay_backend.json")
    backend.write_text("{not json")
    again = read_hf_tokenizer(folder, stories.model.config)  # falls back to transformers and rewrites the cache
    assert type(again) is HFTokenizer
    replayed = read_hf_tokenizer(folder, stories.model.config)
    assert type(replayed) is ReplayedTokenizer
    assert replayed.encode("Once upon a time") == again.encode("Once upon a time")


def test_chat_template_renderer_matches_transformers_and_keeps_the_sandbox():
    from jinja2.exceptions import SecurityError, TemplateError
    from transformers.utils.chat_template_utils import render_jinja_template

    from slimswarm.models.chat_template import TemplateUnsupported, render_chat

    template = ("{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}"
                "{{ bos_token }}{{ m['role'] | upper }} {{ m['content'] | tojson }}\n"
                "{% if m.reasoning_content is defined %}[{{ m.reasoning_content }}]{% endif %}{% endfor %}"
                "{{ ns.n }}{% if add_generation_prompt %}ASSISTANT{% endif %}")
    messages = [{"role": "user", "content": "<b>&\"é\"</b>"},
                {"role": "assistant", "content": "ok", "thinking": "hmm", "tool_calls": None}]
    special = {"bos_token": "<s>", "eos_token": "</s>"}
    ours = render_chat(template, messages, special)
    (theirs,), _ = render_jinja_template([messages], chat_template=template, add_generation_prompt=True, **special)
    assert ours == theirs and '"<b>&\\"é\\"</b>"' in ours and "[hmm]" in ours
    with pytest.raises(SecurityError):
        render_chat("{% set ns = namespace() %}{% set ns._x = 1 %}", [], {})
    with pytest.raises(TemplateError, match="no system"):
        render_chat("{{ raise_exception('no system') }}", [], {})
    with pytest.raises(TemplateUnsupported):
        render_chat("{% generation %}x{% endgeneration %}", [], {})


def test_generate_on_the_gguf_never_imports_transformers(smollm2):
    """With the tokenizer cache warm (the smollm2 fixture wrote it), `slimswarm generate` runs without transformers."""
    code = ("import sys, runpy; sys.argv = ['slimswarm', 'generate', 'smollm2-135m', 'Hello', '--max-tokens', '4']; "
            "import atexit; atexit.register(lambda: print('MODULES', sorted(m for m in ('transformers', 'pydantic', "
            "'gguf', 'sympy') if m in sys.modules))); runpy.run_module('slimswarm.cli', run_name='__main__')")
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip().splitlines()[-1] == "MODULES []", out.stdout[-500:]


_COLD_LOAD = """
import sys
from slimswarm.models import gguf
from slimswarm.models.hf import read_hf_tokenizer
from slimswarm.models.load import smollm2_gguf_path
from pathlib import Path
p = smollm2_gguf_path()
cfg, _ = gguf.open_gguf(p)
tok = gguf.gguf_tokenizer(p, cfg)
folder = read_hf_tokenizer(Path(sys.argv[1]), None)
print(type(tok).__name__, type(folder).__name__, 'transformers' in sys.modules, tok.encode(sys.argv[2]),
      folder.encode(sys.argv[2]))
"""


def test_first_load_converts_in_a_child_and_never_imports_transformers(tmp_path, smollm2, stories, data_dir):
    """Nothing cached: a child process runs transformers' conversion and writes the cache; the process itself
    replays it and never imports transformers. Same ids as the transformers-backed tokenizers of the fixtures."""
    text = "Once upon a time, 12 émoji 🤖 <|im_start|>"
    env = {**os.environ, "PYTHONPATH": SRC, "SLIMSWARM_CACHE": str(tmp_path / "cache")}
    env.pop("SLIMSWARM_TOKENIZER_CHILD", None)
    out = subprocess.run([sys.executable, "-c", _COLD_LOAD, str(data_dir / "models/stories260K/hf"), text],
                         capture_output=True, text=True, env=env, check=True)
    gguf_type, hf_type, imported, rest = out.stdout.strip().split(" ", 3)
    assert (gguf_type, hf_type, imported) == ("ReplayedTokenizer", "ReplayedTokenizer", "False"), out.stdout
    assert rest == f"{smollm2.tokenizer.hf.encode(text, add_special_tokens=False)} {stories.tokenizer.encode(text)}"
    assert len(list((tmp_path / "cache").rglob("replay.json"))) == 2


def test_a_failed_child_leaves_the_first_load_in_process(own_cache, monkeypatch, smollm2, capsys):
    """The child cannot run (here: it exits 1 at once): the load goes through transformers in-process, as before,
    and writes the cache itself, after one warning line that says why."""
    from slimswarm.models import gguf, tokenizer
    from slimswarm.models.load import smollm2_gguf_path

    monkeypatch.delenv("SLIMSWARM_TOKENIZER_CHILD")
    calls = []
    real_run = subprocess.run

    def failing_run(args, **kw):
        calls.append(args[-2:])
        return real_run([sys.executable, "-c", "raise SystemExit(1)"], **kw)

    monkeypatch.setattr(tokenizer.subprocess, "run", failing_run)
    path = smollm2_gguf_path()
    cfg, _ = gguf.open_gguf(path)
    first = gguf.gguf_tokenizer(path, cfg)
    assert calls == [["gguf", str(path.resolve())]] and type(first) is HFTokenizer
    assert capsys.readouterr().err == ("slimswarm: warning: tokenizer conversion in a child process failed (exit code 1);"
                                       " converting in-process\n")
    assert first.encode("Hello there") == smollm2.tokenizer.encode("Hello there")
    assert type(gguf.gguf_tokenizer(path, cfg)) is ReplayedTokenizer and len(calls) == 1  # cached: no child


def test_warm_tokenizer_command_reports_bad_input(tmp_path):
    env = {**os.environ, "PYTHONPATH": SRC, "SLIMSWARM_CACHE": str(tmp_path / "cache")}
    bad = subprocess.run([sys.executable, "-m", "slimswarm.models.warm_tokenizer", "gguf", str(tmp_path / "none.gguf")],
                         capture_output=True, text=True, env=env)
    assert bad.returncode == 1 and "none.gguf" in bad.stderr and bad.stderr.count("\n") == 1
    usage = subprocess.run([sys.executable, "-m", "slimswarm.models.warm_tokenizer"], capture_output=True, text=True,
                           env=env)
    assert usage.returncode == 2 and usage.stderr.startswith("usage:")
