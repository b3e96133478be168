"""Inference speed: each backend's own predict against ONNX Runtime on its exported model.

DenseNet-121, 64 px, batch 16, uint8 images in and logits out on both sides (normalisation
included). ``cxrbench_predict`` returns host arrays, so a GPU backend is synchronised inside the
timed call. ONNX Runtime runs on the CPU with fixed threads and full graph optimisation.
Numbers go to ``benchmark.extra_info``; the only assertion is that both sides agree.
"""

import psutil
import pytest

from cxrbench.data.classes import NUM_CLASSES
from cxrbench.deploy.onnx_file import diff_stats, run_onnx, session
from cxrbench.errors import BackendError
from cxrbench.machine.env import gpu_inventory
from cxrbench.plugins import load_plugins
from cxrbench.testing.conformance import Backend, kit_settings, random_images

#: pytorch first: in this environment importing torch._dynamo after tensorflow segfaults.
BACKENDS = ("pytorch", "keras")
IMAGE_SIZE, BATCH, ROUNDS = 64, 16, 5
ORT_THREADS = psutil.cpu_count(logical=False) or 1

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=BACKENDS)
def deployed(request, tmp_path_factory):
    """A DenseNet-121 built by one backend, its ONNX export, and a batch of images."""
    try:
        backend = Backend(request.param, load_plugins(backend=request.param))
    except BackendError as exc:
        pytest.skip(str(exc))
    settings = kit_settings(IMAGE_SIZE, **{"model.arch": "densenet121", "train.batch_size": BATCH})
    model = backend.build(settings)
    path = tmp_path_factory.mktemp(f"bench-{request.param}") / "model.onnx"
    export = backend.call("cxrbench_export_onnx", model=model, path=str(path), settings=settings)
    return backend, settings, model, export, random_images(BATCH, IMAGE_SIZE)


def _describe(benchmark, deployed, runtime: str) -> None:
    backend, settings, _, export, _ = deployed
    benchmark.extra_info.update(
        backend=backend.name,
        framework=f"{backend.info.framework} {backend.info.version}",
        runtime=runtime,
        arch=settings.model.arch,
        image_size=IMAGE_SIZE,
        batch=BATCH,
        onnx_exporter=export.exporter,
        onnx_layout=export.layout,
        ort_threads=ORT_THREADS,
        gpus=gpu_inventory()["count"],
        numerics=settings.to_dict()["numerics"],
        images_per_s=BATCH / benchmark.stats.stats.mean,
    )


def test_native_inference(benchmark, deployed):
    backend, settings, model, _, images = deployed
    logits = benchmark.pedantic(backend.predict, args=(model, images, settings), rounds=ROUNDS, warmup_rounds=1)
    _describe(benchmark, deployed, "native")
    assert logits.shape == (BATCH, NUM_CLASSES)


def test_onnx_runtime_inference(benchmark, deployed):
    backend, settings, model, export, images = deployed
    sess = session(export.path, threads=ORT_THREADS)
    logits = benchmark.pedantic(
        run_onnx,
        args=(export.path, images, export.layout),
        kwargs={"batch_size": BATCH, "sess": sess},
        rounds=ROUNDS,
        warmup_rounds=1,
    )
    _describe(benchmark, deployed, "onnxruntime CPUExecutionProvider")
    stats = diff_stats(backend.predict(model, images, settings), logits, settings.export.atol, settings.export.rtol)
    assert stats["passed"], stats
