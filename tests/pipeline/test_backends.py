"""Inference backends: PyTorch and ONNX Runtime agree, configuration errors are clear, GPU paths work."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from app.config import ConfigError, ModelConfig
from app.pipeline.backends import BackendError, create_backend
from app.pipeline.backends.onnx_backend import OnnxBackend, onnx_providers
from app.pipeline.backends.torch_backend import TorchBackend
from models import build_model, load_checkpoint, save_checkpoint
from models.onnx_export import export_onnx

OPTIONS = {"backbone": "resnet18", "width": 0.125}


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = build_model("icnet", num_classes=3, in_channels=1, **OPTIONS)
    path = tmp_path_factory.mktemp("backends") / "icnet.pt"
    save_checkpoint(path, model, arch="icnet", options=OPTIONS, class_names=("a", "b", "c"), palette=None,
                    input_size=64, normalization={"mode": "standardize"})
    return path


@pytest.fixture(scope="module")
def onnx_file(weights: Path) -> Path:
    model, meta = load_checkpoint(weights)
    return export_onnx(model, weights.with_name("exported.onnx"), in_channels=meta.in_channels)


def _batch(height: int = 70, width: int = 90) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((2, 1, height, width)).astype(np.float32)


def test_torch_backend_shapes_and_dtypes(weights: Path) -> None:
    model, _ = load_checkpoint(weights)
    backend = TorchBackend(model, device="cpu", channels_last=True)
    logits, labels = backend.infer(_batch()), backend.predict(_batch())
    assert logits.shape == (2, 3, 70, 90) and logits.dtype == np.float32
    assert labels.shape == (2, 70, 90) and labels.dtype == np.uint8
    np.testing.assert_array_equal(labels, logits.argmax(axis=1))
    assert backend.device == "cpu" and "torch" in backend.name
    backend.warmup((1, 1, 64, 64), iters=1)


def test_torch_and_onnx_backends_agree(weights: Path, onnx_file: Path) -> None:
    model, _ = load_checkpoint(weights)
    torch_backend = TorchBackend(model, device="cpu")
    onnx_backend = OnnxBackend(onnx_file, threads=1, device="auto")
    for size in ((64, 64), (70, 90)):
        batch = _batch(*size)
        np.testing.assert_allclose(onnx_backend.infer(batch), torch_backend.infer(batch), rtol=0, atol=1e-4)
        np.testing.assert_array_equal(onnx_backend.predict(batch), torch_backend.predict(batch))
    onnx_backend.warmup((1, 1, 64, 64), iters=1)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the TorchScript exporter announces its retirement
def test_onnx_graph_without_labels_output_falls_back_to_host_argmax(weights: Path, tmp_path: Path) -> None:
    model, _ = load_checkpoint(weights)
    path = tmp_path / "logits_only.onnx"
    torch.onnx.export(model, (torch.randn(1, 1, 64, 64),), str(path), dynamo=False, input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "n", 2: "h", 3: "w"}})
    backend = OnnxBackend(path, device="cpu")
    batch = _batch()
    np.testing.assert_array_equal(backend.predict(batch), TorchBackend(model, device="cpu").predict(batch))


def test_onnx_uses_the_cpu_alone_without_a_gpu(onnx_file: Path, capfd: pytest.CaptureFixture[str]) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present; the CPU-only provider list does not apply")
    assert onnx_providers("auto") == ["CPUExecutionProvider"]
    assert onnx_providers("cpu") == ["CPUExecutionProvider"]
    capfd.readouterr()
    backend = OnnxBackend(onnx_file, device="auto")
    backend.predict(_batch())
    assert backend.device == "cpu" and backend.name == "onnx cpu"
    # A GPU build of ONNX Runtime asked for CUDA/TensorRT without a GPU prints "EP Error" blocks to stderr.
    assert capfd.readouterr().err == ""


GPU_PROVIDERS = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


@pytest.mark.parametrize(("gpu", "available", "expected"), [
    (True, GPU_PROVIDERS, GPU_PROVIDERS),
    (True, ["CUDAExecutionProvider", "CPUExecutionProvider"], ["CUDAExecutionProvider", "CPUExecutionProvider"]),
    (True, ["CPUExecutionProvider"], ["CPUExecutionProvider"]),
    (False, GPU_PROVIDERS, ["CPUExecutionProvider"]),
])
def test_onnx_provider_preference(monkeypatch: pytest.MonkeyPatch, gpu: bool, available: list[str],
                                  expected: list[str]) -> None:
    import onnxruntime

    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: list(reversed(available)))
    assert onnx_providers("auto") == expected


def test_the_onnx_graph_is_cached_per_weights_content_outside_the_weights_folder(
        tmp_path: Path, weights: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folder = tmp_path / "read_only"
    folder.mkdir()
    local = folder / weights.name
    local.write_bytes(weights.read_bytes())
    folder.chmod(0o555)  # an installed package's folder: nothing may be written beside the weights
    try:
        model, meta = load_checkpoint(local)
        config = ModelConfig(weights=str(local), backend="onnx", device="cpu", threads=1)
        with caplog.at_level("INFO"):
            backend = create_backend(config, model, meta.in_channels, local)
        (cached,) = (tmp_path / "cache" / "cellseg" / "onnx").glob("icnet-*.onnx")
        assert isinstance(backend, OnnxBackend) and sorted(folder.iterdir()) == [local]
        assert [r.message for r in caplog.records if "ONNX graph" in r.message] == \
            [f"ONNX graph: exported {local} to {cached}"]
        first = cached.stat().st_mtime_ns
        create_backend(config, model, meta.in_channels, local)
        assert cached.stat().st_mtime_ns == first  # the same weights: not exported again
    finally:
        folder.chmod(0o755)
    other = tmp_path / "other.pt"  # other weights of the same name get their own graph
    torch.manual_seed(1)
    save_checkpoint(other, build_model("icnet", num_classes=3, in_channels=1, **OPTIONS), arch="icnet",
                    options=OPTIONS, class_names=("a", "b", "c"), palette=None, input_size=64,
                    normalization={"mode": "standardize"})
    renamed = other.rename(tmp_path / "icnet.pt")
    create_backend(ModelConfig(weights=str(renamed), backend="onnx", device="cpu", threads=1), model,
                   meta.in_channels, renamed)
    assert len(list((tmp_path / "cache" / "cellseg" / "onnx").glob("icnet-*.onnx"))) == 2


def test_model_onnx_path_is_used_as_it_is(tmp_path: Path, weights: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    model, meta = load_checkpoint(weights)
    graph = export_onnx(model, tmp_path / "mine.onnx", in_channels=meta.in_channels)
    config = ModelConfig(weights=str(weights), backend="onnx", device="cpu", threads=1, onnx_path=str(graph))
    assert isinstance(create_backend(config, model, meta.in_channels, weights), OnnxBackend)
    assert not (tmp_path / "cache").exists()


def test_create_backend_torch(weights: Path) -> None:
    model, meta = load_checkpoint(weights)
    backend = create_backend(ModelConfig(backend="torch", device="cpu"), model, meta.in_channels, weights)
    assert isinstance(backend, TorchBackend)


@pytest.mark.parametrize(("field", "value"), [("backend", "tensorflow"), ("precision", "int3"), ("device", "tpu")])
def test_bad_configuration_raises_backend_error(weights: Path, field: str, value: str) -> None:
    model, meta = load_checkpoint(weights)
    if field == "precision":  # a value the config can check is refused when the config is read
        with pytest.raises(ConfigError, match=value):
            ModelConfig(**{field: value})
        return
    with pytest.raises(BackendError, match=value):
        create_backend(ModelConfig(**{field: value}), model, meta.in_channels, weights)


def test_missing_onnx_file_is_a_backend_error(tmp_path: Path) -> None:
    with pytest.raises(BackendError, match="not found"):
        OnnxBackend(tmp_path / "none.onnx")


def test_cuda_without_a_gpu_is_a_backend_error(weights: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    model, _ = load_checkpoint(weights)
    with pytest.raises(BackendError, match="CUDA"):
        TorchBackend(model, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_gpu_autocast_matches_fp32(weights: Path, precision: str) -> None:
    model, _ = load_checkpoint(weights)
    batch = _batch(256, 320)
    reference = TorchBackend(model, device="cpu").infer(batch)
    backend = TorchBackend(model, device="cuda", precision=precision, channels_last=True)
    assert backend.device.startswith("cuda") and precision in backend.name
    logits = backend.infer(batch)
    assert np.isfinite(logits).all()
    np.testing.assert_allclose(logits, reference, atol=5e-2 if precision == "fp16" else 2e-1)
    agreement = (backend.predict(batch) == reference.argmax(axis=1)).mean()
    assert agreement > 0.98


@pytest.mark.gpu
def test_gpu_onnx_runtime_uses_a_gpu_provider(onnx_file: Path, weights: Path) -> None:
    backend = OnnxBackend(onnx_file, device="cuda")
    assert backend.device == "cuda", backend.name
    model, _ = load_checkpoint(weights)
    batch = _batch()
    np.testing.assert_allclose(backend.infer(batch), TorchBackend(model, device="cpu").infer(batch), atol=1e-3)


def test_inference_threads_policy() -> None:
    from app.pipeline.backends import inference_threads
    from app.pipeline.cpu import reserved_cores, usable_cores

    cores = usable_cores()
    assert inference_threads(3, concurrent=True) == 3 and inference_threads(3, concurrent=False) == 3
    assert inference_threads(0, concurrent=False) == cores
    assert inference_threads(0, concurrent=True) == max(1, cores - reserved_cores(cores))
    assert [reserved_cores(n) for n in (1, 2, 4, 8, 16)] == [1, 1, 1, 2, 4]
    with pytest.raises(BackendError, match="model.threads"):
        inference_threads(-1, concurrent=True)


def test_affinity_plan_splits_the_cores() -> None:
    from app.pipeline.cpu import affinity_plan

    assert affinity_plan("cuda:0", 1) is None
    if not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs Linux and two usable cores")
    cores = os.sched_getaffinity(0)
    plan = affinity_plan("cpu", 1)
    assert len(plan["inference"]) == 1 and plan["inference"] | plan["others"] == cores
    assert not plan["inference"] & plan["others"]
    many = affinity_plan("cpu", 10_000)  # never all cores: the other stages keep at least one
    assert len(many["others"]) == 1


def test_torch_backend_sets_its_thread_count_before_each_batch(weights: Path) -> None:
    model, _ = load_checkpoint(weights)
    before = torch.get_num_threads()
    try:
        backend = TorchBackend(model, device="cpu", threads=1)
        torch.set_num_threads(2)
        backend.predict(_batch(32, 32))
        assert torch.get_num_threads() == 1 and backend.threads == 1
    finally:
        torch.set_num_threads(before)


def test_traced_torch_backend_matches_eager_and_keeps_one_trace_per_shape(weights: Path) -> None:
    model, _ = load_checkpoint(weights)
    eager = TorchBackend(model, device="cpu", trace=False)
    traced = TorchBackend(model, device="cpu", trace=True)
    assert "traced" in traced.name and "traced" not in eager.name
    for size in ((64, 64), (70, 90), (64, 64)):
        batch = _batch(*size)
        np.testing.assert_allclose(traced.infer(batch), eager.infer(batch), rtol=0, atol=1e-4)
    assert len(traced._traces) == 2


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_an_untraceable_model_runs_eagerly_with_a_warning() -> None:
    class DictOut(torch.nn.Module):  # data-dependent Python control flow on a tensor value
        def forward(self, x):
            return {"out": x.repeat(1, 2, 1, 1)} if x.mean() > -1e9 else x

    backend = TorchBackend(DictOut(), device="cpu", trace=True, channels_last=False)
    with pytest.warns(RuntimeWarning, match="cannot be traced"):
        with pytest.raises(Exception):  # noqa: B017 - the eager model itself returns a dict
            backend.predict(_batch(32, 32))
    assert backend.trace is False
