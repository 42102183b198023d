"""The `omni` command line.

    omni train --config configs/demo.py --workdir runs/demo [--set train.steps=200 --set model.d=256 ...]
    omni config [--config configs/demo.py] [--set ...]     # print the resolved config (or the schema with --schema)
"""

from __future__ import annotations

import argparse
import json
import sys

from omni.config import ConfigError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="omni", description="Train early-fusion omni models with JAX/Flax.")
    verbs = parser.add_subparsers(dest="verb", required=True)

    train = verbs.add_parser("train", help="train (or resume) a model in a workdir")
    train.add_argument("--config", required=True, help="a configs/*.py file or a saved config.json")
    train.add_argument("--workdir", required=True, help="where config, metrics, TensorBoard files and checkpoints go")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config field, e.g. --set train.steps=200 (repeatable)")
    train.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")

    show = verbs.add_parser("config", help="print the resolved config, or the whole schema")
    show.add_argument("--config", help="a configs/*.py file or a saved config.json (default: the schema defaults)")
    show.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    show.add_argument("--schema", action="store_true", help="list every key with its type, default and doc")
    return parser


def _resolve(args):
    from omni import config as config_lib

    cfg = config_lib.load_config(args.config) if args.config else config_lib.Config()
    return config_lib.apply_overrides(cfg, args.set)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.verb == "config":
            from omni import config as config_lib

            print(config_lib.describe() if args.schema else json.dumps(config_lib.to_dict(_resolve(args)), indent=2))
            return 0
        cfg = _resolve(args)
        from omni import sharding, train

        try:
            train.train(cfg, args.workdir, progress=not args.no_progress)
        except sharding.MeshError as e:
            raise ConfigError(str(e)) from None
        return 0
    except ConfigError as e:
        print(f"omni: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
