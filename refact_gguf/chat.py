"""Refact's chat format as token ids, with history that fits the context.

`<empty_output>SYSTEM {system}\\n<empty_output>USER {q}\\n<empty_output>ASSISTANT {a}\\n … <empty_output>ASSISTANT`
Message text is tokenized without parsing special tokens, so a message containing
"<empty_output>USER" cannot forge a turn. The reply ends at the next `<empty_output>`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .errors import InputError
from .tokens import CHAT_ROLES, EMPTY_OUTPUT_ID

Tokenize = Callable[[str], list[int]]


@dataclass(frozen=True)
class Message:
    role: str  # system | user | assistant
    content: str


@dataclass(frozen=True)
class ChatPrompt:
    tokens: list[int]
    dropped: int  # oldest turns left out so the history fits


def _turn(tokenize: Tokenize, m: Message) -> list[int]:
    if m.role not in CHAT_ROLES:
        raise InputError(f"unknown chat role {m.role!r}", f"use one of {', '.join(CHAT_ROLES)}")
    return [EMPTY_OUTPUT_ID, *tokenize(f"{CHAT_ROLES[m.role]} {m.content}\n")]


def build_prompt(tokenize: Tokenize, messages: list[Message], budget: int) -> ChatPrompt:
    """Ids of the conversation plus the assistant opener, within `budget` tokens.

    When it does not fit, the oldest turns go first; the system prompt and the newest message
    are never dropped.
    """
    if not messages:
        raise InputError("a chat needs at least one message")
    opener = [EMPTY_OUTPUT_ID, *tokenize(CHAT_ROLES["assistant"])]
    system = [m for m in messages[:1] if m.role == "system"]
    rest = messages[len(system):]
    fixed = sum((_turn(tokenize, m) for m in system), []) + opener
    turns = [_turn(tokenize, m) for m in rest]
    dropped = 0
    while len(turns) > 1 and len(fixed) + sum(map(len, turns)) > budget:
        turns.pop(0)
        dropped += 1
    if len(fixed) + sum(map(len, turns)) > budget:
        raise InputError(
            f"the system prompt and the newest message need {len(fixed) + len(turns[0])} tokens; the context allows {budget}",
            "shorten the message or raise --ctx",
        )
    head = fixed[: len(fixed) - len(opener)]
    return ChatPrompt(head + sum(turns, []) + opener, dropped)
