"""``dropcheck train``: language-model runs with the paper's update rules.

    dropcheck train --config NAME_OR_FILE [--data DIR] [--out DIR] [--resume]
                    [--seed N] [key=value ...]

``NAME_OR_FILE``: a named config (``--list``) or a JSON file of keys
(``"base": NAME`` starts from a named one).  ``key=value`` overrides are
parsed with the type of the key's default (``--list-keys``).  Several GPUs
or CPU processes: ``torchrun --nproc_per_node N -m dropcheck train ...``.

SIGTERM or Ctrl-C stops a single-process run at the next step: it writes a
checkpoint there and exits with status 128 + the signal (143, 130);
``--resume`` continues it.  A second Ctrl-C interrupts at once.
"""

from __future__ import annotations

import argparse
import json

from dropcheck import DropcheckError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", help="named config or JSON file (see --list)")
    parser.add_argument("--data", default=None, help="corpus folder, or the folder holding ptb/ and wikitext-2/ (default: $DROPCHECK_DATA)")
    parser.add_argument("--out", default="runs", help="output folder for the log and checkpoints (default: runs)")
    parser.add_argument("--resume", action="store_true", help="continue the run from its last checkpoint in --out")
    parser.add_argument("--overwrite", action="store_true", help="start again even if --out already holds this run")
    parser.add_argument("--seed", type=int, default=None, help="random seed (overrides the config's)")
    parser.add_argument("--stop-after", type=int, default=None, metavar="STEPS", help="checkpoint and stop after this many steps in total (resume later)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--list", action="store_true", help="list the named configs and the paper's arms, then exit")
    parser.add_argument("--list-keys", action="store_true", help="list every config key with its default, then exit")
    parser.add_argument("--show", action="store_true", help="print the resolved config as JSON, then exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")


def run(args: argparse.Namespace) -> int:
    from . import configs, study

    if args.list:
        for name, over in configs.CONFIGS.items():
            print(f"{name}: " + ", ".join(f"{k}={v}" for k, v in over.items()))
        for plan in study.PLANS.values():
            print(f"\nstudy plan {plan.name!r} (config {plan.config}; `dropcheck reproduce --plan {plan.name}`), "
                  "arms as overrides:")
            for a in plan.arms:
                print(f"  {a.name} [{a.claim}]: " + " ".join(f"{k}={v}" for k, v in a.overrides.items()))
        return 0
    if args.list_keys:
        for k, v in configs.DEFAULTS.items():
            extra = f"  one of {list(configs.CHOICES[k])}" if k in configs.CHOICES else ""
            print(f"{k} = {json.dumps(v)}{extra}")
        return 0
    if not args.config:
        raise DropcheckError("--config is required (a named config or a JSON file; see --list)")
    overrides = list(args.overrides)
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    if args.no_progress:
        overrides.append("progress=false")
    name, cfg = configs.get_config(args.config, overrides)
    if args.show:
        print(json.dumps(cfg, indent=2))
        return 0
    if args.stop_after is not None and args.stop_after < 0:
        raise DropcheckError(f"--stop-after must be >= 0, got {args.stop_after}")

    import os
    import signal

    import torch.distributed as dist

    from .trainer import train

    try:
        res = train(
            cfg,
            data=args.data,
            out=args.out,
            resume=args.resume,
            overwrite=args.overwrite,
            config_name=name,
            stop_after=args.stop_after,
        )
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        if res.finished:
            print(
                f"{res.run_name}: {res.step} steps, best valid ppl {res.best_valid_ppl:.2f}, "
                f"test ppl {res.test_ppl:.2f}; log {res.log_path}"
            )
        else:
            by = f" by {signal.Signals(res.stop_signal).name}" if res.stop_signal else ""
            print(f"{res.run_name}: stopped{by} after {res.step} steps; checkpoint {res.ckpt_path} (--resume to continue)")
    # stopped by a signal: the shell's status for it (128 + signal), so a batch script can tell
    return 128 + res.stop_signal if res.stop_signal else 0
