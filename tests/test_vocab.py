from experiment import BOS, EOS, UNK, Vocab


def test_vocabulary_is_specials_then_most_frequent_words_with_ties_alphabetical():
    v = Vocab.build(["b a a", "c b a", "d"], max_words=2)
    assert v.itos == ["<pad>", "<unk>", "<bos>", "<eos>", "a", "b"]
    assert v.encode("a d zz", 64) == [BOS, 4, UNK, UNK, EOS]


def test_long_inputs_are_truncated_at_max_len():
    v = Vocab.build(["w"], max_words=10)
    ids = v.encode(" ".join(["w"] * 100), 64)
    assert len(ids) == 64 and ids[0] == BOS and ids[-1] != EOS
