"""Chat templates: finding the model's, and rendering messages into a prompt as transformers does.

A template comes from `--chat-template` (a file, or the template itself as vLLM accepts), else
the tokenizer directory's `chat_template.jinja` or `tokenizer_config.json` "chat_template"
(a string, or a list of named templates of which "default" is used). Templates from model
repositories are untrusted code: they run in jinja2's ImmutableSandboxedEnvironment with
transformers' settings and globals (raise_exception, strftime_now, a tojson that does not
escape HTML), so one written for transformers renders the same here.
"""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import jinja2
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from dsjax.tokenizer import OPT_BOS

TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG = "tokenizer_config.json"


class ChatTemplateError(ValueError):
    """The template failed on these messages (raise_exception, or a bug in the template)."""


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(format):
    return datetime.now().strftime(format)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


class _GenerationTag(Extension):
    """transformers' {% generation %}...{% endgeneration %} (it marks assistant tokens for
    training masks): rendered as its body, so templates using it compile."""
    tags = {"generation"}

    def parse(self, parser):
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                       extensions=[_GenerationTag, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _token_text(value, default: str) -> str:
    """tokenizer_config.json spells a special token as a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else default


class ChatTemplate:
    def __init__(self, source: str, origin: str, special_tokens: dict[str, str] | None = None):
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ValueError(f"chat template from {origin} does not compile: {e} (line "
                             f"{e.lineno})") from e
        self.origin = origin
        self.special_tokens = {"bos_token": OPT_BOS, "eos_token": OPT_BOS,
                               **(special_tokens or {})}

    def render(self, messages: list[dict], add_generation_prompt: bool = True,
               continue_final_message: bool = False, documents: list | None = None,
               variables: dict | None = None) -> str:
        """The prompt text; ChatTemplateError when the template refuses the messages. `variables`
        (a request's chat_template_kwargs) may replace the special tokens, not the messages."""
        try:
            # tools: defined and None, as transformers renders it (templates test both ways).
            text = self._template.render({**self.special_tokens, **(variables or {}),
                                          "messages": messages, "tools": None,
                                          "documents": documents,
                                          "add_generation_prompt": add_generation_prompt})
        except Exception as e:  # jinja's errors, and any a template's expressions raise
            raise ChatTemplateError(f"the chat template ({self.origin}) refused these "
                                    f"messages: {e}") from e
        if continue_final_message:
            # Cut after the final message's text, so the model continues it (as vLLM does).
            final = messages[-1].get("content") or ""
            end = text.rfind(final) if final else -1
            if end < 0:
                raise ChatTemplateError("continue_final_message: the rendered prompt does not "
                                        "contain the final message's content")
            text = text[:end + len(final)]
        return text


def _named(template, origin: str) -> str:
    """A template string, or the "default" of a list of named ones."""
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
        if template is None:
            raise ValueError(f"{origin} lists chat templates {sorted(map(str, named))} but no "
                             f"'default': choose one with --chat-template")
    if not isinstance(template, str):
        raise ValueError(f"{origin}: chat_template must be a string or a list of named templates")
    return template


def load_chat_template(option: str | None, tokenizer_dir: str | Path | None
                       ) -> ChatTemplate | None:
    """The template of --chat-template `option`, else the tokenizer directory's, else None."""
    config = {}
    config_path = Path(tokenizer_dir) / TOKENIZER_CONFIG if tokenizer_dir else None
    if config_path is not None and config_path.is_file():
        config = json.loads(config_path.read_text())
    tokens = {name: _token_text(config.get(name), OPT_BOS) for name in ("bos_token", "eos_token")}
    if option and any(mark in option for mark in ("{{", "{%")):
        return ChatTemplate(option, "--chat-template", tokens)
    if option:
        if not Path(option).is_file():
            raise ValueError(f"--chat-template {option}: no such file (give a Jinja template "
                             f"file, or the template itself)")
        return ChatTemplate(Path(option).read_text(), option, tokens)
    if tokenizer_dir and (Path(tokenizer_dir) / TEMPLATE_FILE).is_file():
        path = Path(tokenizer_dir) / TEMPLATE_FILE
        return ChatTemplate(path.read_text(), str(path), tokens)
    if "chat_template" in config:
        return ChatTemplate(_named(config["chat_template"], str(config_path)), str(config_path),
                            tokens)
    return None
