"""The training log: metrics.jsonl and the progress bar beside it."""
from __future__ import annotations

from longcat_flash.train.metrics import MetricsLog, read_metrics


def test_the_progress_bar_shows_each_steps_own_figures(tmp_path, capsys):
    """The bar drew step n before taking step n's figures, so it read `2/6 loss=<step 1's>` and a step's val
    loss showed only one step later (a slow SFT step showed no figures for its whole duration)."""
    log = MetricsLog(tmp_path, start_step=0, total_steps=3)
    log.bar.mininterval = 0  # draw every update, however quick the steps
    frames = []
    for step, loss in ((1, 5.0), (2, 4.0)):
        log.write({"step": step, "loss": loss, "lr": 0.1 * step})
        frames.append(capsys.readouterr().err.split("\r")[-1])
    log.close()
    assert "1/3" in frames[0] and "loss=5 lr=0.1" in frames[0], frames
    assert "2/3" in frames[1] and "loss=4 lr=0.2" in frames[1], frames
    assert [r["loss"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [5.0, 4.0]
