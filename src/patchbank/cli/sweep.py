"""``scripts/sweep.py``: a sweep from a YAML file and/or flags (flags override the file)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from patchbank.cli.runtime import add_verbose, new_parser, run_command
from patchbank.core.errors import PartialFailure, SweepError


def _parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = new_parser(
        prog, "Run a sweep: categories x backbones x extract settings x methods x parameter "
              "grids x shots x seeds; every finished job is skipped on re-runs. Flags override "
              "the YAML file; a flag left out takes the file's value, else the default named.",
        "patchbank sweep --category demo_texture --method padim,knn --shots 1,4,all "
        "--seeds 0,1,2")
    p.add_argument("--config", type=Path, default=None,
                   help="sweep YAML file (default: none, flags only)")
    p.add_argument("--name", default=None,
                   help="sweep name: its table is <scores-dir>/sweeps/<name>.csv (default sweep)")
    p.add_argument("--data-root", type=Path, default=None,
                   help="dataset root (default: the file's, else the embedded demo dataset)")
    p.add_argument("--category", default=None,
                   help="category, comma list or 'all' (default all)")
    p.add_argument("--backbone", default=None,
                   help="comma list of backbones (default efficientnet_lite0)")
    p.add_argument("--method", default=None,
                   help="comma list of methods (default padim)")
    p.add_argument("--grid", action="append", default=[],
                   help="method.key=v1,v2 (or key=v1,v2 for every method): a parameter axis; "
                        "repeatable")
    p.add_argument("--shots", default=None,
                   help="comma list, e.g. 1,4,16,all (default all)")
    p.add_argument("--seeds", default=None,
                   help="comma list, e.g. 0,1,2 (default 0)")
    p.add_argument("--holdout", type=float, default=None,
                   help="held-out fraction of train images for thresholds (default 0.2)")
    p.add_argument("--weights", default=None,
                   help="auto (default), hub, random or a file")
    p.add_argument("--image-size", type=int, default=None,
                   help="square model input size (default: the backbone's)")
    p.add_argument("--layers", default=None,
                   help="comma list of tapped layers (default: the backbone's)")
    p.add_argument("--crop", type=int, default=None,
                   help="centre-crop size after resizing (default: none)")
    p.add_argument("--normalize", default=None, choices=["imagenet", "half", "model"],
                   help="input normalisation (default: the backbone's own)")
    p.add_argument("--banks-dir", type=Path, default=None,
                   help="folder of the feature banks (default featurebanks)")
    p.add_argument("--scores-dir", type=Path, default=None,
                   help="folder of the score runs and sweep tables (default scores)")
    p.add_argument("--device", default=None, choices=["auto", "cpu", "cuda"],
                   help="where models run (default auto: CUDA when available)")
    p.add_argument("--eval-size", type=int, default=None,
                   help="evaluate pixel metrics at this longer side (default: full resolution)")
    p.add_argument("--figures", action="store_true", default=None,
                   help="also draw every run's per-category evaluation figures")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per forward pass (default 16)")
    p.add_argument("--executor", default=None, choices=["inprocess", "ray"],
                   help="run jobs in this process or on Ray (default inprocess)")
    p.add_argument("--ray-address", default=None,
                   help="an existing Ray cluster (e.g. auto, HEAD_IP:6379); default: start a "
                        "local Ray for this sweep")
    p.add_argument("--num-cpus", type=int, default=None,
                   help="cores of a local Ray")
    p.add_argument("--gpus-per-task", type=float, default=None,
                   help="GPUs per Ray task (default: 1 with CUDA, else 0)")
    p.add_argument("--cpus-per-task", type=float, default=1,
                   help="cores (and torch/OpenMP threads) per Ray task (default 1)")
    p.add_argument("--dry-run", action="store_true",
                   help="list the jobs and stop")
    add_verbose(p)
    return p


def config_from_args(args: argparse.Namespace) -> Any:
    """The file's configuration (or the defaults) with every given flag applied."""
    from patchbank.sweep.config import (
        MethodGrid,
        SweepConfig,
        load_config,
        parse_ints,
        parse_list,
        parse_methods,
        parse_setting,
        parse_shots,
    )

    cfg = load_config(args.config) if args.config else SweepConfig(source="flags")
    where = "flags"
    kw: dict[str, Any] = {}
    for flag, key in (("name", "name"), ("data_root", "data_root"), ("category", "categories"),
                      ("holdout", "holdout"), ("banks_dir", "banks_dir"),
                      ("scores_dir", "scores_dir"), ("device", "device"),
                      ("eval_size", "eval_size"), ("figures", "figures"),
                      ("batch_size", "batch_size"), ("executor", "executor"),
                      ("ray_address", "ray_address"), ("num_cpus", "num_cpus")):
        if getattr(args, flag) is not None:
            kw[key] = getattr(args, flag)
    if args.backbone:
        kw["backbones"] = tuple(parse_list(args.backbone, where, "--backbone"))
    if args.shots:
        kw["shots"] = parse_shots(parse_list(args.shots, where, "--shots"), where)
    if args.seeds:
        kw["seeds"] = parse_ints(parse_list(args.seeds, where, "--seeds"), where, "--seeds")
    setting = {k: getattr(args, k) for k in ("weights", "image_size", "layers", "crop",
                                             "normalize") if getattr(args, k) is not None}
    if setting:
        kw["extract"] = (parse_setting(setting, where),)
    methods = parse_methods(args.method, where) if args.method else cfg.methods
    for item in args.grid:
        key, sep, values = item.partition("=")
        if not sep or not key:
            raise SweepError(f"--grid {item!r}: expected method.key=v1,v2 or key=v1,v2")
        method, _, name = key.rpartition(".")
        vals = tuple(parse_list(values, where, "--grid"))
        if method and method not in {m.method for m in methods}:
            raise SweepError(f"--grid {item!r}: {method} is not one of the sweep's methods "
                             f"({', '.join(m.method for m in methods)})")
        methods = tuple(
            MethodGrid(m.method, tuple((k, v) for k, v in m.grid if k != name) + ((name, vals),))
            if not method or m.method == method else m for m in methods)
    kw["methods"] = methods
    return replace(cfg, **kw, source=str(args.config) if args.config else "flags")


def sweep_main(argv: Sequence[str] | None = None, prog: str | None = None) -> None:
    """Entry point of ``patchbank sweep`` and ``scripts/sweep.py``."""
    p = _parser(prog)

    def run(args: argparse.Namespace) -> None:
        from patchbank.sweep import run_sweep
        from patchbank.sweep.executors import make_executor
        from patchbank.sweep.graph import build_graph

        cfg = config_from_args(args)
        if args.dry_run:
            graph = build_graph(cfg)
            for job in graph.extracts + graph.scores:
                print(job.id)
            print(f"{len(graph.extracts)} extraction + {len(graph.scores)} score jobs "
                  f"({graph.duplicates} duplicates dropped)")
            return
        executor = make_executor(cfg.executor, cfg.ray_address, cfg.num_cpus,
                                 args.gpus_per_task, args.cpus_per_task)

        def report(result: Any) -> None:
            if result is None:
                return
            for kind, counts in result.statuses.items():
                print(f"{kind}: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
            print(f"wall time {result.wall_s:.1f} s; table {result.files['csv']}")
            if "md" in result.files:
                print(result.files["md"].read_text())

        try:
            report(run_sweep(cfg, executor))
        except PartialFailure as err:
            report(err.result)
            raise

    run_command(p, run, argv)


if __name__ == "__main__":
    sweep_main()
