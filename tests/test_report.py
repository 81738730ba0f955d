"""report.py: the PNG drawn from runs' metrics.csv (written here by hand with training.MetricsCSV, in the columns of
pretrain.py's and align.py's METRICS), several runs overlaid, empty cells skipped, bad input one line."""

import runpy
import sys

import pytest
from matplotlib.image import imread

from report import plot_runs, write_run_report
from training import MetricsCSV

PRETRAIN = ["step", "tokens", "train_loss", "val_loss", "lr", "tokens_per_sec", "mfu", "router_aux_loss"]
ALIGN = ["step", "epoch", "tokens", "train_loss", "val_loss", "rewards/chosen", "rewards/rejected",
         "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected", "val_rewards/accuracies",
         "val_rewards/margins", "kl", "lr", "tokens_per_sec", "sample"]
STEPS, VAL_EVERY = 12, 5  # validation at steps 5, 10 and the last, 12, as the scripts do


def write_run(run_dir, columns, slope=1.0):
    """A run's metrics.csv: every column numeric, validation columns only every VAL_EVERY steps, a text sample there,
    and an MoE column left empty (a dense model's router_aux_loss)."""
    metrics = MetricsCSV(run_dir / "metrics.csv", columns, enabled=True, truncate_after_step=0)
    for step in range(1, STEPS + 1):
        validated = step % VAL_EVERY == 0 or step == STEPS
        row = {c: 9.0 - slope * step / STEPS + i for i, c in enumerate(columns)}
        row.update(step=step, tokens=step * 256, epoch=step / STEPS, router_aux_loss=None)
        row.update({c: row[c] if validated else None for c in columns if c.startswith("val_")})
        row["sample"] = 'He said, "hello"\nand left' if validated else None
        metrics.log({c: row[c] for c in columns})
    return run_dir


def panels(fig) -> dict[str, list]:
    return {ax.get_title(): ax.get_lines() for ax in fig.axes if ax.get_visible()}


def test_a_pretraining_run_draws_loss_lr_throughput_and_mfu(tmp_path):
    run = write_run(tmp_path / "pretrain", PRETRAIN)
    fig = plot_runs([run], tmp_path / "report.png")
    # router_aux_loss is empty throughout: no panel for it
    assert set(panels(fig)) == {"loss", "learning rate", "tokens/s", "MFU"}
    height, width, _ = imread(tmp_path / "report.png").shape
    assert width >= 800 and height >= 500  # two by two panels of a readable size (100 dpi)
    assert all(ax.get_xlabel() == "tokens" for ax in fig.axes if ax.get_visible())


def test_an_alignment_run_draws_its_rewards_and_log_probs(tmp_path):
    run = write_run(tmp_path / "align", ALIGN)
    fig = plot_runs([run], tmp_path / "report.png")
    assert set(panels(fig)) == {"loss", "learning rate", "tokens/s", "rewards", "reward margin",
                                "preference accuracy", "log-probs", "KL"}
    assert len(panels(fig)["rewards"]) == 2  # chosen and rejected
    assert (tmp_path / "report.png").stat().st_size > 10_000


def test_several_runs_are_overlaid_one_line_each(tmp_path):
    runs = [write_run(tmp_path / name, PRETRAIN, slope) for name, slope in (("a", 1), ("b", 2), ("c", 3))]
    fig = plot_runs(runs, tmp_path / "compare.png")
    lines = panels(fig)
    for title in ("learning rate", "tokens/s", "MFU"):
        assert len(lines[title]) == len(runs), title
    assert len(lines["loss"]) == 2 * len(runs)  # train and validation per run
    assert len({line.get_color() for line in lines["learning rate"]}) == len(runs)  # one colour per run
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["a", "b", "c"]


def test_empty_validation_cells_are_skipped_not_zeros(tmp_path):
    fig = plot_runs([write_run(tmp_path / "run", PRETRAIN)], tmp_path / "report.png")
    train, val = panels(fig)["loss"]
    assert list(train.get_xdata()) == [s * 256 for s in range(1, STEPS + 1)]
    assert list(val.get_xdata()) == [s * 256 for s in (5, 10, 12)]
    assert min(val.get_ydata()) > 0


def test_runs_without_a_tokens_column_are_drawn_against_step(tmp_path):
    run = write_run(tmp_path / "run", [c for c in PRETRAIN if c != "tokens"])
    fig = plot_runs([run, write_run(tmp_path / "other", PRETRAIN)], tmp_path / "report.png")
    assert {ax.get_xlabel() for ax in fig.axes if ax.get_visible()} == {"step"}


@pytest.mark.parametrize("case", ["missing directory", "no step column"])
def test_bad_input_is_one_line(tmp_path, monkeypatch, case):
    run = tmp_path / "run"
    if case == "no step column":
        run.mkdir()
        (run / "metrics.csv").write_text("loss,lr\n1.0,0.1\n")
    monkeypatch.setattr(sys, "argv", ["report.py", str(run), "--out", str(tmp_path / "r.png")])
    with pytest.raises(SystemExit) as e:
        runpy.run_module("report", run_name="__main__")
    message = str(e.value.code)
    assert message.startswith("error: ") and "\n" not in message and str(run) in message, message
    assert not (tmp_path / "r.png").exists()


def test_the_end_of_run_report_never_fails_a_run(tmp_path, monkeypatch, capsys):
    write_run_report(tmp_path / "nothing here", enabled=True)  # no metrics.csv: a warning, no exception
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if matplotlib were not installed
    run = write_run(tmp_path / "run", PRETRAIN)
    write_run_report(run, enabled=True)
    warnings = capsys.readouterr().err.splitlines()
    assert len(warnings) == 2 and all(w.startswith("warning: no report.png") for w in warnings), warnings
    assert "pip install matplotlib" in warnings[1] and not (run / "report.png").exists()
    write_run_report(tmp_path / "nothing here", enabled=False)  # not rank 0: nothing at all
    assert capsys.readouterr().err == ""
