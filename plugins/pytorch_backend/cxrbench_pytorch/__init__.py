"""cxrbench's PyTorch backend: torchvision DenseNet, DDP for several GPUs, legacy ONNX export.

Only the hook implementations live here, and they import torch lazily: importing this plugin (as
``cxrbench backends`` does for discovery) must not import the framework.
"""

from __future__ import annotations

from cxrbench.backend import BackendError, BackendInfo, check_cam_inputs, check_images, distribution_version, hookimpl

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
    if settings.run.gpus > 1 or settings.run.nodes > 1:
        from cxrbench_pytorch import distributed

        if distributed.joined():
            return distributed.train_launched(model, data, settings, recorder)
        if settings.run.nodes > 1:
            raise BackendError("run.nodes > 1: torchrun starts the ranks (docs/multi-node.md), not cxrbench_train")
        return distributed.train(model, data, settings, recorder, world=settings.run.gpus, device_type="cuda")
    from cxrbench_pytorch import loop

    return loop.train(model, data, settings, recorder)


@hookimpl
def cxrbench_node_launcher(settings, head):
    # torchrun's c10d rendezvous on the job's first machine, at torchrun's default port; no restarts: a failed rank
    # is a failed cell, not a retried one.
    return [
        "-m", "torch.distributed.run",
        "--nnodes", str(settings.run.nodes),
        "--nproc-per-node", str(max(1, settings.run.gpus)),
        "--rdzv-backend", "c10d",
        "--rdzv-endpoint", head,
        "--max-restarts", "0",
    ]  # fmt: skip


@hookimpl
def cxrbench_join_world(settings):
    from cxrbench_pytorch import distributed

    return distributed.join(settings)


@hookimpl
def cxrbench_gather(payload):
    from cxrbench_pytorch import distributed

    return distributed.gather(payload)


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


@hookimpl
def cxrbench_peak_flops(settings):
    from cxrbench_pytorch import profile

    return profile.peak_flops(settings)


@hookimpl
def cxrbench_profiler(loop, settings, trace_dir):
    from cxrbench_pytorch import profile

    return profile.TorchProfiler(loop.model.device, trace_dir)


@hookimpl
def cxrbench_operation_rules():
    from cxrbench_pytorch.operations import OPERATION_RULES

    return OPERATION_RULES
