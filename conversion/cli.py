"""The ``resnet34-parity`` command (also ``python -m conversion``): verify, convert, export-onnx.

Exit codes: 0 success, 1 the implementations disagree (verify), 2 bad usage or bad input. Expected
failures print one line on stderr and no traceback; nothing is left half-written.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from conversion.deploy.commands import add_export_arguments, add_verify_arguments  # light: numpy, no framework
from conversion.errors import UserInputError
from conversion.file_io import HEAD_AUTO, check_destination, check_source, file_kind  # light: the standard library only
from conversion.verify.defaults import (  # nothing heavy: `--help` answers without TensorFlow or torch
    DEFAULT_BATCH,
    DEFAULT_LEARNING_RATE,
    DEFAULT_SIZE,
    DEFAULT_TRAIN_BATCH,
    DEFAULT_TRAIN_SIZE,
    DEFAULT_TRAIN_STEPS,
    DEFAULT_WEIGHT_DECAY,
    TRAIN_OPTIMIZERS,
)
from conversion.verify.requests import Sources, TrainingChoice, check_request  # light: numpy

EXIT_OK, EXIT_DISAGREE, EXIT_BAD_INPUT = 0, 1, 2
_FILES = ".keras, .h5, .weights.h5, .pt, .pth, .ckpt, .bin, .safetensors"
_HEAD_DEFAULT = (
    "default: softmax for Keras weights and the twin's state dicts, logits for torchvision's, timm's and transformers'"
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, as argparse does, but without the usage block
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}\n")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _add_size(parser: argparse.ArgumentParser, flag: str, default: tuple[int, int] | None, help: str) -> None:
    """An (H, W) option of two positive integers."""
    parser.add_argument(flag, type=_positive, nargs=2, metavar=("H", "W"), default=default, help=help)


def _head_activation(text: str) -> str | None:
    return None if text in ("none", "linear") else text


def _add_train_arguments(verify: argparse.ArgumentParser) -> None:
    group = verify.add_argument_group(
        "training parity (--train)",
        "Run the same batches through Keras's train_on_batch and the torch twin's training step; compare the "
        "loss, gradients, weights, BatchNorm statistics and optimizer slots after every step. Defaults: batch "
        f"{DEFAULT_TRAIN_BATCH} of {DEFAULT_TRAIN_SIZE[0]}x{DEFAULT_TRAIN_SIZE[1]}, sparse categorical "
        "crossentropy, and a .keras file's compiled optimizer and loss when it has them.",
    )
    group.add_argument("--train", action="store_true", help="compare training steps instead of inference")
    group.add_argument(
        "--optimizer",
        choices=TRAIN_OPTIMIZERS,
        help="Keras optimizer to train with (default: the model's compiled one, else nesterov). sgd/nesterov: "
        f"momentum 0.9, lr {DEFAULT_LEARNING_RATE['sgd']:g} decayed x0.9 every step (ExponentialDecay); "
        f"adam/adamw: lr {DEFAULT_LEARNING_RATE['adam']:g} with CosineDecay over the steps; rmsprop: centered, "
        f"momentum 0.9, lr {DEFAULT_LEARNING_RATE['rmsprop']:g} decayed x0.9 every step",
    )
    group.add_argument("--learning-rate", type=float, metavar="LR", help="initial learning rate of --optimizer")
    group.add_argument(
        "--weight-decay",
        type=float,
        metavar="WD",
        help=f"Keras's decoupled weight decay of --optimizer (default {DEFAULT_WEIGHT_DECAY:g}; 0 disables)",
    )
    group.add_argument(
        "--steps",
        type=int,
        default=DEFAULT_TRAIN_STEPS,
        metavar="K",
        help=f"training steps (default: {DEFAULT_TRAIN_STEPS})",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``resnet34-parity``."""
    parser = _Parser(prog="resnet34-parity", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    verify = commands.add_parser(
        "verify",
        help="compare Keras, PyTorch and ONNX stage by stage (default: seeded twins with hostile weights)",
        description="Run the same images through every implementation given (or, with none, through seeded "
        "twins with hostile weights) and report the error at every stage. Exit 0 when all agree, 1 when not.",
    )
    verify.add_argument(
        "--keras", metavar="A.keras", help="Keras ResNet-34 (.keras, .h5 or .weights.h5; ours or the book's own code)"
    )
    verify.add_argument(
        "--torch",
        metavar="B.pt",
        help="torch ResNet-34 state_dict (.pt, .pth or .safetensors; the twin's keys or torchvision's / timm's)",
    )
    verify.add_argument(
        "--onnx", metavar="C.onnx", help="ONNX export (NHWC or NCHW input; the final output is compared)"
    )
    verify.add_argument("--images", metavar="X.npy", help="NHWC images to use instead of seeded random ones")
    verify.add_argument(
        "--batch",
        type=_positive,
        default=None,
        help=f"images per batch (default: {DEFAULT_BATCH}; {DEFAULT_TRAIN_BATCH} with --train)",
    )
    _add_size(
        verify,
        "--size",
        None,
        f"image height and width (default: {DEFAULT_SIZE[0]} {DEFAULT_SIZE[1]}; "
        f"{DEFAULT_TRAIN_SIZE[0]} {DEFAULT_TRAIN_SIZE[1]} with --train)",
    )
    verify.add_argument("--seed", type=int, default=0, help="seed of the weights and images (default: 0)")
    verify.add_argument(
        "--dtype",
        choices=("float32", "float64"),
        default=None,
        help="precision of the comparison (default: float32 for the built-in twins, the files' own for files; "
        "a float32 file is cast to float64 exactly, and the report says so)",
    )
    verify.add_argument(
        "--classifier-activation",
        type=_head_activation,
        default=HEAD_AUTO,
        help=f"head activation for files that do not record it ({_HEAD_DEFAULT})",
    )
    verify.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    add_verify_arguments(verify)  # --onnx at lower precision: --images, --labels, --max-flip-rate
    _add_train_arguments(verify)

    convert = commands.add_parser(
        "convert",
        help="convert a ResNet-34 between Keras and torch files (the book's own, torchvision's, timm's too)",
        description="Convert by extension: .keras, .h5, .weights.h5 <-> .pt, .pth, .safetensors (or within "
        "a framework). The source's convention is kept unless --convention changes it. The destination is "
        "written atomically.",
    )
    convert.add_argument("src", help=f"source file ({_FILES}) or Hugging Face folder")
    convert.add_argument(
        "dst", help=f"destination file ({_FILES}), or a new folder for Hugging Face transformers (no extension)"
    )
    _add_size(
        convert,
        "--input-size",
        None,
        "input height and width of a Keras destination (default: the source Keras model's; any size from torch); "
        "also the size of the images that measure a --convention change (default there: 224 224)",
    )
    convert.add_argument(
        "--convention",
        choices=("book", "torchvision"),
        default=None,
        help="compute in this convention instead of the source's (default: keep it). book: TF 'same' padding, "
        "BatchNorm epsilon 1e-3; torchvision: symmetric padding, epsilon 1e-5. The weights are copied unchanged, "
        "so the network computes another function: the command prints by how much",
    )
    convert.add_argument(
        "--classifier-activation",
        type=_head_activation,
        default=HEAD_AUTO,
        help=f"head activation when the source does not record it ({_HEAD_DEFAULT})",
    )
    convert.add_argument(
        "--keras-hub",
        action="store_true",
        help="write a .keras destination as keras-hub's ResNetImageClassifier (torchvision convention)",
    )

    export = commands.add_parser(
        "export-onnx",
        help="export a ResNet-34 to ONNX through tf2onnx (its Keras form)",
        description="Export a ResNet-34 to ONNX (dynamic batch), written atomically. A torch file is converted to "
        "its Keras twin first; a torchvision-convention model keeps its symmetric padding.",
    )
    export.add_argument("model", metavar="MODEL", help="the model: .keras, .h5, .weights.h5, .pt, .pth or .safetensors")
    export.add_argument("out", metavar="OUT.onnx", help="the ONNX file to write")
    export.add_argument("--opset", type=int, default=None, help="ONNX opset (default: tf2onnx's default)")
    export.add_argument("--nchw", action="store_true", help="take NCHW input like the torch twin (default: NHWC)")
    _add_size(
        export,
        "--size",
        None,
        "input height and width, for a model built with None spatial dims (default: the model's own)",
    )
    add_export_arguments(export)  # lower precision: --precision, --calibration, --keep-float, ...
    return parser


def _sources(args: argparse.Namespace) -> Sources:
    return Sources(
        keras=args.keras,
        torch=args.torch,
        onnx=args.onnx,
        images=args.images,
        classifier_activation=args.classifier_activation,
        dtype=args.dtype,
        seed=args.seed,
        batch=args.batch,
        size=tuple(args.size) if args.size else None,
    )


def _print_json(report: object) -> None:
    json.dump(report.to_json(), sys.stdout, indent=2, allow_nan=True)
    print()


def _verify(args: argparse.Namespace, status: object) -> int:
    from conversion.verify.report import print_verify_report
    from conversion.verify.sources import verify_sources

    with status("building and comparing the models...", spinner="dots"):
        report = verify_sources(_sources(args))
    if args.json:
        _print_json(report)
    else:
        print_verify_report(report)
    return EXIT_OK if report else EXIT_DISAGREE


def _training_choice(args: argparse.Namespace) -> TrainingChoice:
    return TrainingChoice(args.optimizer, args.learning_rate, args.weight_decay, args.steps)


def _verify_train(args: argparse.Namespace, console: object) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from conversion.verify.report import print_training_report
    from conversion.verify.sources import prepare_training

    choice = _training_choice(args)
    with console.status("building the models...", spinner="dots"):
        prepared = prepare_training(_sources(args), choice)
    with Progress(
        TextColumn("training both twins and their floor twins"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as bar:
        task = bar.add_task("steps", total=args.steps)
        report = prepared.run(progress=lambda done: bar.update(task, completed=done))
    if args.json:
        _print_json(report)
    else:
        print_training_report(report)
    return EXIT_OK if report else EXIT_DISAGREE


def _convert(args: argparse.Namespace, status: object) -> int:
    check_destination(args.dst, args.keras_hub)
    notes: list[str] = []
    with status(f"converting {args.src} -> {args.dst}...", spinner="dots"):
        if file_kind(args.src) == "keras":
            from conversion.files import load_keras

            model = load_keras(args.src, args.classifier_activation, notes)
        else:  # torch alone reads it: a refused file (a pickle, say) answers before TensorFlow loads
            from conversion.torch_files import load_torch

            model = load_torch(args.src, args.classifier_activation, notes)
        from conversion.files import convert_loaded

        written, change = convert_loaded(
            model,
            args.src,
            args.dst,
            input_size=tuple(args.input_size) if args.input_size else None,
            convention=args.convention,
            keras_hub=args.keras_hub,
            notes=notes,
        )
    for note in notes:
        print(note)
    print(f"wrote {written}")
    if change:
        before, after = change["convention"]
        print(
            f"convention {before} -> {after}: the weights are unchanged but the function is not; on "
            f"{change['images']}: logits max rel err {change['logits_max_rel_err']:.3g}, top-1 agreement "
            f"{change['top1_agreement']:.0%}"
        )
    return EXIT_OK


def _export_onnx(args: argparse.Namespace, status: object) -> int:
    deployed = args.precision or args.calibration or args.keep_float or args.images or args.json
    if deployed or args.out.endswith(".tflite"):  # a lowered ONNX file, or LiteRT's
        from rich.console import Console

        from conversion.deploy.commands import export_command

        return export_command(args, Console(stderr=True))  # checks its options, then the model
    check_source(args.model)
    from conversion.files import load_model
    from conversion.onnx_export import export_onnx
    from conversion.weights import torch_to_keras

    with status(f"exporting {args.model} through tf2onnx (~25 s)...", spinner="dots"):
        size = tuple(args.size) if args.size else None
        model = load_model(args.model)
        if not hasattr(model, "input_shape"):  # a torch file: its Keras twin, same convention
            model = torch_to_keras(model, (None, None, model.in_channels))
        written = export_onnx(model, args.out, opset=args.opset, nchw=args.nchw, size=size)
    print(f"wrote {written}")
    return EXIT_OK


def _check_before_loading(args: argparse.Namespace) -> None:
    """What needs no framework is refused first: a typo answers at once, not after TensorFlow's import."""
    if args.command == "verify" and not (args.onnx or args.litert):
        check_request(_sources(args), _training_choice(args) if args.train else None)
    elif args.command == "convert":
        check_source(args.src)


def _run(args: argparse.Namespace) -> int:
    _check_before_loading(args)
    # Imported here so `--help` and usage errors answer without loading TensorFlow and torch.
    from rich.console import Console

    console = Console(stderr=True)
    if args.command == "verify" and args.train:
        return _verify_train(args, console)
    if args.command == "verify" and (args.onnx or args.litert):  # a deployed file, any precision, stage by stage
        from conversion.deploy.commands import verify_command

        return verify_command(args, console)
    if args.command == "verify":
        return _verify(args, console.status)
    if args.command == "convert":
        return _convert(args, console.status)
    if args.command == "export-onnx":
        return _export_onnx(args, console.status)
    raise AssertionError(args.command)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except (UserInputError, OSError) as error:  # expected failures: one line, no traceback
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"resnet34-parity {args.command}: error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT


def console_main() -> int:
    """The ``resnet34-parity`` command's process (also ``python -m conversion``): one command, then exit, so the
    frameworks' imports are kept out of the cycle collector's walks (``keras_impl._startup``; ~2 s of CPU)."""
    from keras_impl._startup import freeze_framework_imports

    freeze_framework_imports()
    return main()


if __name__ == "__main__":
    sys.exit(console_main())
