"""Calibration and evaluation text, and cutting text into token windows.

The default texts come from Debian packages (installed by scripts/setup.sh). Calibration reads two
texts, half of the samples from each, so the statistics are not those of one kind of text (AWQ's
reference calibrates on the Pile for the same reason): the Python library reference
(python3.11-doc, `library/`), and English prose of every kind from Debian's fortunes package
(quotations, literature, politics, people, songs and poems, ...), without the four files that
quote the Jargon File (computers, cookie, definitions, science) and the ASCII art. Evaluation reads the
Python tutorial, FAQ and HOWTOs (python3.11-doc `tutorial/`, `faq/`, `howto/`). The files are
disjoint, so a model is never evaluated on the text it was calibrated on.

A second evaluation domain of another kind, English prose that is not documentation: the Jargon
File (Debian's jargon-text, `jargon.txt.gz`), the lexicon of hacker slang with its usage notes
and anecdotes, from its first entry on (the table of contents is left out). Nothing calibrates
on it.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, Sequence

DOC_PACKAGE = "python3.11-doc"
DOC_ROOT = Path("/usr/share/doc/python3.11/html/_sources")
CALIBRATION_DIRS = ("library",)
EVAL_DIRS = ("tutorial", "faq", "howto")
FORTUNES_PACKAGE = "fortunes"
FORTUNES_ROOT = Path("/usr/share/games/fortunes")
FORTUNES_LEFT_OUT = ("computers", "cookie", "definitions", "science", "art", "ascii-art")
JARGON_PACKAGE = "jargon-text"
JARGON_FILE = Path("/usr/share/doc/jargon-text/jargon.txt.gz")


class TextError(ValueError):
    """A text is missing or too short for what was asked; the message names the minimum."""


def _read_dirs(dirs: Sequence[str], root: Path = DOC_ROOT) -> str:
    files = [f for d in dirs for f in sorted((root / d).glob("**/*.rst.txt"))]
    if not files:
        raise TextError(
            f"no default text under {root} ({', '.join(dirs)}); install it with "
            f"`apt-get install -y {DOC_PACKAGE}` or pass your own text file")
    return "\n\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)


def default_calibration_text() -> str:
    """The Python library reference (python3.11-doc: library/)."""
    return _read_dirs(CALIBRATION_DIRS)


def fortunes_prose(root: Path = FORTUNES_ROOT) -> str:
    """The fortunes package's English texts (UTF-8 files), one after another, each fortune a
    paragraph; FORTUNES_LEFT_OUT are left out."""
    files = [f for f in sorted(root.glob("*.u8")) if f.stem not in FORTUNES_LEFT_OUT]
    if not files:
        raise TextError(f"no fortunes under {root}; install them with `apt-get install -y {FORTUNES_PACKAGE}`")
    return "\n\n".join(re.sub(r"(?m)^%\n", "\n", f.read_text(encoding="utf-8", errors="replace")) for f in files)


def default_calibration_texts() -> list[str]:
    """The default calibration texts, each giving an equal share of the samples."""
    return [default_calibration_text(), fortunes_prose()]


def default_eval_text() -> str:
    """The Python tutorial, FAQ and HOWTOs (python3.11-doc: tutorial/, faq/, howto/)."""
    return _read_dirs(EVAL_DIRS)


def jargon_text(path: Path = JARGON_FILE) -> str:
    """The Jargon File's entries (jargon-text), from the first `:entry:` heading on."""
    import gzip

    if not path.is_file():
        raise TextError(f"{path} is missing; install it with `apt-get install -y {JARGON_PACKAGE}`")
    body = gzip.decompress(path.read_bytes()).decode("utf-8", errors="replace")
    start = body.find("\n   :")
    return body[start + 1:] if start >= 0 else body


def faq_questions(root: Path = DOC_ROOT) -> list[str]:
    """The questions of the Python FAQ (python3.11-doc: faq/), in file order: every section title that
    ends in "?". They are the prompts of the chat check (evaluate.chat_windows)."""
    files = sorted((root / "faq").glob("*.rst.txt"))
    if not files:
        raise TextError(f"no Python FAQ under {root / 'faq'}; install it with `apt-get install -y {DOC_PACKAGE}`")
    questions = []
    for f in files:
        lines = f.read_text(encoding="utf-8", errors="replace").splitlines()
        for title, rule in zip(lines, lines[1:]):
            title = title.strip()
            if title.endswith("?") and len(rule) >= 3 and len(set(rule)) == 1 and rule[0] in "=-~^":
                questions.append(title)
    return questions


EVAL_DOMAINS: dict[str, Callable[[], str]] = {"python-docs": default_eval_text, "jargon": jargon_text}


def eval_domain_text(domain: str) -> str:
    if domain not in EVAL_DOMAINS:
        raise TextError(f"unknown evaluation domain {domain!r}; known: {', '.join(EVAL_DOMAINS)}")
    return EVAL_DOMAINS[domain]()


def read_text(path: str | Path) -> str:
    p = Path(path)
    if not p.is_file():
        raise TextError(f"text file {p} does not exist")
    return p.read_text(encoding="utf-8", errors="replace")


def tokenize(encode: Callable[[str], list[int]], text: str, chunk_chars: int = 1 << 16) -> list[int]:
    """Token ids of `text`, encoded in paragraph-aligned chunks (a tokenizer on one 7 MB string is
    slow and warns about the model's maximum length)."""
    ids: list[int] = []
    start = 0
    while start < len(text):
        end = min(len(text), start + chunk_chars)
        if end < len(text):  # cut at a paragraph break so no word is split between chunks
            cut = text.rfind("\n\n", start, end)
            end = cut + 2 if cut > start else end
        ids.extend(encode(text[start:end]))
        start = end
    return ids


def token_windows(ids: Sequence[int], length: int, count: int | None, what: str = "text",
                  hint: str = "", unit: str = "sample") -> list[list[int]]:
    """`count` non-overlapping windows of `length` tokens, spread evenly over `ids` (all of them when
    count is None). Fewer windows than asked when the text is short; an error when not even one fits."""
    if length < 2:
        raise TextError(f"a window needs at least 2 tokens, got {length}")
    available = len(ids) // length
    if available < 1:
        raise TextError(
            f"the {what} has {len(ids)} tokens, shorter than one {unit} of {length} tokens; "
            f"give at least {length} tokens of text{hint}")
    n = available if count is None else min(count, available)
    # Window i starts at the i-th of n evenly spaced slots among the `available` aligned ones.
    starts = [(i * available // n) * length for i in range(n)]
    return [list(ids[s:s + length]) for s in starts]
