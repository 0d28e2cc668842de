"""compare(): same weights and data for every algorithm, the table, the files."""

import csv

import pytest

import rnngrad
from rnngrad.compare import TABLE_FIELDS, compare
from rnngrad.tasks import StreamAdd

pytestmark = pytest.mark.usefixtures("one_thread")


def test_compare_table_and_files(tmp_path):
    seen = []
    rows = compare("adding", ["bptt", ("bptt again", rnngrad.bptt()), rnngrad.eprop()],
                   seeds=[0, 1], steps=6, hidden=8, batch_size=8, track_every=3, eval_every=3,
                   out_dir=tmp_path, progress=seen.append)
    assert [r["algorithm"] for r in rows] == ["bptt", "bptt again", "eprop(feedback='symmetric')"]
    assert set(rows[0]) == set(TABLE_FIELDS)
    # same initial weights and data: two BPTT runs are identical
    assert rows[0]["final_test_loss_mean"] == rows[1]["final_test_loss_mean"]
    assert rows[0]["cosine_mean"] == pytest.approx(1.0)
    assert 0.0 < rows[2]["cosine_mean"] < 1.0 and rows[2]["state_kib"] < rows[0]["state_kib"]
    assert {p["step"] for p in seen} == {0, 3, 6}
    for f in ("compare.csv", "curves.csv", "alignment.csv", "learning_curves.png",
              "alignment.png"):
        assert (tmp_path / f).stat().st_size > 0
    with open(tmp_path / "compare.csv") as f:
        assert len(list(csv.DictReader(f))) == 3


def test_compare_streaming_online_updates():
    task = StreamAdd(seq_len=12, streaming=True)
    rows = compare(task, ["eprop", "bptt"], steps=4, hidden=8, batch_size=2, update_every=4,
                   optimizer="sgd", lr=0.1, track_every=2)
    assert all(r["final_test_loss_mean"] > 0 for r in rows)


def test_compare_bad_arguments():
    with pytest.raises(ValueError, match="unknown optimizer"):
        compare("adding", ["bptt"], optimizer="rmsprop")
    with pytest.raises(ValueError, match="unknown algorithm"):
        compare("adding", ["nope"])
    with pytest.raises(ValueError, match="distinct"):
        compare("adding", ["bptt", "bptt"])


def test_the_curves_grow_as_the_comparison_goes(tmp_path):
    seen = []

    def progress(info):
        with open(tmp_path / "curves.csv") as f:
            seen.append(len(list(csv.DictReader(f))))
        assert not (tmp_path / "compare.csv").exists()  # written last

    compare("adding", ["bptt", "eprop"], seeds=[0], steps=4, hidden=3, batch_size=2,
            eval_every=2, track_every=2, out_dir=tmp_path, progress=progress)
    assert seen == [1, 2, 3, 4, 5, 6]  # steps 0, 2, 4 of each algorithm, as they came
    with open(tmp_path / "alignment.csv") as f:
        assert [(r["algorithm"], r["step"]) for r in csv.DictReader(f)] == [
            ("bptt", "2"), ("bptt", "4"), ("eprop", "2"), ("eprop", "4")]
    assert (tmp_path / "compare.csv").exists()
