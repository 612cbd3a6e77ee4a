"""Networks: output shapes at several sizes, CDF range, gradients, the name dict."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.networks import (
    IMAGE_MEAN,
    IMAGE_STD,
    NETWORKS,
    SegOutput,
    build_network,
    images_to_tensor,
    load_weights,
    normalise_images,
    output_size,
)

TINY = ["mobilenet_lraspp_tiny", "segformer_tiny"]


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    # The machine is shared: two spinning threads on two busy cores stall far more than one.
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize(("height", "width"), [(64, 128), (32, 32), (50, 70), (96, 40)])
def test_output_shapes(name: str, height: int, width: int) -> None:
    model = build_network(name, num_classes=7).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, height, width))
    assert isinstance(out, SegOutput)
    h, w = output_size(height, width)
    assert out.logits.shape == (2, 7, h, w)
    assert out.cdf.shape == (2, 1, h, w)
    assert out.logits.dtype == torch.float32


@pytest.mark.parametrize("name", ["mobilenet_lraspp", "segformer_mini"])
def test_full_size_networks_shapes(name: str) -> None:
    model = build_network(name).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 96))
    assert out.logits.shape == (1, 19, 16, 24)


@pytest.mark.parametrize("name", TINY)
def test_cdf_head_is_a_probability(name: str) -> None:
    model = build_network(name)
    # Push the CDF head far from its zero initialisation so saturation would show.
    cdf_conv = model.get_submodule("heads.cdf")
    assert isinstance(cdf_conv, torch.nn.Conv2d)
    torch.nn.init.normal_(cdf_conv.weight, std=5.0)
    out = model(torch.randn(2, 3, 32, 64) * 3)
    assert torch.all(out.cdf >= 0) and torch.all(out.cdf <= 1)
    assert out.cdf.std() > 0


@pytest.mark.parametrize("name", TINY)
def test_cdf_head_starts_at_one_half(name: str) -> None:
    out = build_network(name)(torch.randn(1, 3, 32, 32))
    assert torch.allclose(out.cdf, torch.full_like(out.cdf, 0.5))


@pytest.mark.parametrize("name", TINY)
def test_gradients_reach_every_parameter(name: str) -> None:
    model = build_network(name, num_classes=5).train()
    out = model(torch.randn(2, 3, 64, 64))
    labels = torch.randint(0, 5, out.logits.shape[:1] + out.logits.shape[2:])
    loss = torch.nn.functional.cross_entropy(out.logits, labels) + (out.cdf - 0.3).abs().mean()
    loss.backward()
    # The CDF head starts at zero weights, so its gradient is what moves it; check every tensor.
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert missing == []


def test_unknown_name_lists_options() -> None:
    with pytest.raises(ValueError) as err:
        build_network("resnet50")
    for name in NETWORKS:
        assert name in str(err.value)
    assert "resnet50" in str(err.value)


def test_weights_round_trip(tmp_path) -> None:
    a = build_network("mobilenet_lraspp_tiny").eval()
    path = tmp_path / "w.pt"
    torch.save({"model": a.state_dict()}, path)
    b = build_network("mobilenet_lraspp_tiny", weights=path).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(a(x).logits, b(x).logits)
    with pytest.raises(ValueError, match="expected weights matching"):
        load_weights(build_network("segformer_tiny"), path)
    with pytest.raises(FileNotFoundError, match="no such file"):
        build_network("segformer_tiny", weights=tmp_path / "missing.pt")


def test_normalisation_matches_by_hand() -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 5, 6, 3), dtype=np.uint8)
    x = normalise_images(images)
    assert x.shape == (2, 3, 5, 6) and x.dtype == np.float32
    for c in range(3):
        expected = (images[..., c] / 255.0 - IMAGE_MEAN[c]) / IMAGE_STD[c]
        np.testing.assert_allclose(x[:, c], expected, rtol=1e-5, atol=1e-6)
    t = images_to_tensor(torch.from_numpy(images))
    np.testing.assert_allclose(t.numpy(), x, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(images_to_tensor(images).numpy(), x)
    with pytest.raises(ValueError, match="expected"):
        normalise_images(images[..., :2])
