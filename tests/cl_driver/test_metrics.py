import math

import pytest

from cl_driver import metrics

# A[i, j]: accuracy on task j after step i
A = [[50.0, 20.0, 30.0],
     [40.0, 60.0, 10.0],
     [30.0, 50.0, 70.0]]


def test_transfer_is_the_mean_over_later_columns_of_the_entries_above_the_diagonal():
    # column 2: A[0,1] = 20; column 3: mean(A[0,2], A[1,2]) = 20  -> 20
    assert metrics.transfer(A) == pytest.approx(20.0)


def test_average_is_the_mean_of_the_column_means():
    # columns: (50+40+30)/3 = 40, (20+60+50)/3 = 43.33, (30+10+70)/3 = 36.67 -> 40
    assert metrics.average(A) == pytest.approx(40.0)


def test_last_is_the_mean_of_the_final_row():
    assert metrics.last(A) == pytest.approx(50.0)


def test_transfer_weighs_each_column_equally_not_each_entry():
    B = [[0.0, 90.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    # column 2 mean 90, column 3 mean 0 -> 45 (an entry-weighted mean would give 30)
    assert metrics.transfer(B) == pytest.approx(45.0)


def test_one_task_has_no_transfer():
    assert math.isnan(metrics.transfer([[80.0]]))
    assert metrics.average([[80.0]]) == metrics.last([[80.0]]) == 80.0


def test_a_non_square_matrix_is_refused():
    with pytest.raises(ValueError, match="square"):
        metrics.summarize([[1.0, 2.0]])


def test_markdown_table_and_heatmap(tmp_path):
    table = metrics.markdown_table({"m": metrics.summarize(A), "single": metrics.summarize([[10.0]])})
    assert "| m | 20.0 | 40.0 | 50.0 |" in table
    assert "| single | n/a | 10.0 | 10.0 |" in table
    path = metrics.heatmap(A, ["a", "b", "c"], tmp_path / "h.png", title="m")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| 3. c | 30.0 | 50.0 | 70.0 |" in metrics.matrix_table(A, ["a", "b", "c"])
