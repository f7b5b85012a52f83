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


def normalize_label(label: str) -> str:
    return label.strip().lower()


def is_number(s) -> bool:
    return s is not None and bool(re.fullmatch(r"-?[\d,]*\d(?:\.\d+)?", str(s).strip()))


def dataset_label_names() -> dict[str, str]:
    """Data sets' own label names (lower case) → the answer labels agents give: AG News's "Sci/Tech" is "tech"."""
    from ..tasks import AGNEWS_NAMES

    return {k.lower(): v for k, v in AGNEWS_NAMES.items()}


class Extractor:
    """Turns a reply into an answer: the final number when the expected answer is one (or ``number`` is set),
    else a label from ``labels``, else the stripped text.

    A data set's own label names count as the answer label they mean, in replies and in ``expected``
    (``dataset_label_names``: a task whose ``expected`` is AG News's "Sci/Tech" is answered by "tech")."""

    def __init__(self, labels: list[str] | None = None, number: bool = False, aliases: dict[str, str] | None = None):
        self.labels = list(labels or [])
        self.number = number
        known = {normalize_label(lab) for lab in self.labels}
        names = dataset_label_names() if aliases is None else {k.lower(): v for k, v in aliases.items()}
        # only names that point at one of our labels and are not themselves a label
        self.aliases = {k: v for k, v in names.items() if normalize_label(v) in known and k not in known}

    def canonical(self, label: str) -> str:
        """``label``, or the answer label it names (a data set's own label name)."""
        low = normalize_label(label)
        target = self.aliases.get(low)
        if target is None:
            return label
        return next(lab for lab in self.labels if normalize_label(lab) == normalize_label(target))

    def __call__(self, text: str | None, expected=None) -> str | None:
        if text is None:
            return None
        if self.number or (expected is not None and is_number(expected)):
            return final_number(text)
        if self.labels:
            lab = find_label(text, self.labels + list(self.aliases))
            lab = None if lab is None else self.canonical(lab)
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
        return normalize(got) == normalize(self.canonical(str(expected)) if self.labels else str(expected))
