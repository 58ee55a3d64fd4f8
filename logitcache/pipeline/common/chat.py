"""Chat and instruction corpora: conversations rendered with a chat template, labelled per role.

A row of such a corpus holds a conversation, a list of ``{role, content}`` messages
(``corpus.messages_column``). It is rendered to text with the teacher tokenizer's chat
template (or ``corpus.chat_template``) and tokenized as the teacher saw such text in its
training. Only the messages of ``corpus.label_roles`` (default: the assistant's) get soft
labels; system and user messages are context.

Why one record per labelled turn: a record's labelled positions are the tokens after its left
context (``context_length``), the same contract documents with a stride use. Each assistant
turn therefore becomes a window that ends with the turn and starts as far back in the
conversation as ``windows.max_length`` allows. The teacher sees the conversation so far;
stage two trains on the turn only and feeds the rest as input. The cost is that the teacher
reads a conversation's earlier turns once per later labelled turn. A turn longer than one
window is cut like a long document, with ``windows.stride`` tokens of left context.

Which tokens are a message's: of the text the template adds for messages ``[:i + 1]`` beyond
what it renders for ``[:i]``, the part from the message's content on: the content and the
template's end-of-turn marker, without the role header. Templates
that are not prefix-stable fall back to the first occurrence of the content after the
previous message. Token boundaries come from the fast tokenizer's character offsets.
Position ``t`` is labelled when token ``t + 1`` belongs to a labelled message. The turn's
own last position is labelled too: there the teacher predicts what follows the turn.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from logitcache.config import CorpusConfig
from logitcache.errors import ConfigError, CorpusError, TeacherError

#: roles every chat template knows, beside corpus.label_roles
KNOWN_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function", "ipython"})
#: skip reasons that are not bad data, so they are counted even when corpus.on_bad_document is error
ALWAYS_SKIPPED = frozenset({"empty", "no_labelled_turn"})

Conversation = tuple[tuple[str, str], ...]


class BadConversation(ValueError):
    """A conversation that cannot be rendered: why (a skip reason) and where."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


@dataclass(frozen=True, kw_only=True)
class ChatSpec:
    """How the conversations of one build are rendered and labelled (resolved on the driver)."""

    template: str | None  # Jinja text; None: the teacher tokenizer's own
    label_roles: tuple[str, ...]


def chat_spec(cfg: CorpusConfig) -> ChatSpec | None:
    """The ChatSpec of a corpus of conversations (None for plain texts), with
    ``corpus.chat_template`` read from its file when it names one."""
    if cfg.messages_column is None:
        return None
    template = cfg.chat_template
    if template is not None and "{{" not in template and "{%" not in template:
        path = Path(template).expanduser()
        if not path.is_file():
            raise ConfigError(f"corpus.chat_template: {template!r} is neither a file nor a Jinja template "
                              "(no {{ or {% in it)")
        template = path.read_text(encoding="utf-8")
    return ChatSpec(template=template, label_roles=tuple(cfg.label_roles))


def parse_conversation(value: Any, *, column: str, label_roles: Sequence[str]) -> Conversation:
    """The ``(role, content)`` pairs of one row's messages; raises :class:`BadConversation`."""
    if value is None:
        raise BadConversation("missing_value", f"no messages in column {column!r}")
    if not isinstance(value, (list, tuple)) or not value:
        raise BadConversation("bad_messages", f"column {column!r} holds {_brief(value)}, expected a non-empty "
                                              "list of {role, content} messages")
    roles = KNOWN_ROLES | set(label_roles)
    out = []
    for index, message in enumerate(value):
        where = f"{column}[{index}]"
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise BadConversation("bad_messages", f"{where} holds {_brief(message)}, expected {{role, content}}")
        role, content = message["role"], message.get("content")
        if role not in roles:
            raise BadConversation("bad_messages", f"{where}: unknown role {role!r}; known roles are "
                                                  f"{', '.join(sorted(roles))} (corpus.label_roles adds more)")
        if not isinstance(content, str):
            raise BadConversation("bad_messages", f"{where} ({role}): content is {_brief(content)}, expected a string")
        if not content.strip():
            raise BadConversation("bad_messages", f"{where} ({role}): empty message")
        out.append((role, content))
    if not any(role in label_roles for role, _ in out):
        raise BadConversation("no_labelled_turn", f"no message of the roles {', '.join(label_roles)} "
                                                  "(corpus.label_roles) to label")
    return tuple(out)


def _brief(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def require_chat_template(spec: ChatSpec, *, has_template: bool, fast: bool, teacher: str) -> None:
    """Refuse, before any unit runs, a conversation corpus that nothing can render."""
    if spec.template is None and not has_template:
        raise TeacherError(f"corpus.messages_column is set but the tokenizer of teacher {teacher!r} has no chat "
                           "template: set corpus.chat_template to a Jinja template (or the path of a file holding one)")
    if not fast:
        raise TeacherError(f"conversations need a fast tokenizer (for character offsets); the tokenizer of "
                           f"teacher {teacher!r} is not one")


def _render(tokenizer: Any, messages: Conversation, spec: ChatSpec, *, generation: bool) -> str:
    rendered = tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in messages], tokenize=False,
                                             add_generation_prompt=generation, chat_template=spec.template)
    if not isinstance(rendered, str):  # some versions wrap the text
        rendered = rendered[0] if isinstance(rendered, list) else str(rendered)
    return rendered


def _message_spans(tokenizer: Any, messages: Conversation, spec: ChatSpec, full: str) -> list[tuple[int, int]]:
    """Character ``[start, stop)`` of each labelled message's content and end-of-turn in ``full``."""
    spans, cursor = [], 0
    for index, (role, content) in enumerate(messages):
        if role not in spec.label_roles:
            continue
        try:
            before = _render(tokenizer, messages[:index], spec, generation=role == "assistant") if index else ""
            upto = _render(tokenizer, messages[:index + 1], spec, generation=False)
        except Exception:  # templates may refuse partial conversations (e.g. roles must alternate)
            before = upto = None
        found = upto.find(content.strip(), len(before)) if before is not None and upto.startswith(before) else -1
        if found >= 0 and full.startswith(upto):
            start, stop = found, len(upto)  # from the content (after any role header) to the end of the turn
        else:
            start = full.find(content.strip(), cursor)
            if start < 0:
                raise CorpusError(f"the chat template does not reproduce the content of message {index} ({role}) "
                                  "in its output; check corpus.chat_template")
            stop = start + len(content.strip())
        spans.append((start, stop))
        cursor = stop
    return spans


def render_conversation(tokenizer: Any, messages: Conversation, spec: ChatSpec) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Token ids of the rendered conversation, and the ``[first, stop)`` ranges of positions to
    label (position ``t`` is labelled when token ``t + 1`` is a labelled message's), merged."""
    full = _render(tokenizer, messages, spec, generation=False)
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True, truncation=False)
    ids = np.asarray(encoded["input_ids"], dtype=np.int64)
    starts = np.asarray([start for start, _ in encoded["offset_mapping"]], dtype=np.int64)
    ranges: list[tuple[int, int]] = []
    for start, stop in _message_spans(tokenizer, messages, spec, full):
        tokens = np.flatnonzero((starts >= start) & (starts < stop))
        if tokens.size == 0:
            continue
        first, last = max(int(tokens[0]) - 1, 0), int(tokens[-1]) + 1
        if ranges and first <= ranges[-1][1]:
            ranges[-1] = (ranges[-1][0], max(last, ranges[-1][1]))
        else:
            ranges.append((first, last))
    return ids, ranges


def turn_windows(ranges: list[tuple[int, int]], *, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, stop, context_length) of the windows that label position ranges ``ranges``:
    each ends at its turn and reaches back as far as ``max_length`` allows; a turn longer than
    that is cut into windows with ``stride`` tokens of left context."""
    spans = []
    for first, last in ranges:
        if last - first <= max_length:
            start = max(0, last - max_length)
            spans.append((start, last, first - start))
            continue
        position = first
        while position < last:
            context = min(position, stride)
            stop = min(last, position + max_length - context)
            spans.append((position - context, stop, context))
            position = stop
    return spans
