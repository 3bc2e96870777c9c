"""Package a meta-trained learned optimizer from a run directory, with its provenance.

    python scripts/ship_pretrained.py RUN_DIR NAME [--out metaopt/lopt/pretrained]

Reads the run's config and latest checkpoint (``metaopt train`` run directory, e.g.
``out/lopt_mulo``), rebuilds the ``lopt_metatrain`` experiment, and writes the learned
optimizer as a native checkpoint (:func:`metaopt.lopt.save_checkpoint`: checksummed,
atomic) under ``OUT/NAME`` with metadata: the training command, config, seed, commit
(from the run's ``env.json``), the outer step reached, and its held-out evaluation.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from metaopt.lopt import save_checkpoint
from metaopt.runner.checkpoint import latest_checkpoint
from metaopt.runner.config import to_dict
from metaopt.runner.loop import build_experiment, load_into
from metaopt.runner.rundir import load_run_dir_config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("name")
    ap.add_argument("--out", default="metaopt/lopt/pretrained")
    args = ap.parse_args()
    run = Path(args.run_dir)
    cfg = load_run_dir_config(run)
    ckpt = latest_checkpoint(run / "checkpoints")
    if ckpt is None:
        raise SystemExit(f"{run}: no checkpoint under {run / 'checkpoints'}")
    exp = build_experiment(cfg)
    step = load_into(exp, cfg, ckpt).step
    env = json.loads((run / "env.json").read_text(encoding="utf-8"))
    evaluation = exp.evaluate("test")
    metadata = {"name": args.name, "trained_by": "metaopt lopt_metatrain",
                "command": " ".join(env.get("command", [])), "config": to_dict(cfg),
                "seed": cfg.seed, "commit": env.get("git", {}).get("commit"),
                "outer_steps": step, "heldout_eval": evaluation,
                "torch": env.get("torch")}
    path = save_checkpoint(exp.trained_optimizer(), Path(args.out) / args.name,
                           metadata=metadata)
    print(f"wrote {path} (outer step {step}; held-out {evaluation})")


if __name__ == "__main__":
    main()
