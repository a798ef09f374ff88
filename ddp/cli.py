"""Command line: `ddp train`, `ddp predict`, `ddp evaluate`, `ddp export`, `ddp convert`, `ddp lr-find`, `ddp plot`, `ddp gradcheck`, `ddp info`.

    ddp train --dataset digits --hidden 128,64 --epochs 20 --out runs/digits
    ddp train --config run.toml --lr 0.05          # flags override the TOML file
    ddp train --resume runs/digits/checkpoint.npz --epochs 40      # continue; the checkpoint holds the rest
    launch/mpirun.sh -n 4 -- train --dataset digits
    ddp evaluate --checkpoint runs/digits/checkpoint.npz --dataset digits --split test
    ddp predict --checkpoint runs/digits/checkpoint.npz --data-path rows.csv --out predictions.csv
    ddp lr-find --dataset digits --hidden 128,64 --momentum 0.9       # a learning-rate range test, and its PNG
    ddp export --checkpoint runs/digits/best.npz --format onnx --out model.onnx
    ddp plot runs/digits --out curves.png
    ddp gradcheck --sizes 5,8,3 --activation tanh

Bad input ends with one line, `ddp: error: ...`, and exit code 2; a failure with
exit code 1. Under MPI an error on every rank is printed once, by rank 0; an error
on one rank is printed by that rank and ends the whole job (ddp/guard.py), so no
rank is left waiting in a collective.
"""
from __future__ import annotations

import argparse
import os
import sys

from .config import ACTIVATIONS, LOSSES, add_flags, given_settings
from .errors import Stopped, UsageError
from .guard import run_main
from .version import __version__

WHITESPACE_NUL = " \t\x00"   # Open MPI ends its version string with a NUL
BUILTIN = ("digits", "breast_cancer", "diabetes", "synthetic_classification", "synthetic_regression")


class Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)     # --epoch must not mean --epochs

    def error(self, message):
        # argparse prints the whole usage block; a one-line message is easier to act on, and
        # under MPI the guard prints it once for all ranks.
        raise UsageError(f"{message} (see '{self.prog} --help')")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="ddp", description="Data-parallel neural-network training on NumPy/CuPy and MPI.")
    p.add_argument("--version", action="version", version=f"ddp {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser, required=True)
    t = sub.add_parser("train", help="train a model (1 rank, N MPI ranks, or --simulate-ranks N)",
                       description="Train a network (an MLP, or --arch). Under mpiexec each rank takes its shard of every global batch.")
    add_flags(t)
    lf = sub.add_parser("lr-find", help="learning-rate range test: loss against an exponentially rising lr, a PNG "
                        "and a suggestion", description="Train from the untrained model with the lr rising from "
                        "--lr-min to --lr-max over --steps global batches, stopping when the loss explodes; writes "
                        "lr_find.csv and lr_find.png to --out (default runs/DATASET-lr-find). Takes every flag of "
                        "train; on any number of ranks, every rank takes the same decision.")
    add_flags(lf)
    lf.add_argument("--steps", type=int, default=100, help="the most steps to take (default: 100)")
    lf.add_argument("--lr-min", type=float, default=1e-7, help="the first step's lr (default: 1e-07)")
    lf.add_argument("--lr-max", type=float, default=10.0, help="the last step's lr (default: 10.0)")
    g = sub.add_parser("gradcheck", help="compare analytic gradients with central differences (float64)",
                       description="Compare analytic gradients with central differences in float64, per layer.")
    g.add_argument("--sizes", default="5,8,6,3", help="layer sizes including inputs and outputs (default: 5,8,6,3)")
    g.add_argument("--activation", default="tanh", choices=ACTIVATIONS, metavar="NAME",
                   help=f"hidden activation; one of: {', '.join(ACTIVATIONS)} (default: tanh)")
    g.add_argument("--loss", default="softmax_cross_entropy", choices=LOSSES, metavar="NAME",
                   help=f"loss; one of: {', '.join(LOSSES)} (default: softmax_cross_entropy)")
    g.add_argument("--batch", type=int, default=4, help="batch size (default: 4)")
    g.add_argument("--eps", type=float, default=1e-6, help="finite-difference step (default: 1e-6)")
    g.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    g.add_argument("--tolerance", type=float, default=1e-7,
                   help="exit 1 if any layer's relative error exceeds this (default: 1e-7)")
    pr = sub.add_parser("predict", help="predict raw rows with a trained model: one prediction per row",
                        description="Predict each row of a file (.npz with X, .csv, idx) with a checkpoint's model. "
                                    "Rows are raw: the checkpoint's standardization is applied.")
    pr.add_argument("--checkpoint", required=True, metavar="C", help="checkpoint.npz or best.npz (or a run folder)")
    pr.add_argument("--data-path", required=True, metavar="F",
                    help="rows to predict: .npz (array X), .csv/.csv.gz (the model's features, optionally the "
                         "target last; header detected), or idx images (alone, or 'IMAGES,LABELS')")
    pr.add_argument("--out", metavar="P.csv", help="write the predictions here (default: standard output)")
    pr.add_argument("--proba", action="store_true", help="write class probabilities instead (classification)")
    ev = sub.add_parser("evaluate", help="loss and accuracy/R² of a trained model on a file or dataset",
                        description="Evaluate a checkpoint's model on raw rows. With --dataset, the data is split "
                                    "as the training run split it, so --split test reproduces its test metric.")
    ev.add_argument("--checkpoint", required=True, metavar="C", help="checkpoint.npz or best.npz (or a run folder)")
    src = ev.add_mutually_exclusive_group(required=True)
    src.add_argument("--data-path", metavar="F", help="labelled rows: .npz (X, y) or .csv (target last)")
    src.add_argument("--dataset", metavar="NAME", choices=BUILTIN,
                     help=f"a built-in dataset; one of: {', '.join(BUILTIN)}")
    ev.add_argument("--split", choices=("train", "val", "test", "all"), metavar="PART",
                    help="with --dataset: train, val, test or all (default: test on the run's own dataset, "
                         "else all)")
    ev.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    pl = sub.add_parser("plot", help="draw learning curves of one or more runs to a PNG",
                        description="Train/validation loss, the validation metric, and per-layer gradient norms "
                                    "(runs trained with --grad-norms) per epoch, several runs overlaid.")
    pl.add_argument("runs", nargs="+", metavar="RUN", help="run folders (or metrics.jsonl files)")
    pl.add_argument("--out", default="curves.png", metavar="FILE.png", help="image to write (default: curves.png)")
    cv = sub.add_parser("convert", help="turn a CSV, compressed .npz or gzip idx pair into an .npz every rank maps",
                        description="Read a data file once (CSV in chunks, a compressed .npz, 'IMAGES,LABELS' idx) "
                                    "and write its X and y as an uncompressed .npz, which training memory-maps: "
                                    "each rank then reads only its rows instead of parsing the whole file.")
    cv.add_argument("input", metavar="IN", help="a .csv/.csv.gz, .npz, or 'IMAGES,LABELS' idx files")
    cv.add_argument("output", metavar="OUT.npz", help="the uncompressed .npz to write")
    ex = sub.add_parser("export", help="write a trained model as an ONNX graph that takes raw rows",
                        description="Export a checkpoint's model with its standardization and (classification) its "
                                    "softmax: outputs 'label' and 'probabilities', or 'prediction' (regression).")
    ex.add_argument("--checkpoint", required=True, metavar="C", help="checkpoint.npz or best.npz (or a run folder)")
    ex.add_argument("--format", default="onnx", choices=("onnx",), help="the format (default: onnx)")
    ex.add_argument("--out", required=True, metavar="FILE.onnx", help="the file to write")
    sub.add_parser("info", help="print the environment: MPI, GPUs, CuPy, NumPy, BLAS threads",
                   description="Print the MPI library, CUDA-awareness, GPUs, CuPy/NumPy versions and BLAS threads.")
    return p


def cmd_gradcheck(args) -> int:
    from .gradcheck import gradcheck, random_problem
    from .model import MLP

    try:
        sizes = [int(s) for s in args.sizes.split(",")]
    except ValueError:
        raise UsageError(f"--sizes {args.sizes!r} must be comma-separated integers") from None
    if args.batch < 1:
        raise UsageError(f"--batch {args.batch} must be >= 1")
    if not args.eps > 0:
        raise UsageError(f"--eps {args.eps} must be positive")
    model = MLP(sizes, activation=args.activation, loss=args.loss, seed=args.seed, dtype="float64")
    X, y = random_problem(model, args.batch, args.seed)
    errs = gradcheck(model, X, y, args.eps)
    for L, e in zip(model.layers, errs):
        print(f"layer {L.index} ({L.item}, then {args.activation}): relative error {e:.3e}")
    worst = max(errs)
    ok = worst <= args.tolerance
    print(f"{'PASS' if ok else 'FAIL'}: largest relative error {worst:.3e} (tolerance {args.tolerance:g})")
    return 0 if ok else 1


def agreed_config(args, comm):
    """train's and lr-find's configuration, the same on every rank, and the BLAS threads of a rank."""
    from .backend import limit_threads
    from .run import resolve_config
    from .setup import agree
    cfg = agree(comm, resolve_config, given_settings(args))
    limit_threads(getattr(comm, "local_size", None), cfg.simulate_ranks)
    return cfg


def cmd_train(args, comm) -> None:
    from .run import auto_out
    from .stop import handle_sigterm
    from .train import run

    cfg = agreed_config(args, comm)
    if not cfg.out:
        cfg.out = comm.bcast_obj(auto_out(cfg) if comm.rank == 0 else None)
    if cfg.mode == "allreduce" or cfg.ps_sync():
        # Async ps keeps SIGTERM's default: its workers are not in step, so the job ends and resumes from
        # its last checkpoint (--checkpoint-every).
        handle_sigterm()
    run(cfg, comm)


def cmd_predict(args) -> int:
    import csv

    from .api import load, read_rows
    from .run import refuse_run_file
    if args.out:
        refuse_run_file(args.out, "--out")
    model = load(args.checkpoint)
    X, _ = read_rows(args.data_path, model.prep.n_features)
    if args.proba:
        P = model.predict_proba(X)
        header, rows = [f"p_{c}" for c in model.classes_], [[f"{v:.9g}" for v in row] for row in P]
    else:
        pred = model.predict(X).reshape(len(X), -1)
        header = ["prediction"] if pred.shape[1] == 1 else [f"prediction_{j}" for j in range(pred.shape[1])]
        rows = [[f"{v:.17g}" if isinstance(v, float) else str(v) for v in row.tolist()] for row in pred]
    fh = sys.stdout
    try:
        if args.out:
            fh = open(args.out, "w", newline="")
        csv.writer(fh, lineterminator="\n").writerows([header, *rows])
    except BrokenPipeError:            # `ddp predict ... | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as e:
        raise UsageError(f"cannot write {args.out}: {e.strerror or e}") from None
    finally:
        if fh is not sys.stdout:
            fh.close()
    if args.out:
        print(f"ddp: {len(rows)} predictions written to {args.out}", file=sys.stderr)
    return 0


def cmd_evaluate(args) -> int:
    import json

    import numpy as np

    from .api import load, read_rows
    from .config import FIELDS, Config
    from .setup import raw_splits
    model = load(args.checkpoint)
    if args.data_path:
        if args.split:
            raise UsageError("--split applies to --dataset, not to --data-path")
        X, y = read_rows(args.data_path, model.prep.n_features)
        if y is None:
            raise UsageError(f"{args.data_path} has no target: evaluate needs labelled rows")
        where = args.data_path
    else:
        same = model.config.get("dataset") == args.dataset
        part = args.split or ("test" if same else "all")
        known = {k: v for k, v in model.config.items() if k in FIELDS}     # a key another ddp version wrote is not ours
        cfg = Config(**{**known, "dataset": args.dataset, "data_path": "", "val_path": "",
                            "test_path": ""}).validate()
        train, val, test = raw_splits(cfg)
        pick = {"train": [train], "val": [val], "test": [test], "all": [train, val, test]}[part]
        X = np.concatenate([p.X for p in pick])
        y = np.concatenate([p.y for p in pick])
        if train.classes is not None:          # raw_splits gives class indices: back to the labels
            y = train.classes[y]
        where = f"{args.dataset} ({part}, {len(X)} rows)"
        if len(X) == 0:
            raise UsageError(f"the {part} split of {args.dataset} is empty in this run's configuration")
    metrics = model.evaluate(X, y)
    if args.json:
        print(json.dumps(metrics))
    else:
        print(f"ddp: {where}: " + ", ".join(f"{k} {v:.6g}" for k, v in metrics.items() if k != "n"))
    return 0


def cmd_convert(args) -> int:
    import numpy as np

    from .checkpoint import WriteError, write_file
    from .data import infer_format
    from .formats import READERS
    if not args.output.endswith(".npz"):
        raise UsageError(f"the output {args.output} must be an .npz file")
    if not os.path.isdir(os.path.dirname(os.path.abspath(args.output))):
        raise UsageError(f"the folder of {args.output} does not exist")
    fmt = infer_format(args.input)
    print(f"ddp: reading {args.input} ({fmt})", file=sys.stderr, flush=True)
    X, y = READERS[fmt](args.input)[:2]
    # uncompressed (np.savez stores each array as it is, so the ranks can map it); atomic and durable
    try:
        write_file(args.output, lambda fh: np.savez(fh, X=X, y=y))
    except WriteError as e:
        raise WriteError(str(e).split("; ")[0]) from None       # a conversion has no checkpoint to name
    print(f"ddp: wrote {args.output}: X {X.shape} {X.dtype}, y {y.shape} {y.dtype}", file=sys.stderr)
    return 0


def cmd_lr_find(args, comm) -> None:
    from .lrfind import lr_find, write
    cfg = agreed_config(args, comm)
    result = lr_find(cfg, comm, args.steps, args.lr_min, args.lr_max)
    if comm.rank == 0:
        files = write(result, cfg.out or os.path.join("runs", f"{cfg.dataset}-lr-find"))
        why = "the loss exploded" if result["exploded"] else f"--lr-max {args.lr_max:g} reached"
        print(f"ddp: lr-find: {len(result['lr'])} steps ({why}); suggested lr {result['suggestion']:.3g}; "
              f"wrote {', '.join(files)}", flush=True)


def cmd_export(args) -> int:
    from .api import load
    load(args.checkpoint).to_onnx(args.out)
    print(f"ddp: wrote {args.out}")
    return 0


def cmd_plot(args) -> int:
    from .plot import plot
    print(f"ddp: wrote {plot(args.runs, args.out)}")
    return 0


def cmd_info(args) -> int:
    import platform

    import numpy as np

    from . import backend
    print(f"ddp {__version__}, Python {platform.python_version()}, NumPy {np.__version__}")
    local = None
    try:
        from mpi4py import MPI

        from .comm import cuda_aware_mpi
        library = MPI.Get_library_version().splitlines()[0].strip(WHITESPACE_NUL)
        print(f"mpi4py {__import__('mpi4py').__version__}; MPI: {library}")
        print(f"MPI standard {'.'.join(map(str, MPI.Get_version()))}; world size {MPI.COMM_WORLD.Get_size()}; "
              f"CUDA-aware: {'yes' if cuda_aware_mpi() else 'no (GPU buffers are staged through pinned host memory)'}")
        local = MPI.COMM_WORLD.Split_type(MPI.COMM_TYPE_SHARED).Get_size()
    except Exception as e:
        print(f"MPI: not available ({type(e).__name__}: {e})")
    print(f"BLAS threads: {backend.blas_threads()} loaded; ddp train uses {backend.limit_threads(local)} per rank")
    print(f"CuPy: {backend.cupy_version() or 'not installed'}")
    n = backend.gpu_count()
    print(f"GPUs: {n}" if n else f"GPUs: none usable ({backend.gpu_unavailable_reason()})")
    return 0


def main(argv=None) -> int:
    """Run one command; returns the exit code (see guard.py: 0 ok, 1 failure, 2 usage, 130 SIGINT)."""
    return run_main(_main, argv)


def _main(argv) -> int:
    args = build_parser().parse_args(argv)
    if args.command not in ("train", "lr-find"):
        return {"gradcheck": cmd_gradcheck, "predict": cmd_predict, "evaluate": cmd_evaluate, "plot": cmd_plot,
                "convert": cmd_convert, "export": cmd_export, "info": cmd_info}[args.command](args)
    from .comm import world_comm

    comm = world_comm()
    try:
        (cmd_lr_find if args.command == "lr-find" else cmd_train)(args, comm)
    except Stopped as e:              # training: every rank stopped at the same step, with the checkpoint saved
        if comm.rank == 0:
            print(f"ddp: {e}", file=sys.stderr, flush=True)
        return Stopped.exit_code
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
