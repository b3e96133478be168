"""Canonical weights: the layout equals torchvision's state_dict, init is seeded, validation names tensors."""

import numpy as np
import pytest

from cxrbench.backend import canonical as weights
from cxrbench.errors import BackendError, WeightsError

DENSENET121 = (6, 12, 24, 16)


@pytest.mark.backends("pytorch")  # torchvision is the independent reference
def test_densenet121_layout_matches_torchvision():
    import torchvision

    model = torchvision.models.densenet121(weights=None, num_classes=14)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    spec = weights.densenet_spec(DENSENET121)
    assert list(spec) == list(expected)
    assert spec == expected
    assert weights.feature_channels(DENSENET121) == 1024


def test_parameter_count_is_densenet121_with_14_outputs():
    spec = weights.densenet_spec(DENSENET121)
    trainable = sum(int(np.prod(s)) for k, s in spec.items() if "running" not in k)
    assert trainable == 6_968_206  # torchvision densenet121(num_classes=14)


def test_init_is_seeded_and_follows_torchvision_scheme():
    a = weights.init_canonical((1, 1, 1, 1), seed=3)
    b = weights.init_canonical((1, 1, 1, 1), seed=3)
    c = weights.init_canonical((1, 1, 1, 1), seed=4)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["features.conv0.weight"], c["features.conv0.weight"])
    big = weights.init_canonical(DENSENET121, seed=0)["features.denseblock3.denselayer1.conv1.weight"]
    fan_in = big.shape[1]
    assert big.std() == pytest.approx(np.sqrt(2.0 / fan_in), rel=0.02)
    assert np.all(a["features.norm5.running_var"] == 1) and np.all(a["classifier.bias"] == 0)
    assert all(v.dtype == np.float32 for v in a.values())


def test_validate_names_missing_misshapen_and_unexpected_tensors():
    good = weights.init_canonical((1, 1, 1, 1), seed=0)
    weights.validate(good, (1, 1, 1, 1))
    missing = dict(good)
    del missing["features.norm0.running_var"]
    with pytest.raises(WeightsError, match="missing tensor 'features.norm0.running_var'"):
        weights.validate(missing, (1, 1, 1, 1))
    bent = dict(good, **{"classifier.weight": np.zeros((13, 5))})
    with pytest.raises(WeightsError, match=r"'classifier.weight' has shape \(13, 5\), expected \(14,"):
        weights.validate(bent, (1, 1, 1, 1))
    extra = dict(good, stray=np.zeros(1))
    with pytest.raises(WeightsError, match="unexpected tensor 'stray'"):
        weights.validate(extra, (1, 1, 1, 1))


def test_npz_round_trip_and_corrupt_file(tmp_path):
    good = weights.init_canonical((1, 1, 1, 1), seed=0)
    path = weights.save(good, tmp_path / "w.npz")
    back = weights.load(path)
    assert all(np.array_equal(good[k], back[k]) for k in good)
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(path.read_bytes()[:200])
    with pytest.raises(WeightsError, match="corrupt.npz: not a readable .npz"):
        weights.load(corrupt)
    with pytest.raises(WeightsError, match="nowhere.npz: weights file not found"):
        weights.load(tmp_path / "nowhere.npz")


def test_image_size_check():
    assert weights.check_image_size(224) == 7
    assert weights.check_image_size(64) == 2
    with pytest.raises(BackendError, match="image size 16 px is too small"):
        weights.check_image_size(16)
