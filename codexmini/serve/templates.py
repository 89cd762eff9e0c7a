"""Chat templates from the `.cmx` file, rendered in a sandbox.

A template is code that came with a model file, so it runs in Jinja's `ImmutableSandboxedEnvironment` (no
attribute that starts with an underscore, no Python internals, no mutation of the objects it is given), with one
change: an unsafe attribute raises at once instead of becoming an undefined value that renders as nothing, so a
template that tries to reach Python internals is refused with a clear error rather than half-working. The variables
and helpers are Hugging Face's (`messages`, `add_generation_prompt`, `bos_token`, `eos_token`, `raise_exception`,
`strftime_now`, the `tojson` filter), so templates written for transformers render the same here.
"""

from __future__ import annotations

import json
from datetime import datetime

from .errors import ApiError


class TemplateRefused(Exception):
    """The template tried something the sandbox forbids."""


class TemplateError(Exception):
    """The template rejected the conversation (its `raise_exception`) or failed on it."""


def _environment():
    try:
        from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError
    except ImportError as err:
        raise ImportError("chat templates need jinja2: pip install 'codexmini[serve]'") from err

    class Sandbox(ImmutableSandboxedEnvironment):
        def unsafe_undefined(self, obj, attribute):
            raise SecurityError(f"access to attribute {attribute!r} of a {type(obj).__name__!r} object is not "
                                "allowed")

    def raise_exception(message):
        raise TemplateError(str(message))

    def tojson(value, indent=None, ensure_ascii=False, separators=None, sort_keys=False):
        return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, separators=separators,
                          sort_keys=sort_keys)

    env = Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env, SecurityError


class ChatTemplate:
    """A compiled chat template. `render(messages)` gives the prompt text; it raises `ApiError`: 400 when the
    template rejects the conversation, 500 when the template itself is broken or refused by the sandbox."""

    def __init__(self, source: str, bos_token: str = "", eos_token: str = ""):
        from jinja2 import TemplateSyntaxError

        self.source = source
        self.env, self._security_error = _environment()
        self.bos_token, self.eos_token = bos_token, eos_token
        try:
            self.template = self.env.from_string(source)
        except TemplateSyntaxError as err:
            raise TemplateError(f"the chat template does not compile: {err.message} (line {err.lineno})") from None

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        bos_token=self.bos_token, eos_token=self.eos_token, tools=None,
                                        documents=None)
        except TemplateError as err:
            raise ApiError(400, f"the model's chat template rejected these messages: {err}", "messages") from None
        except self._security_error as err:
            raise ApiError(500, f"the model's chat template was refused by the sandbox: {err}",
                           code="chat_template_refused") from None
        except Exception as err:  # noqa: BLE001 - any failure inside template code is the template's, not ours
            raise ApiError(500, f"the model's chat template failed: {type(err).__name__}: {err}",
                           code="chat_template_error") from None

    def check(self) -> str | None:
        """Render a sample conversation: None when it works, else why not (to refuse or warn at load time)."""
        sample = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                  {"role": "assistant", "content": "a"}, {"role": "user", "content": "u"}]
        try:
            self.render(sample)
        except ApiError as err:
            return err.message
        return None
