"""The service's dynamic batcher on its own (no HTTP): one onnxruntime call per batch, each caller its own row.

Batches are made deterministic by holding the inference thread in its first call until the test has queued
what it wants; results are compared with the same model scoring each picture alone (atol 1e-5: another batch
composition may change the last bits of a convolution's sums).
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from cxrbench.deploy.batching import Batcher, QueueFull, Stopped
from cxrbench.deploy.model import ScoringModel
from helpers.deploy import SIZE, chest_like, tiny_export, wait_until

ALL_CLASSES = list(range(14))


class HeldModel(ScoringModel):
    """Records every call's batch size; the first call waits until the test releases it."""

    def __init__(self, path: Path, fail: bool = False):
        super().__init__(path)
        self.calls: list[int] = []
        self.entered, self.release, self.fail = threading.Event(), threading.Event(), fail

    def score(self, images, cam_classes=None):
        self.calls.append(len(images))
        if len(self.calls) == 1:
            self.entered.set()
            assert self.release.wait(timeout=60)
        if self.fail:
            raise RuntimeError("onnxruntime failed")
        return super().score(images, cam_classes)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    return tiny_export(tmp_path_factory.mktemp("model") / "model.onnx")


@pytest.fixture(scope="module")
def pictures() -> np.ndarray:
    return np.stack([chest_like(k, SIZE, SIZE) for k in range(10)])


@pytest.fixture
def held(model_path):
    model = HeldModel(model_path)
    batcher = Batcher(model, max_batch=4, max_delay_s=0.1, capacity=16)
    batcher.start()
    yield model, batcher
    model.release.set()
    batcher.stop()


def test_queued_pictures_are_scored_together_and_each_caller_gets_its_own_row(held, pictures, model_path):
    model, batcher = held
    first = batcher.submit(pictures[0], cam=False)
    assert model.entered.wait(timeout=30)
    wanted_cam = [k % 2 == 0 for k in range(1, 10)]
    futures = [batcher.submit(pictures[k], cam) for k, cam in zip(range(1, 10), wanted_cam)]
    assert batcher.depth == 9
    model.release.set()
    results = [first.result(timeout=30)] + [f.result(timeout=30) for f in futures]
    assert model.calls == [1, 4, 4, 1]  # the held call, then max_batch at a time, the rest when nothing more came
    assert [r.batch_size for r in results] == [1, 4, 4, 4, 4, 4, 4, 4, 4, 1]
    alone = ScoringModel(model_path)
    for k, result in enumerate(results):
        expected = alone.score(pictures[k : k + 1], ALL_CLASSES)
        np.testing.assert_allclose(result.logits, expected.logits[0], rtol=0, atol=1e-5)
        if k and wanted_cam[k - 1]:
            np.testing.assert_allclose(result.maps, expected.maps[0], rtol=0, atol=1e-5)
        else:
            assert result.maps is None


def test_a_full_queue_refuses_and_stopping_fails_the_waiting(held, pictures):
    model, _ = held
    batcher = Batcher(model, max_batch=4, max_delay_s=0.0, capacity=2)
    batcher.start()
    scoring = batcher.submit(pictures[0], cam=False)
    assert model.entered.wait(timeout=30)
    waiting = [batcher.submit(pictures[k], cam=False) for k in (1, 2)]
    with pytest.raises(QueueFull, match="2 pictures are already waiting"):
        batcher.submit(pictures[3], cam=False)
    stopper = threading.Thread(target=batcher.stop)
    stopper.start()
    for future in waiting:
        with pytest.raises(Stopped):
            future.result(timeout=30)
    model.release.set()
    stopper.join(timeout=30)
    assert scoring.result(timeout=30).batch_size == 1  # the batch in progress finishes
    assert not batcher.running
    with pytest.raises(Stopped):
        batcher.submit(pictures[0], cam=False)


def test_a_failed_call_fails_every_caller_of_its_batch_and_the_next_batch_runs(model_path, pictures):
    model = HeldModel(model_path, fail=True)
    batcher = Batcher(model, max_batch=8, max_delay_s=0.1, capacity=8)
    batcher.start()
    try:
        futures = [batcher.submit(pictures[0], cam=False)]
        assert model.entered.wait(timeout=30)
        futures += [batcher.submit(pictures[k], cam=False) for k in (1, 2)]
        model.release.set()
        for future in futures:
            with pytest.raises(RuntimeError, match="onnxruntime failed"):
                future.result(timeout=30)
        assert model.calls == [1, 2]
        assert batcher.running
    finally:
        batcher.stop()


def test_a_cancelled_request_is_not_scored(held, pictures):
    model, batcher = held
    batcher.submit(pictures[0], cam=False)
    assert model.entered.wait(timeout=30)
    gone, kept = batcher.submit(pictures[1], cam=False), batcher.submit(pictures[2], cam=False)
    assert gone.cancel()  # the client went away while its picture waited
    model.release.set()
    assert kept.result(timeout=30).batch_size == 1
    assert model.calls == [1, 1]


def test_a_lone_picture_is_scored_at_once_when_nothing_else_is_on_its_way(model_path, pictures):
    model = HeldModel(model_path)
    model.release.set()
    batcher = Batcher(model, max_batch=4, max_delay_s=600.0, capacity=4, arriving=lambda: 0)
    batcher.start()
    try:
        assert batcher.submit(pictures[0], cam=False).result(timeout=60).batch_size == 1  # not after 600 s
    finally:
        batcher.stop()


def test_a_picture_on_its_way_is_waited_for_within_the_delay(model_path, pictures):
    model = HeldModel(model_path)
    model.release.set()
    batcher = Batcher(model, max_batch=4, max_delay_s=1.5, capacity=4, arriving=lambda: 1)
    batcher.start()
    try:
        first = batcher.submit(pictures[0], cam=False)
        assert wait_until(lambda: batcher.depth == 0, timeout=1, interval=0.01)  # taken; waiting for more
        second = batcher.submit(pictures[1], cam=False)
        assert first.result(timeout=30).batch_size == second.result(timeout=30).batch_size == 2
        assert model.calls == [2]
    finally:
        batcher.stop()
