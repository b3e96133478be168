"""cxrbench's JAX backend: DenseNet-BC in Flax, a jitted training step, jax.sharding data parallelism, and ONNX
written from canonical weights.

Only the hook implementations live here, and they import jax, flax and optax lazily: importing this plugin (as
``cxrbench backends`` does for discovery) must not import the framework. Without jax installed, a hook that needs
it raises a one-line error naming the package to install.
"""

from __future__ import annotations

import importlib.util

from cxrbench.backend import BackendError, BackendInfo, check_cam_inputs, check_images, distribution_version, hookimpl

NAME = "jax"
#: What the backend needs at run time, beside the core.
FRAMEWORK_PACKAGES = ("jax", "flax", "optax")


def _require_framework() -> None:
    """One line naming what to install, instead of an ImportError traceback from a worker."""
    missing = [name for name in FRAMEWORK_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise BackendError(
            f"the jax backend needs {', '.join(missing)}: pip install -e plugins/jax_backend "
            "(and jax[cuda12] for NVIDIA GPUs)"
        )


@hookimpl
def cxrbench_backend_info():
    return BackendInfo(
        name=NAME,
        framework="jax",
        version=distribution_version("jax"),
        onnx_layout="NCHW",
        extra={name: distribution_version(name) for name in ("jaxlib", "flax", "optax")},
    )


@hookimpl
def cxrbench_devices():
    _require_framework()
    import jax

    return ["cpu"] + [str(device) for device in jax.devices() if device.platform == "gpu"]


@hookimpl
def cxrbench_build_model(settings, weights):
    _require_framework()
    from cxrbench_jax.model import build

    return build(settings, weights)


@hookimpl
def cxrbench_get_weights(model):
    from cxrbench_jax import weights

    return weights.from_variables(model.host_variables(), model.block_config)


@hookimpl
def cxrbench_set_weights(model, weights):
    from cxrbench_jax import weights as flax_weights

    model.put(flax_weights.to_variables(weights, model.block_config))
    return True


@hookimpl
def cxrbench_train(model, data, settings, recorder):
    from cxrbench_jax import loop

    return loop.train(model, data, settings, recorder)


@hookimpl
def cxrbench_node_launcher(settings, head):
    return []  # one process per machine; jax.distributed finds Slurm's environment itself


@hookimpl
def cxrbench_join_world(settings):
    _require_framework()
    from cxrbench_jax import world

    return world.join(settings)


@hookimpl
def cxrbench_gather(payload):
    from cxrbench_jax import world

    return world.gather(payload)


@hookimpl
def cxrbench_idiomatic_loop(settings, weights):
    _require_framework()
    from cxrbench_jax import idiomatic

    return idiomatic.loop(settings, weights)


@hookimpl
def cxrbench_predict(model, images, settings):
    from cxrbench_jax import infer

    images = check_images(images, settings.data.image_size)
    return infer.predict(model, images, settings.train.batch_size, settings.eval.tta_hflip)


@hookimpl
def cxrbench_cam(model, images, classes, settings):
    from cxrbench_jax import infer

    images, classes = check_cam_inputs(images, classes, settings.data.image_size)
    return infer.cam(model, images, classes, settings.train.batch_size)


@hookimpl
def cxrbench_export_onnx(model, path, settings):
    from cxrbench_jax import export

    return export.export_onnx(model, path, settings, NAME)


@hookimpl
def cxrbench_peak_flops(settings):
    _require_framework()
    from cxrbench_jax import profile

    return profile.peak_flops(settings)


@hookimpl
def cxrbench_profiler(loop, settings, trace_dir):
    from cxrbench_jax import profile

    return profile.profiler(loop, trace_dir)


@hookimpl
def cxrbench_operation_rules():
    from cxrbench_jax.operations import OPERATION_RULES

    return OPERATION_RULES
