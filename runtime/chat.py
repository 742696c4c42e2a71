"""A multi-turn chat with one artifact: the conversation is rendered with the model's chat
template every turn, and only the tokens after what the KV cache already holds are prefilled.

Commands at the prompt: /reset (forget the conversation), /stats (the last reply's prefill and
decode speed), /exit (or Ctrl-D). Ctrl-C during a reply stops it (what was written so far stays in
the conversation); at the prompt it only clears the line."""
from __future__ import annotations

from typing import Callable, Sequence

from .engine import Engine, PromptTooLongError
from .sampling import SamplingParams

HELP = "commands: /reset forgets the conversation, /stats shows the last reply's speed, /exit (or Ctrl-D) quits"


class ChatSession:
    def __init__(self, engine: Engine, sampling: SamplingParams, system: str | None = None,
                 max_new_tokens: int | None = None, stop: Sequence[str] = ()):
        engine.encode_messages([{"role": "user", "content": ""}])  # no chat template: say so now
        self.engine, self.sampling, self.system, self.stop = engine, sampling, system, stop
        self.max_new_tokens = max_new_tokens or engine.context_window
        self.messages: list[dict[str, str]] = []
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.engine.reset()

    def reply(self, text: str, write: Callable[[str], object]) -> str:
        """The assistant's answer to `text`, written as it forms. A KeyboardInterrupt stops it: the
        part written so far becomes the answer, and the interrupt is not raised."""
        ids = self.engine.encode_messages(self.messages + [{"role": "user", "content": text}])
        if len(ids) >= self.engine.context_window:
            raise PromptTooLongError(f"the conversation is {len(ids)} tokens, which fills the context window of "
                                     f"{self.engine.context_window}; /reset to start over")
        parts: list[str] = []

        def emit(piece: str) -> None:
            write(piece)
            parts.append(piece)

        try:
            self.engine.stream_text(ids, self.max_new_tokens, self.sampling, emit, self.stop, reuse_cache=True)
        except KeyboardInterrupt:
            pass
        answer = "".join(parts)
        self.messages += [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]
        return answer

    def stats(self) -> str:
        t = self.engine.timing
        pp = t["prefill_tokens"] / t["prefill_s"] if t["prefill_s"] else 0.0
        tg = t["decode_tokens"] / t["decode_s"] if t["decode_s"] else 0.0
        return (f"last reply: prefill {t['prefill_tokens']} tokens at {pp:.1f} tok/s, decode {t['decode_tokens']} "
                f"tokens at {tg:.1f} tok/s; {self.engine.length} of {self.engine.context_window} context tokens used")


def chat_loop(session: ChatSession, read: Callable[[str], str], write: Callable[[str], object]) -> None:
    """Read a line, answer it, until /exit or end of input. `read` is input() in a terminal."""
    write(HELP + "\n")
    while True:
        try:
            line = read("> ")
        except EOFError:
            write("\n")
            return
        except KeyboardInterrupt:
            write("\n")
            continue
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return
        if line == "/reset":
            session.reset()
            write("(conversation forgotten)\n")
        elif line == "/stats":
            write(session.stats() + "\n")
        elif line.startswith("/"):
            write(f"unknown command {line.split()[0]}; {HELP}\n")
        else:
            try:
                session.reply(line, write)
            except PromptTooLongError as err:
                write(f"{err}\n")
                continue
            write("\n")
