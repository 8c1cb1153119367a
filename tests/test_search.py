"""Saver search: ranking against a brute-force reference, the pre-screen's soundness, rejections, files and CLI."""

from __future__ import annotations

import doctest
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO_ROOT, requires_shared
from hf_tinysaver.commands import main as cli_main
from hf_tinysaver.models.confidence import compute_confidence
from hf_tinysaver.records import Records
from hf_tinysaver.workflows import search as search_module
from hf_tinysaver.workflows.search import (
    SaverCandidate,
    drop_key,
    load_candidate_table,
    oracle_relative_macs_at_drop,
    rank_savers,
    search_savers,
)
from test_records import write_parquet_folder
from tiny_models import timm_classifier

NUM_LABELS = 10
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def synthetic_records(name: str, labels: np.ndarray, signal: float, seed: int, coarse: bool = True) -> Records:
    """Records of a fake classifier: noisy logits with a label signal; rounded (`coarse`) so confidences tie."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(len(labels), NUM_LABELS)) + signal * np.eye(NUM_LABELS)[labels]
    if coarse:
        logits = np.round(logits * 2) / 2
    logits = logits.astype(np.float32)
    return Records(logits, logits.argmax(1), labels, name, name, "synthetic", "test")


def synthetic_pool(seed: int, n: int = 300, size: int = 6, macs=(5, 95), signals=(0.5, 4.5)):
    """A base (100 M MACs) and candidate savers with random accuracies and MACs (in millions, within `macs`)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, NUM_LABELS, n)
    base = synthetic_records("base", labels, 4.0, seed)
    candidates = []
    for index in range(size):
        records = synthetic_records(f"c{index}", labels, float(rng.uniform(*signals)), seed * 100 + index)
        candidates.append(SaverCandidate(f"c{index}", float(rng.integers(*macs)) * 1e6, records))
    return base, candidates


def brute_force_score(saver: Records, base: Records, relative_saver_macs: float, max_drops):
    """Relative MACs at each allowed drop and the paper's ΔC, from masks over every threshold (no curve, no sums)."""
    confidence = compute_confidence(torch.from_numpy(saver.logits)).numpy()
    labels, n = base.labels, base.n
    base_correct = int((base.predictions == labels).sum())
    thresholds = sorted({1.0, *confidence.tolist(), float(confidence.min()) - 1.0}, reverse=True)
    relative_macs = {}
    for max_drop in max_drops:
        allowed = math.floor(round(max_drop / 100 * n, 9))
        costs = []
        for threshold in thresholds:
            exits = confidence > threshold
            correct = int((np.where(exits, saver.predictions, base.predictions) == labels).sum())
            if base_correct - correct <= allowed:
                costs.append(relative_saver_macs + 1 - exits.mean())
        relative_macs[drop_key(max_drop)] = min(costs)
    exit_rate = 0.0
    for threshold in np.arange(1000, 0, -1) / 1000:
        exits = confidence > threshold
        saver_wins = int((saver.predictions[exits] == labels[exits]).sum())
        if saver_wins < int((base.predictions[exits] == labels[exits]).sum()):
            break
        exit_rate = float(exits.mean())
    return relative_macs, relative_saver_macs - exit_rate


@pytest.mark.parametrize("seed", range(4))
def test_ranking_matches_a_brute_force_reference(seed):
    base, candidates = synthetic_pool(seed)
    # An exact copy of another candidate under a later name: equal on every key but the name.
    candidates.append(SaverCandidate("c9-copy", candidates[0].macs, candidates[0].records))
    base_macs = 100e6
    result = rank_savers(base, base_macs, candidates, max_drops=(0.0, 0.5, 1.0, 2.0), primary_max_drop=1.0)

    expected = {}
    for candidate in candidates:
        relative_macs, delta_c = brute_force_score(candidate.records, base, candidate.macs / base_macs, (0, 0.5, 1, 2))
        expected[candidate.name] = (relative_macs, delta_c, candidate.macs)
    for score in result.candidates:
        relative_macs, delta_c, _ = expected[score.name]
        assert score.status == "ranked"
        assert score.relative_macs == pytest.approx(relative_macs, abs=1e-12)
        assert score.delta_c == pytest.approx(delta_c, abs=1e-12)
        assert score.accuracy == pytest.approx(candidate_accuracy(candidates, score.name))
    order = sorted(
        expected,
        key=lambda name: (round(expected[name][0]["1.0"], 9), round(expected[name][1], 9), expected[name][2], name),
    )
    assert [score.name for score in result.ranked] == order
    assert [score.rank for score in result.ranked] == list(range(1, len(order) + 1))
    paper_order = sorted(expected, key=lambda name: (round(expected[name][1], 9), expected[name][2], name))
    assert sorted(result.ranked, key=lambda s: s.paper_rank)[0].name == paper_order[0]
    copy, original = (next(s for s in result.candidates if s.name == name) for name in ("c9-copy", "c0"))
    assert copy.rank == original.rank + 1
    assert result.winner is (result.ranked[0] if result.ranked[0].relative_macs["1.0"] < 1 else None)


def candidate_accuracy(candidates, name):
    records = next(c.records for c in candidates if c.name == name)
    return float((records.predictions == records.labels).mean())


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("tabulate", [False, True])
def test_prescreen_skips_only_candidates_that_cannot_win(seed, tabulate):
    # Close candidates (similar MACs, accuracies near the base's) so that the bound is often nearly tight.
    base, candidates = synthetic_pool(seed, size=8, macs=(20, 70), signals=(1.5, 5.0))
    rng = np.random.default_rng(seed)
    full = rank_savers(base, 100e6, candidates)
    calls = []

    def lazy(candidate):
        def load():
            calls.append(candidate.name)
            return candidate.records

        # A tabulated accuracy may be optimistic (at least the split's); it only weakens the bound.
        accuracy = candidate_accuracy(candidates, candidate.name) + float(rng.uniform(0, 0.05)) if tabulate else None
        return SaverCandidate(candidate.name, candidate.macs, load, accuracy=accuracy)

    screened = rank_savers(base, 100e6, [lazy(c) for c in candidates], prescreen=True)
    assert screened.winner.name == full.winner.name
    assert screened.winner.relative_macs == full.winner.relative_macs
    by_name = {score.name: score for score in full.candidates}
    skipped = [score for score in screened.candidates if score.status == "skipped"]
    assert sorted(calls) == sorted(score.name for score in screened.ranked)
    for score in screened.candidates:
        # The bound holds for every candidate, recorded or not, and a skipped one truly loses.
        assert score.lower_bound <= by_name[score.name].relative_macs["0.5"] + 1e-9
        if score.status == "skipped":
            assert by_name[score.name].relative_macs["0.5"] > full.winner.relative_macs["0.5"]
            assert "cannot rank first" in score.reason
    assert set(screened.to_dict()["prescreen"]["skipped"]) == {score.name for score in skipped}


def test_prescreen_skips_a_large_candidate_once_a_small_one_saves():
    labels = np.random.default_rng(0).integers(0, NUM_LABELS, 400)
    base = synthetic_records("base", labels, 4.0, 0)
    good = SaverCandidate("small", 10e6, synthetic_records("small", labels, 4.0, 1))
    large = SaverCandidate("large", 90e6, lambda: pytest.fail("the pre-screen recorded a candidate that cannot win"))
    result = rank_savers(base, 100e6, [large, good], prescreen=True)
    assert [(c.name, c.status) for c in result.candidates] == [("small", "ranked"), ("large", "skipped")]
    assert result.candidates[1].lower_bound == pytest.approx(0.9)


@pytest.mark.parametrize("max_drop", [0.0, 0.5, 3.0])
def test_oracle_bound_is_reached_by_an_oracle_confidence(max_drop):
    rng = np.random.default_rng(1)
    labels = rng.integers(0, NUM_LABELS, 500)
    base = synthetic_records("base", labels, 3.0, 2, coarse=False)
    saver = synthetic_records("saver", labels, 2.0, 3, coarse=False)
    harmful = (saver.predictions != labels) & (base.predictions == labels)
    # Confidence ~1 except on the harmful images (saver wrong, base right), which get distinct low confidences so
    # that a threshold can exit all the others and then the harmful ones one at a time.
    logits = np.zeros((500, NUM_LABELS), dtype=np.float32)
    logits[np.arange(500), saver.predictions] = np.where(harmful, np.linspace(0.1, 0.5, 500), 30.0)
    oracle = Records(logits, saver.predictions, labels, "oracle", "oracle", "synthetic", "test")
    result = rank_savers(base, 100e6, [SaverCandidate("oracle", 20e6, oracle)], max_drops=(max_drop,))
    bound = oracle_relative_macs_at_drop(0.2, saver.accuracy, base.accuracy, max_drop)
    assert result.candidates[0].relative_macs[drop_key(max_drop)] == pytest.approx(bound, abs=1 / 500)


def test_rejects_candidates_not_cheaper_than_the_base_or_with_other_classes():
    labels = np.random.default_rng(0).integers(0, NUM_LABELS, 200)
    base = synthetic_records("base", labels, 4.0, 0)
    other = np.random.default_rng(1).normal(size=(200, 5)).astype(np.float32)
    candidates = [
        SaverCandidate("equal", 100e6, synthetic_records("equal", labels, 4.0, 1)),
        SaverCandidate("five-classes", 10e6, Records(other, other.argmax(1), labels, "f", "f", "synthetic", "test")),
        SaverCandidate("told", None, rejection="another label space: test"),
        SaverCandidate("fine", 10e6, synthetic_records("fine", labels, 3.0, 2)),
    ]
    result = rank_savers(base, 100e6, candidates)
    statuses = {c.name: (c.status, c.reason) for c in result.candidates}
    assert statuses["fine"] == ("ranked", None)
    assert statuses["equal"][0] == "rejected" and "not below the base's" in statuses["equal"][1]
    assert statuses["five-classes"] == ("rejected", "it predicts 5 classes but the base 10")
    assert statuses["told"] == ("rejected", "another label space: test")
    assert [c.name for c in result.candidates] == ["fine", "equal", "five-classes", "told"]
    assert result.to_dict()["rejected"].keys() == {"equal", "five-classes", "told"}
    with pytest.raises(ValueError, match="unique"):
        rank_savers(base, 100e6, [candidates[3], candidates[3]])
    unlabelled = Records(base.logits, base.predictions, None, "base", "base", "synthetic", "test")
    with pytest.raises(ValueError, match="labels"):
        rank_savers(unlabelled, 100e6, [candidates[3]])


def test_no_winner_when_no_candidate_saves():
    labels = np.random.default_rng(0).integers(0, NUM_LABELS, 200)
    base = synthetic_records("base", labels, 6.0, 0)
    weak = SaverCandidate("weak", 90e6, synthetic_records("weak", labels, 0.0, 1))
    result = rank_savers(base, 100e6, [weak], max_drops=(0.0,), primary_max_drop=0.0)
    assert result.ranked[0].rank == 1 and result.winner is None
    assert "No candidate makes the cascade cheaper" in result.table()


def test_results_files_and_plot(tmp_path):
    base, candidates = synthetic_pool(0, size=3)
    result = rank_savers(base, 100e6, candidates)
    json_path, csv_path = result.write(tmp_path / "search.json", extra={"note": "x"})
    data = json.loads(json_path.read_text())
    assert data["note"] == "x" and data["winner"] == result.winner.name
    assert [c["rank"] for c in data["candidates"]] == [1, 2, 3]
    for candidate in data["candidates"]:
        assert {"name", "macs", "accuracy", "delta_c", "relative_macs", "exit_rate", "rank"} <= candidate.keys()
        assert set(candidate["relative_macs"]) == set(candidate["exit_rate"]) == {"0.0", "0.5", "1.0"}
    rows = csv_path.read_text().splitlines()
    assert csv_path.name == "search.csv" and len(rows) == 4
    assert "relative_macs_drop_0.5" in rows[0].split(",")
    plot = result.plot(tmp_path / "search.png")
    assert plot.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(plot) as image:
        image.verify()


def test_candidate_table_forms(tmp_path):
    (tmp_path / "t.csv").write_text("name,macs,accuracy\na,1e6,0.5\nb,,0.7\n")
    assert load_candidate_table(tmp_path / "t.csv") == {"a": {"macs": 1e6, "accuracy": 0.5}, "b": {"accuracy": 0.7}}
    (tmp_path / "t.json").write_text(json.dumps({"a": {"macs": 2e6}}))
    assert load_candidate_table(tmp_path / "t.json") == {"a": {"macs": 2e6}}
    (tmp_path / "bad.json").write_text(json.dumps([{"name": "a", "accuracy": 83.2}]))
    with pytest.raises(ValueError, match="fraction"):
        load_candidate_table(tmp_path / "bad.json")


def test_docstring_example_runs():
    text = search_module.__doc__.replace("```python", "").replace("```", "")
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    runner.run(doctest.DocTestParser().get_doctest(text, {}, "search", None, 0))
    assert runner.summarize(verbose=False).failed == 0


@pytest.fixture(scope="module")
def tiny_pool(tmp_path_factory):
    """Tiny classifiers saved as folders: a base, two cheaper savers, one with other labels, and the base again."""
    root = tmp_path_factory.mktemp("pool")
    folders = {}
    other_labels = {i: f"other_{i}" for i in range(NUM_LABELS)}
    for name, model in {
        "base": timm_classifier("test_resnet", seed=0),
        "efficientnet": timm_classifier("test_efficientnet", seed=1),
        "convnext": timm_classifier("test_convnext", seed=2),
        "other-labels": timm_classifier("test_vit", seed=3, labels=other_labels),
    }.items():
        model.save_pretrained(root / name)
        folders[name] = str(root / name)
    data = write_parquet_folder(root / "data")
    return folders, str(data)


def test_search_rejects_other_label_spaces_and_expensive_models(tiny_pool, tmp_path):
    folders, data = tiny_pool
    candidates = [folders["efficientnet"], folders["other-labels"], folders["base"]]
    result = search_savers(folders["base"], candidates, data, "test", cache_dir=tmp_path, progress=False)
    statuses = {c.name: c for c in result.candidates}
    assert statuses[folders["efficientnet"]].status == "ranked"
    other = statuses[folders["other-labels"]]
    assert other.status == "rejected" and "label" in other.reason and "label_mapping" in other.reason
    assert statuses[folders["base"]].status == "rejected" and "not below" in statuses[folders["base"]].reason


def test_cli_search_writes_ranked_results_plot_and_the_winning_cascade(tiny_pool, tmp_path, capsys):
    from transformers import AutoModelForImageClassification

    folders, data = tiny_pool
    table = tmp_path / "table.csv"
    table.write_text(f"name,macs\n{folders['convnext']},31165440\n")
    results = tmp_path / "results" / "search.json"
    arguments = ["search", "--base", folders["base"], "-c", folders["efficientnet"], folders["convnext"]]
    arguments += ["-d", data, "--split", "test", "-b", "8", "--cache-dir", str(tmp_path / "cache"), "--no-progress"]
    # Random tiny models are ~10 % accurate: a 50-point allowance lets every image exit, so a winner exists.
    arguments += ["--max-drop", "50", "--candidate-table", str(table), "--results-file", str(results)]
    assert cli_main([*arguments, "--out", str(tmp_path / "winner")]) == 0
    printed = capsys.readouterr().out
    assert "rank" in printed and "Winner:" in printed and "Saved the winning cascade" in printed
    assert "Every image exits" in printed  # random tiny savers within a 50-point allowance

    data_json = json.loads(results.read_text())
    assert data_json["max_drops"] == [0.0, 0.5, 1.0, 50.0] and data_json["primary_max_drop"] == 50.0
    names = [c["name"] for c in data_json["candidates"]]
    assert sorted(names) == sorted([folders["efficientnet"], folders["convnext"]])
    assert {c["name"]: c["macs"] for c in data_json["candidates"]}[folders["convnext"]] == 31165440
    assert results.with_suffix(".csv").is_file()
    assert results.with_suffix(".png").read_bytes()[:8] == PNG_SIGNATURE

    winner = data_json["winner"]
    cascade = AutoModelForImageClassification.from_pretrained(tmp_path / "winner")
    calibration = json.loads((tmp_path / "winner" / "calibration.json").read_text())
    assert calibration["saver"] == winner and calibration["max_drop"] == 50.0
    assert cascade.config.threshold == calibration["threshold"]
    top = next(c for c in data_json["candidates"] if c["name"] == winner)
    assert calibration["relative_macs"] == pytest.approx(top["relative_macs"]["50.0"])
    assert calibration["search"]["ranked"][0] == winner
    # Both results files say what produced them (the search command, with its versions and hardware).
    from test_provenance import assert_provenance

    assert_provenance(data_json, "search", "--results-file", str(results))
    assert_provenance(calibration, "search", "--out")
    assert (tmp_path / "winner" / "tradeoff.png").read_bytes()[:8] == PNG_SIGNATURE

    # Only candidates that are not cheaper than the base: nothing is ranked, --out saves nothing and says why.
    only_base = ["search", "--base", folders["base"], "-c", folders["base"], "-d", data, "--split", "test"]
    only_base += ["--cache-dir", str(tmp_path / "cache"), "--no-progress", "--results-file", str(results)]
    assert cli_main([*only_base, "--out", str(tmp_path / "none")]) == 1
    assert "no cascade saved" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()
    assert json.loads(results.read_text())["winner"] is None


def _two_process_search(base: str, candidates: list[str], data: str, cache_dir: str, output_dir: str) -> None:
    from accelerate import PartialState

    from hf_tinysaver.records import distributed_state

    PartialState._reset_state()  # forked from the test process, whose single-process state it inherited
    state = distributed_state()
    torch.set_num_threads(1)  # after the state, which sets its own: other counts round the logits differently
    result = search_savers(base, candidates, data, "test", batch_size=4, cache_dir=cache_dir, progress=False)
    scores = [c.to_dict() for c in result.candidates]
    (Path(output_dir) / f"rank{state.process_index}.json").write_text(json.dumps([state.num_processes, scores]))


def test_two_processes_search_like_one(tiny_pool, tmp_path):
    from accelerate import debug_launcher

    folders, data = tiny_pool
    candidates = [folders["efficientnet"], folders["convnext"]]
    single = search_savers(
        folders["base"], candidates, data, "test", batch_size=4, cache_dir=tmp_path / "single", progress=False
    )
    arguments = (folders["base"], candidates, data, str(tmp_path / "cache"), str(tmp_path))
    debug_launcher(_two_process_search, args=arguments, num_processes=2)
    expected = json.loads(json.dumps([c.to_dict() for c in single.candidates]))
    for rank in (0, 1):
        world, scores = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert world == 2
        for score, single_score in zip(scores, expected, strict=True):
            # Same decisions everywhere; thresholds sit between confidences, which move by float noise when the
            # logits are computed under another process layout.
            thresholds = score.pop("threshold"), single_score["threshold"]
            assert score == {k: v for k, v in single_score.items() if k != "threshold"}
            for key, value in thresholds[0].items():
                assert value == pytest.approx(thresholds[1][key], rel=1e-5)


@pytest.mark.slow
@requires_shared("datasets/cifar10-jpeg", "models/cifar10-resnet/resnet20-12fca82f.th")
def test_real_cifar_search_cli(shared_dir, tmp_path, capsys):
    cache_dir = REPO_ROOT / ".cache" / "records"  # git-ignored; a second run only scores
    results = tmp_path / "search.json"
    arguments = [
        "search",
        "--base",
        "cifar10-resnet56",
        "-c",
        "cifar10-resnet20",
        "cifar10-resnet32",
        "cifar10-resnet56",
    ]
    arguments += ["-d", "cifar10", "--split", "test[:1000]", "-b", "250", "--assets", str(shared_dir)]
    arguments += ["--cache-dir", str(cache_dir), "--no-progress", "--results-file", str(results)]
    assert cli_main([*arguments, "--out", str(tmp_path / "winner")]) == 0
    data = json.loads(results.read_text())
    ranked = {c["name"]: c for c in data["candidates"] if c["status"] == "ranked"}
    assert set(ranked) == {"cifar10-resnet20", "cifar10-resnet32"}
    assert data["rejected"].keys() == {"cifar10-resnet56"}
    assert ranked["cifar10-resnet20"]["macs"] == 40551040 and ranked["cifar10-resnet32"]["macs"] == 68862592
    for candidate in ranked.values():
        assert (
            candidate["relative_macs"]["0.0"] >= candidate["relative_macs"]["0.5"] >= candidate["relative_macs"]["1.0"]
        )
        assert candidate["relative_macs"]["0.5"] >= candidate["relative_saver_macs"]
    calibration = json.loads((tmp_path / "winner" / "calibration.json").read_text())
    assert calibration["saver"] == data["winner"]
    assert calibration["relative_macs"] == pytest.approx(ranked[data["winner"]]["relative_macs"]["0.5"])


@pytest.mark.slow
@requires_shared("datasets/cifar10-jpeg", "models/cifar10-resnet/resnet20-12fca82f.th")
@pytest.mark.parametrize("function", ["search_savers", "save_winning_cascade"])
def test_real_docstring_examples_run(function):
    text = getattr(search_module, function).__doc__.replace("```python", "").replace("```", "")
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    runner.run(doctest.DocTestParser().get_doctest(text, {}, function, None, 0))
    assert runner.summarize(verbose=False).failed == 0
