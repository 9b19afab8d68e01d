import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from tgi_server.router.tokenizer import IncrementalDetokenizer, StopSequenceMatcher, load_tokenizer

CORPUS = [
    "héllo wörld 你好 🙂 naïve café",
    "the quick brown fox jumps over the lazy dog",
    "日本語のテキストと中文文本 👍🏽 emoji 🇫🇷 flags",
    "Ünïcödé ñ ß ø å æ œ — “quotes” …",
] * 50
TEXTS = [
    "héllo wörld 你好 🙂",
    "naïve café 日本語 👍🏽🇫🇷 and 🙂🙂",
    "plain ascii text, nothing special",
    "混合 mixed 文本 with ∑ math ≠ symbols",
]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    # A tiny byte-level BPE: with 300 tokens most multi-byte characters span several ids.
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>")


def decode(tokenizer, ids, skip_special_tokens=False) -> str:
    return tokenizer.decode(
        ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False
    )


def test_multi_byte_characters_are_split_across_tokens(tokenizer):
    # Guards the other tests: single tokens of these texts decode to incomplete characters.
    ids = tokenizer.encode("你好 🙂", add_special_tokens=False)
    assert any(decode(tokenizer, [i]).endswith("\ufffd") for i in ids)


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_decode_matches_full_decode(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(tokenizer)
    deltas = [detokenizer.push(i) for i in ids]
    assert not any("\ufffd" in delta for delta in deltas)
    assert "".join(deltas) == decode(tokenizer, ids) == text
    assert detokenizer.text == text
    assert detokenizer.flush() == ""


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_decode_after_prompt(tokenizer, text):
    prompt_ids = tokenizer.encode("prompt 你好 ", add_special_tokens=False)
    ids = tokenizer.encode(text, add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids=prompt_ids)
    deltas = [detokenizer.push(i) for i in ids]
    assert not any("\ufffd" in delta for delta in deltas)
    assert "".join(deltas) == text


def test_empty_deltas_while_a_character_is_incomplete(tokenizer):
    ids = tokenizer.encode("🙂", add_special_tokens=False)
    assert len(ids) > 1
    detokenizer = IncrementalDetokenizer(tokenizer)
    deltas = [detokenizer.push(i) for i in ids]
    assert deltas == [""] * (len(ids) - 1) + ["🙂"]


def test_special_tokens_kept_or_skipped(tokenizer):
    ids = tokenizer.encode("café", add_special_tokens=False) + [tokenizer.eos_token_id]
    kept = IncrementalDetokenizer(tokenizer)
    assert "".join(kept.push(i) for i in ids) == "café<eos>"
    skipped = IncrementalDetokenizer(tokenizer, skip_special_tokens=True)
    assert "".join(skipped.push(i) for i in ids) == "café"


def test_flush_emits_a_never_completed_character(tokenizer):
    ids = tokenizer.encode("a🙂", add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(tokenizer)
    deltas = [detokenizer.push(i) for i in ids[:-1]]
    assert "".join(deltas) == "a"
    tail = detokenizer.flush()
    assert tail.endswith("\ufffd")
    assert detokenizer.text == decode(tokenizer, ids[:-1])


def test_load_tokenizer_from_local_dir(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = load_tokenizer(str(tmp_path))
    text = "héllo wörld 你好 🙂"
    assert loaded.encode(text, add_special_tokens=False) == tokenizer.encode(
        text, add_special_tokens=False
    )


def push_all(matcher: StopSequenceMatcher, deltas: list[str]) -> tuple[list[str], bool]:
    emitted = []
    for delta in deltas:
        text, stopped = matcher.push(delta)
        emitted.append(text)
        if stopped:
            return emitted, True
    return emitted, False


def test_no_stop_sequence_passes_text_through():
    matcher = StopSequenceMatcher([])
    assert push_all(matcher, ["a", "b", ""]) == (["a", "b", ""], False)
    assert matcher.flush() == ""


def test_stop_sequence_split_across_deltas_is_held_back():
    matcher = StopSequenceMatcher(["</end>"])
    emitted, stopped = push_all(matcher, ["hello </", "en", "d> ignored"])
    # "</" and "en" could start the stop sequence: held back, then released with it.
    assert emitted == ["hello ", "", "</end>"]
    assert stopped
    assert matcher.matched == "</end>"


def test_stop_sequence_excluded_like_openai():
    matcher = StopSequenceMatcher(["</end>"], include_stop_sequence=False)
    assert push_all(matcher, ["hello </", "end> more"]) == (["hello ", ""], True)


def test_partial_match_released_when_it_diverges():
    matcher = StopSequenceMatcher(["STOP"])
    assert push_all(matcher, ["a ST", "x", "S", "TO", "ry"]) == (
        ["a ", "STx", "", "", "STOry"],
        False,
    )
    assert matcher.flush() == ""


def test_held_back_tail_released_by_flush():
    matcher = StopSequenceMatcher(["STOP"])
    assert matcher.push("the end ST") == ("the end ", False)
    assert matcher.flush() == "ST"


def test_earliest_completed_stop_sequence_wins():
    matcher = StopSequenceMatcher(["abcd", "bc"])
    assert matcher.push("xabcd") == ("xabc", True)
    assert matcher.matched == "bc"


def test_overlapping_prefixes_hold_the_longest_tail():
    matcher = StopSequenceMatcher(["aab"])
    assert push_all(matcher, ["xa", "a", "a", "b!"]) == (["x", "", "a", "aab"], True)


def test_multi_byte_stop_sequence_over_detokenized_stream(tokenizer):
    ids = tokenizer.encode("say 你好 🙂 then more", add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(tokenizer)
    matcher = StopSequenceMatcher(["好 🙂"])
    emitted, stopped = push_all(matcher, [detokenizer.push(i) for i in ids])
    assert stopped
    assert "".join(emitted) == "say 你好 🙂"


def test_push_after_stop_returns_nothing():
    matcher = StopSequenceMatcher(["x"])
    assert matcher.push("axb") == ("ax", True)
    assert matcher.push("more") == ("", True)
    assert matcher.flush() == ""


def test_empty_stop_sequences_are_ignored():
    matcher = StopSequenceMatcher(["", "z"])
    assert matcher.push("abc") == ("abc", False)
