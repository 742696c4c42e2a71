"""`awqc chat`: turns that reuse the KV cache answer as a fresh engine does on the whole
conversation; Ctrl-C stops a reply, not the program; driven for real through a pseudo-terminal."""
from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest

from awqc.runtime.chat import ChatSession, chat_loop
from awqc.runtime.engine import Engine, PromptTooLongError
from awqc.runtime.sampling import SamplingParams

GREEDY = SamplingParams()


def _fresh_reply(artifact: Path, messages: list[dict[str, str]], max_new: int) -> str:
    """The reference: a new engine, the whole conversation prefilled from an empty cache."""
    engine = Engine(artifact)
    return engine.decode_text(list(engine.generate(engine.encode_messages(messages), max_new, GREEDY)))


def test_second_turn_reuses_the_cache_and_answers_as_from_scratch(tiny_artifact: Path) -> None:
    session = ChatSession(Engine(tiny_artifact), GREEDY, system="be brief", max_new_tokens=6)
    first = session.reply("the quick brown", lambda s: None)
    assert first == _fresh_reply(tiny_artifact, session.messages[:2], 6)
    second = session.reply("fox jumps", lambda s: None)
    full = session.engine.encode_messages(session.messages[:4])
    assert second == _fresh_reply(tiny_artifact, session.messages[:4], 6)
    assert 0 < session.engine.timing["prefill_tokens"] < len(full) // 2  # only the new turn was computed
    session.reset()
    assert session.engine.length == 0 and session.messages == [{"role": "system", "content": "be brief"}]


def test_interrupt_stops_the_reply_and_keeps_the_part_written(tiny_artifact: Path) -> None:
    session = ChatSession(Engine(tiny_artifact), GREEDY, max_new_tokens=20)
    written: list[str] = []

    def write(piece: str) -> None:
        written.append(piece)
        if len(written) == 3:
            raise KeyboardInterrupt

    answer = session.reply("the quick brown", write)
    assert answer == "".join(written[:2]) and session.messages[-1] == {"role": "assistant", "content": answer}
    assert session.reply("again", lambda s: None) == _fresh_reply(tiny_artifact, session.messages[:4], 20)


def test_loop_commands_and_a_conversation_past_the_window(tiny_artifact: Path) -> None:
    session = ChatSession(Engine(tiny_artifact), GREEDY, max_new_tokens=4)
    lines = iter(["hello", "/stats", "/nope", "word " * 200, "/reset", "/exit", "never read"])
    out: list[str] = []
    chat_loop(session, lambda prompt: next(lines), out.append)
    text = "".join(out)
    assert "prefill" in text and "tok/s" in text
    assert "unknown command /nope" in text
    assert "fills the context window" in text and "/reset" in text
    assert "(conversation forgotten)" in text
    assert next(lines) == "never read"  # /exit ended the loop


def test_session_without_a_chat_template_is_refused(tiny_artifact: Path, tmp_path: Path) -> None:
    engine = Engine(tiny_artifact)
    engine.manifest = {**engine.manifest, "tokenizer": {**engine.manifest["tokenizer"], "chat_template": None}}
    with pytest.raises(ValueError, match="no chat template"):
        ChatSession(engine, GREEDY)


def test_chat_in_a_terminal(tiny_artifact: Path) -> None:
    pexpect = pytest.importorskip("pexpect")
    expected = _fresh_reply(tiny_artifact, [{"role": "user", "content": "the quick brown"}], 6)
    # Started as a shell starts it, with Ctrl-C's default action: a child inherits an ignored SIGINT
    # (some test earlier in the same pytest process leaves it ignored), and Python then installs
    # no KeyboardInterrupt handler, so the Ctrl-C below went unanswered.
    child = pexpect.spawn(sys.executable, ["-m", "awqc.compiler.cli", "chat", str(tiny_artifact), "--temperature", "0",
                                           "--max-new-tokens", "6"], encoding="utf-8", timeout=60,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        child.expect_exact("> ")
        child.sendline("the quick brown")
        child.expect_exact("> ")
        reply = child.before.replace("\r\n", "\n").split("the quick brown\n", 1)[1].strip()
        assert reply == expected.strip()
        child.sendline("/stats")
        child.expect("decode \\d+ tokens at [\\d.]+ tok/s")
        child.sendline("/reset")
        child.expect_exact("(conversation forgotten)")
        child.expect_exact("> ")
        child.sendintr()  # Ctrl-C at the prompt: a new prompt, not an exit
        child.expect_exact("> ")
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
