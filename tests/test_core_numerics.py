"""The core's numerics record (one schema for every backend), its documentation, and the out-of-memory message."""

import dataclasses
import json
import re
from pathlib import Path

import pytest

from cxrbench.backend import numerics_record
from cxrbench.backend.canonical import init_canonical
from cxrbench.backend.recorder import Recorder
from cxrbench.errors import BackendError, out_of_memory, out_of_memory_as_error
from cxrbench.run.stages import StageContext, train
from cxrbench.suite import NumericsSettings, Settings
from cxrbench.testing.conformance import assert_one_line

TINY = (1, 1, 1, 1)

DOC = Path(__file__).resolve().parents[1] / "docs" / "devices-and-numerics.md"


def complete(**changes):
    values = {key: f"value of {key}" for key in numerics_record.FIELDS if key != numerics_record.FRAMEWORK}
    return {**values, **changes}


def test_build_orders_the_keys_and_nests_the_framework_extras():
    record = numerics_record.build("mine", framework={"cudnn_benchmark": True}, **complete())
    assert list(record) == list(numerics_record.FIELDS)
    assert record["framework"] == {"cudnn_benchmark": True} and record["device"] == "value of device"


@pytest.mark.parametrize("key", ["device", "batch_size_per_device", "versions"])
def test_a_missing_key_is_one_line_naming_the_backend_and_the_key(key):
    values = complete()
    del values[key]
    with pytest.raises(BackendError, match=f"backend 'mine': the numerics record lacks the key '{key}'") as caught:
        numerics_record.build("mine", framework={}, **values)
    assert_one_line(caught.value)


def test_an_unknown_key_is_refused_and_points_at_the_framework_sub_key():
    with pytest.raises(BackendError, match="unknown key 'per_replica_batch' .*under 'framework'") as caught:
        numerics_record.build("mine", framework={}, **complete(per_replica_batch=4))
    assert_one_line(caught.value)


@pytest.mark.parametrize("record", [None, [], {**complete(), "framework": "torch"}])
def test_check_refuses_what_is_not_a_record(record):
    with pytest.raises(BackendError, match="backend 'mine': the numerics record"):
        numerics_record.check("mine", record)


def test_check_returns_a_complete_record_unchanged():
    record = {**complete(), "framework": {}}
    assert numerics_record.check("mine", record) == record


def test_the_documented_keys_are_the_schema():
    """docs/devices-and-numerics.md lists the record's keys in one table; it cannot drift from the code."""
    section = DOC.read_text(encoding="utf-8").split("## The numerics record", 1)[1].split("\n## ", 1)[0]
    documented = re.findall(r"^\| `(\w+)` \|", section, flags=re.MULTILINE)
    assert documented == list(numerics_record.FIELDS)


def test_every_numerics_option_is_documented_once():
    """The options table says what each backend does with every [numerics] option, and with nothing else."""
    section = DOC.read_text(encoding="utf-8").split("## `[numerics]` options", 1)[1].split("\n## ", 1)[0]
    first_cells = re.findall(r"^\| ([^|]+) \|", section, flags=re.MULTILINE)[2:]  # after the header and its rule
    documented = [name for cell in first_cells for name in re.findall(r"`(\w+)`", cell)]
    assert sorted(documented) == sorted(field.name for field in dataclasses.fields(NumericsSettings))


def test_out_of_memory_message_names_device_stage_and_setting():
    error = out_of_memory("cuda:0 (NVIDIA H200)", 512, "training")
    assert isinstance(error, BackendError)
    assert str(error) == (
        "out of memory on cuda:0 (NVIDIA H200) while training at batch size 512 (train.batch_size): "
        "lower train.batch_size or data.image_size"
    )


class FakeOutOfMemory(RuntimeError):
    pass


def test_out_of_memory_catcher_turns_only_the_frameworks_exception():
    with pytest.raises(BackendError) as caught, out_of_memory_as_error(FakeOutOfMemory, "cpu", 8, "validating"):
        raise FakeOutOfMemory("CUDA out of memory. Tried to allocate 2.00 GiB\nmore lines")
    assert str(caught.value) == str(out_of_memory("cpu", 8, "validating"))
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
    with pytest.raises(RuntimeError, match="another failure"), out_of_memory_as_error(FakeOutOfMemory, "cpu", 8, "x"):
        raise RuntimeError("another failure")


@pytest.mark.parametrize(
    "message",
    [
        "cuDNN error: CUDNN_STATUS_ALLOC_FAILED",  # torch raises these as RuntimeError, not OutOfMemoryError
        "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
        "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 8589934592 bytes.",  # XLA
    ],
)
def test_library_allocation_failures_are_out_of_memory_too(message):
    with pytest.raises(BackendError, match="^out of memory on cuda:0 while training at batch size 64"):
        with out_of_memory_as_error(FakeOutOfMemory, "cuda:0", 64, "training"):
            raise RuntimeError(message)


class OldStyleBackend:
    """A backend whose train hook still returns its own keys."""

    def cxrbench_train(self, model, data, settings, recorder):
        return {
            "best_epoch": 1,
            "best_val_loss": 0.5,
            "numerics": {**complete(), "framework": {}, "grad_scaler": False},
        }

    def cxrbench_get_weights(self, model):
        return init_canonical(TINY, seed=0)


def test_the_train_stage_refuses_a_bad_record_after_keeping_the_trained_weights(tmp_path):
    settings = Settings().replace(**{"model.arch": "densenet-tiny"})
    ctx = StageContext(folder=tmp_path, backend="old", hook=OldStyleBackend(), settings=settings, recorder=Recorder())
    with pytest.raises(BackendError, match="backend 'old': the numerics record has the unknown key 'grad_scaler'"):
        train(ctx)
    assert (tmp_path / "weights_best.npz").exists() and (tmp_path / "history.json").exists()


def test_the_frameworks_peak_memory_lands_beside_the_throughput(tmp_path):
    class GpuBackend(OldStyleBackend):
        def cxrbench_train(self, model, data, settings, recorder):
            return {
                "best_epoch": 1,
                "best_val_loss": 0.5,
                "numerics": {**complete(), "framework": {}},
                "peak_memory": {"mib": 5120.5, "source": "torch.cuda.max_memory_allocated"},
            }

    settings = Settings().replace(**{"model.arch": "densenet-tiny"})
    train(StageContext(folder=tmp_path, backend="gpu", hook=GpuBackend(), settings=settings, recorder=Recorder()))
    throughput = json.loads((tmp_path / "throughput.json").read_text())
    assert throughput["framework_peak_memory_mib"] == 5120.5
    assert throughput["framework_peak_memory_source"] == "torch.cuda.max_memory_allocated"
