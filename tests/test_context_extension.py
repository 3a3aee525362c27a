"""The context-extension stage on the command line: `longcat train --set init_from=DIR` with a longer context and
a RoPE change writes the new rope fields into the output config.json (docs/context_extension.md)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from train_support import make_corpus, tiny_overrides

from longcat_flash.cli import main
from longcat_flash.config import ModelConfig, RopeScaling
from longcat_flash.train.config import TrainConfig

S, LONG = 64, 256  # the tiny recipe's seq_len, and 4x it


def sets(*overrides: str) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def run_cli(*args: str) -> str:
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    return str(exc.value.code)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> tuple[Path, list[str]]:
    """A tiny model pre-trained for 2 steps at S positions, and the data overrides every run here uses."""
    root = tmp_path_factory.mktemp("context")
    data = tiny_overrides(make_corpus(root / "corpus"), root / "cache", "data.val_batches=1")
    main(["train", "--preset", "tiny", "--out", str(root / "base"), "--max-steps", "2", "--no-progress",
          *sets(*data, f"model.max_position_embeddings={S}", "model.rope_theta=10000")])
    return root / "base", data


def test_a_yarn_factor_that_does_not_give_the_context_is_pointed_out(base, tmp_path, capsys):
    """Raising max_position_embeddings on a YaRN run left factor 4 over 64 positions: it trained at 1024 while
    interpolating for 256, silently (transformers warns of the mismatch when it loads such a config)."""
    directory, data = base
    yarn = f"model.rope_scaling={{'rope_type': 'yarn', 'factor': 4, 'original_max_position_embeddings': {S}}}"
    main(["train", "--preset", "tiny", "--out", str(tmp_path / "stale"), "--max-steps", "1", "--no-progress",
          *sets(*data, f"init_from={directory}", f"model.max_position_embeddings={2 * LONG}", yarn)])
    assert (f"note: model.rope_scaling.factor=4 interpolates for 4 x {S} positions, but max_position_embeddings="
            f"{2 * LONG} is {2 * LONG // S} x") in capsys.readouterr().out


def test_a_second_yarn_stage_counted_from_the_first_stages_context_is_pointed_out(base, tmp_path, capsys):
    """Extending a YaRN model again as the docs said ("the length the model was trained at before the extension
    this run makes"), factor 2 over the first stage's 256, gave the first stage's frequencies back: no further
    interpolation, without a word. A further stage keeps the first S and raises the factor."""
    directory, data = base
    first = tmp_path / "first"

    def yarn(factor: int, original: int) -> str:
        return f"model.rope_scaling={{'rope_type': 'yarn', 'factor': {factor}, 'original_max_position_embeddings': " \
               f"{original}}}"

    main(["train", "--preset", "tiny", "--out", str(first), "--max-steps", "1", "--no-progress",
          *sets(*data, f"init_from={directory}", f"model.max_position_embeddings={LONG}", yarn(LONG // S, S))])
    capsys.readouterr()
    for out, stage, noted in (("counted-again", yarn(2, LONG), True), ("compounded", yarn(2 * LONG // S, S), False)):
        main(["train", "--preset", "tiny", "--out", str(tmp_path / out), "--max-steps", "1", "--no-progress",
              *sets(*data, f"init_from={first}", f"model.max_position_embeddings={2 * LONG}", stage)])
        printed = capsys.readouterr().out
        note = (f"note: init_from was extended with YaRN from {S} positions (factor {LONG // S}); this run counts "
                f"from original_max_position_embeddings={LONG}. A further YaRN stage keeps {S} and raises the factor "
                f"(to {2 * LONG // S} here)")
        assert (note in printed) == noted, printed


@pytest.mark.parametrize("rope", [
    [f"model.rope_scaling={{'rope_type': 'yarn', 'factor': 4, 'original_max_position_embeddings': {S}}}"],
    ["model.rope_theta=500000"],
], ids=["yarn", "rope-theta"])
def test_extension_run_writes_the_rope_fields_into_config_json(base, rope, tmp_path, capsys):
    directory, data = base
    out = tmp_path / "extended"
    main(["train", "--preset", "tiny", "--out", str(out), "--max-steps", "2", "--no-progress",
          *sets(*data, f"init_from={directory}", f"model.max_position_embeddings={LONG}", *rope,
                f"data.seq_len={LONG}", "data.batch_size=2")])
    printed = capsys.readouterr().out
    header = next(line for line in printed.splitlines() if line.startswith("starting"))
    assert f"; from {directory}, changing model." in header  # what the run changes from the checkpoint's model
    assert f"model.max_position_embeddings={LONG} (checkpoint: {S})" in header
    assert ("model.rope_scaling=RopeScaling(rope_type='yarn'" if "yarn" in rope[0] else
            "model.rope_theta=500000.0 (checkpoint: 10000.0)") in header
    assert "note: model.rope_scaling.factor" not in printed  # factor 4 x 64 is the 256 it trains at
    cfg, before = ModelConfig.from_json(out), ModelConfig.from_json(directory)
    written = json.loads((out / "config.json").read_text())
    assert written["max_position_embeddings"] == cfg.max_position_embeddings == LONG
    saved = TrainConfig.from_json(out / "train_config.json")  # what --resume rebuilds
    assert saved.model == cfg and saved.data.seq_len == LONG and saved.init_from == str(directory)
    if "yarn" in rope[0]:
        assert cfg.rope_scaling == RopeScaling(rope_type="yarn", factor=4, original_max_position_embeddings=S)
        assert written["rope_parameters"]["rope_type"] == "yarn" and written["rope_parameters"]["factor"] == 4
        assert cfg.rope_theta == before.rope_theta
    else:
        assert written["rope_parameters"] == {"rope_type": "default", "rope_theta": 500000.0}
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoConfig.from_pretrained(out)
    assert ModelConfig.from_dict(json.loads(hf.to_json_string())) == cfg


def test_bad_extension_overrides_are_clear_errors(base):
    directory, data = base
    start = ["train", "--preset", "tiny", "--print-config", *sets(*data, f"init_from={directory}")]
    message = run_cli(*start, *sets(f"data.seq_len={LONG}"))
    assert f"data.seq_len must be <= model.max_position_embeddings={S}" in message
    message = run_cli(*start, *sets("model.rope_scaling.factor=4"))
    assert "rope_scaling.factor=4.0 only applies with rope_type='yarn'" in message
    message = run_cli(*start, *sets("model.rope_scaling={'factor': 4}"))  # read as if the model were YaRN already
    assert "model.rope_scaling as a dict replaces the whole section, rope_type included" in message
    message = run_cli(*start, *sets("model.rope_scaling={'rope_type': 'yarn', 'factor': 4, "
                                    "'original_max_position_embeddings': 128}"))
    assert f"original_max_position_embeddings=128 exceeds max_position_embeddings={S}" in message
    assert "model.num_layers" in run_cli("train", "--preset", "tiny", "--max-steps", "1", "--out",
                                         str(directory.parent / "wider"),
                                         *sets(*data, f"init_from={directory}", "model.num_layers=3"))


def test_the_default_windows_follow_the_context_the_run_sets(tmp_path):
    """`longcat sft --set model.max_position_embeddings=...` on a short-context base kept the base's windows: the
    recipe's 2048 tokens were cut to the base's context, not the one the run sets."""
    from longcat_flash.train.config import build_config

    main(["init", "--preset", "tiny", "--out", str(tmp_path / "m")])
    init, context = f"init_from={tmp_path / 'm'}", ModelConfig.from_json(tmp_path / "m").max_position_embeddings
    assert context < 2048 and build_config("sft", [init]).data.seq_len == context
    longer = [init, "model.max_position_embeddings=4096"]
    assert build_config("sft", longer).data.seq_len == 2048  # the recipe's windows, now that the context holds them
    assert build_config("sft", [*longer, "data.seq_len=100"]).data.seq_len == 100
