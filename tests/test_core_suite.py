"""Suite files: every key validated, errors name the file, the key and what is allowed."""

import pytest

from cxrbench.errors import SuiteError
from cxrbench.suite import (
    COMMON_OVERRIDES,
    Settings,
    apply_overrides,
    available_suites,
    load_suite,
    parse_set_option,
)


def test_builtin_suites_load_and_match_their_purpose():
    assert {"smoke", "chestxray14", "throughput", "scaling"} <= set(available_suites())
    smoke = load_suite("smoke")
    assert smoke.name == "smoke" and smoke.data.source == "phantom" and smoke.data.image_size == 64
    full = load_suite("chestxray14")
    assert full.data.source == "chestxray14" and full.data.image_size == 224 and full.data.split == "official"
    assert full.train.batch_size == 16 and full.train.learning_rate == pytest.approx(1e-3)
    assert load_suite("throughput").run.stages == ("train",)


def test_settings_round_trip_through_json_dict():
    settings = load_suite("smoke")
    assert Settings.from_dict(settings.to_dict()) == settings


@pytest.mark.parametrize(
    "text, message",
    [
        ("[train]\nepochz = 2\n", "unknown key 'train.epochz' (allowed in [train]: epochs"),
        ("[trian]\nepochs = 2\n", "unknown key 'trian'"),
        ("[train]\nepochs = 'two'\n", "train.epochs must be an integer, got 'two'"),
        ("[train]\nepochs = 0\n", "train.epochs = 0 is below the minimum 1"),
        ("[numerics]\nprecision = 'fp8'\n", "numerics.precision = 'fp8' is not allowed (allowed: fp32, bf16, fp16)"),
        ("[numerics]\ntf32 = 1\n", "numerics.tf32 must be true or false, got 1"),
        ("[run]\nstages = ['train', 'deploy']\n", "run.stages has unknown stage 'deploy'"),
        ("[data\n", "not valid TOML"),
    ],
)
def test_bad_suite_names_file_key_and_allowed_values(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(SuiteError) as info:
        load_suite(str(path))
    assert str(path) in str(info.value)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_suite_name_lists_available():
    with pytest.raises(SuiteError, match="unknown suite 'smok' \\(available: .*smoke"):
        load_suite("smok")


def test_common_overrides_and_set_option():
    settings = load_suite("smoke")
    changed = apply_overrides(
        settings, {COMMON_OVERRIDES["epochs"]: 3, COMMON_OVERRIDES["image_size"]: 96, COMMON_OVERRIDES["seed"]: None}
    )
    assert changed.train.epochs == 3 and changed.data.image_size == 96 and changed.run.seed == settings.run.seed
    key, value = parse_set_option("numerics.channels_last=true")
    assert (key, value) == ("numerics.channels_last", True)
    assert parse_set_option("data.path=/some/where") == ("data.path", "/some/where")
    with pytest.raises(SuiteError, match="expected section.key=value"):
        parse_set_option("epochs")
    with pytest.raises(SuiteError, match="data.image_size = 8 is below the minimum 32"):
        apply_overrides(settings, {"data.image_size": 8})
