"""A model's own tokenizer files in-process: ``tokenizer.json`` plus its chat template.

Give the directory vLLM loads the model's tokenizer from (the HuggingFace snapshot): it holds
``tokenizer.json`` and ``tokenizer_config.json`` (special tokens, ``chat_template``) and, in newer
snapshots, ``chat_template.jinja``. Nothing is downloaded. The template is rendered the way
HuggingFace's ``apply_chat_template`` renders it for vLLM: a sandboxed Jinja environment with
``trim_blocks``/``lstrip_blocks`` and loop controls, the ``tojson`` filter, ``raise_exception``
and ``strftime_now``, the special tokens (``bos_token``, ``eos_token``, ...) as variables, then
``messages``, ``tools``, ``documents``, ``add_generation_prompt`` and ``chat_template_kwargs``.
Message content given as a list of parts is joined with newlines (vLLM's "string" content
format) unless the template loops over ``message['content']`` itself ("openai" format: text
parts stay ``{"type": "text", "text"}``, media parts become ``{"type": "image"|"audio"|...}``).
Multimodal placeholders that vLLM inserts for some models in "string" format are not added:
route such models by token ids or engine tokenization.
``continue_final_message`` cuts the rendered text after the last message, as HF does. The text
is then encoded with ``add_special_tokens`` as the request says (vLLM's default: False for chat,
True for completions).

Needs the ``tokenizers`` and ``jinja2`` packages (extra ``kvroute[tokenizers]``).
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path
from typing import Any

from router_service.openai_request import OpenAIError, OpenAIRequest

_SPECIAL = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
            "mask_token")
_OPENAI_FORMAT = re.compile(r"for\s+\w+\s+in\s+\w+(\[\s*['\"]content['\"]\s*\]|\.content\b)")
_MEDIA = {"image_url": "image", "input_image": "image", "image": "image", "audio_url": "audio",
          "input_audio": "audio", "video_url": "video"}


def _token_text(v: Any) -> str | None:
    if isinstance(v, str):
        return v
    if isinstance(v, dict) and isinstance(v.get("content"), str):
        return str(v["content"])
    return None


def _template_from_config(cfg: dict[str, Any]) -> str | None:
    tpl = cfg.get("chat_template")
    if isinstance(tpl, str):
        return tpl
    if isinstance(tpl, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
        found = named.get("default")
        return found if isinstance(found, str) else None
    return None


class ModelTokenizer:
    """``tokenizer.json`` + chat template of one model directory."""

    def __init__(self, directory: str) -> None:
        d = Path(directory)
        if not (d / "tokenizer.json").is_file():
            raise ValueError(f"{directory}: no tokenizer.json (give the model's tokenizer "
                             "directory, as vLLM loads it)")
        try:
            import jinja2.ext
            from jinja2.sandbox import ImmutableSandboxedEnvironment
            from tokenizers import Tokenizer
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise ValueError("tokenizer files need the tokenizers and jinja2 packages: "
                             "pip install 'kvroute[tokenizers]'") from exc
        self.name = d.name
        self._tok: Any = Tokenizer.from_file(str(d / "tokenizer.json"))
        cfg_path = d / "tokenizer_config.json"
        cfg: dict[str, Any] = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        self.special: dict[str, Any] = {k: t for k in _SPECIAL
                                        if (t := _token_text(cfg.get(k))) is not None}
        extra = cfg.get("additional_special_tokens")
        if isinstance(extra, list):
            self.special["additional_special_tokens"] = [
                t for t in map(_token_text, extra) if t is not None]
        jinja_file = d / "chat_template.jinja"
        self.template_source = (jinja_file.read_text() if jinja_file.is_file()
                                else _template_from_config(cfg))
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[_generation_tag(), jinja2.ext.loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self._env = env
        self._compiled: dict[str, Any] = {}

    def _template(self, source: str) -> Any:
        tpl = self._compiled.get(source)
        if tpl is None:
            try:
                tpl = self._env.from_string(source)
            except Exception as exc:
                raise OpenAIError(400, f"chat_template: does not compile: {exc}",
                                  param="chat_template") from None
            self._compiled[source] = tpl
        return tpl

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        """Token ids of ``text``."""
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def render(self, req: OpenAIRequest) -> str:
        """The chat prompt text of ``req``, as vLLM renders it."""
        b = req.body
        source = b.get("chat_template") or self.template_source
        if not source:
            raise OpenAIError(400, f"model {req.model!r} has no chat template; give "
                              "chat_template in the request", param="chat_template")
        openai_format = bool(_OPENAI_FORMAT.search(source))
        messages = [_normalise(m, openai_format) for m in req.messages]
        kwargs: dict[str, Any] = dict(self.special)
        kwargs.update(b.get("chat_template_kwargs") or {})
        try:
            text: str = self._template(source).render(
                messages=messages, tools=b.get("tools"), documents=b.get("documents"),
                add_generation_prompt=b.get("add_generation_prompt", True), **kwargs)
        except OpenAIError:
            raise
        except Exception as exc:
            raise OpenAIError(400, f"chat template failed: {exc}", param="messages") from None
        if b.get("continue_final_message"):
            text = _cut_after_final(text, messages[-1].get("content"))
        return text

    def token_ids(self, req: OpenAIRequest) -> list[int]:
        """Prompt ids of ``req`` (chat: template then encode; completions: encode)."""
        if req.endpoint == "chat":
            return self.encode(self.render(req), req.add_special_tokens)
        prompt = req.prompt
        assert isinstance(prompt, str)
        return self.encode(prompt, req.add_special_tokens)


def _normalise(m: dict[str, Any], openai_format: bool) -> dict[str, Any]:
    content = m.get("content")
    if not isinstance(content, list):
        return m
    if openai_format:  # vLLM: text parts keep their text, media parts become {"type": kind}
        parts = [{"type": "text", "text": str(p.get("text", ""))} if p.get("type") == "text"
                 else {"type": _MEDIA.get(str(p.get("type")), str(p.get("type")))}
                 for p in content]
        return {**m, "content": parts}
    texts = [str(p.get("text", "")) for p in content if p.get("type") == "text"]
    return {**m, "content": "\n".join(texts)}


def _cut_after_final(text: str, final: Any) -> str:
    if isinstance(final, list):
        final = final[-1].get("text", "") if final else ""
    if not isinstance(final, str) or not final.strip():
        return text
    loc = text.rfind(final.strip())
    if loc < 0:
        return text
    if text[loc:loc + len(final.lstrip())] == final.lstrip():
        return text[:loc + len(final.lstrip())]
    return text[:loc + len(final.strip())]


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _raise(message: str) -> None:
    raise OpenAIError(400, f"chat template: {message}", param="messages")


def _generation_tag() -> type[Any]:
    import jinja2.ext
    from jinja2 import nodes

    class GenerationTag(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}`` (HF's assistant-mask marker): body only."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body, lineno=lineno)

    return GenerationTag
