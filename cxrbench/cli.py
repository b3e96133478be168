"""The ``cxrbench`` command. Imports stay lazy so ``--help`` and ``backends`` start fast and never
load a framework."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from cxrbench import __version__
from cxrbench.errors import CxrError, StorageError, is_storage_fault, storage_error
from cxrbench.suite import ARCHITECTURES

#: Exit statuses (docs/faults.md, "Exit status"): 128 + SIGPIPE, as a shell reports a pipeline reader that closed early.
EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED, EXIT_BROKEN_PIPE = 0, 1, 2, 130, 141


def _cmd_backends(args: argparse.Namespace) -> int:
    from cxrbench.machine.env import gpu_inventory
    from cxrbench.plugins import load_plugins, no_backend_message

    plugins = load_plugins(args.plugin)
    if args.check:
        return _check_backends(plugins.backend_names(), args)
    gpus = gpu_inventory()
    devices = ", ".join(["cpu"] + [f"cuda:{d['index']} {d['name']}" for d in gpus["devices"]])
    rows = [(info.name, info.framework, info.version, info.plugin, devices) for info in plugins.backends.values()]
    if args.json:
        listed = [
            {**dict(zip(("name", "framework", "version", "plugin", "devices"), row)), "extra": info.extra}
            for row, info in zip(rows, plugins.backends.values())
        ]
        print(
            json.dumps(
                {"backends": listed, "failures": [{"plugin": f.name, "error": f.error} for f in plugins.failures]},
                indent=2,
            )
        )
    else:
        _print_table(("backend", "framework", "version", "plugin", "devices"), rows)
        for failure in plugins.failures:
            print(f"warning: {failure}", file=sys.stderr)
    if not rows:
        print(f"note: {no_backend_message()}", file=sys.stderr)
    return 0


def _check_backends(names: list[str], args: argparse.Namespace) -> int:
    from cxrbench.machine.framework_devices import check_all
    from cxrbench.run.environments import parse_python_options

    rows = check_all(names, parse_python_options(args.python))
    if args.json:
        print(json.dumps({"checks": rows}, indent=2))
    else:
        _print_table(
            ("backend", "python", "framework sees", "verdict"),
            [(r["backend"], r["python"], ", ".join(r.get("devices") or []) or "-", r["verdict"]) for r in rows],
        )
    return 0 if all(r["ok"] for r in rows) else 1


def _print_table(header: tuple[str, ...], rows: list[tuple]) -> None:
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
    for row in (header, *rows):
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip())


def _cmd_env(args: argparse.Namespace) -> int:
    from cxrbench.machine.env import capture

    print(json.dumps(capture(), indent=2))
    return 0


def _cmd_data_synth(args: argparse.Namespace) -> int:
    from cxrbench.data import phantom

    out = phantom.synthesize(Path(args.out), args.images, args.size, args.seed)
    print(f"wrote a phantom ChestX-ray14 data set of {args.images} images ({args.size} px) to {out}")
    return 0


def _read_index(args: argparse.Namespace):
    from cxrbench.data import nih

    return nih.read_index(
        Path(args.data),
        split=args.split,
        val_fraction=args.val_fraction,
        seed=args.seed,
        exclude=Path(args.exclude) if args.exclude else None,
    )


def _crop_spec(args: argparse.Namespace):
    """``--crop``, ``--crop-model``, ``--crop-margin`` checked as ``data.crop*`` are in a run."""
    from cxrbench.data import crop
    from cxrbench.suite import Settings

    given = {"data.crop": args.crop, "data.crop_model": args.crop_model or "", "data.crop_margin": args.crop_margin}
    spec = crop.spec_from_settings(Settings().replace(**given).data)
    crop.check(spec)
    return spec


def _cmd_data_prepare(args: argparse.Namespace) -> int:
    from cxrbench.data import cache, crop

    spec = _crop_spec(args)
    index = _read_index(args)
    prepared = cache.prepare(
        index,
        args.size,
        crop_spec=spec,
        cache_dir=Path(args.cache) if args.cache else None,
        workers=args.workers,
        progress=not args.quiet,
    )
    for note in index.notes:
        print(f"note: {note}", file=sys.stderr)
    folder = Path(prepared.images.filename).parent
    print(f"prepared {len(index)} images at {args.size} px: key {prepared.key[:16]} ({prepared.images.filename})")
    if spec.active:
        fallbacks = sum(box.fallback for box in prepared.crop_boxes.values())
        print(
            f"cropped to the lungs ({spec.finder}, margin {spec.margin:g}): {fallbacks} of {len(index)} kept whole "
            f"(no lungs found); boxes in {folder / crop.BOXES_FILE}"
        )
    print(folder)
    return 0


def _cmd_data_check(args: argparse.Namespace) -> int:
    from cxrbench.data import check

    summary = check.summarize(_read_index(args), verify_images=not args.no_verify)
    print(json.dumps(summary, indent=2) if args.json else check.format_summary(summary))
    return 0 if check.is_usable(summary) else 1


def _cmd_data_verify(args: argparse.Namespace) -> int:
    from cxrbench.data import cache

    result = cache.verify(
        _read_index(args),
        args.size,
        crop_spec=_crop_spec(args),
        cache_dir=Path(args.cache) if args.cache else None,
        rebuild=not args.no_rebuild,
    )
    print(result.message)
    return EXIT_OK if result.ok else EXIT_FAILED


def _cmd_weights_import(args: argparse.Namespace) -> int:
    from cxrbench.backend import canonical as weights
    from cxrbench.backend import checkpoints
    from cxrbench.files import sha256_of
    from cxrbench.plugins import load_plugins

    imported = checkpoints.import_checkpoint(args.file, ARCHITECTURES[args.arch], load_plugins(args.plugin))
    out = weights.save(imported, args.out)
    print(
        f"{out}: {len(imported)} canonical tensors of {args.arch} from {args.file} "
        f"(sha256 {sha256_of(Path(args.file))[:16]})"
    )
    return EXIT_OK


def _add_index_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="NIH ChestX-ray14 folder (or a phantom one)")
    parser.add_argument("--split", default="official", choices=("official", "random-70-10-20"))
    parser.add_argument("--val-fraction", type=float, default=0.1, help="validation patients carved out of train_val")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--exclude", help="exclusion list: one image file name per line")


def _add_crop_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--crop", choices=("none", "lungs"), default="none", help="crop to the lung fields (data.crop)")
    parser.add_argument(
        "--crop-model", metavar="PATH", help="a lung-segmentation ONNX model (default: the classical lung finder)"
    )
    parser.add_argument("--crop-margin", type=float, default=0.05, help="box margin, a fraction per side (0.05)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cxrbench",
        description="Compare deep-learning frameworks on CheXNet-style DenseNet-121 chest X-ray classification.",
    )
    parser.add_argument("--version", action="version", version=f"cxrbench {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    backends = commands.add_parser("backends", help="list installed backends (no framework is imported)")
    backends.add_argument(
        "--plugin", action="append", default=[], metavar="MODULE", help="also load this plugin module"
    )
    backends.add_argument("--json", action="store_true")
    backends.add_argument(
        "--check",
        action="store_true",
        help="import each backend in a process (its environment) of its own and check the devices "
        "its framework sees against NVML's GPUs; exit 1 when one is blind to a GPU",
    )
    backends.add_argument(
        "--python",
        action="append",
        default=[],
        metavar="BACKEND=PATH",
        help="with --check: that backend's interpreter (as for cxrbench run)",
    )
    backends.set_defaults(func=_cmd_backends)

    env = commands.add_parser("env", help="print the environment capture as JSON")
    env.set_defaults(func=_cmd_env)

    data = commands.add_parser("data", help="generate, prepare and check data sets")
    data_commands = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    synth = data_commands.add_parser("synth", help="write a phantom data set in the NIH ChestX-ray14 format")
    synth.add_argument("--out", required=True)
    synth.add_argument("--images", type=int, default=720)
    synth.add_argument("--size", type=int, default=128, help="image side in pixels")
    synth.add_argument("--seed", type=int, default=0)
    synth.set_defaults(func=_cmd_data_synth)

    prepare = data_commands.add_parser("prepare", help="decode, gray and resize every image once into the cache")
    _add_index_options(prepare)
    prepare.add_argument("--size", type=int, required=True, help="prepared image side in pixels")
    prepare.add_argument(
        "--cache", help="cache folder (default: $CXRBENCH_CACHE/prepared or ~/.cache/cxrbench/prepared)"
    )
    prepare.add_argument("--workers", type=int, help="decoding processes (default: all cores)")
    prepare.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_crop_options(prepare)
    prepare.set_defaults(func=_cmd_data_prepare)

    check = data_commands.add_parser("check", help="report counts, splits and problems; non-zero exit if unusable")
    _add_index_options(check)
    check.add_argument("--json", action="store_true", help="print the summary as JSON")
    check.add_argument("--no-verify", action="store_true", help="do not decode every image")
    check.set_defaults(func=_cmd_data_check)

    verify = data_commands.add_parser(
        "verify", help="check every block of a prepared cache against its checksum; a mismatch rebuilds it (exit 1)"
    )
    _add_index_options(verify)
    verify.add_argument("--size", type=int, required=True, help="prepared image side in pixels")
    verify.add_argument("--cache", help="cache folder (default: as for data prepare)")
    verify.add_argument("--no-rebuild", action="store_true", help="only report a mismatch; remove the corrupt cache")
    _add_crop_options(verify)
    verify.set_defaults(func=_cmd_data_verify)

    weights = commands.add_parser("weights", help="bring published checkpoints into the canonical weights")
    weights_commands = weights.add_subparsers(dest="weights_command", metavar="ACTION", required=True)
    imports = weights_commands.add_parser(
        "import",
        help="convert a framework's checkpoint (.pth, .pth.tar, .pt, "
        ".h5, .keras) to canonical .npz weights, usable as model.init",
    )
    imports.add_argument("file", help="the checkpoint, read by the installed backend that knows its kind")
    imports.add_argument("--out", required=True, help="canonical weights file to write (.npz)")
    imports.add_argument("--arch", default="densenet121", choices=tuple(ARCHITECTURES), help="the DenseNet it holds")
    imports.add_argument("--plugin", action="append", default=[], metavar="MODULE", help="also load this plugin module")
    imports.set_defaults(func=_cmd_weights_import)

    from cxrbench.deploy import cli as deploy_cli
    from cxrbench.report import cli as report_cli
    from cxrbench.run import cli as run_cli

    run_cli.add_parser(commands)
    run_cli.add_overhead_parser(commands)
    report_cli.add_parser(commands)
    deploy_cli.add_parsers(commands)
    return parser


def _error(text: str) -> None:
    """One line on stderr; a closed stderr cannot make it a traceback."""
    try:
        print(f"cxrbench: {text}", file=sys.stderr)
    except OSError:
        pass


def _quiet_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush cannot raise again on the closed pipe."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def main(argv: list[str] | None = None) -> int:
    """Run one command; every failure ends as one line and an exit status, never a traceback (bugs aside)."""
    try:
        args = build_parser().parse_args(argv)
        status = args.func(args)
        sys.stdout.flush()  # here, not at exit, so a closed pipe is handled below
        return status
    except StorageError as exc:
        _error(f"error: {exc}")
        return EXIT_FAILED
    except CxrError as exc:
        _error(f"error: {exc}")
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        _error("interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `cxrbench ... | head`: the reader has what it wanted
        _quiet_stdout()
        return EXIT_BROKEN_PIPE
    except OSError as exc:
        if not is_storage_fault(exc):
            raise
        _error(f"error: {storage_error(exc)}")
        return EXIT_FAILED
