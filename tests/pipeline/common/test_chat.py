"""Tests of logitcache.pipeline.common.chat: conversations parsed, rendered with a chat
template, labelled on the roles asked for, and windowed per turn; and chat rows in the corpus."""

from __future__ import annotations

import json

import numpy as np
import pytest
from transformers import AutoTokenizer

from logitcache.config import CorpusConfig, WindowsConfig
from logitcache.errors import ConfigError, CorpusError, TeacherError
from logitcache.pipeline.common.chat import (
    BadConversation,
    ChatSpec,
    chat_spec,
    parse_conversation,
    render_conversation,
    require_chat_template,
    turn_windows,
)
from logitcache.pipeline.common.corpus import iter_work_units
from logitcache.pipeline.common.windows import make_windows
from tests import fixtures_models

ASSISTANT = ChatSpec(template=None, label_roles=("assistant",))


@pytest.fixture(scope="module")
def chat_tokenizer(tmp_path_factory, tiny_tokenizer_dir):
    return AutoTokenizer.from_pretrained(fixtures_models.build_tiny_chat_lm(tmp_path_factory.mktemp("chat"),
                                                                            tiny_tokenizer_dir))


def conversation(*pairs):
    return parse_conversation([{"role": r, "content": c} for r, c in pairs], column="messages",
                              label_roles=["assistant"])


@pytest.mark.parametrize(("messages", "reason", "words"), [
    (None, "missing_value", "no messages"),
    ("hello", "bad_messages", "expected a non-empty list"),
    ([], "bad_messages", "expected a non-empty list"),
    ([{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}], "bad_messages", "unknown role 'bot'"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": " \n"}], "bad_messages", "empty message"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": 3}], "bad_messages", "expected a string"),
    ([{"content": "hi"}], "bad_messages", "expected {role, content}"),
    ([{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}], "no_labelled_turn", "assistant"),
])
def test_bad_conversations_say_what_is_wrong(messages, reason, words):
    with pytest.raises(BadConversation) as bad:
        parse_conversation(messages, column="messages", label_roles=["assistant"])
    assert bad.value.reason == reason and words in bad.value.detail


def test_labels_cover_exactly_the_assistant_messages_in_any_script(chat_tokenizer):
    messages = conversation(("system", "Be brief."), ("user", "Wie heißt du?"), ("assistant", "我叫小狐狸 🦊"),
                            ("user", "Откуда ты?"), ("assistant", "من الغابة"))
    ids, ranges = render_conversation(chat_tokenizer, messages, ASSISTANT)
    full = chat_tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in messages], tokenize=False)
    assert chat_tokenizer.decode(ids) == full
    assert len(ranges) == 2
    for (first, last), content in zip(ranges, ["我叫小狐狸 🦊", "من الغابة"], strict=True):
        targets = chat_tokenizer.decode(ids[first + 1:last])  # the next tokens of positions first..last-2
        assert targets == f"{content}<|im_end|>\n"  # the template's end of turn is the message's
        assert chat_tokenizer.decode(ids[:first + 1]).endswith("<|im_start|>assistant\n")
    labelled = np.zeros(len(ids), dtype=bool)
    for first, last in ranges:
        labelled[first:last] = True
    user = chat_tokenizer.decode(ids[1:][labelled[:-1]])
    assert "Wie heißt" not in user and "Откуда" not in user and "Be brief" not in user


def test_other_label_roles_and_a_template_that_is_not_prefix_stable(chat_tokenizer):
    messages = conversation(("user", "one two"), ("assistant", "three four"))
    both = ChatSpec(template=None, label_roles=("user", "assistant"))
    ids, ranges = render_conversation(chat_tokenizer, messages, both)
    assert [chat_tokenizer.decode(ids[first + 1:last]) for first, last in ranges] == [
        "one two<|im_end|>\n", "three four<|im_end|>\n"]  # no role headers
    # a template that prints the messages in reverse order: the content is found where it is
    reverse = ("{% for m in messages|reverse %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
               "{% endfor %}")
    ids, ranges = render_conversation(chat_tokenizer, messages, ChatSpec(template=reverse, label_roles=("assistant",)))
    ((first, last),) = ranges
    assert chat_tokenizer.decode(ids[first + 1:last]) == "three four"
    dropping = "{% for m in messages %}{% if m['role'] != 'assistant' %}{{ m['content'] }}{% endif %}{% endfor %}"
    with pytest.raises(CorpusError, match="does not reproduce the content of message 1"):
        render_conversation(chat_tokenizer, messages, ChatSpec(template=dropping, label_roles=("assistant",)))


@pytest.mark.parametrize(("ranges", "max_length", "stride"), [
    ([(10, 20), (30, 45)], 40, 0), ([(66, 121)], 40, 8), ([(3, 50)], 16, 0), ([(0, 5), (9, 70)], 32, 31)])
def test_turn_windows_label_every_position_of_a_turn_once_with_the_longest_history(ranges, max_length, stride):
    spans = turn_windows(ranges, max_length=max_length, stride=stride)
    labelled = [p for start, stop, context in spans for p in range(start + context, stop)]
    assert labelled == [p for first, last in ranges for p in range(first, last)]
    assert all(stop - start <= max_length and 0 <= context < stop - start for start, stop, context in spans)
    for first, last in ranges:
        if last - first <= max_length:
            assert (max(0, last - max_length), last, first - max(0, last - max_length)) in spans


def test_make_windows_of_a_conversation_end_each_at_its_turn(chat_tokenizer, tmp_path):
    rows = fixtures_models.chat_conversations()[:2]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    cfg = CorpusConfig(data_files=[str(path)], messages_column="messages", lang_column="lang", id_column="id")
    (unit,) = iter_work_units(cfg)
    assert [d.messages[1][0] for d in unit.documents] == ["user", "assistant"]
    windows, no_tokens = make_windows(unit.documents, chat_tokenizer, WindowsConfig(max_length=512),
                                      chat=chat_spec(cfg))
    assert no_tokens == 0 and [w.doc_key for w in windows] == ["chat0", "chat0", "chat3"]
    for window in windows:
        tail = chat_tokenizer.decode(window.input_ids[window.context_length + 1:])
        assert tail.endswith("<|im_end|>\n") and "<|im_start|>user" not in tail
    assert len(windows[1].input_ids) > len(windows[0].input_ids)  # the second turn sees the first


def test_corpus_rows_of_conversations_skip_or_fail_as_configured(tmp_path):
    rows = [{"id": "a", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
            {"id": "b", "messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "yo"}]},
            {"id": "c", "messages": [{"role": "user", "content": "only a question"}]}]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    strict = CorpusConfig(data_files=[str(path)], messages_column="messages", id_column="id")
    with pytest.raises(CorpusError, match=r"row 1 .*unknown role 'robot'"):
        list(iter_work_units(strict))
    lenient = CorpusConfig(data_files=[str(path)], messages_column="messages", id_column="id", on_bad_document="skip")
    (unit,) = iter_work_units(lenient)
    assert [d.key for d in unit.documents] == ["a"] and unit.skipped == {"bad_messages": 1, "no_labelled_turn": 1}
    text = tmp_path / "plain.txt"
    text.write_text("a line\n", encoding="utf-8")
    with pytest.raises(CorpusError, match="JSON or Parquet"):
        list(iter_work_units(CorpusConfig(data_files=[str(text)], messages_column="messages")))


def test_a_template_must_exist_and_be_found(tmp_path):
    with pytest.raises(TeacherError, match="no chat template"):
        require_chat_template(ASSISTANT, has_template=False, fast=True, teacher="t")
    require_chat_template(ChatSpec(template="{{ x }}", label_roles=("assistant",)), has_template=False, fast=True,
                          teacher="t")
    with pytest.raises(TeacherError, match="fast tokenizer"):
        require_chat_template(ASSISTANT, has_template=True, fast=False, teacher="t")
    file = tmp_path / "template.jinja"
    file.write_text(fixtures_models.CHATML_TEMPLATE, encoding="utf-8")
    spec = chat_spec(CorpusConfig(data_files=["x.jsonl"], messages_column="messages", chat_template=str(file)))
    assert spec.template == fixtures_models.CHATML_TEMPLATE
    with pytest.raises(ConfigError, match="neither a file nor a Jinja template"):
        chat_spec(CorpusConfig(data_files=["x.jsonl"], messages_column="messages", chat_template="no/such.jinja"))
    with pytest.raises(ConfigError, match="messages_column"):
        CorpusConfig(data_files=["x.jsonl"], chat_template=str(file))
