"""Command line: `ddp train`, `ddp gradcheck`, `ddp info`.

    ddp train --dataset digits --hidden 128,64 --epochs 20 --out runs/digits
    ddp train --config run.toml --lr 0.05          # flags override the TOML file
    launch/mpirun.sh -n 4 -- train --dataset digits
    ddp gradcheck --sizes 5,8,3 --activation tanh

Bad input ends with one line, `ddp: error: ...`, and exit code 2; a failure with
exit code 1. Under MPI an error on every rank is printed once, by rank 0; an error
on one rank is printed by that rank and ends the whole job (ddp/guard.py), so no
rank is left waiting in a collective.
"""
from __future__ import annotations

import argparse
import sys

from . import __version__
from .config import add_flags, from_args
from .errors import UsageError
from .guard import run_main

WHITESPACE_NUL = " \t\x00"   # Open MPI ends its version string with a NUL


class Parser(argparse.ArgumentParser):
    def error(self, message):
        # argparse prints the whole usage block; a one-line message is easier to act on, and
        # under MPI the guard prints it once for all ranks.
        raise UsageError(f"{message} (see '{self.prog} --help')")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="ddp", description="Data-parallel neural-network training on NumPy/CuPy and MPI.")
    p.add_argument("--version", action="version", version=f"ddp {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    t = sub.add_parser("train", help="train a model (1 rank, N MPI ranks, or --simulate-ranks N)",
                       description="Train an MLP. Under mpiexec each rank takes its shard of every global batch.")
    add_flags(t)
    g = sub.add_parser("gradcheck", help="compare analytic gradients with central differences (float64)",
                       description="Compare analytic gradients with central differences in float64, per layer.")
    g.add_argument("--sizes", default="5,8,6,3", help="layer sizes including inputs and outputs (default: 5,8,6,3)")
    g.add_argument("--activation", default="tanh", help="hidden activation (default: tanh)")
    g.add_argument("--loss", default="softmax_cross_entropy", help="loss (default: softmax_cross_entropy)")
    g.add_argument("--batch", type=int, default=4, help="batch size (default: 4)")
    g.add_argument("--eps", type=float, default=1e-6, help="finite-difference step (default: 1e-6)")
    g.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    g.add_argument("--tolerance", type=float, default=1e-7,
                   help="exit 1 if any layer's relative error exceeds this (default: 1e-7)")
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
        print(f"layer {L.index} ({L.n_in} -> {L.n_out}, {L.activation}): relative error {e:.3e}")
    worst = max(errs)
    ok = worst <= args.tolerance
    print(f"{'PASS' if ok else 'FAIL'}: largest relative error {worst:.3e} (tolerance {args.tolerance:g})")
    return 0 if ok else 1


def cmd_info() -> int:
    import platform

    import numpy as np

    from . import backend
    print(f"ddp {__version__}, Python {platform.python_version()}, NumPy {np.__version__}")
    print(f"BLAS threads: {backend.blas_threads()}")
    try:
        from mpi4py import MPI

        from .comm import cuda_aware_mpi
        library = MPI.Get_library_version().splitlines()[0].strip(WHITESPACE_NUL)
        print(f"mpi4py {__import__('mpi4py').__version__}; MPI: {library}")
        print(f"MPI standard {'.'.join(map(str, MPI.Get_version()))}; world size {MPI.COMM_WORLD.Get_size()}; "
              f"CUDA-aware: {'yes' if cuda_aware_mpi() else 'no (GPU buffers are staged through pinned host memory)'}")
    except Exception as e:
        print(f"MPI: not available ({type(e).__name__}: {e})")
    print(f"CuPy: {backend.cupy_version() or 'not installed'}")
    n = backend.gpu_count()
    print(f"GPUs: {n}" if n else f"GPUs: none usable ({backend.gpu_unavailable_reason()})")
    return 0


def main(argv=None) -> int:
    """Run one command; returns the exit code (see guard.py: 0 ok, 1 failure, 2 usage, 130 SIGINT)."""
    return run_main(_main, argv)


def _main(argv) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "info":
        return cmd_info()
    if args.command == "gradcheck":
        return cmd_gradcheck(args)
    from .comm import world_comm
    from .train import run

    cfg = from_args(args)
    run(cfg, world_comm())
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
