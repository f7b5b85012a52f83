"""Answer extraction for scoring and voting: a label from a configured set, or the final number (GSM8K)."""

from __future__ import annotations

import re

_NUM = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_number(text: str) -> str | None:
    """The last number in ``text`` (GSM8K style: after '####' when present), without separators or a trailing .0."""
    if text is None:
        return None
    if "####" in text:
        text = text.rsplit("####", 1)[1]
    nums = _NUM.findall(text)
    if not nums:
        return None
    n = nums[-1].replace(",", "")
    if "." in n:
        n = n.rstrip("0").rstrip(".")
    return n


def find_label(text: str, labels: list[str]) -> str | None:
    """The label that appears first in ``text`` (whole word, any case); longer labels win at the same place."""
    if text is None:
        return None
    best = None
    for lab in sorted(labels, key=len, reverse=True):
        m = re.search(r"(?<![\w/])" + re.escape(lab.lower()) + r"(?![\w/])", text.lower())
        if m and (best is None or m.start() < best[0]):
            best = (m.start(), lab)
    return None if best is None else best[1]


def is_number(s) -> bool:
    return s is not None and bool(re.fullmatch(r"-?[\d,]*\d(?:\.\d+)?", str(s).strip()))


class Extractor:
    """Turns a reply into an answer: the final number when the expected answer is one (or ``number`` is set),
    else a label from ``labels``, else the stripped text."""

    def __init__(self, labels: list[str] | None = None, number: bool = False):
        self.labels = list(labels or [])
        self.number = number

    def __call__(self, text: str | None, expected=None) -> str | None:
        if text is None:
            return None
        if self.number or (expected is not None and is_number(expected)):
            return final_number(text)
        if self.labels:
            lab = find_label(text, self.labels)
            # while voting the expected answer is unknown: a mixed task set may hold math questions too
            return lab if lab is not None or expected is not None else final_number(text)
        return text.strip()

    def correct(self, text: str | None, expected) -> bool:
        from .voting import normalize

        got = self(text, expected)
        if got is None or expected is None:
            return False
        if is_number(expected):
            return got == final_number(str(expected))
        return normalize(got) == normalize(str(expected))
