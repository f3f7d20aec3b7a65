"""Run a benchmark suite side by side with the peers; write JSON + markdown to benchmarks/results.

python benchmarks/run.py --suite persample [--device cpu|cuda] [--quick]
python benchmarks/run.py --suite kernels | commutator | influence | influence_scale | trak_scale
                              | gus | dp | ensemble | score
                              | defaults | kronfluence_defaults | stream | all
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # `benchmarks.*` importable when run as a script

from benchmarks.common import provenance, write_results  # noqa: E402

SUITES = (
    "persample",
    "kernels",
    "commutator",
    "influence",
    "influence_scale",
    "trak_scale",
    "gus",
    "dp",
    "ensemble",
    "score",
    "defaults",
    "kronfluence_defaults",
    "stream",
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--suite", choices=(*SUITES, "all"), default="persample")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--quick", action="store_true", help="small sizes and few repeats (smoke run)"
    )
    parser.add_argument(
        "--models", nargs="+", default=None, help="persample: subset of mlp cnn resnet18"
    )
    parser.add_argument(
        "--batch-sizes", nargs="+", type=int, default=None, help="persample: batch sizes"
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per row")
    parser.add_argument(
        "--runs", type=int, default=None, help="repeat the whole suite (spread of headline ratios)"
    )
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: one isolated row
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    suites = SUITES if args.suite == "all" else (args.suite,)
    for name in suites:
        module = importlib.import_module(f"benchmarks.suites.{name}")
        if args.one is not None:
            return module.run_one(args)
        rows = module.run(args)
        path = write_results(
            name,
            args.device,
            rows,
            provenance(args.device),
            columns=getattr(module, "COLUMNS", None),
            notes=getattr(module, "NOTES", ""),
        )
        print(f"{name}: {len(rows)} rows -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
