"""Refact's special tokens and chat layout: shared by the converter (GGUF metadata) and the runtime."""

from __future__ import annotations

ENDOFTEXT = "<|endoftext|>"
FIM_PREFIX = "<fim_prefix>"
FIM_MIDDLE = "<fim_middle>"
FIM_SUFFIX = "<fim_suffix>"
FIM_PAD = "<fim_pad>"
EMPTY_OUTPUT = "<empty_output>"  # opens every chat turn

# Chat turns: "<empty_output>{ROLE} {text}\n", the reply opened by "<empty_output>ASSISTANT".
CHAT_ROLES = {"system": "SYSTEM", "user": "USER", "assistant": "ASSISTANT"}
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}<empty_output>SYSTEM {{ message['content'] }}\n"
    "{% elif message['role'] == 'user' %}<empty_output>USER {{ message['content'] }}\n"
    "{% elif message['role'] == 'assistant' %}<empty_output>ASSISTANT {{ message['content'] }}\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<empty_output>ASSISTANT{% endif %}"
)
