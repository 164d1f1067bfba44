"""training.py: the learning-rate schedule, log.csv and its plot, shared by every training loop."""
import math

import pytest

from training import CsvLog, log_path, lr_at, plot_curves, read_log


def test_warm_up_then_each_decay():
    lr, total, warm = 1.0, 110, 10
    assert [lr_at(s, total, lr, warm) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert lr_at(60, total, lr, warm, "cosine") == pytest.approx(0.5)
    assert lr_at(35, total, lr, warm, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_at(60, total, lr, warm, "linear") == pytest.approx(0.5)
    assert lr_at(60, total, lr, warm, "constant") == 1.0
    assert lr_at(110, total, lr, warm, "cosine", min_lr_ratio=0.1) == pytest.approx(0.1)
    assert lr_at(500, total, lr, warm, "cosine", min_lr_ratio=0.1) == pytest.approx(0.1)  # stays at the floor
    assert lr_at(60.5, total, lr, warm) < lr_at(60, total, lr, warm)  # fractional steps (a clock's progress)
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_at(0, total, lr, warm, "exponential")


def test_csv_log_with_its_own_columns_and_resume(tmp_path):
    path = tmp_path / "runs" / "log.csv"
    log = CsvLog(path, ("step", "loss", "acc"))
    for step in (1, 2, 3):
        log.write(step=step, loss=1 / step, acc=None, ignored="x")
    rows = read_log(path)
    assert [tuple(r.values()) for r in rows] == [("1", "1", ""), ("2", "0.5", ""), ("3", "0.33333333", "")]
    CsvLog(path, ("step", "loss", "acc"), resume_step=2).write(step=3, loss=0.25)
    assert [(r["step"], r["loss"]) for r in read_log(path)] == [("1", "1"), ("2", "0.5"), ("3", "0.25")]
    CsvLog(path, ("step", "loss"))  # a new run starts afresh
    assert read_log(path) == [] and path.read_text() == "step,loss\n"


def test_the_log_lives_beside_its_checkpoint(tmp_path):
    assert log_path(tmp_path / "finetune-5-2e-05.pt", ".csv") == tmp_path / "finetune-5-2e-05-log.csv"
    assert log_path("base.pt", ".png").name == "base-log.png"


def test_plot_curves(tmp_path):
    log = tmp_path / "log.csv"
    log.write_text("epoch,train_loss,dev_acc\n1,0.9,0.5\n2,0.7,\n3,0.6,0.7\n")
    png = plot_curves(log, tmp_path / "log.png", [("loss", ["train_loss"]), ("accuracy", ["dev_acc"])], x="epoch")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert png is None and not (tmp_path / "log.png").exists()  # optional: nothing written, no error
        return
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
