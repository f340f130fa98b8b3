"""OpenAI chat content as text: the one conversion the server, the learner and offline tools use.

A message's `content` is a string, null, or a list of parts. vLLM renders a text-only model's
chat template with each message's text parts joined by newlines (vllm/renderers/chat_utils.py:
`_parse_chat_message_content_parts`, content format "string"): so do we, so that what the learner
renders is token for token what the server served. Chat templates that concatenate strings
(SmolLM2's, ChatML) cannot take the list form at all.
"""

from __future__ import annotations

from typing import Any

# Part type -> the field holding its text (vLLM's TEXT_PART_TYPES); a bare string is a text part.
TEXT_PART_FIELDS = {
    "text": "text",
    "input_text": "text",
    "output_text": "text",
    "refusal": "refusal",
    "thinking": "thinking",
}


class NotText(ValueError):
    """Content with a part that is not text (an image, audio, ...)."""


def content_text(content: Any) -> str:
    """A message's content as the text the model sees. Raises NotText for non-text parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise NotText(f"content is a {type(content).__name__}")
    texts = []
    for part in content:
        if isinstance(part, str):
            texts.append(part)
            continue
        field = TEXT_PART_FIELDS.get(part.get("type")) if isinstance(part, dict) else None
        if field is None:
            raise NotText(f"a {part.get('type') if isinstance(part, dict) else part!r} part")
        text = part.get(field)
        if text is None:  # vLLM skips a text part without text
            continue
        if not isinstance(text, str):
            raise NotText(f"a {part['type']} part holding a {type(text).__name__}")
        texts.append(text)
    return "\n".join(texts)


def text_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`messages` with every content as text; other fields kept."""
    return [{**message, "content": content_text(message.get("content"))} for message in messages]
