"""``python -m lit_internvl report RUN_DIR...``: one table of every run's final held-out metrics."""

from __future__ import annotations

import argparse

from lit_internvl.callbacks.metrics_report import report_table


def main(argv: list[str]) -> str:
    parser = argparse.ArgumentParser(prog="python -m lit_internvl report", description=__doc__.split(": ", 1)[1])
    parser.add_argument("runs", nargs="+", help="run folders (e.g. runs/stage1), each holding a metrics.json")
    table = report_table(parser.parse_args(argv).runs)
    print(table, flush=True)
    return table
