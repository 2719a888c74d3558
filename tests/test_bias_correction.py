"""Bias correction of INT8 weights (histosurv/export/bias_correction.py), on a small network whose every
kind of layer is known: a Conv with a bias (INT32 bias moved), a strided Conv without one (an INT32 bias
added), a grouped Conv, and a linear layer on tokens (MatMul whose bias is the next Add's).

What is checked: the correction is what the method says on the first layer, whose input is the graph's
own (exact to one accumulator step); the mean error of the output, which is what bias correction is
for, falls; the graph still runs its convolutions in INT8; the record names what was corrected; and the
module leaves an FP32 op alone."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from histosurv.export.bias_correction import bias_correction_record, correct_biases
from histosurv.export.quantize import features_of, quantization_settings, quantize_encoder, structure_of


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.first = torch.nn.Conv2d(3, 16, 3, padding=1, bias=True)
        self.plain = torch.nn.Conv2d(16, 16, 3, stride=2, padding=1, bias=False)
        self.grouped = torch.nn.Conv2d(16, 32, 1, groups=2, bias=False)
        self.tokens = torch.nn.Linear(32, 24)

    def forward(self, patches):
        x = torch.relu(self.first(patches))
        x = torch.relu(self.plain(x))
        x = torch.relu(self.grouped(x))
        return self.tokens(x.flatten(2).transpose(1, 2)).mean(1)  # [N, tokens, 32] -> [N, 24]


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    """The FP32 graph, its INT8 graph without and with the correction, and the patches used."""
    torch.manual_seed(0)
    net = Net().eval()
    with torch.no_grad():  # one outlier weight per output channel coarsens the INT8 grid of the rest, as in
        for layer in (net.first, net.plain, net.grouped, net.tokens):  # trained networks: a shift worth taking out
            w = layer.weight.view(layer.weight.shape[0], -1)
            w[:, 0] = 8 * w.abs().max(dim=1).values
        net.first.bias.uniform_(-0.5, 0.5)
    root = tmp_path_factory.mktemp("bias_correction")
    source = root / "model.onnx"
    torch.onnx.export(net, (torch.rand(2, 3, 16, 16),), str(source), input_names=["patches"], output_names=["features"],
                      dynamic_axes={"patches": {0: "n"}}, dynamo=False)
    rng = np.random.default_rng(1)
    # inputs with a mean far from zero, as image patches: the mean input is what turns rounding into a shift
    patches = (0.6 + 0.4 * rng.random((48, 3, 16, 16))).astype(np.float32)
    settings = quantization_settings()
    plain, corrected = root / "plain.onnx", root / "corrected.onnx"
    # nearest rounding in both: the module under test alone (GPTQ's rounding is tests/test_gptq.py's)
    quantize_encoder(source, plain, patches, settings, bias_correction=False, weight_rounding="nearest")
    quantize_encoder(source, corrected, patches, settings, weight_rounding="nearest")
    return source, plain, corrected, patches


def _names(source):
    return {n.op_type + ":" + n.input[1]: n.name for n in onnx.load(str(source)).graph.node if n.op_type in ("Conv", "MatMul")}


def test_every_int8_layer_is_corrected_and_recorded(graphs):
    source, plain, corrected, patches = graphs
    record = bias_correction_record(corrected)
    assert bias_correction_record(plain) is None
    assert sorted(record["ops"]) == sorted(_names(source).values()) and len(record["ops"]) == 4
    assert record["skipped"] == [] and record["rounds"] == 2 and record["patches"] == len(patches)
    # still INT8 everywhere: the added and moved biases are INT32 inputs the QDQ kernels take as they are
    assert structure_of(corrected)["quantized_ops"] == structure_of(plain)["quantized_ops"] == {"Conv": 3, "MatMul": 1}
    assert structure_of(corrected)["bias_correction"]["ops"] == 4


def test_the_first_layers_bias_moves_by_its_weights_error_on_the_mean_input(graphs):
    """The first Conv sees the graph's input, so its correction has a closed form: minus the mean over
    output positions of (W_int8 - W) convolved with the input's mean map (PyTorch's conv2d here, padding
    and all), to one accumulator step."""
    source, plain, corrected, patches = graphs
    weights = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(source)).graph.initializer}
    q_plain = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(plain)).graph.initializer}
    q_corrected = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(corrected)).graph.initializer}
    name = next(k for k in weights if k.endswith("first.weight"))
    w_int8 = q_plain[name + "_quantized"].astype(np.float32) * q_plain[name + "_scale"].reshape(-1, 1, 1, 1)
    step, zero = q_plain["patches_scale"], q_plain["patches_zero_point"].astype(np.float32)
    seen = (np.clip(np.round(patches / step) + zero, 0, 255) - zero) * step  # the input as the Conv gets it
    error = torch.from_numpy((w_int8 - weights[name]).astype(np.float64))
    mean_map = torch.from_numpy(seen.astype(np.float64).mean(axis=0, keepdims=True))
    expected = -torch.nn.functional.conv2d(mean_map, error, padding=1).mean(dim=(2, 3))[0].numpy()
    bias = next(k for k in q_plain if k.endswith("first.bias_quantized"))
    scale = q_plain[bias + "_scale"]
    moved = (q_corrected[bias].astype(np.int64) - q_plain[bias]) * scale
    assert np.abs(expected).max() > 20 * scale.max()  # a correction of many accumulator steps, not rounding
    np.testing.assert_allclose(moved, expected, atol=0.51 * scale.max())


def test_the_correction_takes_the_mean_error_out_of_the_features(graphs):
    """On other patches from the same distribution: the features' mean error (the shift the correction
    targets) falls several-fold; what differs between patches is not made worse."""
    source, plain, corrected, _ = graphs
    rng = np.random.default_rng(2)
    patches = (0.6 + 0.4 * rng.random((64, 3, 16, 16))).astype(np.float32)
    fp32 = features_of(source, patches)
    errors = {g.name: features_of(g, patches) - fp32 for g in (plain, corrected)}
    shift = {k: np.linalg.norm(e.mean(0)) for k, e in errors.items()}
    spread = {k: np.linalg.norm(e - e.mean(0)) for k, e in errors.items()}
    assert shift["corrected.onnx"] < shift["plain.onnx"] / 3, shift
    assert spread["corrected.onnx"] < 1.1 * spread["plain.onnx"], spread


def test_an_fp32_layer_is_left_alone_and_the_graph_is_rewritten_whole(graphs, tmp_path):
    source, _, _, patches = graphs
    keep = _names(source)
    kept = next(v for k, v in keep.items() if "grouped" in k)
    path = tmp_path / "partial.onnx"
    quantize_encoder(source, path, patches, quantization_settings(), exclude=[kept], weight_rounding="nearest")
    record = bias_correction_record(path)
    assert kept not in record["ops"] and len(record["ops"]) == 3
    graph = onnx.load(str(path)).graph
    assert len(next(n for n in graph.node if n.name == kept).input) == 2  # no bias added to the FP32 Conv
    onnx.checker.check_model(str(path))
    assert not list(tmp_path.glob("*.tmp*")) and sorted(p.name for p in tmp_path.iterdir()) == ["partial.onnx"]


def test_correcting_an_uncorrected_graph_in_place_gives_what_quantisation_gives(graphs, tmp_path):
    """correct_biases on its own (the path the fallback's graphs take) and inside quantize_encoder agree."""
    source, plain, corrected, patches = graphs
    again = tmp_path / "again.onnx"
    again.write_bytes(plain.read_bytes())
    correct_biases(source, again, patches)
    a, b = onnx.load(str(again)), onnx.load(str(corrected))
    values = lambda m: {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}  # noqa: E731
    va, vb = values(a), values(b)
    assert va.keys() == vb.keys() and all(np.array_equal(va[k], vb[k]) for k in va)
