"""Chat templates render in jinja2's sandbox: real templates give transformers' text, hostile ones
(from a checkpoint or an edited manifest) are refused without running anything."""
from __future__ import annotations

import json
import shutil
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import pytest

from awqc.compiler.cli import main
from awqc.runtime.artifact import ArtifactError
from awqc.runtime.chat_template import ChatTemplateError, check_chat_template, compile_chat_template, render_chat

LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}"
          "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
          "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
          "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
          "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
MISTRAL = ("{{ bos_token }}{% for message in messages %}"
           "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
           "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
           "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
           "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
           "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}")
# Block tags on their own lines (trim_blocks/lstrip_blocks), tojson with its options, loop controls,
# namespace, dict, and tools, which transformers passes as None
TOOLS_JSON = """{%- set ns = namespace(turns=0) %}
{%- if tools %}
<|tools|>{{ tools | tojson }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == 'system' %}
<|system|>{{ message.content | tojson }}
        {%- continue %}
    {%- endif %}
    {%- set ns.turns = ns.turns + 1 %}
    {% if message.role == 'user' %}
<|user|>{{ message | tojson(indent=2, sort_keys=True) }}
    {% else %}
<|assistant|>{{ dict(text=message.content, turn=ns.turns) | tojson(separators=(',', ':')) }}
    {% endif %}
    {%- if loop.index > 6 %}{% break %}{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}
<|assistant|>{{ strftime_now('%Y') }}
{%- endif %}"""

ONE_TURN = [{"role": "user", "content": "  What is 2+2? ✓ <b>&</b>  "}]
MULTI_TURN = [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "Hi! How can I help?"},
              {"role": "user", "content": "Tell me a joke — in français, s'il te plaît."}]
WITH_SYSTEM = [{"role": "system", "content": "You are terse."}, *MULTI_TURN]

HOSTILE = {
    "cycler-globals": "{{ cycler.__init__.__globals__.os.system('touch ' ~ marker) }}",
    "subclasses": ("{% for c in ''.__class__.__mro__[1].__subclasses__() %}{% if c.__name__ == 'Popen' %}"
                   "{{ c(['touch', marker]) }}{% endif %}{% endfor %}"),
    "template-context": ("{{ self._TemplateReference__context.cycler.__init__.__globals__.os"
                         ".system('touch ' ~ marker) }}"),
}


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_ckpt: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_ckpt))


@pytest.fixture(scope="module")
def default_tokenizer() -> Any:
    from transformers import AutoTokenizer

    from awqc.compiler.model_import import default_model_path

    p = default_model_path()
    return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)


def ours(tok: Any, template: str, messages: list[dict[str, str]]) -> str:
    return render_chat(template, messages, "test", add_generation_prompt=True, bos_token=tok.bos_token,
                       eos_token=tok.eos_token)


def theirs(tok: Any, template: str, messages: list[dict[str, str]]) -> str:
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, chat_template=template)


def hostile(payload: str, marker: Path) -> str:
    """The payload with the marker path spliced in as a string literal."""
    return payload.replace("marker", json.dumps(str(marker)))


def compile_cli(ckpt: Path, out: Path) -> int:
    return main(["compile", "--model", str(ckpt), "--target", "host", "-o", str(out), "--context-window", "64"])


def assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")], "temporary left behind"


def checkpoint_with_template(tiny_ckpt: Path, dest: Path, template: str) -> Path:
    """A copy of the tiny checkpoint whose tokenizer carries `template`. save_pretrained writes it to
    chat_template.jinja; tokenizer_config.json's "chat_template" is set too, in case a version reads that."""
    shutil.copytree(tiny_ckpt, dest)
    assert (dest / "chat_template.jinja").is_file()
    (dest / "chat_template.jinja").write_text(template)
    cfg_path = dest / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = template
    cfg_path.write_text(json.dumps(cfg))
    return dest


# -- real templates render as transformers renders them ------------------------------------------
@pytest.mark.parametrize("template", [LLAMA3, CHATML, MISTRAL, TOOLS_JSON], ids=["llama3", "chatml", "mistral", "tojson"])
@pytest.mark.parametrize("messages", [ONE_TURN, MULTI_TURN], ids=["one-turn", "multi-turn"])
def test_same_text_as_transformers(hf_tokenizer: Any, template: str, messages: list[dict[str, str]]) -> None:
    assert ours(hf_tokenizer, template, messages) == theirs(hf_tokenizer, template, messages)


@pytest.mark.parametrize("template", [LLAMA3, CHATML, TOOLS_JSON], ids=["llama3", "chatml", "tojson"])
def test_system_message_same_as_transformers(hf_tokenizer: Any, template: str) -> None:
    text = ours(hf_tokenizer, template, WITH_SYSTEM)
    assert text == theirs(hf_tokenizer, template, WITH_SYSTEM)
    assert "You are terse." in text


def test_tojson_helpers(hf_tokenizer: Any) -> None:
    text = ours(hf_tokenizer, TOOLS_JSON, ONE_TURN)
    assert "✓ <b>&</b>" in text  # not ASCII-escaped, not HTML-escaped (Jinja's own tojson would do both)
    assert '\n  "content"' in text  # indent=2
    assert text.endswith(str(datetime.now().year))  # strftime_now
    tools = [{"name": "add", "parameters": {"a": "int"}}]
    rendered = render_chat(TOOLS_JSON, ONE_TURN, "test", tools=tools)
    assert rendered == hf_tokenizer.apply_chat_template(ONE_TURN, tools=tools, tokenize=False,
                                                        add_generation_prompt=True, chat_template=TOOLS_JSON)
    assert '<|tools|>[{"name": "add"' in rendered


def test_no_generation_prompt(hf_tokenizer: Any) -> None:
    text = render_chat(CHATML, MULTI_TURN, "test", add_generation_prompt=False)
    assert text == hf_tokenizer.apply_chat_template(MULTI_TURN, tokenize=False, add_generation_prompt=False,
                                                    chat_template=CHATML)
    assert not text.endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("messages", [ONE_TURN, WITH_SYSTEM], ids=["one-turn", "system"])
def test_default_model_template(default_tokenizer: Any, messages: list[dict[str, str]]) -> None:
    template = default_tokenizer.chat_template
    assert isinstance(template, str) and "im_start" in template
    assert ours(default_tokenizer, template, messages) == theirs(default_tokenizer, template, messages)


def test_compiled_template_is_sandboxed() -> None:
    compiled = compile_chat_template(CHATML, "test")
    assert isinstance(compiled.environment, jinja2.sandbox.ImmutableSandboxedEnvironment)
    assert compile_chat_template(CHATML, "other") is compiled  # cached by the text alone


# -- raise_exception and broken templates ----------------------------------------------------------
def test_raise_exception_carries_message() -> None:
    with pytest.raises(ChatTemplateError, match="Conversation roles must alternate") as info:
        render_chat(MISTRAL, WITH_SYSTEM, "/models/mistral/manifest.json")
    assert "/models/mistral/manifest.json" in str(info.value)
    with pytest.raises(ChatTemplateError, match="Only user and assistant roles are supported!"):
        render_chat(MISTRAL, [{"role": "user", "content": "hi"}, {"role": "tool", "content": "4"}], "test")


def test_syntax_error_names_source_and_line() -> None:
    with pytest.raises(ChatTemplateError, match=r"chat template in /a/manifest.json has a syntax error at line 2"):
        compile_chat_template("ok\n{% for m in messages %}{{ m }", "/a/manifest.json")


@pytest.mark.parametrize("template", ["{{ messages[0].content + 3 }}", "{{ range(10 ** 9) | list }}",
                                      "{{ undefined_thing.attribute }}"])
def test_render_failure_is_chat_template_error(template: str) -> None:
    with pytest.raises(ChatTemplateError, match="the chat template in src failed while rendering"):
        render_chat(template, ONE_TURN, "src")


def test_cannot_modify_messages() -> None:
    messages = [{"role": "user", "content": "hi"}]
    for template in ["{{ messages.append(1) }}", "{{ messages[0].update(role='system') }}",
                     "{{ dict.update(messages[0], role='system') }}"]:
        with pytest.raises(ChatTemplateError):
            render_chat(template, messages, "src")
    assert messages == [{"role": "user", "content": "hi"}]


# -- hostile templates are refused, nothing runs -----------------------------------------------------
@pytest.mark.parametrize("payload", list(HOSTILE.values()), ids=list(HOSTILE))
def test_hostile_template_refused_directly(tmp_path: Path, payload: str) -> None:
    marker = tmp_path / "pwned"
    with pytest.raises(ChatTemplateError, match="tried to access unsafe attributes and was refused") as info:
        render_chat(hostile(payload, marker), ONE_TURN, "/x/manifest.json")
    assert "/x/manifest.json" in str(info.value) and "nothing was run" in str(info.value)
    with pytest.raises(ChatTemplateError, match="the chat template of /ckpt"):
        check_chat_template(hostile(payload, marker), "/ckpt", "<s>", "</s>")
    assert not marker.exists()


@pytest.mark.parametrize("payload", list(HOSTILE.values()), ids=list(HOSTILE))
def test_hostile_checkpoint_template_fails_compile(tmp_path: Path, capsys: pytest.CaptureFixture, tiny_ckpt: Path,
                                                   payload: str) -> None:
    marker = tmp_path / "pwned"
    ckpt = checkpoint_with_template(tiny_ckpt, tmp_path / "ckpt", hostile(payload, marker))
    out = tmp_path / "out"
    assert compile_cli(ckpt, out) == 2
    err = capsys.readouterr().err
    assert f"the chat template of {ckpt}" in err and "unsafe" in err
    assert not marker.exists()
    assert_nothing_written(out)


def test_syntax_error_checkpoint_template_fails_compile(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                        tiny_ckpt: Path) -> None:
    ckpt = checkpoint_with_template(tiny_ckpt, tmp_path / "ckpt", "{% for m in messages %}{{ m['content'] }}")
    out = tmp_path / "out"
    assert compile_cli(ckpt, out) == 2
    err = capsys.readouterr().err
    assert "syntax error" in err and str(ckpt) in err
    assert_nothing_written(out)


def test_hostile_template_in_edited_manifest(tmp_path: Path, tiny_artifact: Path) -> None:
    from awqc.runtime.engine import Engine

    marker = tmp_path / "pwned"
    art = tmp_path / "art"
    shutil.copytree(tiny_artifact, art)
    path = art / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["tokenizer"]["chat_template"] = hostile(HOSTILE["cycler-globals"], marker)
    if "manifest_sha256" in manifest:
        # Reseal it, as whoever hands over a whole hostile artifact can: the sandbox must hold on its own
        from awqc.runtime import artifact

        manifest["manifest_sha256"] = artifact.manifest_digest(manifest)
    path.write_text(json.dumps(manifest, indent=2))
    with pytest.raises((ChatTemplateError, ArtifactError)) as info:
        Engine(art).encode_chat("hi")
    if isinstance(info.value, ChatTemplateError):
        assert f"{art}/manifest.json" in str(info.value) and "unsafe" in str(info.value)
    assert not marker.exists()


def test_engine_chat_still_works(tiny_artifact: Path, hf_tokenizer: Any) -> None:
    from awqc.runtime.engine import Engine

    engine = Engine(tiny_artifact)
    text = hf_tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                            add_generation_prompt=True)
    assert engine.encode_chat("hi") == engine.tokenizer.encode(text, add_special_tokens=False).ids
