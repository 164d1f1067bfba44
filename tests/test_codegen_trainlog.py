"""Tests for codegen/trainlog.py: log.csv and the loss / chrF plot."""
import pytest

from codegen.trainlog import LOG_FIELDS, CsvLog, read_log


def test_csv_log_keeps_the_rows_up_to_the_resumed_step(tmp_path):
    path = tmp_path / "log.csv"
    log = CsvLog(path)
    for step in (1, 2, 3):
        log.write(step=step, lr=0.5, train_loss=1.0 / 3 if step == 2 else None)
    assert [r["step"] for r in read_log(path)] == ["1", "2", "3"] and tuple(read_log(path)[0]) == LOG_FIELDS
    assert read_log(path)[1]["train_loss"] == "0.33333333" and read_log(path)[0]["train_loss"] == ""
    CsvLog(path, resume_step=2).write(step=3, lr=0.25)
    assert [(r["step"], r["lr"]) for r in read_log(path)] == [("1", "0.5"), ("2", "0.5"), ("3", "0.25")]
    CsvLog(path)  # a new run starts a new log
    assert read_log(path) == []


def test_plot_curves_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is optional; without it training skips the plot")
    from codegen.trainlog import plot_curves

    log = tmp_path / "log.csv"
    log.write_text("step,epoch,lr,train_loss,valid_loss,chrf,tokens_per_s,elapsed\n"
                   "10,0.1,0.001,5.0,,,100,1\n20,0.2,0.001,4.0,4.5,3.0,100,2\n")
    png = plot_curves(log, tmp_path / "curves.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

