"""Prompt encoding, the one place a prompt becomes token ids."""

from __future__ import annotations

from collections.abc import Sequence

from m2r2_jax.errors import M2R2Error


def encode_chat(tokenizer, messages: Sequence[dict]) -> list[int]:
    """Exactly `tokenizer.apply_chat_template(messages, add_generation_prompt=True)`, as a list of ints."""
    if not hasattr(tokenizer, "apply_chat_template"):
        raise M2R2Error("this model's tokenizer has no chat template (a chat model is needed)")
    for m in messages:
        try:
            str(m.get("content", "")).encode("utf-8")
        except UnicodeEncodeError as e:
            raise M2R2Error(f"a {m.get('role', 'chat')} turn is not valid UTF-8 text (character {e.start})") from None
    try:
        ids = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True)
    except (ValueError, TypeError) as e:
        raise M2R2Error(f"cannot apply the chat template: {str(e).splitlines()[0] if str(e) else e}") from None
    if hasattr(ids, "keys"):
        ids = ids["input_ids"]
    if len(ids) and isinstance(ids[0], (list, tuple)):
        ids = ids[0]
    return [int(i) for i in ids]


def check_prompt(text) -> str:
    """A prompt is text that encodes as UTF-8 (command-line bytes that are not UTF-8 arrive as
    surrogates); checked before anything loads."""
    if not isinstance(text, str):
        raise M2R2Error(f"a prompt must be text, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise M2R2Error(f"the prompt is not valid UTF-8 text (character {e.start})") from None
    return text


def encode_prompt(tokenizer, text: str, chat: bool) -> list[int]:
    """One user turn: chat-templated (`encode_chat`) or plain text."""
    check_prompt(text)
    if chat:
        return encode_chat(tokenizer, [{"role": "user", "content": text}])
    return [int(i) for i in tokenizer(text)["input_ids"]]
