"""``dropcheck train``: language-model runs with the paper's update rules.

    dropcheck train --config NAME_OR_FILE [--data DIR] [--out DIR] [--resume]
                    [--seed N] [--arm PLAN:ARM] [key=value ...]

``NAME_OR_FILE``: a named config (``--list``) or a JSON file of keys
(``"base": NAME`` starts from a named one).  ``key=value`` overrides are
parsed with the type of the key's default (``--list-keys``).  Several GPUs
or CPU processes: ``torchrun --nproc_per_node N -m dropcheck train ...``.

SIGTERM or Ctrl-C stops a single-process run at the next step: it writes a
checkpoint there and exits with status 128 + the signal (143, 130);
``--resume`` continues it.  A second Ctrl-C interrupts at once.

``--arm PLAN:ARM`` (what ``dropcheck reproduce`` passes) marks the run as an
arm of a study plan: its log header then records the plan, the arm and the
claim it serves, where the figures read them.  The run's config must be the
arm's (the plan's config, the arm's overrides, its run name), or it is refused.
"""

from __future__ import annotations

import argparse
import json

from typing import Any, Mapping

from dropcheck import DropcheckError
from paper_figures import log_schema


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", help="named config or JSON file (see --list)")
    parser.add_argument("--data", default=None, help="corpus folder, or the folder holding ptb/ and wikitext-2/ (default: $DROPCHECK_DATA)")
    parser.add_argument("--out", default="runs", help="output folder for the log and checkpoints (default: runs)")
    parser.add_argument("--resume", action="store_true", help="continue the run from its last checkpoint in --out")
    parser.add_argument("--overwrite", action="store_true", help="start again even if --out already holds this run")
    parser.add_argument("--seed", type=int, default=None, help="random seed (overrides the config's)")
    parser.add_argument("--stop-after", type=int, default=None, metavar="STEPS", help="checkpoint and stop after this many steps in total (resume later)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--arm", default=None, metavar="PLAN:ARM", help="the run is this arm of a study plan (recorded in the log header; see --list)")
    parser.add_argument("--list", action="store_true", help="list the named configs and the paper's arms, then exit")
    parser.add_argument("--list-keys", action="store_true", help="list every config key with its default, then exit")
    parser.add_argument("--show", action="store_true", help="print the resolved config as JSON, then exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")


def study_arm(spec: str, config_name: str, cfg: Mapping[str, Any]) -> dict[str, str]:
    """The log header's ``plan``, ``arm`` and ``claim`` for ``--arm PLAN:ARM``
    (``study.PLANS``), after checking that the run is that arm's: the plan's
    config with every override of the plan and the arm, the seed's run name."""
    from .studies import study

    plan_name, sep, arm_name = spec.partition(":")
    if not sep:
        raise DropcheckError(f"--arm: expected PLAN:ARM, got {spec!r}")
    plan = study.get_plan(plan_name)
    arm = plan.arm(arm_name)
    if config_name != plan.config:
        raise DropcheckError(f"--arm {spec}: plan {plan.name!r} runs config {plan.config!r}, not {config_name!r}")
    wrong = sorted(k for k, v in plan.overrides(arm.name, cfg["seed"]).items() if cfg.get(k) != v)
    if wrong:
        raise DropcheckError(f"--arm {spec}: the run's config differs from the arm's in {wrong}")
    return {log_schema.PLAN: plan.name, log_schema.ARM: arm.name, log_schema.CLAIM: arm.claim}


def run(args: argparse.Namespace) -> int:
    from .pipeline import configs
    from .studies import study

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
    arm = study_arm(args.arm, name, cfg) if args.arm else None
    if args.stop_after is not None and args.stop_after < 0:
        raise DropcheckError(f"--stop-after must be >= 0, got {args.stop_after}")

    import os
    import signal

    import torch.distributed as dist

    from .pipeline.trainer import train

    try:
        res = train(
            cfg,
            data=args.data,
            out=args.out,
            resume=args.resume,
            overwrite=args.overwrite,
            config_name=name,
            stop_after=args.stop_after,
            study=arm,
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
