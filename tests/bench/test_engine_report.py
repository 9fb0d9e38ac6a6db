"""The fastest-forms report of bench.engine: its verdicts against issue 17's GPU targets."""

from __future__ import annotations

import argparse

import torch

from bench.engine import _fastest_report


def test_the_fastest_report_states_each_gpu_target_met_or_missed() -> None:
    args = argparse.Namespace(
        model="cifar10_resnet20", batch_sizes=[256, 1024], dtypes=["fp32", "bf16"], repeats=5
    )
    # (adapted / plain, plain s, adapted s) per (dtype, adapter, batch)
    results = {
        ("fp32", "adabn", 256): (1.25, 1e-3, 1.25e-3),
        ("fp32", "adabn", 1024): (1.2, 4e-3, 1024 / 150_000),
        ("bf16", "adabn", 256): (1.4, 1e-3, 1.4e-3),
        ("bf16", "adabn", 1024): (1.1, 2e-3, 1024 / 250_000),
    }
    lines = _fastest_report(args, torch.device("cuda"), "NVIDIA H200", True, ["adabn"], results)
    rows = {line.split(" | ")[0].strip("| "): line for line in lines if line.startswith("| ")}
    assert "B=256 <= 1.3: met; B=1024 >= 200,000/s: MISSED" in rows["fp32"]
    assert "B=256 <= 1.3: MISSED; B=1024 >= 200,000/s: met" in rows["bf16"]
    assert "| 1.25 | 204,800 | 1.20 | 150,000 |" in rows["fp32"]
    assert "Plain forward, bf16 (images/s): B=256: 256,000, B=1024: 512,000." in lines
    assert "captured as CUDA graphs" in "\n".join(lines)
