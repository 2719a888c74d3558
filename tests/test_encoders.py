"""Patch encoders: torchvision weights load strictly, ONNX Runtime matches PyTorch, the CLI exports them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from histosurv.errors import InputError, MissingInputError
from histosurv.export.encoder_export import (
    EncoderExportError,
    _check_onnx_runs,
    encoder_from_version,
    example_patches,
    export_encoder,
)
from histosurv.data.encoder_record import IMAGENET_MEAN, IMAGENET_STD
from histosurv.export.models.encoders import ENCODERS, build_encoder
from histosurv.export.models.resnet import RESNETS, load_torchvision_state_dict, read_weights_file
from histosurv.runtime.engines import load_engine
from histosurv.runtime.pipeline import PatchEncoder

from .conftest import run_cli

# generated from torchvision's own resnet.py by tests/data/make_torchvision_resnet_keys.py
TORCHVISION_KEYS = json.loads((Path(__file__).parent / "data" / "torchvision_resnet_keys.json").read_text())
TORCHVISION_NAME = {"resnet18": "resnet18", "resnet50_trunc": "resnet50"}


def torchvision_state_dict(arch: str, seed: int = 1) -> dict[str, torch.Tensor]:
    """Random tensors under torchvision's key names and shapes, fc (and layer4) included, as saved."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in TORCHVISION_KEYS[arch].items():
        if key.endswith("num_batches_tracked"):
            sd[key] = torch.tensor(7)
        elif key.endswith("running_var"):
            sd[key] = torch.rand(shape, generator=g) + 0.5
        else:
            sd[key] = torch.randn(shape, generator=g) * 0.05
    return sd


@pytest.mark.parametrize("name", sorted(RESNETS))
def test_torchvision_weights_load_and_are_used(name):
    encoder = build_encoder(name)
    patches = example_patches(2, 64)
    with torch.no_grad():
        before = encoder(patches)
    sd = torchvision_state_dict(TORCHVISION_NAME[name])
    kept = {k: v for k, v in TORCHVISION_KEYS[TORCHVISION_NAME[name]].items() if not k.startswith(RESNETS[name].dropped)}
    assert {k: list(v.shape) for k, v in encoder.trunk.state_dict().items()} == kept
    load_torchvision_state_dict(encoder, sd)
    for key, value in encoder.trunk.state_dict().items():
        assert torch.equal(value, sd[key]), key
    with torch.no_grad():
        after = encoder(patches)
    assert after.shape == (2, ENCODERS[name].feature_dim)
    assert not torch.allclose(before, after)


def test_checkpoint_wrappers_and_dataparallel_prefixes_are_accepted():
    sd = torchvision_state_dict("resnet18")
    wrapped = {"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 90}
    encoder = build_encoder("resnet18")
    load_torchvision_state_dict(encoder, wrapped)
    assert torch.equal(encoder.trunk.conv1.weight, sd["conv1.weight"])


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda sd: sd.pop("layer2.1.bn2.running_var"), "missing 1 keys \\(layer2.1.bn2.running_var\\)"),
        (lambda sd: sd.update({"head.weight": torch.zeros(3)}), "unexpected 1 keys \\(head.weight\\)"),
        (lambda sd: sd.update({"conv1.weight": torch.zeros(64, 3, 3, 3)}), "wrong shapes \\(conv1.weight: \\(64, 3, 3, 3\\)"),
        (lambda sd: sd.update({"bn1.running_mean": [0.0] * 64}), "not tensors \\(bn1.running_mean\\)"),
    ],
)
def test_weights_that_do_not_fit_are_refused_by_name(change, message):
    sd = torchvision_state_dict("resnet18")
    change(sd)
    with pytest.raises(InputError, match=message):
        load_torchvision_state_dict(build_encoder("resnet18"), sd)


def test_a_state_dict_must_be_a_dict():
    with pytest.raises(InputError, match="ckpt: holds a list, not a state_dict"):
        load_torchvision_state_dict(build_encoder("resnet18"), [torch.zeros(1)], source="ckpt")


def test_resnet50_weights_do_not_load_into_resnet18():
    with pytest.raises(InputError, match="not torchvision resnet18 weights"):
        load_torchvision_state_dict(build_encoder("resnet18"), torchvision_state_dict("resnet50"))


def load_weights_file(encoder, path) -> None:
    load_torchvision_state_dict(encoder, read_weights_file(path), str(path))


def test_weights_files(tmp_path):
    from safetensors.torch import save_file

    sd = torchvision_state_dict("resnet18")
    torch.save(sd, tmp_path / "w.pth")
    save_file(sd, str(tmp_path / "w.safetensors"))
    for f in ("w.pth", "w.safetensors"):
        encoder = build_encoder("resnet18")
        load_weights_file(encoder, tmp_path / f)
        assert torch.equal(encoder.trunk.layer4[1].conv2.weight, sd["layer4.1.conv2.weight"])
    with pytest.raises(MissingInputError, match="weights file not found"):
        load_weights_file(build_encoder("resnet18"), tmp_path / "none.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="junk.pth: not a readable weights file"):
        load_weights_file(build_encoder("resnet18"), tmp_path / "junk.pth")


def test_normalisation_is_imagenet_inside_the_model():
    encoder = build_encoder("resnet18")
    patches = example_patches(3, 64)
    x = patches.permute(0, 3, 1, 2).float() / 255.0
    x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(encoder(patches), encoder.trunk(x), rtol=1e-5, atol=1e-5)


def test_unknown_encoder():
    with pytest.raises(InputError, match="unknown patch encoder 'vit_base'"):
        build_encoder("vit_base")


@pytest.fixture(scope="module", params=sorted(RESNETS))  # the ViTs: tests/test_vit.py
def exported(request, tmp_path_factory):
    repo = tmp_path_factory.mktemp("encoders")
    return export_encoder(repo, request.param), repo


def test_onnx_runtime_matches_pytorch_at_any_batch(exported):
    mv, _ = exported
    model = encoder_from_version(mv)
    engine = load_engine(mv, "onnxruntime")
    for batch in (1, 5):
        patches = example_patches(batch, 256, seed=10 + batch)
        with torch.no_grad():
            expected = model(patches).numpy()
        got = engine.run({"patches": patches.numpy()})["features"]
        assert got.shape == (batch, ENCODERS[mv.info.architecture].feature_dim)
        assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()


def test_repository_entry_is_a_patch_encoder(exported):
    mv, repo = exported
    assert [(t.name, t.datatype, t.shape) for t in mv.inputs] == [("patches", "UINT8", (-1, 256, 256, 3))]
    assert mv.outputs[0].shape == (-1, ENCODERS[mv.info.architecture].feature_dim)
    record = mv.encoder_record
    assert record.weights.source == "seeded" and "no pretrained weights" in record.weights.detail
    family = ENCODERS[mv.info.architecture]
    assert (record.architecture, record.feature_dim, record.patch_size, record.mpp) == (family.name, family.feature_dim, 256, 0.5)
    assert (record.input_size, record.feature, record.preprocessing.mean) == (256, "pooled", IMAGENET_MEAN)
    assert (record.name, record.version) == (mv.name, mv.version)
    pbtxt = (repo / mv.name / "config.pbtxt").read_text()
    assert 'name: "patches"' in pbtxt and "TYPE_UINT8" in pbtxt and "dims: [ -1, 256, 256, 3 ]" in pbtxt
    assert f"dims: [ -1, {ENCODERS[mv.info.architecture].feature_dim} ]" in pbtxt
    encoder = PatchEncoder.from_repository(repo, mv.name)
    assert (encoder.patch_size, encoder.feature_dim) == (256, mv.outputs[0].shape[1])
    with pytest.raises(InputError, match="'patches' must have shape \\[-1, 256, 256, 3\\]"):
        encoder.encode(np.zeros((2, 224, 224, 3), np.uint8))


def test_export_refuses_a_graph_that_disagrees_with_pytorch(exported):
    mv, _ = exported
    other = build_encoder(mv.info.architecture, seed=1)  # not the weights the graph was exported with
    with pytest.raises(EncoderExportError, match="differ from PyTorch's"):
        _check_onnx_runs(other, mv.path / "model.onnx", 256)


def test_cli_export_and_verify(tmp_path):
    sd = torchvision_state_dict("resnet18")
    torch.save(sd, tmp_path / "tv.pth")
    repo = tmp_path / "repo"
    out = run_cli("export", "--encoder", "resnet18", "--weights", tmp_path / "tv.pth", "--patch-size", 224, "--repo", repo)
    assert out.returncode == 0, out.stderr
    assert "patches UINT8 [-1, 224, 224, 3] -> features [-1, 512]" in out.stdout
    pbtxt = (repo / "resnet18_encoder" / "config.pbtxt").read_text()
    assert "TYPE_UINT8" in pbtxt and "dims: [ -1, 224, 224, 3 ]" in pbtxt
    out = run_cli("verify", "--repo", repo, "--model", "resnet18_encoder")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "PASS onnxruntime" in out.stdout
    manifest = json.loads((repo / "resnet18_encoder" / "histosurv.json").read_text())
    version = manifest["versions"]["1"]
    assert version["parity"]["onnxruntime"]["passed"] is True
    assert version["parity"]["onnxruntime"]["max_features_rel"] < 1e-4
    assert version["encoder"]["weights"]["source"] == "file" and "tv.pth" in version["encoder"]["weights"]["detail"]
    assert version["encoder"]["patch_size"] == 224 and version["encoder"]["mpp"] == 0.5


@pytest.mark.parametrize(
    "args,message",
    [
        (["--encoder", "resnet34"], "argument --encoder: invalid choice: 'resnet34'"),
        (["--encoder", "resnet18", "--weights", "missing.pth"], "missing.pth: encoder weights file not found"),
        (["--run", ".", "--patch-size", "224"], "--patch-size goes with --encoder"),
    ],
)
def test_cli_export_bad_input(tmp_path, args, message):
    out = run_cli("export", *args, "--repo", tmp_path / "repo", cwd=tmp_path)
    assert out.returncode == 2
    assert message in out.stderr
    assert not (tmp_path / "repo" / "resnet18_encoder" / "1").exists()


def test_cli_export_needs_exactly_one_source(tmp_path):
    out = run_cli("export", "--encoder", "resnet18", "--run", tmp_path, "--repo", tmp_path / "repo")
    assert out.returncode == 2 and "not allowed with argument" in out.stderr


def test_weights_identity_is_the_tensors_not_the_file(tmp_path):
    """The same weights from a .pth and a .safetensors file, or seeded alike twice, are one identity
    in the encoder record; other weights are another (what the runtime compares before serving)."""
    from safetensors.torch import save_file

    sd = torchvision_state_dict("resnet18")
    torch.save(sd, tmp_path / "w.pth")
    save_file({k: v for k, v in reversed(list(sd.items()))}, str(tmp_path / "w.safetensors"))  # another layout
    repo = tmp_path / "repo"
    digests = {}
    for name, kwargs in [("pth", dict(weights=tmp_path / "w.pth")), ("st", dict(weights=tmp_path / "w.safetensors")),
                         ("seed0", dict(seed=0)), ("seed0_again", dict(seed=0)), ("seed1", dict(seed=1))]:
        mv = export_encoder(repo, "resnet18", name=name, patch_size=64, artifacts=(), **kwargs)
        digests[name] = mv.encoder_record.weights.sha256
    assert digests["pth"] == digests["st"]
    assert digests["seed0"] == digests["seed0_again"]
    assert len({digests["pth"], digests["seed0"], digests["seed1"]}) == 3


def test_an_encoder_compiled_with_aotinductor_matches_pytorch_and_is_served_by_name(tmp_path):
    """The GPU encoder of boxes whose ONNX Runtime has no CUDA provider, checked here as a CPU package."""
    from histosurv.export.repository_writer import add_engine
    from histosurv.export.verify import ENCODER_BATCHES, verify_version

    repo = tmp_path / "repo"
    export_encoder(repo, "resnet18", patch_size=128)
    with pytest.raises(InputError, match="an encoder package for cpu computes in fp32 or bf16, not .fp16. \\(FP16 is for GPUs"):
        add_engine(repo, "resnet18_encoder", "torch", device="cpu", precision="fp16")
    with pytest.raises(InputError, match="--kernels do not apply to the torch artifact of a patch encoder \\(it takes --device, --precision\\)"):
        add_engine(repo, "resnet18_encoder", "torch", kernels="triton")
    mv, key = add_engine(repo, "resnet18_encoder", "torch", device="cpu")
    entry = mv.info.engines[key]
    assert (key, entry.file, entry.precision, entry.device) == ("torch", "model.pt2", "fp32", "cpu")
    assert entry.built_for.torch == torch.__version__ and entry.details["smoke_features_rel"] <= 1e-3
    (report,) = verify_version(repo, "resnet18_encoder", engines=["torch"])
    assert report.passed and [row["n"] for row in report.rows] == list(ENCODER_BATCHES)
    # auto keeps ONNX Runtime on a CPU; the package is served by name and gives ONNX Runtime's features
    onnx = PatchEncoder.from_repository(repo, "resnet18_encoder")
    compiled = PatchEncoder.from_repository(repo, "resnet18_encoder", engine="torch")
    assert onnx.engine.key == "onnxruntime" and compiled.engine.describe()["backend"] == "torch"
    patches = example_patches(7, 128, seed=3).numpy()
    want, got = onnx.encode(patches), compiled.encode(patches)
    assert got.shape == (7, 512) and np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_tile_through_a_compiled_encoder_writes_its_engine_facts(cmu_svs, tmp_path):
    """The torch engine's facts (torch's version object, no kernels) must be writable h5 attributes."""
    import h5py

    from histosurv.export.repository_writer import add_engine

    from .conftest import run_cli

    repo = tmp_path / "repo"
    export_encoder(repo, "resnet18", patch_size=128, artifacts=())
    add_engine(repo, "resnet18_encoder", "torch", device="cpu")
    out = run_cli("tile", cmu_svs, "--repo", repo, "--encoder", "resnet18_encoder", "--encoder-engine", "torch",
                  "--out", tmp_path / "cmu.h5")
    assert out.returncode == 0, out.stderr
    with h5py.File(tmp_path / "cmu.h5") as f:
        attrs = dict(f.attrs)
        assert f["features"].shape[1] == 512
    assert (attrs["encoder_engine"], attrs["encoder_backend"], attrs["encoder_precision"]) == ("torch", "torch", "fp32")
    assert attrs["encoder_torch"] == torch.__version__ and attrs["encoder_kernels"] == "none"


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_an_encoder_package_for_cuda_matches_pytorch(tmp_path, precision):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from histosurv.export.repository_writer import add_engine
    from histosurv.export.verify import verify_version

    repo = tmp_path / "repo"
    export_encoder(repo, "resnet50_trunc")
    mv, key = add_engine(repo, "resnet50_trunc_encoder", "torch", device="cuda", precision=precision)
    entry = mv.info.engines[key]
    assert key == {"fp32": "torch_cuda", "fp16": "torch_cuda_fp16"}[precision] and entry.precision == precision
    assert entry.built_for.compute_capability
    (report,) = verify_version(repo, "resnet50_trunc_encoder", engines=[key], sizes=(1, 4, 64))
    assert report.passed and report.device.startswith("cuda") and report.tolerance == {"fp32": 1e-4, "fp16": 1e-2}[precision]
