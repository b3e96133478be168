"""``--sweep``: grid parsing and its refusals, the table from hand-made cell files, sweep.csv, the report
section, and (slow) a one-key, two-value sweep of a tiny PyTorch model end to end."""

import csv
import io
import json
import re
from pathlib import Path

import pytest

from cxrbench.cli import main
from cxrbench.errors import CxrError
from cxrbench.files import write_json
from cxrbench.report.render import write_report
from cxrbench.run import sweep
from cxrbench.run.folder import sweep_folder
from cxrbench.run.schema import validate
from cxrbench.suite import Settings, parse_set_option
from helpers.fake_run import HOSTILE_BACKEND, HOSTILE_ERROR, make_fake_run
from helpers.tiny_run import TINY_RUN

# -- grid ------------------------------------------------------------------------------------------


def test_grid_values_are_typed_and_points_cover_every_combination():
    texts = ["numerics.precision=fp32,bf16", "train.batch_size=32, 64", "numerics.channels_last=false,true"]
    grid = sweep.parse_grid(texts, Settings())
    assert grid == {
        "numerics.precision": ["fp32", "bf16"],
        "train.batch_size": [32, 64],
        "numerics.channels_last": [False, True],
    }
    points = sweep.points(grid)
    assert len(points) == 8
    assert points[0] == {
        "name": "numerics.precision-fp32__train.batch_size-32__numerics.channels_last-false",
        "overrides": {"numerics.precision": "fp32", "train.batch_size": 32, "numerics.channels_last": False},
    }
    assert points[-1]["overrides"] == {
        "numerics.precision": "bf16",
        "train.batch_size": 64,
        "numerics.channels_last": True,
    }
    assert len({p["name"] for p in points}) == 8
    assert sweep.points({}) == []


def test_worker_set_options_read_back_to_the_same_values():
    overrides = {
        "numerics.precision": "bf16",
        "train.batch_size": 64,
        "numerics.channels_last": True,
        "train.learning_rate": 0.5,
    }
    options = sweep.set_options(overrides)
    assert options[::2] == ["--set"] * 4
    assert dict(parse_set_option(text) for text in options[1::2]) == overrides


@pytest.mark.parametrize(
    "texts, message",
    [
        (["numerics.nosuch=1,2"], "--sweep numerics.nosuch: unknown key 'numerics.nosuch'"),
        (["nosection.key=1"], "--sweep nosection.key: unknown key 'nosection.key' (sections: data, "),
        (["train.batch_size=32,big"], "--sweep train.batch_size: train.batch_size must be an integer, got 'big'"),
        (["train.batch_size=0,8"], "--sweep train.batch_size: train.batch_size = 0 is below the minimum 1"),
        (["numerics.precision=fp32,fp64"], "--sweep numerics.precision: numerics.precision = 'fp64' is not allowed"),
        (
            ["numerics.channels_last=false,yes"],
            "--sweep numerics.channels_last: numerics.channels_last must be true or false",
        ),
        (["numerics.precision"], "--sweep 'numerics.precision': expected section.key=value1,value2"),
        (["precision=fp32"], "--sweep 'precision=fp32': expected section.key=value1,value2"),
        (["train.batch_size=8,8"], "--sweep train.batch_size: a value is given twice"),
        (["train.batch_size=8", "train.batch_size=16"], "--sweep train.batch_size: given twice"),
        (["data.image_size=64,224"], "--sweep data.image_size: cannot be swept, it changes the prepared data set"),
        (["run.seed=1,2"], "--sweep run.seed: cannot be swept, use --repeats"),
    ],
)
def test_bad_sweeps_are_one_line_errors_naming_the_option_and_key(texts, message):
    with pytest.raises(CxrError) as caught:
        sweep.parse_grid(texts, Settings())
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)


@pytest.mark.backends("numpy")
def test_bad_sweep_is_refused_before_any_work(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "--backend", "numpy", "--sweep", "numerics.precision=fp32,fp64", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "--sweep numerics.precision" in err
    assert not out.exists()


# -- table -----------------------------------------------------------------------------------------


def _cell_files(
    folder: Path,
    status: str,
    speed: float | None,
    rss: list[float],
    gpu_mem: list[float] = (),
    error: str | None = None,
) -> None:
    write_json(folder / "status.json", {"status": status, "error": error})
    if speed is not None:
        write_json(
            folder / "throughput.json",
            {
                "train_images_per_s": speed,
                "first_step_s": 4.0,
                "disturbed": False,
                "train_images_per_s_interval": [speed - 2, speed + 1],
            },
        )
    rows = [{"t": i, "phase": "train", "device": "cpu", "rss_mib": v, "mem_mib": None} for i, v in enumerate(rss)]
    rows += [{"t": i, "phase": "train", "device": "gpu0", "rss_mib": None, "mem_mib": v} for i, v in enumerate(gpu_mem)]
    rows.append({"t": 99, "phase": "export", "device": "cpu", "rss_mib": 99999.0})  # not training: ignored
    torn = '{"t": 100, "pha'  # a killed worker's last line
    (folder / "monitor.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + torn, encoding="utf-8")


def _hand_made_sweep(run_dir: Path, names=("pytorch", "keras")) -> dict:
    grid = {"numerics.channels_last": [False, True]}
    off, on = (p["name"] for p in sweep.points(grid))
    _cell_files(sweep_folder(run_dir, off, names[0]), "completed", 30.0, [900.0, 1200.5, 1100.0])
    _cell_files(sweep_folder(run_dir, on, names[0]), "completed", 36.0, [800.0], gpu_mem=[5000.0, 7000.0])
    _cell_files(sweep_folder(run_dir, off, names[1]), "completed", 20.0, [2000.0])
    _cell_files(
        sweep_folder(run_dir, on, names[1]),
        "failed",
        None,
        [],
        error=HOSTILE_ERROR if names[0] != "pytorch" else "numerics.channels_last is not supported on the CPU",
    )
    return sweep.table(run_dir, list(names), grid)


def test_table_cells_have_speed_interval_first_step_and_peak_memory(tmp_path):
    section = _hand_made_sweep(tmp_path)
    assert section["keys"] == ["numerics.channels_last"] and len(section["cells"]) == 4
    first, third, second, failed = section["cells"]  # point by point, the backends inside
    assert (
        first["backend"],
        first["overrides"],
        first["train_images_per_s"],
        first["train_images_per_s_interval"],
        first["first_step_s"],
        first["peak_memory_mib"],
        first["memory_source"],
    ) == ("pytorch", {"numerics.channels_last": False}, 30.0, [28.0, 31.0], 4.0, 1200.5, "rss")
    assert (second["point"], second["peak_memory_mib"], second["memory_source"]) == (
        "numerics.channels_last-true",
        7000.0,
        "gpu",
    )  # GPU memory when sampled
    assert third["backend"] == "keras" and third["point"] == "numerics.channels_last-false"
    assert (failed["status"], failed["error"], failed["train_images_per_s"], failed["peak_memory_mib"]) == (
        "failed",
        "numerics.channels_last is not supported on the CPU",
        None,
        None,
    )


def test_sweep_csv_has_one_row_per_cell(tmp_path):
    rows = list(csv.DictReader(io.StringIO(sweep.to_csv(_hand_made_sweep(tmp_path)))))
    assert [(r["numerics.channels_last"], r["backend"], r["status"]) for r in rows] == [
        ("false", "pytorch", "completed"),
        ("false", "keras", "completed"),
        ("true", "pytorch", "completed"),
        ("true", "keras", "failed"),
    ]
    first, failed = rows[0], rows[3]
    assert (first["train_images_per_s"], first["interval_low"], first["peak_memory_mib"], first["disturbed"]) == (
        "30.0",
        "28.0",
        "1200.5",
        "false",
    )
    assert failed["train_images_per_s"] == "" and "not supported" in failed["error"]


def test_a_cell_without_a_steady_state_says_why_in_the_table_csv_and_terminal(tmp_path):
    from cxrbench.run.progress import sweep_lines

    section = _hand_made_sweep(tmp_path)
    folder = sweep_folder(tmp_path, section["points"][0], "pytorch")
    reason = "no steady state: 7 steps after warm-up (train.warmup_steps = 5) make 1 window(s) of 5 steps"
    write_json(
        folder / "throughput.json",
        {
            "train_images_per_s": None,
            "train_images_per_s_interval": None,
            "first_step_s": 0.7,
            "disturbed": False,
            "no_steady_state": reason,
        },
    )
    section = sweep.table(tmp_path, ["pytorch", "keras"], section["grid"])
    assert section["cells"][0]["no_steady_state"] == reason
    assert next(csv.DictReader(io.StringIO(sweep.to_csv(section))))["no_steady_state"] == reason
    lines = sweep_lines(section)
    assert lines[0] == f"sweep numerics.channels_last-false  pytorch: {reason}"
    assert lines[1] == "sweep numerics.channels_last-false  keras: 20.0 img/s [18.0, 21.0]"
    assert lines[3] == "sweep numerics.channels_last-true  keras: numerics.channels_last is not supported on the CPU"


def _report_with_sweep(run_dir: Path) -> str:
    run = json.loads((run_dir / "run.json").read_text())
    run["sweep"] = _hand_made_sweep(run_dir, tuple(run["backends"]))
    write_json(run_dir / "run.json", run)
    return write_report([run_dir]).read_text()


def test_report_has_a_sweep_table_and_chart(tmp_path):
    html = _report_with_sweep(make_fake_run(tmp_path / "run"))
    section = html[html.index('<section id="sweep">') : html.index("</section>", html.index('<section id="sweep">'))]
    assert "<svg" in section and 'href="#sweep"' in html
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", section))
    assert "false pytorch completed 30 [28.0, 31.0] 4 1200 rss no" in text
    assert "true pytorch completed 36 [34.0, 37.0] 4 7000 gpu no" in text
    assert len(re.findall(r"<tr", section)) == 1 + 4
    assert "numerics.channels_last is not supported on the CPU" in text


def test_sweep_section_escapes_hostile_names_and_errors(tmp_path):
    html = _report_with_sweep(make_fake_run(tmp_path / "run", hostile=True))
    section = html[html.index('<section id="sweep">') : html.index("</section>", html.index('<section id="sweep">'))]
    assert HOSTILE_BACKEND not in section and HOSTILE_ERROR not in section and "<script" not in section
    assert "&lt;img src=x" in section and "&lt;/pre&gt;&lt;script&gt;" in section


# -- end to end ------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.backends("pytorch")
def test_one_key_two_values_sweep_of_a_tiny_model(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(
        [
            "run",
            "--backend",
            "pytorch",
            "--set",
            "model.arch=densenet-tiny",
            "--set",
            "train.max_steps=4",
            "--set",
            "train.warmup_steps=1",
            "--set",
            "train.window_steps=1",
            "--set",
            'run.stages=["train"]',
            "--sweep",
            "train.batch_size=4,8",
            "--out",
            str(out),
        ]
    )
    assert code == 0, capsys.readouterr().err
    section = json.loads((out / "run.json").read_text())["sweep"]
    assert section["grid"] == {"train.batch_size": [4, 8]}
    assert [(c["point"], c["status"]) for c in section["cells"]] == [
        ("train.batch_size-4", "completed"),
        ("train.batch_size-8", "completed"),
    ]
    for cell, batch in zip(section["cells"], (4, 8)):
        folder = out / "sweep" / cell["point"] / "pytorch"
        history = json.loads((folder / "history.json").read_text())
        assert history[0]["images"] == 4 * batch  # the worker trained with the point's batch size
        low, high = cell["train_images_per_s_interval"]  # three one-step windows after the warm-up: steady
        assert cell["first_step_s"] > 0 and 0 < low <= cell["train_images_per_s"] <= high
        assert json.loads((folder / "status.json").read_text())["stages"]["evaluate"] == "skipped"
        assert cell["peak_memory_mib"] is None or cell["memory_source"] == "rss"
    assert len((out / "sweep.csv").read_text().splitlines()) == 3
    assert 'id="sweep-table"' in (out / "index.html").read_text()
    validate(json.loads((out / "run.json").read_text()))


@pytest.mark.backends("numpy")
def test_a_point_the_backend_refuses_by_design_is_a_refused_cell(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["run", "--backend", "numpy", *TINY_RUN, "--set", "run.stages=[]", "--out", str(out)]
    assert main([*args, "--sweep", "numerics.precision=fp32,bf16"]) == 0, capsys.readouterr().err
    section = json.loads((out / "run.json").read_text())["sweep"]
    fp32, bf16 = section["cells"]
    assert (fp32["status"], fp32["error"]) == ("completed", None)
    assert bf16["status"] == "refused"  # UnsupportedSetting: by design, not a failure
    assert bf16["error"] == "numerics.precision = 'bf16': the numpy backend computes in fp32 only"
    status = json.loads((out / "sweep" / bf16["point"] / "numpy" / "status.json").read_text())
    assert (status["status"], status["refused"]) == ("failed", True)
    rows = list(csv.DictReader(io.StringIO((out / "sweep.csv").read_text())))
    assert [row["status"] for row in rows] == ["completed", "refused"]
