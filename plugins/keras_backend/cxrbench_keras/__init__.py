"""cxrbench backend plugin: Keras 3 on TensorFlow (keras.applications DenseNet, tf.distribute).

Only hook implementations live here. TensorFlow and Keras are imported inside the hooks (through
the sibling modules), never at plugin import, so discovery stays cheap; KERAS_BACKEND is fixed to
"tensorflow" before any Keras import.
"""

from __future__ import annotations

import os

from cxrbench.backend import BackendInfo, check_cam_inputs, check_images, distribution_version, hookimpl

os.environ["KERAS_BACKEND"] = "tensorflow"

NAME = "keras"
#: Checkpoints this backend imports (``cxrbench weights import``): legacy HDF5, Keras 3 weights and archives.
CHECKPOINT_SUFFIXES = (".h5", ".keras")


@hookimpl
def cxrbench_backend_info():
    return BackendInfo(
        name=NAME,
        framework="keras",
        version=distribution_version("keras"),
        onnx_layout="NHWC",
        extra={"tensorflow": distribution_version("tensorflow"), "tf2onnx": distribution_version("tf2onnx")},
    )


@hookimpl
def cxrbench_devices():
    import tensorflow as tf

    return ["cpu"] + [gpu.name for gpu in tf.config.list_physical_devices("GPU")]


@hookimpl
def cxrbench_build_model(settings, weights):
    from cxrbench_keras import determinism

    determinism.prepare_environment(settings.numerics)  # before the first TensorFlow import
    from cxrbench_keras.model import build

    determinism.apply(settings.numerics)
    return build(settings, weights)


@hookimpl
def cxrbench_get_weights(model):
    from cxrbench_keras.weights import get_weights

    return get_weights(model.network)


@hookimpl
def cxrbench_set_weights(model, weights):
    from cxrbench_keras.weights import set_weights

    set_weights(model.network, weights, model.block_config)
    return True


@hookimpl
def cxrbench_import_checkpoint(path, block_config):
    from pathlib import Path

    if not Path(path).name.endswith(CHECKPOINT_SUFFIXES):  # decided before TensorFlow is imported
        return None
    from cxrbench_keras.checkpoint import import_checkpoint

    return import_checkpoint(Path(path), tuple(block_config))


@hookimpl
def cxrbench_train(model, data, settings, recorder):
    from cxrbench_keras.loop import train

    return train(model, data, settings, recorder)


@hookimpl
def cxrbench_node_launcher(settings, head):
    return []  # one worker per machine; its MultiWorkerMirroredStrategy reads Slurm's environment


@hookimpl
def cxrbench_join_world(settings):
    from cxrbench_keras import determinism

    determinism.prepare_environment(settings.numerics)  # before the first TensorFlow import
    from cxrbench_keras import distributed, numerics

    numerics.configure_runtime(settings)  # threads and devices before the strategy starts TensorFlow's runtime
    return distributed.join(settings)


@hookimpl
def cxrbench_gather(payload):
    from cxrbench_keras import distributed

    return distributed.gather(payload)


@hookimpl
def cxrbench_idiomatic_loop(settings, weights):
    from cxrbench_keras import determinism

    determinism.prepare_environment(settings.numerics)  # as for the backend's model: before TensorFlow's import
    from cxrbench_keras import idiomatic

    determinism.apply(settings.numerics)
    return idiomatic.loop(settings, weights)


@hookimpl
def cxrbench_predict(model, images, settings):
    from cxrbench_keras.infer import predict

    return predict(model, check_images(images, settings.data.image_size), settings)


@hookimpl
def cxrbench_cam(model, images, classes, settings):
    from cxrbench_keras.infer import cam

    images, classes = check_cam_inputs(images, classes, settings.data.image_size)
    return cam(model, images, classes, settings.train.batch_size)


@hookimpl
def cxrbench_export_onnx(model, path, settings):
    from cxrbench_keras.export import export_onnx

    return export_onnx(model, path, settings)


@hookimpl
def cxrbench_peak_flops(settings):
    from cxrbench_keras.profile import peak_flops

    return peak_flops(settings)


@hookimpl
def cxrbench_profiler(loop, settings, trace_dir):
    from cxrbench_keras.profile import TensorFlowProfiler

    return TensorFlowProfiler(trace_dir)


@hookimpl
def cxrbench_operation_rules():
    from cxrbench_keras.operations import OPERATION_RULES

    return OPERATION_RULES
