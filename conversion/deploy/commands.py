"""The command-line halves of deployment precision: ``export-onnx --precision ...`` and ``verify --onnx ...``.

Each reads and checks every array before a model loads (bad input fails in a moment, one line, nothing written),
then calls the Python API (``lower``, ``check``, ``search``).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from conversion.deploy.lower import CALIBRATION_METHODS, MIN_CALIBRATION_IMAGES, PRECISIONS, load_images
from conversion.deploy.report import DEFAULT_MAX_FLIP_RATE, DeploymentCheck, StageError
from conversion.deploy.stage_map import check_keep_float, keep_float_text
from conversion.errors import InputError

# Datasets at least this large get a progress bar.
PROGRESS_FROM = 256


def add_export_arguments(export: argparse.ArgumentParser) -> None:
    """export-onnx's deployment options."""
    group = export.add_argument_group(
        "deployment precision",
        "Lower the exported file to fp16 (onnxconverter-common, float32 in and out) or int8 (ONNX Runtime's "
        "quantize_static: QDQ, per-channel weights, after quant_pre_process); docs/deployment.md.",
    )
    group.add_argument("--precision", choices=PRECISIONS, default=None, help="fp32, fp16 or int8 (default: fp32)")
    group.add_argument("--calibration", metavar="IMAGES.npy", help="int8: NHWC float32 calibration images")
    group.add_argument(
        "--calibration-method",
        choices=CALIBRATION_METHODS,
        default="minmax",
        help="int8 calibration: minmax (default; 1 image or more), entropy or percentile "
        f"({MIN_CALIBRATION_IMAGES['entropy']} images or more)",
    )
    group.add_argument(
        "--keep-float",
        metavar="STAGES",
        help="source stages kept in float32: comma-separated stem, unit_0 ... unit_15, head; or auto (with "
        "--max-flip-rate and --images): the smallest set found that keeps the flip rate within the limit",
    )
    group.add_argument(
        "--max-flip-rate",
        type=float,
        default=DEFAULT_MAX_FLIP_RATE,
        metavar="R",
        help=f"--keep-float auto: the top-1 flip rate allowed on --images (default: {DEFAULT_MAX_FLIP_RATE}, as "
        "verify's for fp16 and int8 files)",
    )
    group.add_argument("--images", metavar="X.npy", help="--keep-float auto: NHWC float32 images the flip rate uses")
    group.add_argument("--json", action="store_true", help="print what was written (and the search) as JSON")


def add_verify_arguments(verify: argparse.ArgumentParser) -> None:
    """verify's dataset option for --onnx (--images is verify's own)."""
    verify.add_argument(
        "--labels", metavar="y.npy", help="--onnx with --images: integer labels, for each side's accuracy"
    )
    verify.add_argument(
        "--litert",
        metavar="FILE.tflite",
        help="a LiteRT file exported from --keras or --torch (export-onnx SRC OUT.tflite), checked as --onnx is",
    )
    verify.add_argument(
        "--max-flip-rate",
        type=float,
        default=None,
        metavar="R",
        help=f"--onnx: the top-1 flip rate allowed (default: 0 for a fp32 file, {DEFAULT_MAX_FLIP_RATE} for fp16 and "
        "int8)",
    )


def _float32_images(path: str, what: str) -> np.ndarray:
    """An .npy array checked for what needs no model: rank 4, float32, finite."""
    images = load_images(path, what)
    if not isinstance(images, np.ndarray) or images.ndim != 4:
        raise InputError(f"{path}: expected {what} of rank 4 (N, H, W, C); received shape {np.shape(images)}")
    if images.dtype != np.float32:
        raise InputError(f"{path}: expected {what} of dtype float32 (NHWC); received {images.dtype}")
    if not np.all(np.isfinite(images)):
        raise InputError(f"{path}: expected finite {what}; received {int((~np.isfinite(images)).sum())} NaN/Inf")
    return images


def _progress(console: Any, total: int, label: str) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console, transient=True
    )


# --- export-onnx -----------------------------------------------------------------------------------------


def _existing(path: str, suffix: str) -> str:
    if not path.endswith(suffix):
        raise InputError(f"{path}: expected a {suffix} file")
    if not Path(path).is_file():
        raise InputError(f"{path}: no such file")
    return path


def export_command(args: argparse.Namespace, console: Any) -> int:
    """``export-onnx ... --precision P [--calibration ...] [--keep-float ...]``."""
    from conversion.deploy.lower import check_image_set, lower_onnx
    from conversion.files import load_model
    from conversion.onnx_export import export_onnx
    from conversion.weights import torch_to_keras

    precision = args.precision or "fp32"
    auto = (args.keep_float or "").strip() == "auto"
    keep = () if auto or not args.keep_float else check_keep_float(args.keep_float.split(","))
    if args.keep_float is not None and not auto and not keep:
        raise InputError("--keep-float names stages (stem, unit_0 ... unit_15, head) or auto; received nothing")
    calibration = _float32_images(args.calibration, "calibration images") if args.calibration else None
    if precision == "int8" and calibration is None:
        raise InputError("--precision int8 needs --calibration IMAGES.npy (NHWC float32)")
    if calibration is not None and calibration.shape[0] < MIN_CALIBRATION_IMAGES[args.calibration_method]:
        raise InputError(
            f"calibration method {args.calibration_method} needs at least "
            f"{MIN_CALIBRATION_IMAGES[args.calibration_method]} calibration images; received {calibration.shape[0]}"
        )
    images = _float32_images(args.images, "images") if args.images else None
    if auto and images is None:
        raise InputError("--keep-float auto needs --images X.npy: the flip rate is measured on them")
    if auto and precision == "fp32":
        raise InputError("--keep-float auto searches a fp16 or int8 file; give --precision fp16 or int8")
    if not 0 <= args.max_flip_rate < 1:
        raise InputError(f"--max-flip-rate must be a rate in [0, 1); received {args.max_flip_rate}")
    out = Path(args.out)
    if out.suffix not in (".onnx", ".tflite"):
        raise InputError(f"{out}: expected an .onnx destination (or .tflite for LiteRT)")
    if not out.parent.is_dir():
        raise InputError(f"{out}: the folder {out.parent} does not exist")
    size = tuple(args.size) if args.size else None
    if out.suffix == ".tflite":
        return _export_litert(args, console, precision, calibration, size, out)
    with console.status(f"exporting {args.model} through tf2onnx...", spinner="dots"):
        model = load_model(args.model)
        if not hasattr(model, "input_shape"):  # a torch file: its Keras twin, same convention
            model = torch_to_keras(model, (None, None, model.in_channels))
    with tempfile.TemporaryDirectory(prefix="resnet34-export-") as work:
        fp32 = Path(work) / "fp32.onnx"
        with console.status(f"exporting {args.model} through tf2onnx...", spinner="dots"):
            export_onnx(model, fp32, opset=args.opset, nchw=args.nchw, size=size)
        import onnx

        fp32_model = onnx.load(str(fp32))
        if calibration is not None:
            check_image_set(calibration, fp32_model, "calibration images", 1)
        if images is not None:
            check_image_set(images, fp32_model, "images", 1)
        search = None
        extra: dict[str, str] = {}
        if auto:
            from conversion.deploy.search import search_keep_float

            reference = _reference(model, fp32_model)
            with console.status("searching the stages to keep in float32...", spinner="dots") as status:

                def on_trial(trial: Any) -> None:
                    status.update(f"tried {keep_float_text(trial.kept_float)}: flip rate {trial.flip_rate:.2%}")
                    print(
                        f"tried {keep_float_text(trial.kept_float)}: flip rate {trial.flip_rate:.2%} "
                        f"({trial.flips} of {images.shape[0]})",
                        file=sys.stderr if args.json else sys.stdout,
                    )

                search = search_keep_float(
                    fp32,
                    reference,
                    precision,
                    images,
                    args.max_flip_rate,
                    calibration=calibration,
                    method=args.calibration_method,
                    on_trial=on_trial,
                )
            keep = search.kept_float
            extra["keep_float_search"] = json.dumps(search.to_json(), separators=(",", ":"))
        with console.status(f"lowering to {precision}...", spinner="dots"):
            written = lower_onnx(
                fp32,
                out,
                precision,
                calibration=calibration,
                method=args.calibration_method,
                keep_float=keep,
                extra_metadata=extra,
            )
    result = {
        "path": str(written.path),
        "precision": precision,
        "kept_float": list(written.kept_float),
        "calibration": written.calibration.to_json() if written.calibration else None,
    }
    if search is not None:
        result.update({"flip_rate": search.flip_rate, "reached": search.reached, "tried": search.to_json()["tried"]})
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        print()
    else:
        if search is not None:
            print(search.message())
        print(f"wrote {written.path} ({precision}, kept in float32: {keep_float_text(written.kept_float)})")
    return 0


def _export_litert(
    args: argparse.Namespace,
    console: Any,
    precision: str,
    calibration: np.ndarray | None,
    size: tuple[int, int] | None,
    out: Path,
) -> int:
    """``export-onnx SRC OUT.tflite [--precision fp32|int8 --calibration X.npy]``: Keras's own LiteRT export."""
    from conversion.deploy.litert import LITERT_PRECISIONS, export_litert
    from conversion.files import load_model
    from conversion.weights import keras_to_torch, torch_to_keras

    if precision not in LITERT_PRECISIONS:
        raise InputError(f"a LiteRT file is fp32 or int8; received --precision {precision}")
    if args.keep_float:
        raise InputError("--keep-float applies to ONNX files; LiteRT's int8 is whole-model")
    with console.status(f"exporting {args.model} through LiteRT...", spinner="dots"):
        model = load_model(args.model)
        twin = keras_to_torch(model) if hasattr(model, "input_shape") else model
        model_size = tuple(model.input_shape[1:3]) if hasattr(model, "input_shape") else (None, None)
        size = size or model_size
        if None in size:
            raise InputError("a LiteRT file has a fixed input size: give --size H W")
        if calibration is not None and tuple(calibration.shape[1:3]) != tuple(size):
            raise InputError(f"calibration images are {calibration.shape[1:3]}; the model takes {tuple(size)}")
        keras_model = torch_to_keras(twin, (*size, twin.in_channels))  # bit for bit, at the fixed size
        written = export_litert(keras_model, out, precision, calibration)
    print(f"wrote {written} (LiteRT {precision})")
    return 0


def _reference(model: Any, fp32_model: Any) -> Any:
    """The source in ``build_resnet34``'s layout at the file's input size (what the stage rows need)."""
    from conversion.deploy.lower import input_geometry
    from conversion.weights import keras_to_torch, torch_to_keras

    _, height, width, channels = input_geometry(fp32_model)
    return torch_to_keras(keras_to_torch(model), (height, width, channels))


# --- verify --onnx -----------------------------------------------------------------------------------------


def _merged_rows(report: Any, check: DeploymentCheck) -> None:
    """Put the ONNX file's per-stage comparison into verify's rows (its ``onnx`` column), in place."""
    from conversion.verify.report import StageComparison, StageRow

    by_stage: dict[str, StageError] = {row.stage: row for row in check.stages}
    rows = []
    for row in report.stages:
        mine = by_stage.get(row.stage)
        onnx = row.onnx
        if mine is not None:
            within = mine.floor_ratio <= check.floor_multiple or mine.max_rel <= report.tolerance
            onnx = StageComparison(
                max_abs=mine.max_abs,
                max_rel=mine.max_rel,
                cosine=mine.cosine,
                noise_floor=mine.noise_floor,
                floor_ratio=mine.floor_ratio,
                ill_conditioned=mine.noise_floor > report.tolerance,
                local_max_rel=None,
                local_noise_floor=None,
                local_floor_ratio=None,
                ok=within,
            )
        rows.append(StageRow(row.stage, row.shape, row.torch, onnx))
    report.stages = rows


def print_deployment(check: DeploymentCheck) -> None:
    """The deployed file's per-stage table (its error as a multiple of each stage's float32 floor), then its lines."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:  # a pipe or a file: wide enough for every column, as verify's own table
        console = Console(width=max(console.width, 120))
    table = Table(
        title=f"The {check.precision} ONNX file against the source, per stage ({check.stage_images} images; floor: "
        "float32's, x floor: the error in floors)"
    )
    for column in ("stage", "max abs", "max rel", "floor", "x floor", "added", ""):
        table.add_column(column, justify="left" if column == "stage" else "right")
    for row in check.stages:
        mark = "" if row.finite else "[red]inf/NaN[/red]"
        if row.stage == check.loss_enters_at:
            mark = (mark + " [yellow]<- loss enters[/yellow]").strip()
        table.add_row(
            row.stage,
            f"{row.max_abs:.2e}",
            f"{row.max_rel:.2e}",
            f"{row.noise_floor:.1e}",
            f"{row.floor_ratio:.3g}",
            f"{row.added:+.2e}",
            mark,
        )
    console.print(table)
    for line in check.lines():
        console.print(line)
    console.print(check.verdict())


def verify_command(args: argparse.Namespace, console: Any) -> int:
    """``verify --keras A|--torch B --onnx C [--images X.npy [--labels y.npy]]``: verify's own comparison of the
    sources, then the ONNX file stage by stage (each stage's floor) and over the images."""
    from conversion.deploy.check import check_deployment, check_labels, torch_logits
    from conversion.verify.inference import source_check, verify_models
    from conversion.verify.requests import Sources
    from conversion.verify.sources import comparison_images, load_pair
    from conversion.verify.stages import model_dtype

    deployed = args.litert or args.onnx
    if args.litert and args.onnx:
        raise InputError("give one deployed file: --onnx or --litert")
    if not (args.keras or args.torch):
        raise InputError(
            f"{'--litert' if args.litert else '--onnx'} needs --keras or --torch: the weights {deployed} "
            "was exported from"
        )
    if args.dtype == "float64":
        raise InputError("--onnx compares in float32 (ONNX Runtime's CPU convolutions are float32); drop --dtype")
    images = _float32_images(args.images, "images") if args.images else None
    labels = None
    if args.labels:
        if images is None:
            raise InputError("--labels needs --images: one label per image")
        labels = check_labels(load_images(args.labels, "labels"), images.shape[0])
    if args.max_flip_rate is not None and not 0 <= args.max_flip_rate < 1:
        raise InputError(f"--max-flip-rate must be a rate in [0, 1); received {args.max_flip_rate}")
    # The file is read first: a bad one fails before the models load, and its size is the default image size.
    if args.litert:
        from conversion.deploy.litert import LiteRTModel

        try:
            litert = LiteRTModel(_existing(args.litert, ".tflite"))
        except InputError:
            raise
        except ImportError:
            raise InputError("--litert needs LiteRT's interpreter: pip install ai-edge-litert") from None
        except Exception as error:  # the interpreter's own message for a corrupt or foreign file
            first = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
            raise InputError(f"{args.litert}: not a readable LiteRT file ({first})") from None
        _, height, width, _ = (int(n) for n in litert.input["shape"])
    else:
        from conversion.deploy.check import load_onnx
        from conversion.deploy.lower import input_geometry

        _, height, width, _ = input_geometry(load_onnx(args.onnx))
    size = tuple(args.size) if args.size else ((height, width) if height and width else None)
    sources = Sources(
        keras=args.keras,
        torch=args.torch,
        classifier_activation=args.classifier_activation,
        seed=args.seed,
        batch=args.batch,
        size=size,
    )
    with console.status("building and comparing the models...", spinner="dots"):
        pair = load_pair(sources)
        if model_dtype(pair.keras_model) != "float32":
            raise InputError("--onnx compares a float32 source with its ONNX file; the source is float64")
        batch = args.batch or 2
        stage_images = comparison_images(sources, pair.keras_model, None if images is None else images[:batch])
        report = verify_models(pair.keras_model, pair.torch_model, stage_images, seed=args.seed)
        if pair.source is not None:
            report.source_check = source_check(pair.source, pair.keras_model, stage_images)
            report.agree = report.agree and report.source_check.ok
    source = torch_logits(pair.torch_model) if args.torch and not args.keras else None
    dataset = stage_images if images is None else images
    if args.litert:
        from conversion.deploy.litert import check_litert

        precision = "int8" if any(" in int8" in key for key in litert.integer_ops()) else "fp32"
        with console.status("running the LiteRT file...", spinner="dots"):
            check = check_litert(
                pair.keras_model, args.litert, dataset, labels, precision=precision, max_flip_rate=args.max_flip_rate
            )
    else:
        run = functools.partial(
            check_deployment,
            pair.keras_model,
            args.onnx,
            stage_images,
            images=dataset,
            labels=labels,
            source=source,
            max_flip_rate=args.max_flip_rate,
        )
        if dataset.shape[0] >= PROGRESS_FROM:  # a bar on long runs, a spinner otherwise
            with _progress(console, dataset.shape[0], "source and ONNX file over the images") as bar:
                task = bar.add_task("images", total=dataset.shape[0])
                check = run(progress=lambda done, _total: bar.update(task, completed=done))
        else:
            with console.status("running the ONNX file...", spinner="dots"):
                check = run()
    agree = bool(report) and check.ok
    if args.json:
        _merged_rows(report, check)
        data = report.to_json()
        data.update(check.summary_json())
        data["agree"] = agree
        data["deployment"] = check.to_json()
        json.dump(data, sys.stdout, indent=2, allow_nan=True)
        print()
    else:
        from conversion.verify.report import print_verify_report

        # verify's own table (the sources against each other), then the ONNX file's rows in their own table.
        print_verify_report(report)
        print_deployment(check)
    return 0 if agree else 1
