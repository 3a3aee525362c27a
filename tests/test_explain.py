"""`longcat explain`: per-token FFN-expert counts written as JSON/HTML/PNG, consistent statistics, clear errors."""
from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch

from longcat_flash.analysis.explain import CLASSES, classify, token_spans
from longcat_flash.checkpoint.hf import LongcatFlash
from longcat_flash.cli import main
from longcat_flash.presets import tiny
from longcat_flash.tokenizer import train_tokenizer

CORPUS = ["def add(a, b):\n    return a + b  # 2024\n", "<script>alert(1)</script> The quick brown fox.\n",
          "naïve café, 你好 🙂 x_1 = 42;\n"] * 10
TEXT = 'def f(x_1):\n\treturn x_1 + 42  # <script>alert("hi")</script> 你好 🙂'
CONTEXT = 64


def _save_checkpoint(path, tok, ffn_bias: float | None = None, **changes) -> None:
    """A tiny model (with `changes` to its config) beside its tokenizer; `ffn_bias` pushes every router's
    FFN-expert bias to force zero experts."""
    model = LongcatFlash(tiny().replace(vocab_size=320, max_position_embeddings=CONTEXT, **changes))
    model.init_weights(0.5)  # a wide router init, so counts vary across tokens and layers
    if ffn_bias is not None:
        for router in model.routers():
            router.e_score_correction_bias[: model.config.n_routed_experts] = ffn_bias
    model.save_pretrained(path)
    tok.save(path)


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(CORPUS, vocab_size=320)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tok):
    path = tmp_path_factory.mktemp("ckpt")
    _save_checkpoint(path, tok)
    return path


@pytest.fixture(scope="module")
def explained(checkpoint, tmp_path_factory):
    """One run through the CLI, shared by the checks on what it wrote."""
    out = tmp_path_factory.mktemp("explain")
    main(["explain", "--model", str(checkpoint), "--text", TEXT, "--out", str(out)])
    return out, json.loads((out / "explain.json").read_text(encoding="utf-8"))


def test_files_written_and_summary_printed(checkpoint, tmp_path, capsys):
    main(["explain", "--model", str(checkpoint), "--text", "x = 1, y", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    names = ["explain.json", "explain.html"] + (["explain.png"] if importlib.util.find_spec("matplotlib") else [])
    for name in names:
        assert (tmp_path / name).stat().st_size > 0
        assert f"wrote {tmp_path / name}" in printed
    for cls in (*CLASSES, "all"):
        assert cls in printed
    if "explain.png" in names:
        assert (tmp_path / "explain.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_run_without_matplotlib_leaves_no_earlier_picture(checkpoint, tmp_path, monkeypatch, capsys):
    """The help says the files there are replaced: an explain.png of another text stayed beside the new JSON."""
    import sys

    (tmp_path / "explain.png").write_bytes(b"an earlier run's picture")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    main(["explain", "--model", str(checkpoint), "--text", "x = 1", "--out", str(tmp_path)])
    assert "skipped explain.png" in capsys.readouterr().out and not (tmp_path / "explain.png").exists()


def test_counts_are_integers_in_range_and_averages_are_layer_means(explained):
    _, data = explained
    k, layers, tokens = data["moe_topk"], data["num_layers"], data["num_tokens"]
    assert layers == tiny().num_layers and len(data["counts"]) == layers
    assert all(len(row) == tokens for row in data["counts"])
    assert all(isinstance(c, int) and 0 <= c <= k for row in data["counts"] for c in row)
    assert len({c for row in data["counts"] for c in row}) > 1  # the view has something to show
    for t, avg in enumerate(data["average"]):
        assert avg == pytest.approx(sum(row[t] for row in data["counts"]) / layers)
    for i, stats in enumerate(data["layers"]):
        assert stats["mean"] == pytest.approx(sum(data["counts"][i]) / tokens)


def test_the_experts_are_the_routers_ffn_choices(checkpoint, explained):
    """explain.json said how many FFN experts each token used, not which: the router's ids were thrown away."""
    _, data = explained
    model = LongcatFlash.from_pretrained(checkpoint)
    ids = torch.tensor([[t["id"] for t in data["tokens"]]])
    routing = model(ids, compute_logits=False).routing
    for layer, info in zip(data["experts"], routing):
        want = [sorted(e for e in row if e < info.n_ffn) for row in info.ids.tolist()]
        assert layer == want
    assert [[len(used) for used in layer] for layer in data["experts"]] == data["counts"]


def test_spans_rebuild_the_text_and_class_stats_add_up(explained):
    _, data = explained
    assert "".join(t["text"] for t in data["tokens"]) == TEXT
    assert [t["class"] for t in data["tokens"]] == [classify(t["text"]) for t in data["tokens"]]
    stats = data["classes"]
    assert set(stats) == set(CLASSES)
    assert sum(s["count"] for s in stats.values()) == data["num_tokens"]
    weighted = sum(s["mean"] * s["count"] for s in stats.values() if s["count"])
    assert weighted == pytest.approx(sum(data["average"]))
    for name, s in stats.items():
        values = [a for a, t in zip(data["average"], data["tokens"]) if t["class"] == name]
        if values:
            mean = sum(values) / len(values)
            assert s["std"] == pytest.approx(math.sqrt(sum((v - mean) ** 2 for v in values) / len(values)))


def test_html_escapes_the_text(explained):
    out, _ = explained
    page = (out / "explain.html").read_text(encoding="utf-8")
    assert "<script" not in page.lower()
    assert "&lt;" in page and "&quot;" in page  # the "<" token, and the quoted spans in tooltips
    assert page.count('<tr class="avg">') == 1 and page.count("<th>layer ") == tiny().num_layers


def test_forced_zero_experts_give_zero_counts(tok, tmp_path, capsys):
    _save_checkpoint(tmp_path / "ckpt", tok, ffn_bias=-10.0)
    main(["explain", "--model", str(tmp_path / "ckpt"), "--text", TEXT, "--out", str(tmp_path / "out"), "--json"])
    data = json.loads(capsys.readouterr().out)
    assert all(c == 0 for row in data["counts"] for c in row)
    assert all(a == 0 for a in data["average"])
    assert all(s["mean"] == 0 for s in data["classes"].values() if s["count"])
    assert json.loads((tmp_path / "out" / "explain.json").read_text(encoding="utf-8"))["counts"] == data["counts"]


def test_the_summary_states_the_range_the_model_allows(tok, tmp_path, capsys):
    """With fewer zero experts than top-k a token uses at least K - Z FFN experts: the line said [0, K]."""
    _save_checkpoint(tmp_path / "ckpt", tok, zero_expert_num=1, num_layers=1)
    main(["explain", "--model", str(tmp_path / "ckpt"), "--text", TEXT, "--out", str(tmp_path / "out")])
    assert "1 layer, FFN experts per token per layer in [2, 3] (mean" in capsys.readouterr().out
    _save_checkpoint(tmp_path / "few", tok, n_routed_experts=2, zero_expert_num=4, num_layers=1)  # top-3
    main(["explain", "--model", str(tmp_path / "few"), "--text", TEXT, "--out", str(tmp_path / "out")])
    assert "FFN experts per token per layer in [0, 2] (mean" in capsys.readouterr().out


@pytest.mark.parametrize("span, expected", [
    (" ", "whitespace"), ("\n\t", "whitespace"), ("42", "digits"), (" 7", "digits"), ("(", "punctuation"),
    (" +=", "punctuation"), ("。", "punctuation"), ("the", "identifiers"), (" __init__", "identifiers"),
    ("x1", "identifiers"), ("你好", "identifiers"), ("):x", "other"), ("🙂", "other"), ("", "other"),
])
def test_classify_rules(span, expected):
    assert classify(span) == expected


def test_token_spans_keep_multibyte_characters_whole(tok):
    ids = tok.encode("a你🙂b")
    spans = token_spans(tok, ids)
    assert "".join(spans) == "a你🙂b" and len(spans) == len(ids)
    assert "\ufffd" not in "".join(spans)
    assert all(s in ("", "a", "你", "🙂", "b") or s.isascii() for s in spans)


@pytest.mark.parametrize("make_args, message", [
    (lambda ck, tmp: ["--model", str(tmp / "missing"), "--text", "hi"], "does not exist"),
    (lambda ck, tmp: ["--model", str(tmp), "--text", "hi"], "is not a model directory: it has no config.json"),
    (lambda ck, tmp: ["--model", str(ck), "--text", ""], "empty"),
    (lambda ck, tmp: ["--model", str(ck), "--text", "word, " * CONTEXT], f"max_position_embeddings={CONTEXT}"),
])
def test_bad_input_fails_with_a_clear_message(checkpoint, tmp_path, make_args, message):
    with pytest.raises(SystemExit, match=message):
        main(["explain", *make_args(checkpoint, tmp_path), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
