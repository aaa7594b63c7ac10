"""rounds.jsonl as the progress table reads it while a run writes it: each complete row once, none lost."""

import json

from momkd_fed.run_log import ROUNDS_FILE, RoundsFollower, append_round, read_rounds, truncate_rounds


def _row(n: int, seconds: float) -> dict:
    return {"round": n, "seconds": {"total": seconds}}


def test_each_complete_row_is_returned_once_and_a_partial_line_waits(tmp_path):
    path = tmp_path / ROUNDS_FILE
    rows = RoundsFollower(path)
    assert rows.new_rows() == []  # no file yet
    append_round(tmp_path, _row(1, 1.0))
    append_round(tmp_path, _row(2, 2.0))
    assert [r["round"] for r in rows.new_rows()] == [1, 2]
    assert rows.new_rows() == []
    with path.open("a") as f:  # a row half-written when the table looks
        f.write(json.dumps(_row(3, 3.0))[:10])
    assert rows.new_rows() == []
    with path.open("a") as f:
        f.write(json.dumps(_row(3, 3.0))[10:] + "\n")
    assert [r["round"] for r in rows.new_rows()] == [3]


def test_resume_skips_the_rows_already_there_and_shows_a_round_run_again(tmp_path):
    path = tmp_path / ROUNDS_FILE
    for n in (1, 2, 3):
        append_round(tmp_path, _row(n, float(n)))
    rows = RoundsFollower(path, skip_existing=True)  # --resume: rounds 1-3 were printed by the last session
    assert rows.new_rows() == []
    assert truncate_rounds(tmp_path, 2) == 2  # the last checkpoint was round 2: round 3 is run again
    assert rows.new_rows() == []  # the rows kept were seen already
    append_round(tmp_path, _row(3, 30.0))
    append_round(tmp_path, _row(4, 40.0))
    assert [(r["round"], r["seconds"]["total"]) for r in rows.new_rows()] == [(3, 30.0), (4, 40.0)]
    assert [r["round"] for r in read_rounds(tmp_path)] == [1, 2, 3, 4]


def test_a_file_rewritten_and_grown_past_the_old_offset_is_read_again_from_the_start(tmp_path):
    path = tmp_path / ROUNDS_FILE
    append_round(tmp_path, _row(1, 1.0))
    rows = RoundsFollower(path)
    assert [r["round"] for r in rows.new_rows()] == [1]
    path.unlink()  # a fresh run in the same folder, which is already further than the first one was
    append_round(tmp_path, _row(1, 1.5))
    append_round(tmp_path, _row(2, 2.5))
    assert [(r["round"], r["seconds"]["total"]) for r in rows.new_rows()] == [(1, 1.5), (2, 2.5)]
