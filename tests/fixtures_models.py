"""Tiny, offline test assets: a multilingual corpus, a byte-level BPE tokenizer, teacher models.

Everything here is built locally in well under a second per asset, never touches the network,
and is deterministic (fixed texts, ``torch.manual_seed``). The builders are plain functions that
take an output directory, so tests (through the session fixtures in ``tests/conftest.py``) and
benchmarks can both call them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# label: 0 negative, 1 neutral, 2 positive (a toy sentiment task)
_TEXTS: dict[str, list[tuple[str, int]]] = {
    "en": [
        ("The new library opened downtown and the reading rooms are bright and quiet. "
         "I spent the whole afternoon there and loved it.", 2),
        ("The train was delayed again this morning.", 0),
        ("Rain is expected on Tuesday, with temperatures around twelve degrees.", 1),
        ("We planted tomatoes, beans and basil in the small garden behind the house. For weeks "
         "nothing seemed to happen, and the neighbours joked about our empty soil. Then, after a "
         "warm week in June, everything grew at once. By August we had more tomatoes than we could "
         "eat, so we gave baskets of them to everyone on the street. Next year we want to try "
         "peppers and perhaps a few strawberries.", 2),
        ("The update broke the printer driver, and support has not answered my emails for a week.", 0),
        ("The meeting has been moved to room 204 on the second floor.", 1),
        ("Her first novel is funny, warm and surprisingly wise.", 2),
        ("Our team spent three months rewriting the billing service. The old code had grown for "
         "ten years without tests, and every change broke something else. We started by writing "
         "tests for the behaviour customers relied on, then replaced one module at a time. The "
         "migration finished on a Friday night without a single failed payment. On Monday the "
         "support queue was the shortest it had been all year, and nobody outside the team "
         "noticed that anything had changed, which was exactly the point.", 2),
    ],
    "de": [
        ("Das Konzert gestern Abend war wunderbar, das Orchester hat großartig gespielt.", 2),
        ("Der Kühlschrank ist schon wieder kaputt, und der Techniker kommt erst nächste Woche.", 0),
        ("Die Bibliothek ist montags von neun bis achtzehn Uhr geöffnet.", 1),
        ("Im Herbst sind wir mit dem Fahrrad an der Donau entlang gefahren. Die Wege waren gut "
         "ausgeschildert, und in den kleinen Dörfern gab es überall Bäckereien mit frischem Kuchen. "
         "An einem Tag hat es stark geregnet, aber wir haben in einer gemütlichen Pension "
         "übernachtet. Am Ende der Woche waren wir müde, aber sehr glücklich.", 2),
        ("Die Lieferung kam beschädigt an und niemand fühlt sich zuständig.", 0),
        ("Der Zug nach Hamburg fährt von Gleis sieben ab.", 1),
        ("Ich finde die neue Software unübersichtlich und langsam.", 0),
    ],
    "es": [
        ("La paella de mi abuela es la mejor que he probado en mi vida.", 2),
        ("El vuelo se canceló y nadie nos dio información.", 0),
        ("La reunión empieza a las diez en la sala principal.", 1),
        ("El sábado fuimos al mercado temprano para comprar fruta y pescado. Había mucha gente, "
         "pero los vendedores eran amables y nos dejaron probar las naranjas. Después cocinamos "
         "juntos en casa y comimos en la terraza hasta que se puso el sol. Fue uno de esos días "
         "sencillos que uno recuerda durante mucho tiempo.", 2),
        ("El hotel estaba sucio y el ruido de la calle no nos dejó dormir.", 0),
        ("El museo cierra los lunes por mantenimiento.", 1),
        ("Me encantó la película, sobre todo la música.", 2),
    ],
    "ru": [
        ("Вчера мы гуляли в парке, и погода была просто чудесная.", 2),
        ("Автобус опять опоздал на двадцать минут, и я пропустил встречу.", 0),
        ("Магазин работает с девяти утра до восьми вечера.", 1),
        ("Зимой в нашем городе рано темнеет, поэтому мы часто сидим дома. По вечерам мы пьём чай "
         "с вареньем и читаем вслух старые книги. Иногда приходят друзья, и мы играем в "
         "настольные игры до полуночи. Эти долгие вечера мне нравятся больше, чем шумные "
         "праздники.", 2),
        ("Телефон сломался через неделю после покупки, а гарантию не приняли.", 0),
        ("Лекция по истории начнётся в аудитории номер пять.", 1),
        ("Этот ресторан слишком дорогой, а еда невкусная.", 0),
    ],
    "zh": [
        ("今天的天气很好，我们去公园散步了，心情非常愉快。", 2),
        ("这家餐厅的服务太慢了，我们等了一个小时。", 0),
        ("图书馆周一到周五早上八点开门。", 1),
        ("上个月我们去了一个小山村。村子里的人都很热情，给我们做了很多好吃的饭菜。早上我们爬山看日出，"
         "晚上坐在院子里聊天看星星。虽然那里没有网络，但是大家都觉得那几天过得特别开心。", 2),
        ("新买的电脑总是死机，我很失望。", 0),
        ("会议改到下午三点在二楼举行。", 1),
        ("这本书写得很有意思，我推荐给大家。", 2),
    ],
    "ar": [
        ("كانت الرحلة إلى البحر رائعة، واستمتعنا كثيرا بالشمس والهواء النقي.", 2),
        ("تأخر القطار ساعتين ولم يعتذر أحد.", 0),
        ("يفتح المتحف أبوابه من الساعة التاسعة صباحا حتى الخامسة مساء.", 1),
        ("في الصيف الماضي زرنا جدتي في قريتها الصغيرة. كانت تستيقظ مع شروق الشمس وتخبز الخبز في "
         "الفرن القديم. كنا نساعدها في جمع الزيتون ونتحدث معها عن أيام شبابها. تعلمت منها الصبر "
         "وحب الأرض، وأتمنى أن أعود إليها قريبا.", 2),
        ("الخدمة في هذا الفندق سيئة والغرف غير نظيفة.", 0),
        ("سيبدأ الاجتماع في الساعة العاشرة في القاعة الكبيرة.", 1),
        ("أعجبني هذا الكتاب كثيرا، فهو ممتع ومفيد.", 2),
    ],
    "hi": [
        ("आज मौसम बहुत सुहावना है और हम सब पार्क में खेलने गए।", 2),
        ("बस फिर से देर से आई और मैं दफ्तर समय पर नहीं पहुँच पाया।", 0),
        ("पुस्तकालय सोमवार से शनिवार तक सुबह नौ बजे खुलता है।", 1),
        ("पिछले साल हम गर्मियों की छुट्टियों में पहाड़ों पर गए थे। वहाँ की हवा ठंडी और साफ़ थी, "
         "और हर सुबह हम नदी के किनारे टहलते थे। एक दिन हमने एक छोटे से गाँव में स्थानीय लोगों "
         "के साथ खाना खाया। वह यात्रा मुझे हमेशा याद रहेगी।", 2),
        ("यह फ़ोन बहुत धीमा है और इसकी बैटरी जल्दी खत्म हो जाती है।", 0),
        ("बैठक अब दोपहर तीन बजे होगी।", 1),
        ("यह फ़िल्म बहुत मज़ेदार थी, मुझे बहुत पसंद आई।", 2),
    ],
}

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>"}
LANGS = tuple(_TEXTS)


def multilingual_texts() -> list[dict[str, Any]]:
    """50 documents in 7 languages (4 non-Latin scripts), interleaved by language.

    Each is ``{"id", "text", "lang", "label"}``; ids look like ``"ru-003"``. Index 3 of every
    language (and ``en-007``) is a multi-sentence document, long enough to need several windows.
    """
    longest = max(len(docs) for docs in _TEXTS.values())
    out = []
    for index in range(longest):
        for lang, docs in _TEXTS.items():
            if index < len(docs):
                text, label = docs[index]
                out.append({"id": f"{lang}-{index:03d}", "text": text, "lang": lang, "label": label})
    return out


def write_corpus(out_dir: str | os.PathLike[str], docs: Sequence[dict[str, Any]] | None = None,
                 parts: int = 2) -> Path:
    """Write ``docs`` (default: :func:`multilingual_texts`) as ``part-<i>.jsonl`` files, split evenly."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    docs = list(multilingual_texts() if docs is None else docs)
    size = -(-len(docs) // parts)
    for part in range(parts):
        with open(out / f"part-{part}.jsonl", "w", encoding="utf-8") as stream:
            for doc in docs[part * size:(part + 1) * size]:
                stream.write(json.dumps(doc, ensure_ascii=False) + "\n")
    return out


def build_tiny_tokenizer(out_dir: str | os.PathLike[str], *, vocab_size: int = 400,
                         texts: Sequence[str] | None = None, add_bos: bool = True) -> Path:
    """Train a byte-level BPE tokenizer on ``texts`` and save it as a PreTrainedTokenizerFast.

    Special tokens ``<pad> <bos> <eos> <unk>`` get ids 0-3; encoding with special tokens
    prepends ``<bos>`` (when ``add_bos``). Any string can be encoded (byte fallback alphabet).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if texts is None:
        texts = [doc["text"] for doc in multilingual_texts()]
    specials = list(SPECIAL_TOKENS.values())
    backend = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    backend.train_from_iterator(texts, trainer=trainer)
    if add_bos:
        bos = SPECIAL_TOKENS["bos_token"]
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, backend.token_to_id(bos))])
    else:
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **SPECIAL_TOKENS)
    out = Path(out_dir)
    tokenizer.save_pretrained(out)
    return out


def _model_config(model_type: str, vocab_size: int, tokenizer: Any, **extra: Any) -> Any:
    from transformers import AutoConfig

    ids = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
           "eos_token_id": tokenizer.eos_token_id}
    if model_type == "gpt2":
        shape = {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_inner": 64, "n_positions": 512}
    else:
        shape = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "num_key_value_heads": 2, "intermediate_size": 64, "max_position_embeddings": 512}
        if model_type == "gpt_neox":
            del shape["num_key_value_heads"]
        if model_type == "gemma2":
            shape.update(head_dim=8, query_pre_attn_scalar=8, sliding_window=64)
    # A wider init than the default 0.02 gives peakier, more teacher-like distributions.
    settings = {"vocab_size": vocab_size, "initializer_range": 0.1, "tie_word_embeddings": False,
                **ids, **shape, **extra}  # extra wins: callers may change the shape too
    return AutoConfig.for_model(model_type, **settings)


def build_tiny_causal_lm(out_dir: str | os.PathLike[str], tokenizer_dir: str | os.PathLike[str], *,
                         model_type: str = "llama", pad_vocab_to: int | None = None, seed: int = 0,
                         **config: Any) -> Path:
    """A randomly initialised tiny causal LM (hidden 32, 2 layers, 4 heads) plus its tokenizer.

    ``model_type`` is any of llama, qwen2, mistral, gpt2, gpt_neox, gemma2. The vocabulary is
    ``len(tokenizer)``, rounded up to a multiple of ``pad_vocab_to`` when given (padding rows, as
    many released models have). Extra keyword arguments go into the config and override the
    tiny shape (e.g. ``hidden_size=768``, or ``final_logit_softcapping`` for gemma2). Saved as
    safetensors.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    vocab = len(tokenizer)
    if pad_vocab_to:
        vocab = -(-vocab // pad_vocab_to) * pad_vocab_to
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_model_config(model_type, vocab, tokenizer, **config))
    out = Path(out_dir)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_chat_lm(out_dir: str | os.PathLike[str], tokenizer_dir: str | os.PathLike[str], *,
                       template: str | None = CHATML_TEMPLATE, seed: int = 0) -> Path:
    """A tiny causal LM whose tokenizer has ChatML's ``<|im_start|>`` / ``<|im_end|>`` special
    tokens and, unless ``template`` is None, a ChatML chat template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    if template is not None:
        tokenizer.chat_template = template
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_model_config("llama", len(tokenizer), tokenizer))
    out = Path(out_dir)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def chat_conversations() -> list[dict[str, Any]]:
    """Conversations in several scripts: rows of a corpus with a ``messages`` column."""
    turns = [(doc["lang"], doc["text"]) for doc in multilingual_texts()]
    rows = []
    for i in range(0, 24, 3):
        (lang, first), (_, second), (_, third) = turns[i], turns[i + 1], turns[i + 2]
        messages = [{"role": "user", "content": f"Q{i}: {first[:40]}"},
                    {"role": "assistant", "content": second[:80]}]
        if i % 2 == 0:
            messages = [{"role": "system", "content": "Answer briefly."}, *messages,
                        {"role": "user", "content": "And then?"}, {"role": "assistant", "content": third[:60]}]
        rows.append({"id": f"chat{i}", "lang": lang, "messages": messages})
    return rows


def build_tiny_classifier(out_dir: str | os.PathLike[str], tokenizer_dir: str | os.PathLike[str], *,
                          num_labels: int = 3, seed: int = 0) -> Path:
    """A tiny LlamaForSequenceClassification (``num_labels`` classes, pad_token_id set) plus tokenizer."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = _model_config("llama", len(tokenizer), tokenizer, num_labels=num_labels)
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(config)
    out = Path(out_dir)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
