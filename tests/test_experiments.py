"""Every experiment runs end to end in its --quick mode (real trainer, real corpus, seconds) and writes its JSON
and PNG. Their numbers mean nothing at this size; the full runs behind the README table are not tests."""
from __future__ import annotations

import importlib
import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
LIBRARIES = {"common.py", "budget_convergence.py"}  # a helper module; an analysis of an existing run directory
NAMES = sorted(p.stem for p in EXPERIMENTS.glob("*.py") if p.name not in LIBRARIES)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("experiments")  # one root; each experiment works in its own WORK/<name>


def test_there_are_experiments():
    assert len(NAMES) >= 9, NAMES


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_quick_mode_writes_json_and_png(name: str, work: Path, experiments_path, monkeypatch):
    """Run as the script's --quick command line runs it, but in this process (runpy): a subprocess spent ~5 s
    of each script's ~10 importing torch and the package again. A failure is the script's own exception."""
    import matplotlib.pyplot as plt

    out = work / "out"
    monkeypatch.setenv("LONGCAT_TUNE_MALLOC", "0")  # the scripts tune malloc: leave this process's alone
    monkeypatch.setattr(sys, "argv", [f"experiments/{name}.py", "--quick", "--out", str(out),
                                      "--work", str(work / name)])
    try:
        runpy.run_path(str(EXPERIMENTS / f"{name}.py"), run_name="__main__")
    finally:
        plt.close("all")
    record = json.loads((out / f"{name}.json").read_text())
    assert record["experiment"] == name and record["quick"] is True
    assert record["claim"] and record["setup"] and record["verdict"] and record["results"]
    assert record["reproduced"] in (True, False, None)
    assert (out / f"{name}.png").stat().st_size > 1000


# ---- arguments: a bad one stops the script with one line, before any tokenizer or training work ----
# Checked in this process (the script's main() under a patched argv): a subprocess per case spent ~4 s importing
# torch for a check that takes milliseconds. One case runs as a real process (the work directory's).

def _experiment(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout)


def _main_refuses(name: str, args: list[str], monkeypatch, capsys) -> str:
    """experiments/<name>.py's main() with `args`: it must exit with status 2 (argparse's); its last stderr line."""
    monkeypatch.setenv("LONGCAT_TUNE_MALLOC", "0")  # main() tunes malloc: leave this process's alone
    monkeypatch.setattr(sys, "argv", [f"experiments/{name}.py", *args])
    with pytest.raises(SystemExit) as stopped:
        importlib.import_module(name).main()
    err = capsys.readouterr().err
    assert stopped.value.code == 2, err
    return err.splitlines()[-1]


@pytest.mark.parametrize("name, args, flag", [
    ("zero_experts", ["--steps", "0"], "--steps"),
    ("zero_experts", ["--seeds", "-1"], "--seeds"),
    ("mtp_acceptance", ["--checkpoints", "0"], "--checkpoints"),
    ("mla_scales", ["--q-ratio", "3"], "--q-ratio"),  # does not divide d_model
    ("adam_eps", ["--eps", "-1"], "--eps"),
    ("adam_eps", ["--eps", "1e-3", "1e-3"], "--eps: 0.001 given more than once"),  # a one-ε "grid"
    ("adam_eps", ["--eps", "1e-3"], "--eps: a loss-vs-ε curve needs at least 2"),
    ("width_transfer", ["--lrs", "1e-2", "2e-2", "1e-2"], "--lrs: 0.01 given more than once"),
    ("z_loss", ["--z-weights", "0", "1e-6", "1e-6"], "--z-weights: 1e-06 given more than once"),
    ("context_extension", ["--theta", "-5"], "--theta"),
    ("width_transfer", ["--mults", "1"], "--mults"),
    ("width_transfer", ["--lrs", "1e-2"], "--lrs"),
    ("growth", ["--depth", "3"], "--depth"),
    ("zero_experts", ["--data", "{tmp}/no-such-corpus"], "no-such-corpus"),
    ("zero_experts", ["--out", "{tmp}/a-file"], "--out"),
    ("zero_experts", ["--steps", "5"], "--steps"),  # --quick's own step count: refused, not silently replaced
])
def test_a_bad_argument_is_one_line_before_any_work(name: str, args: list[str], flag: str, tmp_path: Path,
                                                     experiments_path, monkeypatch, capsys):
    (tmp_path / "a-file").write_text("")
    work = tmp_path / "work"
    last = _main_refuses(name, ["--quick", "--out", str(tmp_path / "out"), "--work", str(work),
                                *(a.format(tmp=tmp_path) for a in args)], monkeypatch, capsys)
    assert flag in last and not (work / "_data").exists()  # stopped before the tokenizer


def test_growth_refuses_a_growth_step_with_no_steps_after_it(tmp_path: Path, experiments_path, monkeypatch,
                                                             capsys):
    """--grow-at equal to --steps trained every run, then measure() found no step after growth and crashed."""
    corpus, work = tmp_path / "corpus", tmp_path / "work"
    corpus.mkdir()
    (corpus / "doc.txt").write_text("a tiny corpus\n")
    last = _main_refuses("growth", ["--out", str(tmp_path / "out"), "--work", str(work), "--data", str(corpus),
                                    "--steps", "20", "--grow-at", "20"], monkeypatch, capsys)
    assert "--grow-at 20 must be below --steps 20" in last and not (work / "_data").exists()


def test_mtp_acceptance_refuses_more_checkpoints_than_steps(tmp_path: Path, experiments_path, monkeypatch, capsys):
    """It measured --steps checkpoints and said "over all 4 checkpoints" for --checkpoints 8."""
    corpus, work = tmp_path / "corpus", tmp_path / "work"
    corpus.mkdir()
    (corpus / "doc.txt").write_text("a tiny corpus\n")
    last = _main_refuses("mtp_acceptance", ["--out", str(tmp_path / "out"), "--work", str(work), "--data",
                                            str(corpus), "--steps", "4", "--checkpoints", "8"], monkeypatch, capsys)
    assert "--checkpoints 8 is more than --steps 4" in last and not (work / "_data").exists()
    last = _main_refuses("mtp_acceptance", ["--out", str(tmp_path / "out"), "--work", str(work), "--data",
                                            str(corpus), "--new-tokens", "4"], monkeypatch, capsys)
    assert "--new-tokens 4 is too few to tell a degenerate output" in last  # 1/4 distinct read as not degenerate


@pytest.mark.slow
def test_a_diverging_run_ends_its_experiment_with_results_not_a_traceback(tmp_path: Path, experiments_path,
                                                                          monkeypatch, capsys):
    """`z_loss.py --lr 100` stopped the whole experiment with the trainer's TrainingStopped traceback and no JSON
    (only width_transfer caught it). A diverged run's figures read NaN: null in the JSON, nan in the verdict."""
    monkeypatch.setenv("LONGCAT_TUNE_MALLOC", "0")
    monkeypatch.setattr(sys, "argv", ["experiments/z_loss.py", "--quick", "--lr", "100", "--out",
                                      str(tmp_path / "out"), "--work", str(tmp_path / "work")])
    importlib.import_module("z_loss").main()
    assert capsys.readouterr().out.count(": diverged (stopping at step") == 2
    record = json.loads((tmp_path / "out" / "z_loss.json").read_text())
    assert [r["final_val_loss"] for r in record["results"].values() if isinstance(r, dict)] == [None, None]
    assert "final val loss nan vs nan" in record["verdict"]


def test_a_diverged_runs_last_record_reads_as_nan_where_analyses_look(experiments_path):
    """The record held the numeric figures only (a list of per-layer figures, or `skipped`, was missing)."""
    import math

    from common import diverged_record

    records = [{"step": i, "skipped": False, "loss": 5.0, "ffn_experts_per_layer": [2.0, 2.1]} for i in (1, 2)]
    last = diverged_record(records)
    assert last["step"] == 3 and last["diverged"] and not last["skipped"]
    assert math.isnan(last["val_loss"]) and all(map(math.isnan, last["ffn_experts_per_layer"]))


def test_a_diverging_run_ends_an_experiment_whose_analysis_cannot_read_nan_in_one_line(tmp_path: Path,
                                                                                        experiments_path):
    """Every experiment but width_transfer ended with the trainer's TrainingStopped traceback. Those that drive the
    LR high on purpose (z_loss, width_transfer) read NaN figures; the others, whose analyses cannot (statistics
    over NaN fails inside Python), stop with one line naming the run."""
    from common import Setup, run
    from train_support import make_corpus, tiny_config

    cfg = tiny_config(make_corpus(tmp_path / "corpus"), tmp_path / "cache", "optim.lr=100", "max_steps=12")
    setup = Setup("budget_control", False, tmp_path / "out", tmp_path / "work", cfg)
    with pytest.raises(SystemExit, match=r"\[budget_control\] r0 diverged \(stopping at step \d+: 5 consecutive"):
        run(setup, "r0", cfg)
    assert run(setup, "r0", cfg, may_diverge=True)[-1]["diverged"]


def test_a_corpus_the_trainer_refuses_ends_the_experiment_in_one_line(tmp_path: Path, experiments_path):
    """A corpus too small for one validation window ended the experiment with the trainer's ValueError traceback;
    one with no text first trained a tokenizer on nothing."""
    from common import Setup, prepare_data, run
    from train_support import tiny_config

    (tmp_path / "small").mkdir()
    (tmp_path / "small" / "a.py").write_text("x = 1\n" * 20)
    cfg = tiny_config(tmp_path / "small", tmp_path / "cache", "max_steps=2")
    setup = Setup("zero_experts", True, tmp_path / "out", tmp_path / "work", cfg)
    with pytest.raises(SystemExit, match=r"\[zero_experts\] r0: the val split has \d+ tokens, fewer than one window"):
        run(setup, "r0", cfg)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("")
    empty = Setup("zero_experts", True, tmp_path / "out", tmp_path / "work", tiny_config(tmp_path / "empty",
                                                                                       tmp_path / "cache"))
    with pytest.raises(SystemExit, match=r"the corpus holds no text"):
        prepare_data(empty, tmp_path / "shared")
    assert not (tmp_path / "shared").exists()


def test_a_work_directory_the_experiments_do_not_own_is_refused(tmp_path: Path):
    """An experiment replaces WORK/<label> (base, yarn, ...): `--work runs` deleted a user's own runs/base. As a
    real process: one line on stderr, status 2, no traceback."""
    work = tmp_path / "runs"
    (work / "base").mkdir(parents=True)
    (work / "base" / "NOTES.txt").write_text("mine")
    proc = _experiment(str(EXPERIMENTS / "zero_experts.py"), "--quick", "--out", str(tmp_path / "out"), "--work",
                       str(work))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert f"--work {work} already holds files no experiment wrote" in proc.stderr.splitlines()[-1]
    assert (work / "base" / "NOTES.txt").read_text() == "mine"


def test_a_changed_setting_does_not_overwrite_the_committed_results(tmp_path: Path, experiments_path, monkeypatch,
                                                                     capsys):
    """Without --out (and without --quick) the results would go to docs/experiments: a run that is not the reference
    run is refused there, before it trains."""
    reference = EXPERIMENTS.parent / "docs" / "experiments" / "zero_experts.json"
    before = reference.read_bytes()
    last = _main_refuses("zero_experts", ["--steps", "5", "--work", str(tmp_path)], monkeypatch, capsys)
    assert "--out" in last
    assert reference.read_bytes() == before and not (tmp_path / "_data").exists()


def _budget_records(steps: int, grown_at: int | None = None) -> list[dict]:
    """A `longcat train` run's metrics records: 2 layers, 4 from step `grown_at` on (`longcat grow`, resumed)."""
    def layers(s: int) -> list[float]:
        return [1.0, 2.0, 3.0, 4.0] if grown_at is not None and s >= grown_at else [2.0, 2.0 + (-1) ** s / s]

    return [{"step": s, "skipped": False, "ffn_experts_target": 2.0, "ffn_experts_per_token": 2.0 + (-1) ** s / s,
             "ffn_experts_per_layer": layers(s), "ffn_experts_std": 0.5} for s in range(1, steps + 1)]


def _budget_run(run: Path, records: list[dict], zero_experts: int = 4) -> Path:
    """A run directory as budget_convergence reads it: metrics.jsonl and train_config.json."""
    from longcat_flash.train.config import apply_overrides, recipe

    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run / "train_config.json").write_text(
        apply_overrides(recipe("small"), [f"model.zero_expert_num={zero_experts}"]).to_json())
    return run


def test_budget_convergence_writes_to_out_and_refuses_a_negative_tolerance(tmp_path: Path, experiments_path,
                                                                          monkeypatch, capsys):
    run, out, steps = _budget_run(tmp_path / "run", _budget_records(20)), tmp_path / "out", 20
    assert "--tolerance" in _main_refuses("budget_convergence", [str(run), "--tolerance", "-1"], monkeypatch, capsys)
    assert "--window 21 is longer than the run's 20 logged steps" in _main_refuses(
        "budget_convergence", [str(run), "--window", "21"], monkeypatch, capsys)  # was a mean over fewer, as if 21
    assert f"{tmp_path / 'nope'} does not exist" in _main_refuses("budget_convergence", [str(tmp_path / "nope")],
                                                                   monkeypatch, capsys)  # not "holds no metrics"
    monkeypatch.setattr(sys, "argv", ["budget_convergence.py", str(run / "metrics.jsonl"), "--out", str(out)])
    importlib.import_module("budget_convergence").main()  # given the file itself
    written = [out / "budget_convergence.json", out / "budget_convergence.png"]
    assert capsys.readouterr().out.splitlines()[-1] == f"[budget_convergence] wrote {written[0]} and {written[1]}"
    summary = json.loads(written[0].read_text())
    assert summary["tail_steps"] == steps and not any(key.startswith("last50") for key in summary)
    assert not (run / "budget_convergence.json").exists()


@pytest.mark.parametrize("records, zero_experts, message", [
    ([{"step": 1}, {"step": 2}], 4, "metrics.jsonl: record 1 lacks skipped, ffn_experts_target, "
                                    "ffn_experts_per_token, ffn_experts_per_layer, ffn_experts_std"),
    (_budget_records(20), 0, "the run's model has no zero experts"),  # was reported as perfect control
])
def test_budget_convergence_refuses_what_is_not_a_budget_run(records: list, zero_experts: int, message: str,
                                                             tmp_path: Path, experiments_path, monkeypatch, capsys):
    run = _budget_run(tmp_path / "run", records, zero_experts)
    assert message in _main_refuses("budget_convergence", [str(run)], monkeypatch, capsys)
    assert not (run / "budget_convergence.json").exists()


def test_budget_convergence_keeps_the_layers_a_grown_run_added(tmp_path: Path, experiments_path):
    """Grown from 2 to 4 layers at step 11: the tail means and the plot dropped layers 2 and 3."""
    import budget_convergence

    records = _budget_records(20, grown_at=11)
    summary = budget_convergence.summarize(records, 10, 0.03)
    assert summary["tail_layer_means"][2:] == [3.0, 4.0] and summary["tail_layer_steps"] == [20, 20, 10, 10]
    fig = budget_convergence.plot(records, 2.0, tmp_path / "budget_convergence.png")
    drawn = [list(line.get_xdata()) for line in fig.axes[0].lines[:4]]
    assert drawn == [list(range(1, 21))] * 2 + [list(range(11, 21))] * 2


# ---- the experiments' own logic, on made-up measurements ----

@pytest.fixture(scope="module")
def experiments_path():
    sys.path.insert(0, str(EXPERIMENTS))  # the scripts import their helpers as `common`
    yield
    sys.path.remove(str(EXPERIMENTS))


def test_the_tokenizer_cache_is_per_corpus_and_inside_work(tmp_path: Path, experiments_path):
    """Two corpora in folders of the same name, and a corpus edited in place, each get their own tokenizer."""
    from common import MICRO, Setup, data_directory

    from longcat_flash.train.config import apply_overrides, recipe

    def cache(corpus: Path) -> Path:
        base = apply_overrides(recipe("small"), [*MICRO, f"data.source={corpus}"])
        return data_directory(Setup("x", True, tmp_path / "out", tmp_path / "work", base))

    first, second = tmp_path / "a" / "corpus", tmp_path / "b" / "corpus"
    for corpus, text in ((first, "one corpus\n"), (second, "another corpus\n")):
        corpus.mkdir(parents=True)
        (corpus / "doc.txt").write_text(text)
    before = cache(first)
    assert before != cache(second) and before.is_relative_to(tmp_path / "work")
    (first / "doc.txt").write_text("one corpus, edited\n" * 3)
    assert cache(first) != before


def test_context_extension_is_judged_against_the_control(experiments_path):
    """Continued training alone lowers the long-range loss; the RoPE change is credited only with what it adds."""
    import context_extension as ce

    S = 8

    def results(control: float, extension: float) -> dict:
        losses = {"base": 5.0, ce.CONTROL: control, **{label: extension for label in ce.EXTENSIONS}}
        return {label: {"spans": {f"[0,{S})": 4.0, f"[{S},{ce.FACTOR * S})": loss}} for label, loss in losses.items()}

    gains, reproduced, verdict = ce.judge(results(control=4.2, extension=4.2 - ce.MARGIN / 2), S)
    assert not reproduced and "not reproduced" in verdict
    assert all(g > ce.MARGIN for label, g in gains["past_S_gain_over_base"].items() if label != "base")
    assert ce.judge(results(control=4.2, extension=4.2 - 2 * ce.MARGIN), S)[1]


def test_an_untrained_rope_change_gives_its_tokenizer_the_new_context(experiments_path, tmp_path):
    """The "base + yarn" variant's tokenizer_config.json kept the old model_max_length (transformers warns past it)."""
    import context_extension as ce
    import torch

    from longcat_flash.checkpoint.fresh import init_checkpoint
    from longcat_flash.config import ModelConfig
    from longcat_flash.presets import tiny
    from longcat_flash.tokenizer import Tokenizer

    base = init_checkpoint(tiny(), tmp_path / "base", dtype=torch.float32)
    longer = ModelConfig.from_json(base).replace(max_position_embeddings=4 * tiny().max_position_embeddings)
    out = ce.with_config(base, tmp_path / "longer", longer)
    assert ModelConfig.from_json(out) == longer
    assert Tokenizer.load(out).model_max_length == longer.max_position_embeddings


def test_committed_context_extension_verdict_follows_its_numbers(experiments_path):
    import context_extension as ce

    record = json.loads((EXPERIMENTS.parent / "docs" / "experiments" / "context_extension.json").read_text())
    _, reproduced, verdict = ce.judge(record["results"], record["results"]["S"])
    assert (record["reproduced"], record["verdict"]) == (reproduced, verdict)


def test_mtp_acceptance_reports_the_measured_acceptance_when_not_judged(experiments_path):
    import mtp_acceptance as mtp

    rows = [{"step": 4 * (i + 1), "acceptance": 0.1 * (i + 1), "distinct_token_fraction": 1.0}
            for i in range(mtp.MIN_JUDGED - 1)]
    text = mtp.describe_seed(0, mtp.trend(rows), rows)
    assert "nan" not in text and "not judged" in text
    assert f"{rows[0]['acceptance']:.3f} at step {rows[0]['step']}" in text


def test_mtp_acceptance_judges_the_agreement_by_the_acceptance_rule(experiments_path):
    """The verdict said the teacher-forced agreement "rises" without computing its trend."""
    import mtp_acceptance as mtp

    rows = [{"step": 4 * (i + 1), "acceptance": 0.1 * (i + 1), "agreement": 0.6 - 0.1 * i,
             "distinct_token_fraction": 1.0} for i in range(mtp.MIN_JUDGED + 1)]
    measured = {0: rows}
    text = mtp.describe(mtp.trends_of(measured), measured)
    assert "engine acceptance (greedy, 1 MTP draft, held-out code) rises: seed 0" in text
    assert "teacher-forced agreement does not rise: seed 0: 0.600 at step 4 -> 0.300 at step 16" in text


def test_committed_mtp_acceptance_verdict_follows_its_numbers(experiments_path):
    import mtp_acceptance as mtp

    record = json.loads((EXPERIMENTS.parent / "docs" / "experiments" / "mtp_acceptance.json").read_text())
    seeds = {int(key.removeprefix("seed")): value for key, value in record["results"].items() if key != "held_out"}
    measured = {seed: value["per_checkpoint"] for seed, value in seeds.items()}
    trends = mtp.trends_of(measured)
    for seed, value in seeds.items():
        assert trends["acceptance"][seed].items() <= value.items()
    assert (record["reproduced"], record["verdict"]) == (mtp.decide(list(trends["acceptance"].values())),
                                                         mtp.describe(trends, measured))


def test_mtp_acceptance_plot_names_the_dotted_seed(experiments_path):
    """The second seed is --seed + 1, not "seed 2"."""
    import mtp_acceptance as mtp

    rows = [{"step": 4, "acceptance": 0.5, "agreement": 0.5, "distinct_token_fraction": 1.0}]
    records = [{"step": 4, "val_loss": 5.0, "mtp_loss": 5.0}]
    fig = mtp.plot({5: rows, 6: rows}, {5: records, 6: records})
    assert fig.axes[0].get_title() == "acceptance (hollow: degenerate output; dotted: seed 6)"


def test_width_transfer_optimum_on_an_uneven_grid(experiments_path):
    import math

    import width_transfer as wt

    lrs, best = [1e-3, 3e-3, 4e-3, 2e-2, 5e-2], 5e-3  # no constant factor apart
    losses = [(math.log2(lr) - math.log2(best)) ** 2 for lr in lrs]
    assert wt.optimum(lrs, losses)["fitted_lr"] == pytest.approx(best)


def test_tool_use_pretrains_its_base_on_the_given_data_and_seed(tmp_path: Path, experiments_path, monkeypatch):
    """Outside --quick the base is the small preset: it was trained on the stdlib with seed 0 whatever was asked,
    and wrote its token cache under ~/.cache rather than --work."""
    import tool_use
    from common import MICRO, Setup

    from longcat_flash.train.config import apply_overrides, recipe

    trained = []
    monkeypatch.setattr(tool_use, "train", lambda cfg, out, progress: trained.append(cfg) or out.mkdir(parents=True))
    corpus = str(tmp_path / "corpus")
    base = apply_overrides(recipe("small"), [*MICRO, f"data.source={corpus}", "seed=5"])
    setup = Setup("tool_use", False, tmp_path / "out", tmp_path / "work", base)
    tool_use.base_model(setup, None)
    (cfg,) = trained
    assert (cfg.data.source, cfg.seed, cfg.preset) == (corpus, 5, "small")
    assert (tmp_path / "work") in Path(cfg.data.cache_dir).parents
    (tmp_path / "work" / "base" / "config.json").write_text("{}")  # as the finished run leaves it
    tool_use.base_model(setup, None)
    assert len(trained) == 1  # reused: it was compared with the config as the trainer saves it, never equal
    tool_use.base_model(Setup("tool_use", False, tmp_path / "out", tmp_path / "work",
                              apply_overrides(base, ["seed=6"])), None)
    assert [c.seed for c in trained] == [5, 6]


def test_tool_use_verdict_gives_every_figure_in_both_modes(experiments_path):
    import tool_use

    figures = ("right_tool", "right_arguments", "valid_json")
    results = {mode: {key: (k + 1) / 10 + i / 100 for i, key in enumerate(figures)}
               for k, mode in enumerate(tool_use.MODES)}
    copying = {model: {"first_copy": 1.0, "second_copy": 1.0} for model in ("base", "tuned")}
    text = tool_use.verdict_text(results, copying)
    for key in figures:
        assert " / ".join(f"{results[mode][key]:.0%}" for mode in tool_use.MODES) in text, (key, text)


def test_tool_use_stops_on_a_failed_command_with_its_line_and_on_ctrl_c_quietly(tmp_path, experiments_path,
                                                                              monkeypatch, capsys):
    """Its `longcat` commands run in its process: a failure was blamed on `longcat sft --model`, and Ctrl-C in one
    (the command's own status 130) was reported as a failed command with status 1."""
    import tool_use

    (tmp_path / "rows.jsonl").mkdir()
    with pytest.raises(SystemExit) as stop:
        tool_use.longcat("data", "tools", "--out", str(tmp_path / "rows.jsonl"), "--n", "2")
    assert stop.value.code == "[tool_use] `longcat data tools` failed; its error is above"
    assert "is a directory" in capsys.readouterr().err  # the command's own line, above it
    monkeypatch.setattr(tool_use, "cli_main", lambda args: sys.exit(130))  # as the CLI ends on Ctrl-C
    with pytest.raises(SystemExit) as stop:
        tool_use.longcat("sft", "--model", "m", "--data", "d.jsonl")
    assert stop.value.code == 130 and "failed" not in capsys.readouterr().err


def test_tool_use_scores_arguments_as_json_values(experiments_path):
    """A reply's 25 against the expected 25.0 (the generator writes half-amounts as 61.0) was a wrong argument."""
    import tool_use

    expected = [("convert", {"amount": 61.0, "to": "km"}), ("wx", {"city": "Oslo"})]
    assert tool_use.same_calls([("wx", {"city": "Oslo"}), ("convert", {"to": "km", "amount": 61})], expected)
    assert not tool_use.same_calls([("convert", {"amount": 61.5, "to": "km"}), ("wx", {"city": "Oslo"})], expected)
    assert not tool_use.same_calls([("wx", {"city": "Oslo"}), ("wx", {"city": "Oslo"})], expected)
    assert not tool_use.same_calls([("wx", {"city": "Oslo"})], expected)


def test_a_run_directory_a_live_process_trains_in_is_not_replaced(tmp_path: Path, experiments_path):
    """A killed tool_use.py left its `longcat sft` training in WORK/sft; the rerun deleted the directory under it
    and two runs wrote there at once."""
    import signal
    import time

    from common import cleared, stop_children_on_sigterm

    out = tmp_path / "sft"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; from "
                               "longcat_flash.train import run_lock; run_lock.hold(Path(sys.argv[1])); print(1, "
                               "flush=True); time.sleep(60)", str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "1\n"
        with pytest.raises(SystemExit, match=rf"{out} is in use by another training process \(pid {holder.pid}"):
            cleared(out)
        assert out.is_dir()
    finally:
        holder.kill()
        holder.wait()
    (out / "metrics.jsonl").write_text("{}\n")
    assert cleared(out) == out and not out.exists()  # its process gone: replaced
    previous = signal.getsignal(signal.SIGTERM)
    try:  # SIGTERM stops an experiment as Ctrl-C does, so that subprocess.run kills the command it runs
        stop_children_on_sigterm()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
    finally:
        signal.signal(signal.SIGTERM, previous)
