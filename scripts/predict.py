"""Thin wrapper: see `python scripts/predict.py --help` and patchbank.inference.cli.predict_main."""

from patchbank.cli.predict import predict_main

if __name__ == "__main__":
    predict_main()
