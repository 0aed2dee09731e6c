"""Refact's special tokens (strings and ids) and chat layout: shared by the converter (GGUF
metadata) and the runtime. The ids are those of Refact-1.6B's tokenizer; the converter checks that
a checkpoint's tokenizer agrees before writing a GGUF."""

from __future__ import annotations

ENDOFTEXT = "<|endoftext|>"
FIM_PREFIX = "<fim_prefix>"
FIM_MIDDLE = "<fim_middle>"
FIM_SUFFIX = "<fim_suffix>"
FIM_PAD = "<fim_pad>"
EMPTY_OUTPUT = "<empty_output>"  # opens every chat turn

ENDOFTEXT_ID, FIM_PREFIX_ID, FIM_MIDDLE_ID, FIM_SUFFIX_ID, FIM_PAD_ID, EMPTY_OUTPUT_ID = 0, 1, 2, 3, 4, 14
IDS = {ENDOFTEXT: ENDOFTEXT_ID, FIM_PREFIX: FIM_PREFIX_ID, FIM_MIDDLE: FIM_MIDDLE_ID, FIM_SUFFIX: FIM_SUFFIX_ID,
       FIM_PAD: FIM_PAD_ID, EMPTY_OUTPUT: EMPTY_OUTPUT_ID}

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
