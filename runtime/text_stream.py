"""Generated tokens → text as it forms: whole characters only, held back while it may still be the
start of a stop string, and ended before the first stop string."""
from __future__ import annotations

from typing import Callable, Sequence


class TextStream:
    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = ()):
        self.decode, self.stop = decode, [s for s in stop if s]
        self.tokens: list[int] = []
        self.shown = ""
        self.stopped = False  # a stop string was reached
        self._hold = max((len(s) for s in self.stop), default=1) - 1  # characters that may start one

    def feed(self, token: int) -> str:
        """The text that became final with this token ('' while it may still change)."""
        self.tokens.append(token)
        text = self.decode(self.tokens)
        hits = [i for i in (text.find(s, max(len(self.shown) - len(s), 0)) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            return self._show(text, min(hits))
        if text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            return ""
        return self._show(text, len(text) - self._hold if self.stop else len(text))

    def finish(self) -> str:
        """What is left to show when generation ends without a stop string."""
        return "" if self.stopped else self._show(self.decode(self.tokens), None)

    def _show(self, text: str, end: int | None) -> str:
        end = len(text) if end is None else end
        if end <= len(self.shown):
            return ""
        piece = text[len(self.shown):end]
        self.shown = text[:end]
        return piece
