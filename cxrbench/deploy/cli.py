"""``cxrbench predict``, ``serve`` and ``results``: options here, work in the modules each command imports when run
(so ``cxrbench --help`` loads neither numpy-heavy code nor FastAPI, pydicom or pandas)."""

from __future__ import annotations

import argparse

from cxrbench.deploy.limits import MAX_BATCH, MAX_BATCH_DELAY_MS, MAX_BYTES, MAX_PIXELS, MAX_QUEUE
from cxrbench.results import TABLES  # light: pandas is imported only when a table is made


def _predict(args: argparse.Namespace) -> int:
    from cxrbench.deploy import predict

    return predict.run(args)


def _serve(args: argparse.Namespace) -> int:
    from cxrbench.deploy import serve

    return serve.run(args)


def _results(args: argparse.Namespace) -> int:
    from cxrbench import results

    return results.run(args)


def _add_model(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="an exported model.onnx, or a run folder (with --backend)")
    parser.add_argument("--backend", help="which backend's export, when MODEL is a run folder with several")
    parser.add_argument("--max-pixels", type=int, default=MAX_PIXELS, help=f"refuse larger pictures ({MAX_PIXELS})")
    parser.add_argument(
        "--crop-model",
        metavar="PATH",
        help="the lung-segmentation ONNX model the export was trained with (data.crop_model), if not where it was",
    )


def add_parsers(commands) -> None:
    predict = commands.add_parser("predict", help="score PNG/JPEG/DICOM pictures with an ONNX export (no framework)")
    _add_model(predict)
    predict.add_argument("images", metavar="IMAGE", nargs="+", help="picture files, folders or globs")
    predict.add_argument("--format", choices=("csv", "json"), default="csv", help="table on stdout (default csv)")
    predict.add_argument(
        "--cam", metavar="DIR", help="write one CAM overlay PNG (with predicted boxes) per picture and class here"
    )
    predict.add_argument("--top-k", type=int, default=3, help="CAMs for the K most probable classes (default 3)")
    predict.add_argument("--classes", nargs="+", metavar="CLASS", help="CAMs for these classes instead of the top K")
    predict.add_argument("--batch-size", type=int, default=16, help="pictures per onnxruntime call (default 16)")
    predict.set_defaults(func=_predict)

    serve = commands.add_parser(
        "serve",
        help="serve an ONNX export over HTTP (POST /predict; GET /health, /ready, /model, /metrics)",
        description="Every path but /health needs 'Authorization: Bearer TOKEN' when tokens are set. "
        "See docs/serving.md.",
    )
    _add_model(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--max-bytes", type=int, default=MAX_BYTES, help=f"largest accepted upload ({MAX_BYTES})")
    serve.add_argument("--workers", type=int, help="threads decoding uploads (default: the usable cores)")
    serve.add_argument("--token-file", metavar="PATH", help="accepted bearer tokens, one per line (or $CXRBENCH_TOKEN)")
    serve.add_argument(
        "--insecure-no-auth",
        action="store_true",
        help="serve a non-loopback --host without any token (anyone who reaches the port may score)",
    )
    serve.add_argument("--ssl-certfile", metavar="PATH", help="TLS certificate chain (PEM); with --ssl-keyfile")
    serve.add_argument("--ssl-keyfile", metavar="PATH", help="TLS private key (PEM)")
    serve.add_argument(
        "--max-batch", type=int, default=MAX_BATCH, help=f"pictures per onnxruntime call at most ({MAX_BATCH})"
    )
    serve.add_argument(
        "--max-batch-delay-ms",
        type=float,
        default=MAX_BATCH_DELAY_MS,
        help=f"how long a picture may wait for others to join its batch ({MAX_BATCH_DELAY_MS:g} ms)",
    )
    serve.add_argument(
        "--max-queue",
        type=int,
        default=MAX_QUEUE,
        help=f"scoring requests in progress at most; more get 503 with Retry-After ({MAX_QUEUE})",
    )
    serve.set_defaults(func=_serve)

    results = commands.add_parser("results", help="a run's results as one table (several runs stacked, a 'run' column)")
    results.add_argument("run_dirs", metavar="RUN_DIR", nargs="+")
    results.add_argument("--table", choices=TABLES, default="auroc", help="which table (default auroc)")
    results.add_argument("--format", choices=("csv", "markdown", "json"), default="csv")
    results.set_defaults(func=_results)
