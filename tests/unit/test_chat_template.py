"""Local tokenizer files: tokenizer.json + chat template rendered as HF/vLLM render it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("jinja2")
tokenizers = pytest.importorskip("tokenizers")

from engine_sim.chat_api import render_chat  # noqa: E402
from router_service.chat_template import ModelTokenizer  # noqa: E402
from router_service.openai_request import OpenAIError, parse  # noqa: E402

CHATML = ("{% for message in messages %}"
          "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + "
          "'\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
          "{% endif %}")
# trim_blocks/lstrip_blocks matter here: the newlines after block tags must vanish
LLAMAISH = """{{ bos_token }}
{% for m in messages %}
    {% if m['role'] == 'system' and not loop.first %}{{ raise_exception('system first') }}
    {% endif %}
[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}
{% endfor %}
{% if add_generation_prompt %}[assistant] {% endif %}"""
PARTS = ("{% for m in messages %}{% for p in m['content'] %}<{{ p['text'] }}>{% endfor %}"
         "{% endfor %}")


def _model_dir(tmp: Path, template: str | None = CHATML, jinja_file: bool = False) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    words = ["<s>", "</s>", "<unk>", "hello", "world", "[user]", "[assistant]", "hi", "there"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[
        ("<s>", 0)])
    tmp.mkdir(parents=True, exist_ok=True)
    tok.save(str(tmp / "tokenizer.json"))
    cfg: dict[str, object] = {"bos_token": "<s>", "eos_token": {"content": "</s>"}}
    if template is not None and not jinja_file:
        cfg["chat_template"] = template
    (tmp / "tokenizer_config.json").write_text(json.dumps(cfg))
    if template is not None and jinja_file:
        (tmp / "chat_template.jinja").write_text(template)
    return tmp


def test_chatml_render_equals_engine_sim_render(tmp_path: Path) -> None:
    mt = ModelTokenizer(str(_model_dir(tmp_path)))
    msgs = [{"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "a"},
                                         {"type": "text", "text": "b"}]}]
    req = parse("chat", {"messages": msgs})
    assert mt.render(req) == render_chat(msgs) == (
        "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\na\nb<|im_end|>\n"
        "<|im_start|>assistant\n")
    cont = parse("chat", {"messages": [*msgs, {"role": "assistant", "content": "So"}],
                          "add_generation_prompt": False, "continue_final_message": True})
    assert mt.render(cont).endswith("<|im_start|>assistant\nSo")
    assert mt.render(cont) == render_chat(cont.messages, False, True)


def test_special_tokens_trim_blocks_and_encoding(tmp_path: Path) -> None:
    mt = ModelTokenizer(str(_model_dir(tmp_path, LLAMAISH, jinja_file=True)))
    req = parse("chat", {"messages": [{"role": "user", "content": "hello world"}]})
    # trim_blocks/lstrip_blocks drop the newline after block tags, not after {{ }}
    assert mt.render(req) == "<s>\n[user] hello world</s>\n[assistant] "
    # chat: add_special_tokens false by default (the template already has the BOS)
    assert mt.token_ids(req) == [0, 5, 3, 2, 6]  # "world</s>" is one unknown word
    text = parse("completions", {"prompt": "hello world"})
    assert mt.token_ids(text) == [0, 3, 4]  # completions: BOS added by the post-processor
    raw = parse("completions", {"prompt": "hello world", "add_special_tokens": False})
    assert mt.token_ids(raw) == [3, 4]
    bad = parse("chat", {"messages": [{"role": "user", "content": "x"},
                                      {"role": "system", "content": "late"}]})
    with pytest.raises(OpenAIError) as info:
        mt.render(bad)
    assert info.value.status == 400 and "system first" in info.value.message


def test_openai_content_format_and_request_template(tmp_path: Path) -> None:
    mt = ModelTokenizer(str(_model_dir(tmp_path, PARTS)))
    req = parse("chat", {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "x"}, {"type": "image_url", "image_url": {}},
        {"type": "text", "text": "y"}]}]})
    assert mt.render(req) == "<x><><y>"
    own = parse("chat", {"messages": [{"role": "user", "content": "q"}],
                         "chat_template": "{{ messages[0]['content'] }}!"})
    assert mt.render(own) == "q!"


def test_missing_template_and_files(tmp_path: Path) -> None:
    mt = ModelTokenizer(str(_model_dir(tmp_path / "m", None)))
    with pytest.raises(OpenAIError, match="no chat template"):
        mt.render(parse("chat", {"messages": [{"role": "user", "content": "x"}]}))
    with pytest.raises(ValueError, match=r"tokenizer\.json"):
        ModelTokenizer(str(tmp_path / "nothing"))
