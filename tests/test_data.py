import pytest

from tests.conftest import write_tsv
from train.data import load_sst2, parse_extra_eval, read_tsv
from train.stop import UsageError


def test_reads_glue_layout(tmp_path):
    s = read_tsv(write_tsv(tmp_path / "a.tsv", [("a fine film", 1), ("dull", 0)]))
    assert s.sentences == ["a fine film", "dull"] and s.labels == [1, 0]


@pytest.mark.parametrize(
    "content, message",
    [
        ("sentence\tlabel\ngood\t2\n", r"a\.tsv:2: label '2' is not 0 or 1"),
        ("sentence\tlabel\ngood\t1\n \t0\n", r"a\.tsv:3: empty sentence"),
        ("sentence\tlabel\ngood\n", r"a\.tsv:2: expected 2 tab-separated columns"),
        ("text\tlabel\ngood\t1\n", r"a\.tsv:1: header is 'text\\tlabel'; expected"),
        ("", r"a\.tsv is empty"),
        ("sentence\tlabel\n", r"a\.tsv has a header but no examples"),
    ],
)
def test_malformed_files_name_file_and_line(tmp_path, content, message):
    (tmp_path / "a.tsv").write_text(content)
    with pytest.raises(UsageError, match=message):
        read_tsv(tmp_path / "a.tsv")


def test_missing_folder_and_file(tmp_path):
    with pytest.raises(UsageError, match="data folder .* not found"):
        load_sst2(tmp_path / "nope")
    write_tsv(tmp_path / "train.tsv", [("good", 1)])
    with pytest.raises(UsageError, match=r"dev\.tsv not found"):
        load_sst2(tmp_path)


def test_hub_failure_names_both_ways(monkeypatch):
    import datasets

    def offline(*a, **k):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(UsageError, match="stanfordnlp/sst2.*--data-dir"):
        load_sst2(None)


def test_extra_eval_needs_name_and_path(tmp_path):
    with pytest.raises(UsageError, match="NAME=PATH"):
        parse_extra_eval(["justapath.tsv"])
    p = write_tsv(tmp_path / "x.tsv", [("good", 1)])
    assert list(parse_extra_eval([f"x={p}"])) == ["x"]
