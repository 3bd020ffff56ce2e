"""``patchbank app`` (also ``patchbank-app``): start the Streamlit app on 127.0.0.1 only."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

PAGE = Path(__file__).with_name("page.py")


def streamlit_argv(port: int, max_upload_mb: int = 64) -> list[str]:
    """``streamlit run`` arguments: localhost only, headless, no telemetry, no file watcher."""
    return ["streamlit", "run", str(PAGE),
            "--server.address", "127.0.0.1", "--server.port", str(port),
            "--server.headless", "true", "--browser.gatherUsageStats", "false",
            "--server.fileWatcherType", "none", "--server.maxUploadSize", str(max_upload_mb),
            "--global.developmentMode", "false", "--client.toolbarMode", "viewer"]


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> None:
    p = argparse.ArgumentParser(
        prog=prog, description="Start the patchbank Streamlit app on 127.0.0.1.",
        epilog="example:\n  patchbank app --scores-dir scores --method patchcore",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scores-dir", type=Path, default=Path("scores"),
                   help="folder of the fitted score runs (default: scores)")
    p.add_argument("--port", type=int, default=8501, help="port on 127.0.0.1 (default: 8501)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where models run (default: auto, CUDA when available)")
    p.add_argument("--backbone", default=None, help="only offer runs of this backbone")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--method", default=None, help="only offer runs of this method")
    g.add_argument("--run", default=None, help="only offer this run (name or unique prefix)")
    p.add_argument("--category", default=None, help="only offer this category")
    args = p.parse_args(argv)
    from patchbank.app.logic import preselect, run_table

    chosen = {"BACKBONE": args.backbone, "METHOD": args.method, "RUN": args.run,
              "CATEGORY": args.category}
    if any(chosen.values()):
        runs = run_table(args.scores_dir)
        if preselect(runs, *chosen.values()).empty:
            given = " ".join(f"--{k.lower()} {v}" for k, v in chosen.items() if v)
            have = sorted({f"{b}/{r} ({m})" for b, r, m in
                           runs[["backbone", "run", "method"]].itertuples(index=False)})
            print(f"error: {args.scores_dir}: no fitted run matches {given}; runs here: "
                  f"{', '.join(have) or 'none'}; make one with `patchbank score`",
                  file=sys.stderr)
            sys.exit(2)
    try:
        from streamlit.web import cli as stcli
    except ImportError:
        print("error: streamlit is not installed; pip install -e '.[app]' (or make app)",
              file=sys.stderr)
        sys.exit(2)
    os.environ["PATCHBANK_SCORES_DIR"] = str(args.scores_dir.resolve())
    os.environ["PATCHBANK_DEVICE"] = args.device
    for key, value in chosen.items():
        if value:
            os.environ[f"PATCHBANK_{key}"] = value
    print(f"patchbank app: http://127.0.0.1:{args.port}  (scores: {args.scores_dir})",
          file=sys.stderr)
    sys.argv = streamlit_argv(args.port)
    sys.exit(stcli.main())


if __name__ == "__main__":
    main()
