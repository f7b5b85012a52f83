"""Agents layer: a function-calling set over the built-in tools (calculator, lookup, word_count), rendered with the
server's tool template, with a train / held-out split that shares no question template and no argument values.

How it is made:

- every example is one user question that one tool answers; the prompt lists all three tools (``Tool.spec()``, as
  an agent or an OpenAI client sends them) and is rendered by ``plan_chat`` and the model's chat template exactly as
  ``slimswarm serve`` renders a request with ``tools`` (system prompt with ``<tools>``, then the user turn);
- the target is the call as the tool grammar writes it (``render_call``: ``<tool_call>\\n{"name": ..., "arguments":
  {...}}\\n</tool_call>``), then end-of-turn; only those tokens carry the loss (``encode_pairs``);
- question templates: 6 per tool for training, 3 or 4 other ones per tool held out (``TEMPLATES``);
- values: calculator operands a in 2..999, b in 2..99 with + - * /, split by a CRC32 of (a, op, b): a quarter held
  out; lookup keys: every third fact of ``FACTS`` (sorted, 5 of 16) held out; word_count texts: 3-8 words drawn from two
  disjoint word lists;
- a held-out example therefore has a template the training set never used AND values it never saw;
- prompts that need no tool (``CHAT_TEMPLATES`` x ``TOPICS``, split the same way) are mixed in, with the base
  model's own reply as target, so the specialist still answers in text under ``tool_choice: auto``;
- in training, tools are listed in a shuffled order half the time and a short system prompt is prepended a third
  of the time (the held-out prompts: canonical order, no system prompt), so the adapter does not learn one layout.
"""

from __future__ import annotations

import json
import random
import zlib
from dataclasses import dataclass

from .tools import FACTS, calculator, lookup, word_count

TOOL_FUNCS = (calculator, lookup, word_count)
SPLITS = ("train", "held_out")

OPS = {"+": ["plus"], "-": ["minus"], "*": ["times", "multiplied by"], "/": ["divided by"]}
TEMPLATES = {
    "calculator": {
        "train": ["What is {a} {op} {b}?", "Calculate {a} {op} {b}.", "Please compute {a} {op} {b} for me.",
                  "I need the result of {a} {op} {b}.", "Use the calculator: {a} {op} {b}", "How much is {a} {op} {b}?"],
        "held_out": ["Can you work out {a} {op} {b}?", "Tell me what {a} {op} {b} equals.",
                     "Find the value of {a} {op} {b}."],
    },
    "lookup": {
        "train": ["How many {key}?", "Look up the number of {key}.", "I forgot how many {key}. Can you check?",
                  "Find out how many {key}.", "What is the number of {key}?", "Tell me how many {key}."],
        "held_out": ["Do you know how many {key}?", "Check this fact for me: {key}.", "Quick question: how many {key}?",
                     "Remind me how many {key}."],
    },
    "word_count": {
        "train": ['How many words are in this text: "{text}"', 'Count the words in "{text}".', "Word count of: {text}",
                  "Please count how many words this sentence has: {text}", 'Count words: "{text}"',
                  'How many words does "{text}" have?'],
        "held_out": ['Tell me the number of words in "{text}".', 'How long is "{text}" in words?',
                     'Give me the word count for the phrase "{text}".'],
    },
}
WORDS = {
    "train": ("apple river stone cloud window garden music paper silver orange tiger bridge candle forest lemon "
              "rocket pencil meadow castle harbor summer violin basket marble").split(),
    "held_out": "planet copper dragon island mirror pepper thunder valley cotton falcon glacier lantern".split(),
}
# prompts no tool answers: the target is the base model's own reply (tools in its prompt), so the adapter learns
# when not to call as well as how to call
CHAT_TEMPLATES = {
    "train": ["Write a short poem about {topic}.", "Describe {topic} in one sentence.",
              "Give me a title for a story about {topic}.", "Tell me something nice about {topic}.",
              "Why do people like {topic}?", "Write a friendly greeting that mentions {topic}."],
    "held_out": ["Write a haiku about {topic}.", "Suggest a name for a song about {topic}.",
                 "Say one kind thing about {topic}."],
}
TOPICS = {"train": ["the sea", "autumn", "a small dog", "coffee", "the mountains", "an old library", "rain", "music",
                    "a birthday party", "the city at night", "gardens", "trains"],
          "held_out": ["owls", "a sunset", "the desert", "snow", "a lighthouse", "tea"]}
SYSTEM_PROMPTS = ["You are a helpful assistant.", "Use a tool when it helps.",
                  "You are a helpful AI assistant. Solve tasks using your tools."]


@dataclass(frozen=True)
class ToolExample:
    question: str
    tool: str | None  # None: a prompt no tool answers
    arguments: dict
    want: object  # what the tool returns for the right arguments
    template: str  # "tool:split:index" into TEMPLATES[tool][split]
    values: tuple  # the drawn values; (template, values) identifies the example


def tool_specs() -> list[dict]:
    """The OpenAI ``tools`` entries of the built-in tools, as an Agent sends them."""
    from .agent import Tool

    return [Tool(f).spec() for f in TOOL_FUNCS]


def _calc_split(a: int, sym: str, b: int) -> str:
    return "held_out" if zlib.crc32(f"{a}{sym}{b}".encode()) % 4 == 0 else "train"


def lookup_keys(split: str) -> list[str]:
    keys = sorted(FACTS)
    return [k for i, k in enumerate(keys) if (i % 3 == 1) == (split == "held_out")]


def _draw(tool: str, split: str, rng: random.Random) -> tuple[tuple, dict, dict, object]:
    """(values, template fields, arguments, expected result) for one example of ``tool`` in ``split``."""
    if tool == "calculator":
        while True:
            a, b, sym = rng.randint(2, 999), rng.randint(2, 99), rng.choice(list(OPS))
            if _calc_split(a, sym, b) == split:
                break
        expr = f"{a} {sym} {b}"
        return (a, sym, b), {"a": a, "b": b, "op": rng.choice(OPS[sym])}, {"expression": expr}, calculator(expr)
    if tool == "lookup":
        key = rng.choice(lookup_keys(split))
        return (key,), {"key": key}, {"key": key}, lookup(key)
    text = " ".join(rng.sample(WORDS[split], rng.randint(3, 8)))
    return (text,), {"text": text}, {"text": text}, word_count(text)


def tool_call_set(split: str, n: int, seed: int = 0) -> list[ToolExample]:
    """``n`` examples of ``split`` (tools in turn, templates and values drawn with ``seed``); held-out ones are
    distinct, training ones may repeat a lookup (11 keys x 6 templates), seen then in another prompt layout."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: expected one of {SPLITS}")
    rng = random.Random(f"{split}-{seed}")
    names = [f.__name__ for f in TOOL_FUNCS]
    out, seen, tries = [], set(), 0
    while len(out) < n:
        tries += 1
        if tries > 100 * n:
            raise ValueError(f"cannot draw {n} distinct {split} examples")
        tool = names[len(out) % len(names)]
        k = rng.randrange(len(TEMPLATES[tool][split]))
        values, fields, args, want = _draw(tool, split, rng)
        ident = (f"{tool}:{split}:{k}", values)
        if ident in seen and split == "held_out":
            continue
        seen.add(ident)
        out.append(ToolExample(TEMPLATES[tool][split][k].format(**fields), tool, args, want, ident[0], values))
    return out


def chat_set(split: str, n: int, seed: int = 0) -> list[ToolExample]:
    """``n`` prompts of ``split`` that need no tool (``tool`` None); held-out ones distinct, with their own
    templates and topics."""
    rng = random.Random(f"chat-{split}-{seed}")
    out, seen = [], set()
    for _ in range(100 * n):
        if len(out) == n:
            return out
        k, topic = rng.randrange(len(CHAT_TEMPLATES[split])), rng.choice(TOPICS[split])
        ident = (f"chat:{split}:{k}", (topic,))
        if ident in seen and split == "held_out":
            continue
        seen.add(ident)
        out.append(ToolExample(CHAT_TEMPLATES[split][k].format(topic=topic), None, {}, None, *ident))
    raise ValueError(f"cannot draw {n} distinct {split} chat prompts")


def prompt_messages(ex: ToolExample, rng: random.Random | None = None) -> tuple[list[dict], list[dict]]:
    """(messages, tools) of the request for ``ex``; with ``rng`` (training) the layout varies."""
    tools = tool_specs()
    messages = [{"role": "user", "content": ex.question}]
    if rng is not None:
        if rng.random() < 0.5:
            rng.shuffle(tools)
        if rng.random() < 1 / 3:
            messages.insert(0, {"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    return messages, tools


def target_text(ex: ToolExample) -> str:
    """The assistant's reply: the call as the tool grammar writes it."""
    from ..engine.tools import render_call

    return render_call(ex.tool, json.dumps(ex.arguments))


def training_pairs(tokenizer, examples: list[ToolExample], seed: int = 0, vary: bool = True) -> list[tuple[str, str]]:
    """(prompt text, target text) pairs for ``finetune_lora``: the prompt as the server renders it."""
    from ..engine.chat_plan import plan_chat

    rng = random.Random(seed) if vary else None
    out = []
    for ex in examples:
        messages, tools = prompt_messages(ex, rng)
        plan = plan_chat(messages, tools, "auto")
        out.append((tokenizer.chat(plan.messages), target_text(ex)))
    return out
