"""``patchbank-app``: start the Streamlit app on 127.0.0.1 (never on other interfaces)."""

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


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Start the patchbank Streamlit app on 127.0.0.1.")
    p.add_argument("--scores-dir", type=Path, default=Path("scores"))
    p.add_argument("--port", type=int, default=8501)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = p.parse_args(argv)
    try:
        from streamlit.web import cli as stcli
    except ImportError:
        print("error: streamlit is not installed; pip install -e '.[app]' (or make app)",
              file=sys.stderr)
        sys.exit(2)
    os.environ["PATCHBANK_SCORES_DIR"] = str(args.scores_dir.resolve())
    os.environ["PATCHBANK_DEVICE"] = args.device
    print(f"patchbank app: http://127.0.0.1:{args.port}  (scores: {args.scores_dir})",
          file=sys.stderr)
    sys.argv = streamlit_argv(args.port)
    sys.exit(stcli.main())


if __name__ == "__main__":
    main()
