from protocols import SMALL
from train.data import Vocab

W = SMALL["written"]


def written(sentences, words):
    return Vocab.build(sentences, len(W.specials) + words, W.specials, W.bos_eos, W.vocab_ties)


def test_vocabulary_is_specials_then_most_frequent_words_with_ties_alphabetical():
    v = written(["b a a", "c b a", "d"], 2)
    assert v.itos == ["<pad>", "<unk>", "<bos>", "<eos>", "a", "b"]
    assert v.encode("a d zz", 64) == [v.bos, 4, v.unk, v.unk, v.eos]


def test_first_seen_ties_keep_the_order_words_first_appear_in():
    v = Vocab.build(["zz yy", "yy zz xx"], 4, ("<PAD>", "<UNK>"), False, "first_seen")
    assert v.itos == ["<PAD>", "<UNK>", "zz", "yy"] and v.encode("yy xx", 64) == [3, 1]


def test_long_inputs_are_truncated_at_max_len():
    v = written(["w"], 10)
    ids = v.encode(" ".join(["w"] * 100), 64)
    assert len(ids) == 64 and ids[0] == v.bos and ids[-1] != v.eos
