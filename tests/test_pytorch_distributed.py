"""DistributedDataParallel on CPUs (gloo): two ranks must compute what one process computes on the
concatenated batch. torch's nn.SyncBatchNorm refuses CPU tensors, so the CPU path synchronises
BatchNorm with the backend's AllReduceBatchNorm2d; the running statistics in the comparison prove
the synchronisation (unsynchronised ranks would each average only half the batch)."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest

from helpers.backends import require

pytestmark = require("pytorch")

import torch  # noqa: E402
import torch.distributed as dist

import cxrbench_pytorch as backend
from cxrbench.backend.recorder import Recorder
from cxrbench.errors import TrainingDiverged
from cxrbench.testing.conformance import assert_one_line, kit_settings, random_canonical, synthetic_data
from cxrbench_pytorch import distributed

TINY = (1, 1, 1, 1)
#: Weights after one step, two ranks against one process. A large Adam epsilon keeps the update a
#: smooth function of the gradient (with 1e-8 the first step is lr * sign(g), so rounding on
#: near-zero BatchNorm gradients would show as differences of size lr in either implementation).
WEIGHTS_ATOL = 1e-5
ONE_STEP = {"train.epochs": 1, "train.max_steps": 1, "train.adam_epsilon": 1e-3, "run.seed": 3}


@pytest.fixture
def single_rank_group(tmp_path):
    dist.init_process_group("gloo", init_method=(tmp_path / "rendezvous").as_uri(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_all_reduce_batchnorm_equals_batchnorm_on_one_rank(single_rank_group):
    torch.manual_seed(0)
    reference = torch.nn.BatchNorm2d(8)
    with torch.no_grad():
        reference.weight.uniform_(0.5, 1.5)
        reference.bias.normal_()
    synced = distributed.AllReduceBatchNorm2d(8)
    synced.load_state_dict(reference.state_dict())
    x = torch.randn(4, 8, 5, 5) * 3 + 1
    outputs = []
    for norm in (reference, synced):
        inputs = x.clone().requires_grad_()
        out = norm(inputs)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        outputs.append(
            (out.detach(), inputs.grad, norm.weight.grad, norm.bias.grad, norm.running_mean, norm.running_var)
        )
    for got, expected in zip(outputs[1], outputs[0]):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_memory_mapped_images_travel_as_their_file(tmp_path):
    data = synthetic_data(32)
    np.save(tmp_path / "images.npy", data.images)
    data.images = np.load(tmp_path / "images.npy", mmap_mode="r")
    portable = distributed._portable(data)
    assert portable[0].images.size == 0  # the pixels are not pickled
    reopened = distributed._reopen(pickle.loads(pickle.dumps(portable)))
    np.testing.assert_array_equal(reopened.images, data.images)


def test_a_ranks_error_is_rebuilt_with_its_attributes():
    error = TrainingDiverged(2, 5, math.nan)
    rebuilt = distributed._rebuild_error(*pickle.loads(pickle.dumps((type(error), error.args, vars(error)))))
    assert type(rebuilt) is TrainingDiverged and str(rebuilt) == str(error)
    assert (rebuilt.epoch, rebuilt.step) == (2, 5)


def run_ranks(settings, data, weights, world=2):
    model, recorder = backend.cxrbench_build_model(settings=settings, weights=weights), Recorder()
    result = distributed.train(model, data, settings, recorder, world=world, device_type="cpu")
    return model, recorder, result


@pytest.mark.slow
def test_two_gloo_ranks_equal_one_process_on_the_concatenated_batch():
    data, weights = synthetic_data(32, train=8, val=6, seed=4), random_canonical(TINY, seed=5)
    # Linear scaling: two ranks of 2 at lr 1e-3 are one process of 4 at lr 2e-3.
    single = kit_settings(32, **ONE_STEP, **{"train.batch_size": 4, "train.learning_rate": 2e-3})
    ranks = kit_settings(32, **ONE_STEP, **{"train.batch_size": 2, "train.learning_rate": 1e-3})
    reference, reference_recorder = backend.cxrbench_build_model(settings=single, weights=weights), Recorder()
    backend.cxrbench_train(model=reference, data=data, settings=single, recorder=reference_recorder)
    model, recorder, result = run_ranks(ranks, data, weights)

    assert result["max_abs_weight_diff_between_ranks"] == 0.0  # both ranks hold identical weights
    got, expected = (backend.cxrbench_get_weights(model=m) for m in (model, reference))
    moved = np.abs(got["features.conv0.weight"] - weights["features.conv0.weight"]).max()
    assert moved > 1e-4  # the parent really received the trained weights
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], atol=WEIGHTS_ATOL, rtol=0, err_msg=name)
    (record,), (reference_record,) = recorder.history, reference_recorder.history
    assert (record.steps, record.images) == (1, 4)
    assert record.train_loss == pytest.approx(reference_record.train_loss, abs=1e-6)
    assert record.val_loss == pytest.approx(reference_record.val_loss, abs=1e-6)
    numerics = result["numerics"]
    assert (numerics["world_size"], numerics["global_batch"], numerics["learning_rate"]) == (2, 4, 2e-3)
    assert numerics["data_parallel"] == "DistributedDataParallel (gloo)" and numerics["synchronized_batchnorm"]
    assert numerics["framework"]["batchnorm"].startswith("AllReduceBatchNorm2d") and numerics["devices"] == ["cpu"] * 2


@pytest.mark.slow
def test_divergence_in_the_ranks_reaches_the_parent_as_one_line():
    settings = kit_settings(32, **{"train.batch_size": 2, "train.max_steps": 2, "train.learning_rate": math.inf})
    with pytest.raises(TrainingDiverged, match=r"at epoch 1, step 2") as error:
        run_ranks(settings, synthetic_data(32, seed=1), random_canonical(TINY, seed=1))
    assert_one_line(error.value)


def test_an_interrupt_while_ranks_train_terminates_every_rank(monkeypatch):
    from helpers.sleeper import wait

    settings = kit_settings(32)
    model = backend.cxrbench_build_model(settings=settings, weights=None)
    started, spawn = [], torch.multiprocessing.spawn

    def spawn_sleepers(fn, args, nprocs, join):  # ranks that would wait in a collective for two minutes
        job = spawn(wait, args=(120.0,), nprocs=nprocs, join=False)
        job.join = lambda timeout=None: (_ for _ in ()).throw(KeyboardInterrupt())  # Ctrl-C while following
        started.append(job)
        return job

    monkeypatch.setattr(distributed.mp, "spawn", spawn_sleepers)
    with pytest.raises(KeyboardInterrupt):
        distributed.train(model, synthetic_data(32, train=8, val=4), settings, Recorder(), world=2, device_type="cpu")
    (job,) = started
    assert not any(process.is_alive() for process in job.processes)


def test_node_local_batchnorm_with_one_rank_per_node_keeps_each_ranks_statistics():
    """``train.batchnorm_sync = "node"`` with one rank per machine: nothing to synchronise, each rank normalises
    its own batch (plain BatchNorm2d, recorded as such); with "global" every BatchNorm is synchronised."""
    settings = kit_settings(32, **{"run.nodes": 2, "train.batchnorm_sync": "node"})
    group = distributed.batchnorm_group(settings, world=2)
    assert group is distributed.UNSYNCHRONISED and distributed.batchnorm_group(kit_settings(32), world=2) is None
    net = backend.cxrbench_build_model(settings=kit_settings(32), weights=None).net
    assert distributed.synchronise_batchnorm(net, "cpu", group).startswith("torch.nn.BatchNorm2d (one rank per node")
    assert any(type(m) is torch.nn.BatchNorm2d for m in net.modules())
    assert "over every rank" in distributed.synchronise_batchnorm(net, "cpu")
    assert not any(type(m) is torch.nn.BatchNorm2d for m in net.modules())
