"""The scoring service under load against offline scoring on the same machine (:mod:`cxrbench.deploy.loadtest`).

CI-sized: densenet-tiny at 64 px, 256 px pictures, 48 answers or 5 s per cell, 1, 8 and 16 clients, with
dynamic batching and without (``--max-batch 1``), loopback only. The table goes to the terminal and every figure
to ``benchmark.extra_info``; the assertions are about behaviour (no errors, batches > 1 under 16 clients only
with batching), never about speed. For the issue's figures (DenseNet-121, 224 px, 1024 px pictures) run
``python -m cxrbench.deploy.loadtest`` on a quiet machine (docs/serving.md).
"""

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")

from cxrbench.deploy.loadtest import LoadSettings, format_table, measure, synthetic_export  # noqa: E402

SETTINGS = LoadSettings(
    clients=(1, 8, 16), requests=48, time_limit_s=5.0, picture_size=256, pictures=8, baseline_repeats=2
)


def test_serve_under_load(benchmark, tmp_path, capsys):
    model = synthetic_export(tmp_path, "densenet-tiny", 64)
    result = benchmark.pedantic(measure, args=(model, SETTINGS, tmp_path), rounds=1, iterations=1)
    benchmark.extra_info.update(result.as_dict())
    with capsys.disabled():
        print("\n" + format_table(result))
    assert len(result.cells) == 6
    for cell in result.cells:
        assert cell.errors == {} and cell.answered > 0, cell
    assert result.cell("none", 16).mean_batch == 1.0
    batching = next(c for c in result.cells if c.mode != "none" and c.clients == 16)
    assert batching.mean_batch > 1.0, batching
