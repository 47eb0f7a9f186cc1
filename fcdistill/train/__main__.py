"""`accelerate launch -m fcdistill.train --config CONFIG.yaml [--resume] [--set KEY=VALUE ...]`.

The same `run` as `fcd train`; each process of the launch calls it and transformers' Trainer picks
up the process group (DDP, FSDP2, DeepSpeed) from the environment accelerate sets.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fcdistill.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", "-c", required=True, help="training config YAML")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field (value read as YAML)")
    parser.add_argument("--check", action="store_true", help="validate config and data, load no model")
    args = parser.parse_args(argv)

    from fcdistill.train.config import ConfigError
    from fcdistill.train.sft import Prepared, run

    try:
        result = run(args.config, resume=args.resume, overrides=args.overrides, check_only=args.check)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if isinstance(result, Prepared):
        print(f"config ok: FC token {result.fc.token!r} id {result.fc.token_id}")
    else:
        print(f"trained {result.global_step} steps; {result.final_dir.name}: {result.final_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
