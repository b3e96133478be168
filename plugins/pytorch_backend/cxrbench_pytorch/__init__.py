"""cxrbench's PyTorch backend: torchvision DenseNet, DDP for several GPUs, legacy ONNX export.

Only the hook implementations live here, and they import torch lazily: importing this plugin (as
``cxrbench backends`` does for discovery) must not import the framework.
"""

from __future__ import annotations

from cxrbench.backend import BackendInfo, check_cam_inputs, check_images, distribution_version, hookimpl

NAME = "pytorch"
#: Checkpoints this backend imports (``cxrbench weights import``): torch state_dicts and training checkpoints.
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".pth.tar")


@hookimpl
def cxrbench_backend_info():
    return BackendInfo(
        name=NAME,
        framework="torch",
        version=distribution_version("torch"),
        onnx_layout="NCHW",
        extra={"torchvision": distribution_version("torchvision")},
    )


@hookimpl
def cxrbench_devices():
    import torch

    return ["cpu"] + [f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())]


@hookimpl
def cxrbench_build_model(settings, weights):
    from cxrbench_pytorch.model import build

    return build(settings, weights)


@hookimpl
def cxrbench_get_weights(model):
    from cxrbench_pytorch import weights

    return weights.get(model.net)


@hookimpl
def cxrbench_set_weights(model, weights):
    from cxrbench_pytorch import weights as tv_weights

    tv_weights.put(model.net, weights, model.block_config)
    return True


@hookimpl
def cxrbench_import_checkpoint(path, block_config):
    from pathlib import Path

    if not Path(path).name.endswith(CHECKPOINT_SUFFIXES):  # decided before torch is imported
        return None
    from cxrbench_pytorch import weights

    return weights.import_checkpoint(Path(path), tuple(block_config))


@hookimpl
def cxrbench_train(model, data, settings, recorder):
    if settings.run.gpus > 1:
        from cxrbench_pytorch import distributed

        return distributed.train(model, data, settings, recorder, world=settings.run.gpus, device_type="cuda")
    from cxrbench_pytorch import loop

    return loop.train(model, data, settings, recorder)


@hookimpl
def cxrbench_idiomatic_loop(settings, weights):
    from cxrbench_pytorch import idiomatic

    return idiomatic.loop(settings, weights)


@hookimpl
def cxrbench_predict(model, images, settings):
    from cxrbench_pytorch import infer

    images = check_images(images, settings.data.image_size)
    return infer.predict(model, images, settings.train.batch_size, settings.eval.tta_hflip)


@hookimpl
def cxrbench_cam(model, images, classes, settings):
    from cxrbench_pytorch import infer

    images, classes = check_cam_inputs(images, classes, settings.data.image_size)
    return infer.cam(model, images, classes, settings.train.batch_size)


@hookimpl
def cxrbench_export_onnx(model, path, settings):
    from cxrbench_pytorch import export

    return export.export_onnx(model, path, settings)
