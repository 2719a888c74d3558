"""GPTQ rounding of INT8 weights (histosurv/export/gptq.py).

What is checked: the rounding itself against what the method says (with uncorrelated inputs there is
nothing to compensate with, and GPTQ is nearest rounding exactly; with correlated ones it lowers the
layer's output error on inputs it was not fitted on, within the integer range); and on a small network
with a layer of each kind: the layers GPTQ can take are re-rounded and recorded, the others named and
left alone, ONNX Runtime's scales are kept, the graph stays INT8, and the features' error that differs
between patches (what moves a downstream model's ranks) falls."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from histosurv.export.gptq import gptq_round, weight_rounding_record
from histosurv.export.quantize import features_of, quantization_settings, quantize_encoder, structure_of


def _nearest(w, scale, bound=127):
    return np.clip(np.round(w / scale[:, None]), -bound, bound).astype(np.int32)


def test_with_uncorrelated_inputs_gptq_is_nearest_rounding():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(12, 40))
    scale = np.abs(w).max(1) / 127
    h = np.diag(rng.uniform(0.5, 2.0, size=40))
    assert np.array_equal(gptq_round(w, h, scale, 127), _nearest(w, scale))


def test_with_correlated_inputs_gptq_lowers_the_output_error_on_new_inputs():
    rng = np.random.default_rng(1)
    mixing = rng.normal(size=(8, 40))

    def inputs(n):  # inputs with a mean that vary along a few directions, as an image's convolution windows do
        return rng.normal(size=(n, 8)) @ mixing + 0.1 * rng.normal(size=(n, 40)) + 1.0

    w = rng.normal(size=(24, 40))
    w[:, 0] *= 6  # an outlier column coarsens each row's grid
    scale = np.abs(w).max(1) / 127
    fitted = inputs(4000)
    h = np.cov(fitted, rowvar=False)
    q = gptq_round(w, h, scale, 127)
    assert q.dtype == np.int32 and np.abs(q).max() <= 127
    assert not np.array_equal(q, _nearest(w, scale))
    fresh = inputs(4000)
    centred = fresh - fresh.mean(0)
    error = {name: np.mean((centred @ (ints * scale[:, None] - w).T) ** 2)
             for name, ints in (("nearest", _nearest(w, scale)), ("gptq", q))}
    assert error["gptq"] < error["nearest"] / 3, error


def test_the_integer_range_is_kept():
    rng = np.random.default_rng(2)
    w = rng.normal(size=(8, 30))
    scale = np.abs(w).max(1) / 63  # a reduce_range grid: 7 bits
    h = np.cov(rng.normal(size=(500, 30)) @ rng.normal(size=(30, 30)), rowvar=False)
    assert np.abs(gptq_round(w, h, scale, 63)).max() <= 63


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.first = torch.nn.Conv2d(3, 16, 3, padding=1, bias=True)
        self.plain = torch.nn.Conv2d(16, 24, 3, stride=2, padding=1, bias=False)
        self.grouped = torch.nn.Conv2d(24, 32, 1, groups=2, bias=False)
        self.tokens = torch.nn.Linear(32, 24)

    def forward(self, patches):
        x = torch.relu(self.first(patches))
        x = torch.relu(self.plain(x))
        x = torch.relu(self.grouped(x))
        return self.tokens(x.flatten(2).transpose(1, 2)).mean(1)


def _smooth_patches(rng, n):
    """Image-like inputs: neighbouring pixels correlate, so a convolution's window inputs do."""
    coarse = torch.from_numpy(rng.random((n, 3, 6, 6)).astype(np.float32))
    return (0.3 + 0.7 * torch.nn.functional.interpolate(coarse, size=(16, 16), mode="bilinear")).numpy()


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    torch.manual_seed(0)
    net = Net().eval()
    with torch.no_grad():  # one outlier weight per output channel coarsens its INT8 grid, as in trained networks:
        for layer in (net.first, net.plain, net.grouped, net.tokens):  # the rounding then outweighs the activations'
            w = layer.weight.view(layer.weight.shape[0], -1)
            w[:, 0] = 8 * w.abs().max(dim=1).values
    root = tmp_path_factory.mktemp("gptq")
    source = root / "model.onnx"
    torch.onnx.export(net, (torch.rand(2, 3, 16, 16),), str(source), input_names=["patches"], output_names=["features"],
                      dynamic_axes={"patches": {0: "n"}}, dynamo=False)
    patches = _smooth_patches(np.random.default_rng(3), 64)
    settings = quantization_settings()
    nearest, gptq = root / "nearest.onnx", root / "gptq.onnx"
    quantize_encoder(source, nearest, patches, settings, bias_correction=False, weight_rounding="nearest")
    quantize_encoder(source, gptq, patches, settings, bias_correction=False)  # GPTQ: the default
    return source, nearest, gptq


def test_the_layers_it_can_take_are_rerounded_and_recorded(graphs):
    source, nearest, gptq = graphs
    names = {n.input[1]: n.name for n in onnx.load(str(source)).graph.node if n.op_type in ("Conv", "MatMul")}
    grouped = next(v for k, v in names.items() if "grouped" in k)
    record = weight_rounding_record(gptq)
    assert weight_rounding_record(nearest) is None and structure_of(nearest)["weight_rounding"] is None
    assert sorted(record["ops"]) == sorted(v for v in names.values() if v != grouped) and record["skipped"] == [grouped]
    assert record["output_error_gptq"] < record["output_error_nearest"]
    assert structure_of(gptq)["quantized_ops"] == structure_of(nearest)["quantized_ops"] == {"Conv": 3, "MatMul": 1}
    a = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(nearest)).graph.initializer}
    b = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(gptq)).graph.initializer}
    assert a.keys() == b.keys()
    for name in a:
        if name.endswith("_scale") or name.endswith("_zero_point"):  # ONNX Runtime's grid is kept
            assert np.array_equal(a[name], b[name]), name
    changed = {k for k in names if not np.array_equal(a[k + "_quantized"], b[k + "_quantized"])}
    assert changed == {k for k, v in names.items() if v != grouped}  # the grouped Conv's are nearest's still
    for name in changed:
        assert b[name + "_quantized"].dtype == np.int8 and np.abs(b[name + "_quantized"].astype(int)).max() <= 127
    onnx.checker.check_model(str(gptq))


def test_the_features_error_between_patches_falls_on_new_patches(graphs):
    source, nearest, gptq = graphs
    patches = _smooth_patches(np.random.default_rng(4), 64)
    fp32 = features_of(source, patches)
    spread = {}
    for graph in (nearest, gptq):
        error = features_of(graph, patches) - fp32
        spread[graph.name] = np.linalg.norm(error - error.mean(0))
    assert spread["gptq.onnx"] < 0.8 * spread["nearest.onnx"], spread


@pytest.mark.parametrize("kernel,pads,strides,dilations", [
    ((3, 3), (1, 1), (1, 1), (1, 1)), ((1, 1), (0, 0), (2, 2), (1, 1)), ((3, 2), (1, 0), (2, 1), (2, 1)),
    ((7, 7), (3, 3), (2, 2), (1, 1)),
])
def test_conv_windows_are_unfolds_columns(kernel, pads, strides, dilations):
    """The windows H is measured on are the ones the Conv multiplies its weights with: every one, in
    unfold's order, when all are asked for; a subset of them when fewer are."""
    from histosurv.export.gptq import conv_windows

    value = torch.randn(3, 5, 11, 9)
    unfolded = torch.nn.functional.unfold(value, kernel, dilation=dilations, padding=pads, stride=strides)
    expected = unfolded.transpose(1, 2).reshape(-1, unfolded.shape[1])
    rng = np.random.default_rng(0)
    assert torch.equal(conv_windows(value, kernel, pads, strides, dilations, 10_000, rng), expected)
    some = conv_windows(value, kernel, pads, strides, dilations, 17, rng)
    assert some.shape == (17, expected.shape[1])
    assert all(any(torch.equal(row, e) for e in expected) for row in some)
