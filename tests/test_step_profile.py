"""Where a step's time goes: the sweep that gives every instant of the profiled region to one category, and the
arithmetic of how much of a step-time difference between two backends the categories explain. Framework-free."""

import pytest

from cxrbench.backend.profiling import INPUT_REGION, PROFILE_REGION, TraceEvent
from cxrbench.metrics import step_profile
from cxrbench.metrics.operation_categories import CATEGORY_KEYS, Classifier, category_rules


def op(name, start, end, lane="main", scope="", kind="op"):
    return TraceEvent(name, float(start), float(end - start), lane, kind, scope)


def categories_us(result):
    """Microseconds per category over the whole region (the result is ms per step)."""
    return {k: round(v * 1000 * result["steps"], 6) for k, v in result["categories_ms"].items() if v}


def test_nested_spans_take_the_outer_rule_and_every_instant_lands_in_one_category():
    events = [
        op(PROFILE_REGION, 0, 100, kind="host"),
        op("aten::conv2d", 0, 30),  # claims its inner operators
        op("aten::mkldnn_convolution", 5, 25),
        op("aten::empty", 6, 7),
        op("Optimizer.step#Adam.step", 40, 60, kind="host"),  # an annotation: its inner operators are the optimizer
        op("aten::add_", 42, 50),
        op(INPUT_REGION, 70, 80, kind="host"),
        op("mystery_op", 85, 90),
    ]
    rules = category_rules("optimizer", r"^Optimizer\.step") + category_rules("conv_forward", r"^aten::conv2d")
    result = step_profile.analyse(events, Classifier(rules), steps=2)
    assert categories_us(result) == {
        "conv_forward": 30.0,
        "optimizer": 8.0,  # the Python time inside the annotation, 12 us, is no operation: overhead
        "input": 10.0,
        "other": 5.0,
        "overhead": 47.0,  # 30-40, 40-42, 50-60, 60-70, 80-85, 90-100
    }
    assert sum(result["categories_ms"].values()) == pytest.approx(result["step_ms"]) == pytest.approx(0.05)
    assert result["operations_ms"] == pytest.approx((30 + 8 + 5) / 1000 / 2)
    assert [(o["name"], o["category"]) for o in result["unmapped"]] == [("mystery_op", "other")]
    top = result["top_operations"][0]
    assert (top["name"], top["path"], top["calls_per_step"]) == (
        "aten::mkldnn_convolution",
        "aten::conv2d/aten::mkldnn_convolution",
        0.5,
    )


def test_concurrent_operations_share_the_instants_they_overlap_and_host_spans_fill_only_the_gaps():
    events = [
        op(PROFILE_REGION, 0, 40, kind="host"),
        op("Conv2D", 0, 20, lane="compute/1", scope="model/conv1"),
        op("Relu", 10, 30, lane="compute/2", scope="model/relu1"),
        op("launch", 0, 40, lane="python", kind="host"),  # host work under the operations: never counted twice
    ]
    result = step_profile.analyse(events, Classifier(), steps=1)
    assert categories_us(result) == {"conv_forward": 15.0, "elementwise": 15.0, "overhead": 10.0}


def test_events_outside_the_region_are_cut_off_and_a_trace_without_region_uses_all_events():
    inside = [op(PROFILE_REGION, 10, 20, kind="host"), op("Conv2D", 0, 15), op("Relu", 18, 30)]
    assert categories_us(step_profile.analyse(inside, Classifier(), 1)) == {
        "conv_forward": 5.0,
        "elementwise": 2.0,
        "overhead": 3.0,
    }
    whole = step_profile.analyse([op("Conv2D", 0, 15), op("Relu", 18, 30)], Classifier(), 1)
    assert whole["region"].startswith("all events") and whole["step_ms"] == pytest.approx(0.030)


def profile(**ms):
    categories = {key: 0.0 for key in CATEGORY_KEYS}
    categories.update(ms)
    return {"categories_ms": categories, "step_ms": sum(categories.values())}


def test_the_explained_share_is_the_named_categories_difference_over_the_timed_difference():
    base = profile(conv_forward=20.0, batch_norm=5.0, concat_copy=2.0, overhead=3.0)  # 30 ms profiled
    other = profile(conv_forward=19.0, batch_norm=14.0, concat_copy=4.0, overhead=3.5, other=1.5)  # 42 ms
    result = step_profile.explain("keras", other, 43.0, "pytorch", base, 31.0)
    assert result["delta_ms"] == pytest.approx(12.0)
    assert result["explained_ms"] == pytest.approx(-1.0 + 9.0 + 2.0 + 0.5)  # everything but "other"
    assert result["share_explained"] == pytest.approx(10.5 / 12.0)
    assert result["missing"] == {"unmapped_ms": pytest.approx(1.5), "profiled_vs_timed_ms": pytest.approx(0.0)}
    assert result["explained_enough"] and not result["negligible"]
    assert result["sentence"].startswith(
        "Of keras's extra 12.0 ms per step against pytorch (steady state: 43.0 vs 31.0 ms per step), "
        "9.0 ms batch norm, 2.0 ms concatenation and copies"
    )
    assert "offset by 1.0 ms convolution (forward)" in result["sentence"]
    assert result["sentence"].endswith("the categories explain 88 %")


def test_a_profile_that_does_not_match_the_timed_difference_says_what_is_missing():
    base, other = profile(batch_norm=5.0, overhead=5.0), profile(batch_norm=6.0, overhead=5.0, other=6.0)
    result = step_profile.explain("jax", other, 20.0, "pytorch", base, 10.0)  # timed: 10 ms apart; named: 1 ms
    assert result["share_explained"] == pytest.approx(0.1) and not result["explained_enough"]
    assert result["missing"]["unmapped_ms"] == pytest.approx(6.0)
    assert result["missing"]["profiled_vs_timed_ms"] == pytest.approx(-3.0)  # profiled 7 ms apart, timed 10
    assert "missing: +6.0 ms in unmapped operations, -3.0 ms between the profiled and the timed" in result["sentence"]


def test_a_difference_within_the_measurement_has_nothing_to_explain():
    base, other = profile(batch_norm=10.0), profile(batch_norm=10.2)
    small = step_profile.explain("keras", other, 10.2, "pytorch", base, 10.0)
    assert small["negligible"] and "nothing to explain" in small["sentence"]
    noisy = step_profile.explain("keras", other, 13.0, "pytorch", base, 10.0, ratio_interval=[0.6, 1.1])
    assert noisy["negligible"]


def test_compare_builds_run_json_section_from_backend_summaries():
    throughput = {
        "train_images_per_s": 16.0 / 0.040,
        "window_rates": {"train": [400.0, 401.0, 399.0, 400.5]},
        "disturbance": {"train": {"disturbed": True}},  # the noise guard's verdict on keras' timed training
    }
    faster = {"train_images_per_s": 16.0 / 0.030, "window_rates": {"train": [533.0, 534.0, 532.0, 533.5]}}
    summaries = {
        "pytorch": {"profile": {"status": "done", **profile(conv_forward=25.0, overhead=5.0)}, "throughput": faster},
        "keras": {
            "profile": {"status": "done", **profile(conv_forward=25.0, batch_norm=14.0)},
            "throughput": throughput,
        },
        "numpy": {"profile": {"status": "skipped", "reason": "backend 'numpy' has no profiler"}, "throughput": {}},
    }
    section = step_profile.compare(summaries, "pytorch", global_batch=16)
    assert section["steady_step_ms"] == {"pytorch": pytest.approx(30.0), "keras": pytest.approx(40.0)}
    assert section["missing"] == {"numpy": "backend 'numpy' has no profiler"}
    (pair,) = section["pairs"]
    assert pair["backend"] == "keras" and pair["share_explained"] == pytest.approx(9.0 / 10.0)
    assert pair["disturbed"] == ["keras"] and "measured while the machine was busy: keras disturbed" in pair["sentence"]
    batch_norm = next(row for row in section["categories"] if row["key"] == "batch_norm")
    assert batch_norm["ms"] == {"pytorch": 0.0, "keras": 14.0}
    assert step_profile.global_batch({"train": {"batch_size": 16}, "run": {"gpus": 4}}) == 64
