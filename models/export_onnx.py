"""Write a model to ONNX with its BatchNorm layers kept as BatchNormalization nodes.

``python -m models.export_onnx MODEL FILE`` (or ``tta-serve export-onnx MODEL FILE``) exports a
registered model with its pretrained weights; :func:`to_onnx` exports any eval-mode module.
Exporters fold eval-mode BatchNorm into the preceding convolution when they fold constants,
which leaves nothing to adapt: the export here keeps it (``do_constant_folding=False``, eval
mode), and checks that every BatchNorm2d came out as a node.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import onnx
import torch
from torch import nn

from models.errors import ModelError
from models.registry import check_batchnorm, create_model

OPSET = 17


def to_onnx(
    model: nn.Module,
    input_shape: tuple[int, int, int],
    *,
    dynamic_size: bool = False,
) -> onnx.ModelProto:
    """The ONNX graph of an eval-mode classifier, BatchNorm kept, the batch size dynamic.

    Args:
        model: an eval-mode module with BatchNorm2d layers.
        input_shape: (channels, height, width) of one input.
        dynamic_size: also leave the height and width dynamic.

    Example:
        >>> proto = to_onnx(model, (3, 32, 32))  # doctest: +SKIP
    """
    expected = check_batchnorm(model)
    axes = {0: "batch", 2: "height", 3: "width"} if dynamic_size else {0: "batch"}
    with warnings.catch_warnings(), tempfile.TemporaryDirectory() as folder:
        file = Path(folder) / "model.onnx"
        # The TorchScript exporter's deprecation and constant-folding notices: not actionable.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model.eval(),
            (torch.zeros(1, *input_shape),),
            file,
            dynamo=False,
            training=torch.onnx.TrainingMode.EVAL,
            do_constant_folding=False,  # folding would fuse BatchNorm into the convolutions
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": axes, "logits": {0: "batch"}},
            opset_version=OPSET,
        )
        proto = onnx.load_model(file)
    found = sum(node.op_type == "BatchNormalization" for node in proto.graph.node)
    if found != expected:
        raise ModelError(f"the export kept {found} of {expected} BatchNorm2d layers as nodes")
    return proto


def export_onnx(name: str, file: Path, *, cache_dir: Path) -> int:
    """Write registered model ``name`` with its pretrained weights to ``file``; BN nodes kept."""
    model, spec = create_model(name, cache_dir=cache_dir.expanduser())
    proto = to_onnx(model, (3, *spec.input_size))
    onnx.save_model(proto, file)
    return sum(node.op_type == "BatchNormalization" for node in proto.graph.node)


def main(argv: Sequence[str] | None = None) -> None:
    """``export-onnx MODEL FILE [--cache-dir DIR]``."""
    parser = argparse.ArgumentParser(
        prog="tta-serve export-onnx",
        description="Write a registered model to ONNX with its BatchNorm layers kept as nodes.",
    )
    parser.add_argument("model", help="a registered model name (GET /v1/models lists them)")
    parser.add_argument("file", type=Path, help="the .onnx file to write")
    parser.add_argument(
        "--cache-dir",
        type=Path,
        # The server's weights cache (TTA_MODEL_CACHE_DIR, which scripts/env.sh seeds offline).
        default=Path(os.environ.get("TTA_MODEL_CACHE_DIR", "~/.cache/tta-serve/models")),
        help="weights cache (default: $TTA_MODEL_CACHE_DIR, else ~/.cache/tta-serve/models)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(levelname)s %(name)s: %(message)s")
    layers = export_onnx(args.model, args.file, cache_dir=args.cache_dir)
    logging.getLogger(__name__).info(
        "wrote %s to %s with %d BatchNormalization nodes", args.model, args.file, layers
    )


if __name__ == "__main__":
    main()
