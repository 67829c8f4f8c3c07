"""The ``kdistill`` command line.

``run`` a YAML experiment, ``lm`` a language-model distillation, the built-in ``demo``, and
the workflow around them: ``report`` (Markdown + PNG figures), ``sweep`` (temperature × alpha
grid), ``compress`` (pruning and int8 quantisation), ``export`` (self-describing safetensors,
ONNX) and ``predict``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from kdistill.config import ConfigError, load_config, read_config_file
from kdistill.plots import PlotsUnavailable
from kdistill.trainer import ResumeError


def _run(args: argparse.Namespace) -> int:
    from kdistill.experiment import run_experiment
    from kdistill.schemes.__main__ import main as scheme_main
    from kdistill.schemes.config import has_scheme, load_scheme_config

    read_config_file(args.config, args.set)  # a missing, non-UTF-8 or non-YAML file: one line
    if has_scheme(args.config):  # online, self-distillation, EMA, multi-teacher, unlabelled
        scheme_cfg, _ = load_scheme_config(args.config, args.set)
        _prepare_output(args, scheme_cfg.output_dir)
        overrides = [arg for item in args.set for arg in ("--set", item)]
        return scheme_main(["run", args.config, *overrides, *(["--resume"] * args.resume)])
    if _dense_task(args.config) is not None:  # task: detection | segmentation
        return _run_dense(args)
    cfg = load_config(args.config, args.set)
    _prepare_output(args, cfg.output_dir)
    result = run_experiment(cfg, resume=args.resume)
    student = result.summary["student"]
    print(
        f"student {student['model']}: test accuracy {student['test_accuracy']:.4f} "
        f"(best {student['best_test_accuracy']:.4f}); weights in {student['weights']}"
    )
    return 0


def _dense_task(path: str) -> str | None:
    """The ``task:`` of a config file when it is a dense-prediction task, else ``None``."""
    from kdistill.config import parse_yaml

    try:
        data = parse_yaml(open(path).read())  # noqa: SIM115 - a small file, read once
    except Exception:  # an unreadable file is reported by the regular loader
        return None
    task = data.get("task") if isinstance(data, dict) else None
    return task if task in ("detection", "segmentation") else None


def _run_dense(args: argparse.Namespace) -> int:
    from kdistill.config import read_config_file
    from kdistill.dense.config import dense_config_from_dict
    from kdistill.dense.run import run_dense

    cfg = dense_config_from_dict(read_config_file(args.config, args.set))
    result = run_dense(cfg, resume=args.resume)
    metric = "map" if cfg.task == "detection" else "miou"
    for name, row in result.summary["models"].items():
        print(f"{name}: {metric} {row[metric]:.4f}, {row['parameters']:,} parameters")
    print(f"report in {cfg.output_dir}/report.md")
    return 0


def _prepare_output(args: argparse.Namespace, output_dir: str) -> None:
    from kdistill.rundir import prepare_output_dir

    protected = (Path(args.config).expanduser(),)
    prepare_output_dir(
        output_dir, resume=args.resume, overwrite=args.overwrite, protected=protected
    )


def _check_local_models(cfg: object) -> None:
    """A ``teacher.path`` / ``student.path`` that does not exist is named here, before
    transformers reads it as a Hub repo id (an 80-line traceback about repo names)."""
    for key in ("teacher", "student"):
        path = getattr(getattr(cfg, key, None), "path", None)
        if isinstance(path, str) and path and not Path(path).expanduser().exists():
            raise ConfigError(
                f"{key}.path: {path} does not exist; give the folder of a Hugging Face model "
                "(config.json + weights): a path in the file is relative to the file's folder, "
                "one given with --set to the working directory"
            )


def _lm(args: argparse.Namespace) -> int:
    from kdistill.lm.config import load_lm_config
    from kdistill.lm.train import run_lm

    cfg = load_lm_config(args.config, args.set)
    _check_local_models(cfg)
    _prepare_output(args, cfg.output_dir)
    result = run_lm(cfg, resume=args.resume)
    student, teacher = result.summary["student"], result.summary["teacher"]
    versus = f"; teacher {teacher['eval']['perplexity']:.2f}" if teacher else ""
    print(
        f"student: held-out perplexity {student['final']['perplexity']:.2f} (before "
        f"training {student['initial']['perplexity']:.2f}{versus}); weights in "
        f"{student['weights']} and {student['hf_folder']}"
    )
    if "bits_per_byte" in student["final"]:  # causal LMs: comparable across tokenizers
        teacher_bpb = (teacher or {}).get("eval", {}).get("bits_per_byte")
        versus = "" if teacher_bpb is None else f"; teacher {teacher_bpb:.3f}"
        print(
            f"student: held-out bits per byte {student['final']['bits_per_byte']:.3f} (before "
            f"training {student['initial']['bits_per_byte']:.3f}{versus})"
        )
    return 0


def _generate(args: argparse.Namespace) -> int:
    from kdistill.serve.client import EndpointUnavailable
    from kdistill.serve.config import load_generate_config
    from kdistill.serve.generate import run_generate

    try:
        result = run_generate(load_generate_config(args.config, args.set))
    except EndpointUnavailable as err:  # a server that is down or unreachable: the user's to fix
        print(
            f"kdistill: error: {err}; rerun once it answers (finished records are kept)",
            file=sys.stderr,
        )
        return 2
    note = f"; cut a torn last line ({result.truncated_bytes} B)" if result.truncated_bytes else ""
    print(
        f"{result.samples_written} samples written, {result.samples_skipped} already there, "
        f"for {result.prompts} prompts in {result.seconds:.1f} s ({result.requests} requests, "
        f"{result.retries} retries, {result.tokens_out} tokens out, "
        f"{result.tokens_per_second:.1f} tokens/s){note} -> {result.output}"
    )
    return 0


def _serve(args: argparse.Namespace) -> int:
    from kdistill.serve.server import serve

    serve(
        args.model_dir,
        host=args.host,
        port=args.port,
        name=args.name,
        device=args.device,
        dtype=args.dtype,
        max_batch=args.max_batch,
        batch_wait_ms=args.batch_wait_ms,
        batch_patience=args.batch_patience,
        max_logprobs=args.max_logprobs,
    )
    return 0


def _demo(args: argparse.Namespace) -> int:
    from kdistill.demo import run_demo

    run_demo(
        output_dir=args.output_dir,
        quick=args.quick,
        seed=args.seed,
        epochs=args.epochs,
        retrain_teacher=args.retrain_teacher,
        data_root=args.data,
        progress=not args.no_progress,
    )
    return 0


def _report(args: argparse.Namespace) -> int:
    from kdistill.report import write_report

    result = write_report(args.run_dir, temperatures=args.temperature, samples=args.samples)
    for name, path in result.figures.items():
        print(f"{name}: {path}")
    for note in result.notes:
        print(f"note: {note}")
    print(f"written to {result.markdown}")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from kdistill.sweep import Grid, parse_grid_item, read_grid_file, run_sweep

    grid = read_grid_file(args.grid_file) if args.grid_file else Grid()
    for item in args.grid:
        key, values = parse_grid_item(item)
        grid.product[key] = values
    result = run_sweep(
        args.config,
        grid=grid,
        temperatures=args.temperature,
        alphas=args.alpha,
        seeds=args.seeds,
        metric=args.select,
        overrides=args.set,
        jobs=args.jobs,
        output_dir=args.output_dir,
        resume=args.resume,
        name=args.name,
    )
    print("\n" + result.files["table"].read_text())
    for note in result.notes:
        print(f"note: {note}")
    print(f"best config: {result.files['best']}")
    return 0


def _compress(args: argparse.Namespace) -> int:
    from kdistill.compress import compress_run, markdown_table

    result = compress_run(
        args.run_dir,
        amount=args.amount,
        structured_amount=args.structured,
        finetune_epochs=args.finetune_epochs,
        finetune_overrides=args.set,
        calibration_samples=args.calibration,
        test_subset=args.test_subset,
        output_dir=args.output_dir,
        repeats=args.repeats,
        threads=args.threads,
    )
    print("\n" + markdown_table(result.rows))
    print(f"written to {result.output_dir / 'compress.md'}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from kdistill.export import export_student

    result = export_student(args.run_dir, output=args.output, onnx_path=args.onnx, opset=args.opset)
    meta = result.metadata
    print(f"student {meta['model']} {meta['kwargs']} -> {result.safetensors}")
    if result.onnx is not None:
        print(f"ONNX -> {result.onnx}")
        if result.onnx_max_abs_diff is None:
            print("onnxruntime not installed: ONNX output not checked")
        else:
            print(f"onnxruntime vs PyTorch: max abs diff of logits {result.onnx_max_abs_diff:.2e}")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from kdistill.export import ExportError, load_exported, load_images, predict

    try:
        model, meta = load_exported(args.exported)
        images = load_images(args.images)
        classes, probs = predict((model, meta), images, normalized=args.normalized)
    except ExportError as err:
        print(f"kdistill: error: {err}", file=sys.stderr)
        return 2
    names = meta.get("classes") or [str(i) for i in range(probs.shape[1])]
    for i, (c, p) in enumerate(zip(classes.tolist(), probs.max(-1).values.tolist(), strict=True)):
        print(f"{i}\t{c}\t{names[c]}\t{p:.3f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kdistill",
        description=__doc__,
        epilog=f"Errors you can fix are one message and exit code 2; add {TRACEBACK_FLAG} "
        f"(anywhere) or set {DEBUG_ENV}=1 to see the stack trace for a bug report.",
    )
    parser.add_argument(TRACEBACK_FLAG, action="store_true", help="show the stack of an error")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="train from a YAML config")
    run.add_argument("config", help="path to an experiment YAML file")
    run.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set distill.temperature=8 (repeatable)",
    )
    run.add_argument(
        "--resume", action="store_true", help="continue from the newest checkpoint in output_dir"
    )
    run.add_argument("--overwrite", action="store_true", help="delete a non-empty output_dir first")
    run.set_defaults(func=_run)

    lm = sub.add_parser(
        "lm", help="distil a language model (token KD, seq-KD, GKD, DistilBERT) from YAML"
    )
    lm.add_argument("config", help="path to an LM YAML file (see examples/lm/)")
    lm.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set distill.divergence=reverse_kl (repeatable)",
    )
    lm.add_argument(
        "--resume", action="store_true", help="continue from the newest checkpoint in output_dir"
    )
    lm.add_argument("--overwrite", action="store_true", help="delete a non-empty output_dir first")
    lm.set_defaults(func=_lm)

    generate = sub.add_parser(
        "generate", help="teacher completions + top-k logprobs from an OpenAI-compatible server"
    )
    generate.add_argument("config", help="a generate YAML file (see kdistill.serve.config)")
    generate.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set sampling.n=4 (repeatable)",
    )
    generate.set_defaults(func=_generate)

    serve = sub.add_parser("serve", help="an OpenAI-compatible server for a local HF causal LM")
    serve.add_argument("model_dir", help="a Hugging Face model folder (config.json, tokenizer)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--name", default=None, help="the model's name (default: the folder's)")
    serve.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda:0")
    serve.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    serve.add_argument("--max-batch", type=int, default=32, help="sequences per batch at most")
    serve.add_argument(
        "--batch-wait-ms", type=float, default=5.0, help="idle gap (ms) that closes a batch"
    )
    serve.add_argument(
        "--batch-patience", type=float, default=0.1,
        help="fraction of the last batch's time to wait for its clients' next requests",
    )  # fmt: skip
    serve.add_argument("--max-logprobs", type=int, default=64, help="largest top-k served")
    serve.set_defaults(func=_serve)

    demo = sub.add_parser("demo", help="teacher vs student with and without KD on Fashion-MNIST")
    demo.add_argument("--quick", action="store_true", help="a one-minute smoke run on a subset")
    demo.add_argument("--output-dir", default="runs/demo")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--epochs", type=int, default=None, help="student epochs (default 15)")
    demo.add_argument(
        "--retrain-teacher",
        action="store_true",
        help="train the teacher instead of loading the shipped checkpoint",
    )
    demo.add_argument("--data", default=None, help="folder with the Fashion-MNIST IDX files")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.set_defaults(func=_demo)

    report = sub.add_parser(
        "report", help="report.md + PNG figures for a demo or run folder (needs matplotlib)"
    )
    report.add_argument("run_dir", help="a folder written by kdistill demo or kdistill run")
    report.add_argument(
        "--temperature",
        type=float,
        nargs="+",
        default=[1.0, 2.0, 4.0, 8.0],
        help="temperatures of the dark-knowledge figure (default 1 2 4 8)",
    )
    report.add_argument("--samples", type=int, default=3, help="test images in that figure")
    report.set_defaults(func=_report)

    sweep = sub.add_parser(
        "sweep", help="grid of runs over any config keys and seeds, chosen on validation"
    )
    sweep.add_argument("config", help="experiment YAML (a scheme: section runs that scheme)")
    sweep.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="values of one config key, e.g. distill.terms[1].weight=0.1,1,10 (repeatable)",
    )
    sweep.add_argument("--grid-file", help="YAML: grid: {key: [values]} and/or points: [...]")
    sweep.add_argument("--temperature", type=float, nargs="+", help="= --grid distill.temperature")
    sweep.add_argument("--alpha", type=float, nargs="+", help="= --grid distill.alpha")
    sweep.add_argument("--seeds", type=int, nargs="+", help="seeds per point (default: config's)")
    sweep.add_argument(
        "--select", help="metric: val_accuracy (default with data.val_size) or test_accuracy"
    )
    sweep.add_argument("--name", default="sweep", help="file names: NAME.md, NAME.json, ...")
    sweep.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    sweep.add_argument("--jobs", type=int, default=1, help="runs in parallel (threads are split)")
    sweep.add_argument("--output-dir", default=None, help="sweep folder (default: output_dir)")
    sweep.add_argument("--resume", action="store_true", help="continue unfinished grid points")
    sweep.set_defaults(func=_sweep)

    compress = sub.add_parser(
        "compress", help="prune + quantise a trained student; accuracy/size/latency per stage"
    )
    compress.add_argument("run_dir", help="a run folder, or a demo folder (its KD student)")
    compress.add_argument("--amount", type=float, default=0.5, help="global unstructured share")
    compress.add_argument(
        "--structured", type=float, default=0.1, help="share of output channels (0: skip)"
    )
    compress.add_argument(
        "--finetune-epochs", type=int, default=0, help="KD fine-tune after pruning (0: none)"
    )
    compress.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a key of the fine-tune run, e.g. --set data.train_subset=10000",
    )
    compress.add_argument("--calibration", type=int, default=1024, help="calibration images")
    compress.add_argument("--test-subset", type=int, default=None)
    compress.add_argument("--repeats", type=int, default=20, help="latency repeats")
    compress.add_argument("--threads", type=int, default=None, help="CPU threads for latency")
    compress.add_argument("--output-dir", default=None, help="default RUN_DIR/compress")
    compress.set_defaults(func=_compress)

    export = sub.add_parser("export", help="self-describing safetensors (and ONNX) of a student")
    export.add_argument("run_dir", help="a run folder, or a demo folder (its KD student)")
    export.add_argument(
        "--output",
        default=None,
        help="safetensors file (default RUN_DIR/export/student.safetensors)",
    )
    export.add_argument("--onnx", default=None, metavar="FILE.onnx", help="also export ONNX")
    export.add_argument("--opset", type=int, default=17)
    export.set_defaults(func=_export)

    predict = sub.add_parser("predict", help="classify images with an exported student")
    predict.add_argument("exported", help="a .safetensors file written by kdistill export")
    predict.add_argument("images", help=".npy or .pt: (N, H, W) or (N, C, H, W); uint8 or [0, 1]")
    predict.add_argument(
        "--normalized", action="store_true", help="the images are standardised already"
    )
    predict.set_defaults(func=_predict)
    return parser


def user_error_message(err: BaseException) -> str | None:
    """The message for an error a user caused (config, data, files, disk) and can fix, or
    ``None`` for anything else (a bug: the stack trace is shown)."""
    from kdistill.export import ExportError
    from kdistill.rundir import describe_os_error

    if isinstance(err, (ConfigError, ResumeError, PlotsUnavailable, ExportError)):
        return str(err)
    if isinstance(err, FloatingPointError):  # non-finite loss/gradients/teacher: says where
        return str(err)
    if isinstance(err, FileNotFoundError) and err.filename is None:
        return str(err)  # our own "... not found; looked at ..." messages
    if isinstance(err, OSError):
        return describe_os_error(err)
    if isinstance(err, UnicodeDecodeError):
        return (
            f"a file is not valid UTF-8 (byte {err.object[err.start]:#04x} at offset "
            f"{err.start}): save it as UTF-8 (run again with --traceback to see which file)"
        )
    return None


TRACEBACK_FLAG = "--traceback"
DEBUG_ENV = "KDISTILL_DEBUG"


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command; errors a user can fix end with one message on stderr and exit code 2
    (``--traceback`` anywhere on the line, or ``KDISTILL_DEBUG=1``, shows the stack instead)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = TRACEBACK_FLAG in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    argv = [a for a in argv if a != TRACEBACK_FLAG]
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except Exception as err:
        message = None if debug else user_error_message(err)
        if message is None:
            raise
        print(f"kdistill: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
