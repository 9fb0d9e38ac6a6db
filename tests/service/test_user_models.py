"""Bring-your-own model: user models named in a config file are served; broken ones refused."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torchvision.models
from torch import nn

from service.settings import Settings
from tests.models import toy_models
from tests.service.helpers import png, random_pixels, running_server

TOY = "tests.models.toy_models"


def save(model: nn.Module, path: Path) -> str:
    """Random weights of ``model`` as safetensors; the path."""
    return str(toy_models.save_random(model, path))


def entry(name: str, builder: str, weights: str, labels: str, size: int) -> str:
    return (
        f"[[user_models]]\nname = '{name}'\n{builder}\nweights = '{weights}'\n"
        f"labels = {labels}\ninput_size = [{size}, {size}]\nmean = [0.5, 0.5, 0.5]\n"
    )


def test_user_models_from_a_config_file(
    tmp_path: Path,
    model_cache: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    toy = save(toy_models.tiny_bn_net(), tmp_path / "toy.safetensors")
    mobile = save(torchvision.models.mobilenet_v3_small(num_classes=3), tmp_path / "m.safetensors")
    no_bn = save(toy_models.tiny_gn_net(), tmp_path / "gn.safetensors")
    config = tmp_path / "tta.toml"
    config.write_text(
        "models = []\n"
        + entry("toy", f"factory = '{TOY}:tiny_bn_net'", toy, "['no', 'yes']", 8)
        + entry("mobile", "architecture = 'mobilenet_v3_small'", mobile, "['a', 'b', 'c']", 32)
        + entry("missing", f"factory = '{TOY}:nothing_here'", toy, "['no', 'yes']", 8)
        + entry("mismatch", "architecture = 'resnet18'", mobile, "['a', 'b', 'c']", 32)
        + entry("no-bn", f"factory = '{TOY}:tiny_gn_net'", no_bn, "['no', 'yes']", 8)
    )
    monkeypatch.setenv("TTA_CONFIG_FILE", str(config))
    settings = Settings(
        port=0, store="memory", model_cache_dir=model_cache, data_dir=tmp_path, log_level="warning"
    )
    with (
        caplog.at_level(logging.ERROR, logger="service.main"),
        running_server(settings) as server,
        server.client() as http,
    ):
        served = {m["name"]: m for m in http.get("/v1/models").json()["data"]}
        assert served.keys() == {"toy", "mobile"}
        assert served["toy"]["labels"] == ["no", "yes"] and served["toy"]["input_size"] == [8, 8]
        assert served["mobile"]["architecture"] == "mobilenet_v3_small"
        for model, labels in (("toy", {"no", "yes"}), ("mobile", {"a", "b", "c"})):
            # random weights: with the source statistics (the default's first forward)
            # mobilenet's activations overflow; AdaBN's share of the batch keeps them finite
            body = {"id": model, "model": model, "adapter": "adabn"}
            created = http.post("/v1/streams", json=body)
            assert created.status_code == 201, created.text
            files = [("images", ("a.png", png(random_pixels(1, 3, size=40)[0]), "image/png"))]
            predicted = http.post(f"/v1/streams/{model}/predict", files=files)
            assert predicted.status_code == 200, predicted.text
            assert predicted.json()["predictions"][0]["label"] in labels
    refusals = {r.getMessage() for r in caplog.records}
    assert (
        f"model missing refused: model factory '{TOY}:nothing_here': {TOY} has no "
        "'nothing_here'" in refusals
    )
    assert any(
        m.startswith("model mismatch refused: weights do not fit model mismatch") for m in refusals
    )
    assert "model no-bn refused: model no-bn has no BatchNorm2d layer: nothing to adapt" in refusals


def test_a_user_model_needs_one_builder(tmp_path: Path) -> None:
    base = {
        "name": "x",
        "weights": tmp_path / "w.safetensors",
        "labels": ["a"],
        "input_size": (8, 8),
    }
    with pytest.raises(ValueError, match="set exactly one of factory, architecture"):
        Settings(models=[], user_models=[base])
    both = {**base, "factory": f"{TOY}:tiny_bn_net", "architecture": "resnet18"}
    with pytest.raises(ValueError, match="set exactly one of factory, architecture"):
        Settings(models=[], user_models=[both])
