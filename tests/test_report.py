"""The HTML report of a run folder: content, missing pieces, escaping, size, the CLI.

Every test renders a FAKE run folder (tests/helpers/fake_run.py) whose numbers are computed with the
project's real metric functions, so nothing here trains a network.
"""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from cxrbench.backend.timing import ratio_interval
from cxrbench.cli import main
from cxrbench.errors import CxrError
from cxrbench.report.figures import format_number
from cxrbench.report.load import load_run
from cxrbench.report.references import CHEXNET, MICROSOFT_POST
from cxrbench.report.render import write_report
from helpers.fake_run import HOSTILE_BACKEND, HOSTILE_CLASS, HOSTILE_ERROR, HOSTILE_PLUGIN, make_fake_run


class Elements(HTMLParser):
    """Every start tag with its attributes, the text per tag, and where SVG elements are."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def parse(html: str) -> Elements:
    parser = Elements()
    parser.feed(html)
    return parser


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory) -> Path:
    return make_fake_run(tmp_path_factory.mktemp("run") / "run-a", gpus=1, scaling=True)


@pytest.fixture(scope="module")
def report(fake_run) -> str:
    return write_report([fake_run]).read_text(encoding="utf-8")


def test_default_output_is_index_html_of_the_first_run(fake_run, report):
    assert (fake_run / "index.html").is_file()
    assert report.startswith("<!DOCTYPE html>")


def test_summary_shows_each_backends_mean_auroc_and_ci(fake_run, report):
    run = load_run(fake_run)
    for backend in run.backends.values():
        auroc = backend.get("auroc")
        assert f"{auroc['mean']:.4f}" in report
        low, high = auroc["ci"]["mean"]
        assert f"[{low:.3f}, {high:.3f}]" in report


def test_speed_ratio_reads_at_a_glance(fake_run, report):
    """Steady-state ratio with its bootstrap interval over both backends' windows, and the warm-up apart."""
    run = load_run(fake_run)
    torch_tp, keras_tp = (run.backends[n].get("throughput") for n in ("pytorch", "keras"))
    ratio = keras_tp["train_images_per_s"] / torch_tp["train_images_per_s"]
    low, high = ratio_interval(keras_tp["window_rates"]["train"], torch_tp["window_rates"]["train"])
    assert low <= ratio <= high
    keras_speed, torch_speed = (format_number(t["train_images_per_s"]) for t in (keras_tp, torch_tp))
    expected = (
        f"keras {ratio:.2f}x pytorch in training [{low:.2f}, {high:.2f}] "
        f"(steady state, one process each, {keras_speed} vs {torch_speed} img/s)"
    )
    assert expected in report
    assert "keras spends 100 s before its first step, pytorch 1.2 s" in report


def test_disturbed_figure_is_marked_next_to_the_number(tmp_path):
    run_dir = make_fake_run(tmp_path / "busy")
    path = run_dir / "run.json"
    data = json.loads(path.read_text())
    verdict = {"others_cpu_share_mean": 0.42, "limit": 0.15, "disturbed": True}
    data["backends"]["keras"]["throughput"].update(disturbed=True, disturbance={"train": verdict})
    path.write_text(json.dumps(data))
    html = write_report([run_dir], out=tmp_path / "r.html").read_text()
    assert "(disturbed: others used 42% of the CPU)" in html  # beside the number in the summary table
    assert (
        "no speed verdict in training: the machine was busy while it was timed (keras disturbed: others used 42% "
        "of the CPU)"
    ) in html  # and no ratio from it
    assert "x pytorch in training" not in html


def test_no_steady_state_says_so_instead_of_a_ratio(tmp_path):
    run_dir = make_fake_run(tmp_path / "short")
    path = run_dir / "run.json"
    data = json.loads(path.read_text())
    reason = "no steady state: 3 steps after warm-up (train.warmup_steps = 5) make 0 window(s)"
    data["backends"]["keras"]["throughput"].update(train_images_per_s=None, steady=False, no_steady_state=reason)
    path.write_text(json.dumps(data))
    html = write_report([run_dir], out=tmp_path / "r.html").read_text()
    assert f"keras in training: {reason}" in html and "x pytorch in training" not in html


def test_baseline_option_flips_the_sentence(fake_run, tmp_path):
    html = write_report([fake_run], out=tmp_path / "r.html", baseline="keras").read_text()
    assert "pytorch " in html and "x keras in training [" in html
    with pytest.raises(CxrError, match="--baseline 'tensorflow'.*pytorch, keras"):
        write_report([fake_run], out=tmp_path / "r.html", baseline="tensorflow")


def test_per_class_table_has_references_and_delong(fake_run, report):
    comparison = json.loads((fake_run / "comparison.json").read_text())
    pair = comparison["agreement"]["pairs"][0]["per_class"]
    table = report[report.index('id="auroc-table"') : report.index("</table>", report.index('id="auroc-table"'))]
    rows = re.findall(r"<tr><td class=\"text\">(.*?)</td>(.*?)</tr>", table, re.S)
    assert [name for name, _ in rows] == list(CHEXNET.per_class)
    for name, cells in rows:
        assert f"{CHEXNET.per_class[name]:.4f}" in cells
        assert f"{MICROSOFT_POST.per_class[name]:.4f}" in cells
        p = pair[name]["p_value"]
        assert ("&lt;0.001" if p < 0.001 else f"{p:.3f}") in cells
    assert "0.8414" in table and "0.8450" in table  # CheXNet and Microsoft post means


def test_every_chart_is_inline_svg_and_nothing_is_fetched(report):
    elements = parse(report)
    assert sum(1 for tag, _ in elements.tags if tag == "svg") == 5  # ROC, loss+lr, epoch time, utilisation, scaling
    for tag, attrs in elements.tags:
        for key in ("src", "href", "xlink:href"):
            value = attrs.get(key) or ""
            assert not re.match(r"(https?:)?//", value), f"<{tag} {key}={value}> would need the network"
    assert "<link" not in report and "@import" not in report and "url(http" not in report


def test_gallery_shows_the_same_images_side_by_side(fake_run, report):
    index = json.loads((fake_run / "pytorch" / "cams" / "index.json").read_text())
    images = [attrs for tag, attrs in parse(report).tags if tag == "img"]
    assert len(images) == 2 * len(index)
    for entry in index:
        alts = [a["alt"] for a in images if a["alt"].endswith(f"{entry['class']} CAM on {entry['image']}")]
        assert sorted(a.split(":")[0] for a in alts) == ["keras", "pytorch"]
    assert all(a["src"].startswith("data:image/png;base64,") for a in images)


def test_localisation_table_has_reference_row_and_centred_box(fake_run, report):
    loc = load_run(fake_run).backends["pytorch"].get("localisation")
    table = report[report.index('id="localisation-table"') :]
    table = table[: table.index("</table>")]
    assert "ChestX-ray8 T(IoBB)=0.5" in table and "0.945" in table  # Cardiomegaly's published accuracy
    assert "centred box" in table
    assert f"{loc['iobb']['overall']['accuracy']['0.5']:.3f}" in table


def test_equivalence_matrix_is_a_heat_map(fake_run, report):
    eq = json.loads((fake_run / "comparison.json").read_text())["equivalence"]
    table = report[report.index('id="equivalence-table"') :]
    table = table[: table.index("</table>")]
    colours = re.findall(r'style="background: (hsl\([^)]*\))"', table)
    assert len(colours) == len(eq["labels"]) ** 2
    assert len(set(colours)) > 1  # colour follows the value
    assert f"{eq['max_abs'][0][1]:.1e}" in table


def test_no_gpu_is_said_plainly(tmp_path):
    run = make_fake_run(tmp_path / "cpu-run", gpus=0)
    html = write_report([run]).read_text()
    assert "no GPU (NVML unavailable: NVMLError_LibraryNotFound)" in html
    assert '<td class="text">gpu0</td>' not in html and "GPU util %<" not in html


def test_failed_backend_renders_a_note_error_and_log_tail(tmp_path):
    run = make_fake_run(tmp_path / "failed-run", failed="keras")
    html = write_report([run]).read_text()
    assert "keras failed: BackendError: out of memory at batch size 16" in html
    log = (run / "keras" / "log.txt").read_text().splitlines()
    failures = html[html.index('id="failures"') :]
    assert log[-1] in failures and log[-40] in failures and log[-41] not in failures
    assert "slower than" not in html and "No speed ratio" in html  # keras has no speed figures


def test_missing_stages_render_notes_not_crashes(tmp_path):
    run = make_fake_run(tmp_path / "bare", backends=("pytorch",))
    for name in ("predictions.npz", "localisation.json", "cams.npz", "monitor.jsonl", "onnx.json", "metrics.json"):
        (run / "pytorch" / name).unlink()
    (run / "comparison.json").unlink()
    data = json.loads((run / "run.json").read_text())
    for key in ("auroc", "localisation", "onnx"):
        data["backends"]["pytorch"].pop(key)
    (run / "run.json").write_text(json.dumps(data))
    (run / "pytorch" / "cams" / "index.json").unlink()
    html = write_report([run]).read_text()
    for text in (
        "No ROC curves",
        "No localisation results",
        "No CAM images",
        "No equivalence check",
        "No monitor samples",
    ):
        assert text in html


def test_backend_folder_without_merge_is_read_from_its_files(tmp_path):
    """A run whose parent died before merging: the backend's own files still give its results."""
    run = make_fake_run(tmp_path / "unmerged")
    data = json.loads((run / "run.json").read_text())
    data["backends"] = {}
    (run / "run.json").write_text(json.dumps(data))
    html = write_report([run]).read_text()
    mean = json.loads((run / "keras" / "metrics.json").read_text())["auroc"]["mean"]
    assert f"{mean:.4f}" in html


def test_drawn_from_cams_npz_when_pngs_are_missing(tmp_path):
    run = make_fake_run(tmp_path / "npz-only", cam_images=4)
    for name in ("pytorch", "keras"):
        (run / name / "cams" / "index.json").unlink()
    html = write_report([run]).read_text()
    images = [a for t, a in parse(html).tags if t == "img"]
    assert len(images) == 8


def test_not_a_run_folder_is_a_one_line_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "run.json: not found" in err
    (tmp_path / "run.json").write_text("{broken")
    assert main(["report", str(tmp_path)]) == 2
    assert "run.json: not valid JSON" in capsys.readouterr().err


# -- safety ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hostile_html(tmp_path_factory) -> str:
    run = make_fake_run(tmp_path_factory.mktemp("hostile") / "run", failed="keras", hostile=True, cam_images=4)
    return write_report([run]).read_text(encoding="utf-8")


def test_hostile_strings_are_escaped_everywhere(hostile_html):
    elements = parse(hostile_html)
    tags = [tag for tag, _ in elements.tags]
    assert "script" not in tags and "iframe" not in tags
    assert not [a for t, a in elements.tags if any(k.startswith("on") for k in a)], (
        "an event-handler attribute was injected"
    )
    assert not [a for t, a in elements.tags if a.get("id") == "injected"]
    assert not [a for t, a in elements.tags if t == "img" and a.get("src") == "x"]
    text = "".join(elements.text)
    for hostile in (HOSTILE_CLASS, HOSTILE_BACKEND, HOSTILE_ERROR, HOSTILE_PLUGIN):
        assert hostile in text, f"{hostile!r} is not shown as text"


def test_hostile_names_in_charts_stay_text(hostile_html):
    svgs = re.findall(r"<svg.*?</svg>", hostile_html, re.S)
    assert svgs and any("&lt;script&gt;" in svg for svg in svgs)
    assert not any("<script" in svg for svg in svgs)


# -- size and CLI ---------------------------------------------------------------------------------


def test_smoke_sized_report_stays_under_5_mb(tmp_path):
    """16 CAM images x 2 backends at 224 px (noisy, so they compress like real X-rays)."""
    run = make_fake_run(tmp_path / "big", cam_images=16, image_size=224, n_test=2000)
    out = write_report([run])
    size = out.stat().st_size
    print(f"report of a 16-image x 2-backend gallery at 224 px: {size / 2**20:.2f} MiB")
    assert size < 5 * 2**20


def test_cli_writes_report_with_benchmarks_and_comparison(fake_run, tmp_path, capsys):
    bench = tmp_path / "bench.json"
    bench.write_text(
        json.dumps(
            {
                "machine_info": {"node": "ci-host", "cpu": {"brand_raw": "AMD EPYC"}, "python_version": "3.11.9"},
                "datetime": "2025-11-27T13:00:00",
                "commit_info": {"id": "6cf1d94"},
                "benchmarks": [
                    {
                        "name": "test_predict_speed[pytorch]",
                        "group": "predict",
                        "stats": {"median": 0.0123, "mean": 0.0125, "stddev": 0.0004, "ops": 80.1, "rounds": 20},
                        "extra_info": {"images_per_s": 1301.5},
                    }
                ],
            }
        )
    )
    other = make_fake_run(tmp_path / "run-b", gpus=1)
    data = json.loads((other / "run.json").read_text())
    data["environment"]["packages"]["torch"] = "2.15.0"
    throughput = data["backends"]["keras"]["throughput"]
    throughput["train_images_per_s"] *= 1.5  # the whole window distribution moved: the intervals part
    throughput["train_images_per_s_interval"] = [1.5 * bound for bound in throughput["train_images_per_s_interval"]]
    (other / "run.json").write_text(json.dumps(data))
    out = tmp_path / "cmp.html"
    code = main(
        ["report", str(fake_run), str(other), "--out", str(out), "--benchmark-json", str(bench), "--threshold", "10"]
    )
    assert code == 0 and f"wrote {out}" in capsys.readouterr().out
    html = out.read_text()
    benchmarks = html[html.index('id="benchmarks"') :]
    assert (
        "test_predict_speed[pytorch]" in benchmarks and "0.0123" in benchmarks and "images_per_s=1301.5" in benchmarks
    )
    comparison = html[html.index('id="comparison"') : html.index('id="accuracy"')]
    assert "environment.packages.torch" in comparison and "2.15.0" in comparison
    row = re.search(
        r'<tr class="flag-better"><td class="text">keras</td><td class="text">train images/s</td>.*?</tr>',
        comparison,
        re.S,
    )
    assert row and "+50.0 %" in row.group(0)


def test_bad_benchmark_json_names_the_file(fake_run, tmp_path):
    bad = tmp_path / "bench.json"
    bad.write_text(json.dumps({"no": "benchmarks"}))
    with pytest.raises(CxrError, match=r"--benchmark-json .*bench.json: not a pytest-benchmark file"):
        write_report([fake_run], out=tmp_path / "x.html", benchmark_json=[bad])


def test_report_is_deterministic(fake_run, report, tmp_path):
    assert write_report([fake_run], out=tmp_path / "again.html").read_text(encoding="utf-8") == report


class _SectionPlugin:
    """A plugin adding a report section; its title is escaped, its HTML (its own job) kept."""

    @staticmethod
    def cxrbench_report_sections(run):
        return [("<i>Extra</i> for " + run["suite"], f"<p id='plugin-html'>{len(run['backends'])} backends</p>")]


class _BrokenPlugin:
    @staticmethod
    def cxrbench_report_sections(run):
        raise RuntimeError("plugin bug")


@pytest.mark.parametrize(
    "plugin, expected",
    [
        (_SectionPlugin, "<p id='plugin-html'>2 backends</p>"),
        (_BrokenPlugin, "cxrbench_report_sections failed: RuntimeError: plugin bug"),
    ],
)
def test_plugin_sections(fake_run, tmp_path, monkeypatch, plugin, expected):
    import cxrbench.plugins
    from cxrbench.hookspecs import hookimpl

    plugins = cxrbench.plugins.load_plugins()
    plugins.manager.register(type("P", (), {"cxrbench_report_sections": hookimpl(plugin.cxrbench_report_sections)}))
    monkeypatch.setattr(cxrbench.plugins, "load_plugins", lambda: plugins)
    html = write_report([fake_run], out=tmp_path / "p.html").read_text()
    assert expected in html
    if plugin is _SectionPlugin:
        assert "&lt;i&gt;Extra&lt;/i&gt; for smoke" in html
