"""DistributedDataParallel's buffer switch in the spelling the installed torch accepts: ``forward_sync_buffers``
(torch 2.13+) or ``broadcast_buffers`` (torch 2.11, the GPU machine's). The second test hides the new keyword the way
torch 2.11 lacks it and trains one step through the backend's own DDP call site on one gloo rank."""

from __future__ import annotations

import inspect
import queue
import warnings

import pytest

from helpers.backends import require

pytestmark = require("pytorch")

import torch  # noqa: E402
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from cxrbench.backend import canonical
from cxrbench.testing.conformance import kit_settings, random_canonical, synthetic_data
from cxrbench_pytorch import distributed


@pytest.fixture
def single_rank_group(tmp_path):
    dist.init_process_group("gloo", init_method=(tmp_path / "rendezvous").as_uri(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_the_keyword_follows_the_installed_torch():
    has_new = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    expected = "forward_sync_buffers" if has_new else "broadcast_buffers"
    assert distributed.no_forward_buffer_sync() == {expected: False}


def test_a_torch_without_forward_sync_buffers_gets_broadcast_buffers(single_rank_group, tmp_path, monkeypatch):
    calls: list[dict] = []

    class TorchBefore213(DistributedDataParallel):
        """DDP as torch 2.11 spells it: ``forward_sync_buffers=`` would be a TypeError here."""

        def __init__(self, module, device_ids=None, broadcast_buffers=True):
            calls.append({"broadcast_buffers": broadcast_buffers})
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # newer torch deprecates broadcast_buffers
                super().__init__(module, device_ids=device_ids, broadcast_buffers=broadcast_buffers)

    monkeypatch.setattr(distributed, "DistributedDataParallel", TorchBefore213)
    assert distributed.no_forward_buffer_sync() == {"broadcast_buffers": False}

    settings = kit_settings(32, **{"train.epochs": 1, "train.max_steps": 1})
    canonical.save(random_canonical(settings.model.block_config, 0), tmp_path / distributed.INITIAL)
    events = queue.Queue()
    result = distributed._train_rank(
        0, 1, torch.device("cpu"), settings, synthetic_data(32, train=8, val=4), tmp_path, events, "gloo"
    )

    assert calls == [{"broadcast_buffers": False}]
    assert result["max_abs_weight_diff_between_ranks"] == 0
    assert result["numerics"]["data_parallel"] == "DistributedDataParallel (gloo)"
    assert (tmp_path / distributed.FINAL).exists() and not events.empty()
