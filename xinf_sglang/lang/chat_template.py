"""Role markers of a program, rendered with the model's own chat template.

``with s.user(): ...`` must produce exactly the text the model's chat template renders for that message, so that
an SGLang program and a chat completion of the same messages send the model the same tokens. The template is
Jinja (the checkpoint's ``chat_template``, or the one Xinference registered for the model); what a role adds
around its content is found by rendering the conversation so far with one more message whose content is a
sentinel: the text before the sentinel (minus the rendering of the conversation so far) opens the role, the
text after it closes the role. This keeps template-specific behaviour, such as a default system prompt inserted
before the first message, exactly as the template writes it.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

from .errors import LangError

_SENTINEL = "\x00sglite-lang-content\x00"
ROLES = ("system", "user", "assistant")


class ChatTemplate:
    """One model's chat template.

    Args:
        template: the Jinja text of the template.
        special_tokens: the variables HF passes to templates besides the messages (``bos_token``, ``eos_token``).
    """

    def __init__(self, template: str, special_tokens: Mapping[str, str] | None = None) -> None:
        if not isinstance(template, str) or not ("{{" in template or "{%" in template):
            raise LangError(f"a chat template must be Jinja text; got {str(template)[:80]!r}")
        self.template = template
        self.special_tokens = dict(special_tokens or {})

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        """The template's text for ``messages`` (as ``tokenizer.apply_chat_template(..., tokenize=False)``)."""
        from transformers.utils.chat_template_utils import render_jinja_template

        try:
            rendered, _ = render_jinja_template(
                conversations=[messages], chat_template=self.template,
                add_generation_prompt=add_generation_prompt, **self.special_tokens,
            )
        except Exception as e:  # jinja2's TemplateError and the template's own raise_exception
            roles = [m["role"] for m in messages]
            raise LangError(f"the model's chat template refused the roles {roles}: {e}") from None
        return rendered[0]

    def markers(self, role: str, history: list[dict[str, str]]) -> tuple[str, str]:
        """(opening, closing) text of a ``role`` message that follows ``history``."""
        if role not in ROLES:
            raise LangError(f"role must be one of {', '.join(ROLES)}; got {role!r}")
        return self._markers(role, tuple((m["role"], m["content"]) for m in history))

    @functools.lru_cache(maxsize=256)
    def _markers(self, role: str, history: tuple[tuple[str, str], ...]) -> tuple[str, str]:
        messages = [{"role": r, "content": c} for r, c in history]
        before = self.render(messages)
        full = self.render([*messages, {"role": role, "content": _SENTINEL}])
        head, sep, tail = full.partition(_SENTINEL)
        if not sep:
            raise LangError(f"the model's chat template does not show the content of a {role} message")
        if not head.startswith(before):
            raise LangError(
                "the model's chat template renders earlier messages differently once another follows; a program "
                "only appends text, so its roles cannot follow this template"
            )
        return head[len(before):], tail

    @functools.cached_property
    def stop_strings(self) -> tuple[str, ...]:
        """What ends an assistant turn in this template's text (its closing marker, whitespace stripped)."""
        closing = self.markers("assistant", [{"role": "user", "content": "x"}])[1].strip()
        return (closing,) if closing else ()


class NoChatTemplate(ChatTemplate):
    """A model without a chat template: programs without roles run; a role is an error that says why."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def markers(self, role: str, history: list[dict[str, str]]) -> tuple[str, str]:
        raise LangError(f"roles need the model's chat template: {self.reason}")

    @property
    def stop_strings(self) -> tuple[str, ...]:  # type: ignore[override]
        return ()
