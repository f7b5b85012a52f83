"""Routers choosing which agent (and which compression level of its model) answers a task: a learned contextual
bandit (LinUCB, or epsilon-greedy per context) maximising accuracy − λ·cost, a fixed-rule router, a prompt router."""

from __future__ import annotations

import re
import threading
import zlib

import numpy as np

from ..errors import SlimswarmError


class KeywordFeatures:
    """Bag of keyword groups: feature i is 1 when any keyword of group i occurs in the text, plus a bias of 1."""

    def __init__(self, groups: dict[str, list[str]]):
        self.names = list(groups)
        self.patterns = [re.compile(r"\b(" + "|".join(re.escape(k.lower()) for k in kws) + r")\b") if kws else None
                         for kws in groups.values()]

    @property
    def dim(self) -> int:
        return len(self.names) + 1

    def __call__(self, text: str) -> np.ndarray:
        t = text.lower()
        return np.array([1.0] + [float(bool(p and p.search(t))) for p in self.patterns])

    def key(self, text: str) -> str:
        """A discrete context: the names of the groups that fire, for per-context value tables."""
        x = self(text)[1:]
        return "+".join(n for n, v in zip(self.names, x) if v) or "none"


class HashedWordFeatures:
    """Word unigrams and bigrams hashed into ``dim`` buckets (CRC32, stable across runs), L2-normalised, plus a bias
    of 1: a context a learned router can separate task kinds with when no keyword list does."""

    WORD = re.compile(r"[a-z0-9']+")

    def __init__(self, dim: int = 256):
        if dim < 1:
            raise SlimswarmError(f"router features: hashed dim {dim} must be >= 1")
        self.dim_words = dim

    @property
    def dim(self) -> int:
        return self.dim_words + 1

    def __call__(self, text: str) -> np.ndarray:
        words = self.WORD.findall(text.lower())
        v = np.zeros(self.dim_words)
        for w in words + [a + " " + b for a, b in zip(words, words[1:])]:
            v[zlib.crc32(w.encode()) % self.dim_words] += 1.0
        n = np.linalg.norm(v)
        return np.concatenate([[1.0], v / n if n else v])

    def key(self, text: str) -> str:
        raise SlimswarmError("router: hashed word features have no discrete contexts; use the bandit (LinUCB) router "
                             "or keyword features with the epsilon router")


class Router:
    """choose(text) -> arm name; update(text, arm, reward) learns (no-op for fixed routers)."""

    def __init__(self, arms: list[str]):
        if not arms:
            raise SlimswarmError("router: no arms to choose from")
        self.arms = list(arms)

    def choose(self, text: str, ctx=None) -> str:
        raise NotImplementedError

    def update(self, text: str, arm: str, reward: float) -> None:
        pass


class LinUCBRouter(Router):
    """Disjoint LinUCB (Li et al. 2010): per arm a ridge regression of reward on features, picking the arm with the
    highest upper confidence bound θ·x + α·sqrt(xᵀA⁻¹x). Ties break to the first arm, so runs are reproducible."""

    def __init__(self, arms: list[str], features, alpha: float = 1.0):
        super().__init__(arms)
        self.features, self.alpha = features, alpha
        d = features.dim
        self.A_inv = [np.eye(d) for _ in arms]  # (I + Σ x xᵀ)⁻¹, kept by Sherman–Morrison: O(d²) a step, no inverse
        self.b = [np.zeros(d) for _ in arms]
        self._lock = threading.Lock()

    def scores(self, text: str) -> np.ndarray:
        x = self.features(text)
        out = []
        for inv, b in zip(self.A_inv, self.b):
            ax = inv @ x
            out.append(float(b @ ax + self.alpha * np.sqrt(max(float(x @ ax), 0.0))))
        return np.array(out)

    def choose(self, text: str, ctx=None) -> str:
        with self._lock:
            return self.arms[int(np.argmax(self.scores(text)))]

    def update(self, text: str, arm: str, reward: float) -> None:
        x = self.features(text)
        i = self.arms.index(arm)
        with self._lock:
            ax = self.A_inv[i] @ x
            self.A_inv[i] -= np.outer(ax, ax) / (1.0 + float(x @ ax))
            self.b[i] += reward * x


class EpsilonGreedyRouter(Router):
    """Per discrete context (which keyword groups fire), a running mean reward per arm; explores with prob. ε."""

    def __init__(self, arms: list[str], features: KeywordFeatures, epsilon: float = 0.1, seed: int = 0):
        super().__init__(arms)
        self.features, self.epsilon = features, epsilon
        self.rng = np.random.default_rng(seed)
        self.value: dict[str, np.ndarray] = {}
        self.count: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()

    def choose(self, text: str, ctx=None) -> str:
        k = self.features.key(text)
        with self._lock:
            n = self.count.get(k)
            if n is None or (n == 0).any():  # try every arm once per context before exploiting
                return self.arms[0 if n is None else int(np.argmin(n))]
            if self.rng.random() < self.epsilon:
                return self.arms[int(self.rng.integers(len(self.arms)))]
            return self.arms[int(np.argmax(self.value[k]))]

    def update(self, text: str, arm: str, reward: float) -> None:
        k = self.features.key(text)
        i = self.arms.index(arm)
        with self._lock:
            v = self.value.setdefault(k, np.zeros(len(self.arms)))
            n = self.count.setdefault(k, np.zeros(len(self.arms)))
            n[i] += 1
            v[i] += (reward - v[i]) / n[i]


class RuleRouter(Router):
    """Fixed rules: the first arm whose keywords occur in the text, else ``default`` (the first arm)."""

    def __init__(self, arms: list[str], rules: dict[str, list[str]], default: str | None = None):
        super().__init__(arms)
        bad = [a for a in list(rules) + ([default] if default else []) if a not in arms]
        if bad:
            raise SlimswarmError(f"router rules: unknown member {bad[0]!r} (members: {', '.join(arms)})")
        self.rules = KeywordFeatures(rules)
        self.order = list(rules)
        self.default = default or arms[0]

    def choose(self, text: str, ctx=None) -> str:
        hits = self.rules(text)[1:]
        return next((a for a, h in zip(self.order, hits) if h), self.default)


class PromptRouter(Router):
    """Asks a model which member should answer (by name or capability), falling back to the first member."""

    def __init__(self, arms: list[str], agent, describe: dict[str, str] | None = None):
        super().__init__(arms)
        self.agent = agent
        self.describe = describe or {}

    def choose(self, text: str, ctx=None) -> str:
        from .answers import find_label

        if ctx is None:
            return self.arms[0]
        menu = "\n".join(f"- {a}: {self.describe.get(a, '')}".rstrip(": ") for a in self.arms)
        reply = ctx.ask(self.agent, f"Which member should handle this task? Answer with one name.\n{menu}\n\n"
                                    f"Task: {text}").content
        return find_label(reply, self.arms) or self.arms[0]


def reward(correct: bool, tokens: int, cost: float, lam: float) -> float:
    """accuracy − λ·cost, cost in units of 1k tokens times the arm's relative price (an int4 model is cheaper)."""
    return float(correct) - lam * cost * tokens / 1000.0
