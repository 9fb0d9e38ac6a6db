"""Tests of the accuracy benchmark's machinery: orderings, protocols, lanes, errors, reporting.

No data set and no trained model: the numbers themselves belong to ``bench/accuracy.py``'s runs.
"""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from bench.accuracy import (
    CANDIDATES,
    MAIN_VARIANTS,
    ModelResults,
    Pool,
    ResultCache,
    Table,
    build_protocol,
    check_targets,
    cut,
    dirichlet_order,
    error_rates,
    longest_runs,
    majority_share,
    measure,
    parse_args,
    recommend,
    render,
    render_best_everywhere,
    run_protocol,
    score_candidates,
    stream_config,
    variant,
)
from bench.report import read_section, table, write_section

LABELS = np.repeat(np.arange(10), 100)  # 1000 balanced labels, sorted


def _order(seed: int, delta: float = 0.1, labels: np.ndarray = LABELS) -> np.ndarray:
    return dirichlet_order(labels, delta, np.random.default_rng(seed), num_classes=10)


# --------------------------------------------------------------------------- Dirichlet ordering


@pytest.mark.parametrize("delta", [0.01, 0.1, 1.0, 100.0])
def test_dirichlet_order_is_a_permutation(delta: float) -> None:
    order = _order(0, delta)
    assert sorted(order.tolist()) == list(range(len(LABELS)))


def test_dirichlet_order_is_deterministic_per_seed() -> None:
    assert np.array_equal(_order(3), _order(3))
    assert not np.array_equal(_order(3), _order(4))


def test_small_delta_gives_long_single_class_runs() -> None:
    rng = np.random.default_rng(0)
    shuffled = LABELS[rng.permutation(len(LABELS))]
    correlated = np.mean(longest_runs(LABELS[_order(0, 0.1)]))
    # an i.i.d. order has runs of ~1.1; NOTE's delta = 0.1 gives runs of tens at N = 1000
    assert np.mean(longest_runs(shuffled)) < 1.5
    assert correlated > 15
    assert np.mean(longest_runs(LABELS[_order(0, 0.01)])) > correlated
    # large delta: every chunk holds every class, still as blocks (of ~N / classes^2)
    assert np.mean(longest_runs(LABELS[_order(0, 100.0)])) < correlated / 2


def test_dirichlet_order_keeps_every_chunk_populated() -> None:
    # chunks = classes; each chunk holds >= 10 samples, so 10 blocks of the stream are not empty
    labels = np.random.default_rng(1).integers(0, 10, 2000)
    order = dirichlet_order(labels, 0.1, np.random.default_rng(0), num_classes=10)
    assert sorted(order.tolist()) == list(range(2000))


def test_longest_runs() -> None:
    assert longest_runs(np.array([1, 1, 2, 2, 2, 1])).tolist() == [2, 3, 1]
    assert longest_runs(np.array([], dtype=np.int64)).tolist() == []


# -------------------------------------------------------------------------------------- batching


def test_cut_keeps_order_and_a_short_last_batch() -> None:
    batches = cut(np.arange(10), 4)
    assert [b.tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


DOMAINS = np.repeat(np.arange(3), 100)
POOL_LABELS = np.tile(np.arange(10), 30)


def _rows(streams: list[list[np.ndarray]]) -> list[int]:
    return sorted(np.concatenate([b for s in streams for b in s]).tolist())


@pytest.mark.parametrize(
    ("name", "streams", "batch"),
    [("iid", 3, 64), ("continual", 1, 64), ("mixed", 1, 64), ("dirichlet", 3, 64)],
)
def test_protocols_show_every_image_once(name: str, streams: int, batch: int) -> None:
    protocol = build_protocol(name, DOMAINS, POOL_LABELS, seed=0, batch=batch)
    assert len(protocol.streams) == streams
    assert _rows(protocol.streams) == list(range(300))
    assert all(len(b) <= batch for s in protocol.streams for b in s)
    assert protocol.images == 300


def test_iid_streams_are_one_corruption_each_and_shuffled() -> None:
    protocol = build_protocol("iid", DOMAINS, POOL_LABELS, seed=0, batch=64)
    for d, stream in enumerate(protocol.streams):
        rows = np.concatenate(stream)
        assert set(DOMAINS[rows].tolist()) == {d}
        assert not np.array_equal(rows, np.sort(rows))


def test_continual_batches_never_straddle_a_corruption_change() -> None:
    protocol = build_protocol("continual", DOMAINS, POOL_LABELS, seed=0, batch=64)
    stream = protocol.streams[0]
    assert all(len(set(DOMAINS[b].tolist())) == 1 for b in stream)
    assert [int(DOMAINS[b[0]]) for b in stream] == sorted(int(DOMAINS[b[0]]) for b in stream)


def test_mixed_batches_mix_corruptions() -> None:
    protocol = build_protocol("mixed", DOMAINS, POOL_LABELS, seed=0, batch=64)
    assert len(set(DOMAINS[protocol.streams[0][0]].tolist())) == 3


def test_single_protocol_caps_images_and_uses_n_1() -> None:
    protocol = build_protocol("single", DOMAINS, POOL_LABELS, seed=0, single_n=7)
    assert protocol.batch == 1
    assert [len(s) for s in protocol.streams] == [7, 7, 7]
    assert all(len(b) == 1 for s in protocol.streams for b in s)


def test_protocols_are_deterministic_and_seeded() -> None:
    first = build_protocol("dirichlet", DOMAINS, POOL_LABELS, seed=0)
    again = build_protocol("dirichlet", DOMAINS, POOL_LABELS, seed=0)
    other = build_protocol("dirichlet", DOMAINS, POOL_LABELS, seed=1)
    flat = [np.concatenate(p.streams[0]) for p in (first, again, other)]
    assert np.array_equal(flat[0], flat[1])
    assert not np.array_equal(flat[0], flat[2])
    assert first.seeds == again.seeds
    assert len(set(first.seeds)) == len(first.seeds)


@pytest.mark.parametrize("name", ["iid", "dirichlet", "single"])
def test_a_subset_of_corruptions_keeps_each_streams_images_and_order(name: str) -> None:
    """Keyed by the corruption's index in the full list, a run over corruptions 1 and 2 gives
    their streams exactly the rows (relative to the domain) of the run over 0, 1 and 2."""
    full = build_protocol(name, DOMAINS, POOL_LABELS, seed=0, batch=16, single_n=20)
    rows = DOMAINS > 0
    subset = build_protocol(
        name, DOMAINS[rows] - 1, POOL_LABELS[rows], seed=0, batch=16, single_n=20, keys=[1, 2]
    )
    offset = int((~rows).sum())
    for whole, part in zip(full.streams[1:], subset.streams, strict=True):
        assert [b.tolist() for b in whole] == [(b + offset).tolist() for b in part]
    assert full.seeds[1:] == subset.seeds


def test_unknown_protocol_names_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="valid: iid, continual"):
        build_protocol("sorted", DOMAINS, POOL_LABELS, seed=0)


def test_majority_share_is_one_for_single_class_batches() -> None:
    protocol = build_protocol("iid", DOMAINS, np.zeros(300, dtype=np.int64), seed=0)
    assert majority_share(protocol, np.zeros(300, dtype=np.int64)) == 1.0


def test_stream_config_carries_the_seed_only_where_the_adapter_takes_one() -> None:
    assert stream_config(variant("unmix_tns", components=128), 7) == {
        "components": 128,
        "seed": 7,
    }
    assert stream_config(variant("adabn", prior_images=16), 7) == {"prior_images": 16}
    assert variant("adabn", prior_images=16).label == "adabn(prior_images=16)"


# ----------------------------------------------------------------------------------------- lanes


def _tiny_engine():
    from engine.core import Engine

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),
    )
    with torch.no_grad():  # non-trivial source statistics
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    return Engine(model.eval(), num_classes=10, capacity=64)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 255


def test_lanes_give_each_stream_what_it_gets_alone() -> None:
    """Packing several streams into one forward changes no prediction (segment statistics)."""
    engine = _tiny_engine()
    rng = np.random.default_rng(0)
    pool = Pool(
        torch.from_numpy(rng.integers(0, 256, (300, 3, 8, 8), dtype=np.uint8)),
        POOL_LABELS,
        DOMAINS,
        ("a", "b", "c"),
    )
    protocol = build_protocol("iid", DOMAINS, POOL_LABELS, seed=0, batch=32)
    variants = [variant("tbn"), variant("adabn"), variant("unmix_tns", components=4)]
    packed = run_protocol(engine, _identity, pool, protocol, variants, max_batch=1000)
    alone = run_protocol(engine, _identity, pool, protocol, variants, max_batch=32)
    for v in variants:
        assert (packed[v.label] >= 0).all()
        assert np.array_equal(packed[v.label], alone[v.label]), v.label


def test_a_stopped_run_resumes_from_its_cache(tmp_path: Path, monkeypatch) -> None:
    """Results are stored per variant and corruption as they finish; with --resume only the
    missing corruption streams run again, and the table is the same as an uninterrupted run."""
    import bench.accuracy as accuracy

    engine = _tiny_engine()
    rng = np.random.default_rng(0)
    pool = Pool(
        torch.from_numpy(rng.integers(0, 256, (300, 3, 8, 8), dtype=np.uint8)),
        POOL_LABELS,
        DOMAINS,
        ("a", "b", "c"),
    )
    protocol = build_protocol("iid", DOMAINS, POOL_LABELS, seed=0, batch=32)
    variants = [variant("tbn"), variant("adabn")]
    args = parse_args(["--resume", "--cells", str(tmp_path / "cells.json"), "--max-batch", "64"])
    setting = ResultCache.setting("tiny", args, 100, protocol.key)
    whole = measure(engine, _identity, pool, protocol, variants, args, "", ResultCache(None), "x")

    # a run stopped after adabn's first corruption: its cache holds that one cell only
    partial = ResultCache(args.cells)
    first = {"a": float(whole.errors["adabn"][0])}
    partial.store(setting, protocol.title, 100, 0.0, "adabn", first)
    ran: list[tuple[str, int]] = []
    real = accuracy.run_protocol

    def counting(*a, todo=None, **k):
        ran.extend(sorted(todo))
        return real(*a, todo=todo, **k)

    monkeypatch.setattr(accuracy, "run_protocol", counting)
    resumed = measure(
        engine, _identity, pool, protocol, variants, args, "", ResultCache(args.cells), setting
    )
    assert ("adabn", 0) not in ran and ("adabn", 1) in ran and ("tbn", 0) in ran
    for v in variants:
        np.testing.assert_array_equal(resumed.errors[v.label], whole.errors[v.label])
    ran.clear()
    again = measure(
        engine, _identity, pool, protocol, variants, args, "", ResultCache(args.cells), setting
    )
    assert ran == []  # everything cached: nothing runs
    np.testing.assert_array_equal(again.errors["tbn"], whole.errors["tbn"])


# ---------------------------------------------------------------------------------------- errors


def test_error_rates_per_domain_and_unseen_domains() -> None:
    labels = np.array([0, 1, 2, 3, 4, 5])
    domains = np.array([0, 0, 1, 1, 2, 2])
    predictions = np.array([0, 9, 2, 3, -1, -1])  # domain 2 not shown
    errors = error_rates(predictions, labels, domains, 3)
    assert errors[:2].tolist() == [50.0, 0.0]
    assert math.isnan(errors[2])


def _results(**means: dict[str, float]) -> ModelResults:
    """Results whose protocol tables hold one corruption with the given errors."""
    results = ModelResults()
    for key, errors in means.items():
        results.tables[key] = Table(key, 10, {k: np.array([v]) for k, v in errors.items()})
    return results


def test_targets_met_and_missed() -> None:
    results = _results(
        iid64={"source": 60.0, "tbn": 30.0, "adabn": 32.0},
        dirichlet={"source": 60.0, "tbn": 85.0, "unmix_tns": 59.0, "alpha_bn": 58.0},
        single={"source": 60.0, "tbn": 90.0, "alpha_bn": 58.0, "unmix_tns": 61.5},
    )
    checks = {c.claim: c for c in check_targets(results)}
    assert checks["i.i.d. B=64: best adapter cuts the mean error vs source by >= 45 % relative"].met
    assert checks["Dirichlet(0.1): UnMix-TNS >= 20 points better than TBN"].met
    assert checks["N=1: best adapter >= 5 points better than source"].met is False
    assert checks["ordering, N=1: unmix_tns about at or below source (<= source + 1)"].met is False


def test_targets_not_measured_without_the_protocol() -> None:
    checks = check_targets(_results(iid64={"source": 60.0, "tbn": 30.0}))
    assert {c.met for c in checks if "Dirichlet" in c.claim} == {None}


def test_candidate_gaps_and_worst_protocol() -> None:
    results = _results(
        iid64={"source": 60.0, "adabn(prior_images=64)": 40.0},
        single={"source": 50.0, "adabn(prior_images=64)": 52.5},
    )
    (candidate,) = score_candidates(results, ["adabn(prior_images=64)"])
    assert candidate.gaps == {"iid64": -20.0, "single": 2.5}
    assert candidate.worst == ("single", 2.5)
    assert candidate.overall == pytest.approx(46.25)


def test_a_candidate_missing_a_protocol_or_a_corruption_gets_no_verdict() -> None:
    """Its gaps where measured are shown, but it is neither safe nor the safest (found when a
    partial candidate read as "worst: iid64 +nan" and could have been picked by dict order)."""
    label = "adabn(prior_images=16)"
    results = _results(
        continual={"source": 60.0, label: 45.0},
        dirichlet={"source": 60.0, label: 50.0},
        iid64={"source": 60.0, "adabn": 40.0},
    )
    results.tables["dirichlet"].errors[label][0] = math.nan  # one corruption not measured
    (candidate,) = score_candidates(results, [label])
    assert candidate.gaps["continual"] == -15.0
    assert math.isnan(candidate.gaps["dirichlet"]) and math.isnan(candidate.gaps["iid64"])
    assert candidate.describe_worst() == "not measured in dirichlet"
    assert not any("Default" in line for line in recommend(results, [candidate]))


def test_best_everywhere_gaps_verdicts_and_share_removed() -> None:
    results = _results(
        iid64={"source": 60.0, "tbn": 40.0, "adabn": 41.5, "momentum": 39.0},
        continual={"source": 60.0, "tbn": 45.0, "adabn": 46.0, "momentum": 70.0},
    )
    results.tables["continual"].errors["tbn"][0] = math.nan  # one corruption not measured
    results.clean["source"] = 20.0
    text = "\n".join(render_best_everywhere(results))
    # continual's best among complete variants is adabn (tbn lacks a corruption)
    assert "| best | momentum 39.0 | adabn 46.0 |" in text
    assert "| adabn | +2.5 | +0.0 | missed |" in text
    assert "| momentum | +0.0 | +24.0 | missed |" in text  # and worse than source
    assert "| tbn | +1.0 |  | not measured everywhere |" in text
    # (60 - 39) / (60 - 20) = 52 % of the corruption-added error removed, i.i.d.
    assert "| momentum | 52 | -25 |" in text


def test_best_everywhere_meets_within_two_points_and_never_worse() -> None:
    results = _results(
        iid64={"source": 60.0, "a": 40.0, "b": 41.9},
        dirichlet={"source": 60.0, "a": 50.0, "b": 45.0},
    )
    text = "\n".join(render_best_everywhere(results))
    assert "| b | +1.9 | +0.0 | met in the 2 of 5 protocols measured |" in text
    assert "| a | +0.0 | +5.0 | missed |" in text


def test_parallel_runs_sharing_a_cells_file_keep_each_others_results(tmp_path: Path) -> None:
    path = tmp_path / "cells.json"
    first, second = ResultCache(path), ResultCache(path)  # both opened before either stores
    first.store("s|iid64", "i.i.d.", 10, 0.2, "tbn", {"fog": 30.0})
    second.store("s|iid64", "i.i.d.", 10, 0.2, "adabn", {"fog": 31.0})
    second.store("s|single", "N=1", 10, 0.1, "adabn", {"fog": 50.0})
    reread = ResultCache(path)
    assert reread.errors("s|iid64", "tbn") == {"fog": 30.0}
    assert reread.errors("s|iid64", "adabn") == {"fog": 31.0}
    assert reread.errors("s|single", "adabn") == {"fog": 50.0}


def test_a_run_without_source_reports_its_candidates_without_failing() -> None:
    """A resumed piece of the matrix may run only some variants: no gap to source, no error."""
    results = _results(iid64={"momentum": 38.3, "adabn(prior_images=64)": 37.0})
    (candidate,) = score_candidates(results, ["adabn(prior_images=64)"])
    assert candidate.means == {"iid64": 37.0}
    assert math.isnan(candidate.gaps["iid64"])
    assert candidate.describe_worst() == "not measured in iid64"


def test_variant_labels_are_unique() -> None:
    labels = [v.label for v in (*MAIN_VARIANTS, *CANDIDATES)]
    assert len(labels) == len(set(labels))


# --------------------------------------------------------------------------------------- report


def test_a_run_of_some_variants_reports_only_those() -> None:
    args = parse_args(["--variants", "source", "tbn", "--corruptions", "fog", "--n", "10"])
    assert args.variants == ["source", "tbn"]
    results = _results(dirichlet={"source": 60.0, "tbn": 85.0})
    results.clean = {"source": 20.0, "tbn": 26.0}
    body = render({"cifar10_resnet20": results}, args, torch.device("cpu"), 60.0, {})
    assert "| tbn | 85.0 |" in body and "| source | 60.0 |" in body
    rows = {line.split(" | ")[0] for line in body.splitlines() if line.startswith("| ")}
    assert not rows & {"| alpha_bn", "| unmix_tns", "| momentum", "| adabn"}


def test_unknown_variant_labels_are_refused() -> None:
    with pytest.raises(SystemExit):
        parse_args(["--variants", "adabn(prior_images=3)"])


def test_write_section_replaces_only_its_block(tmp_path: Path) -> None:
    path = tmp_path / "report.md"
    write_section(path, "a", "first", title="Title")
    write_section(path, "b", "second")
    write_section(path, "a", "first again \\1")
    text = path.read_text()
    assert text.startswith("# Title\n")
    assert read_section(path, "a") == "first again \\1"
    assert read_section(path, "b") == "second"
    assert text.index("begin:a") < text.index("begin:b")
    assert read_section(path, "missing") is None


def test_table_formats_floats_and_nan() -> None:
    assert table(["x", "y"], [["a", 1.25], ["b", math.nan]]).splitlines()[2:] == [
        "| a | 1.2 |",
        "| b | - |",
    ]
