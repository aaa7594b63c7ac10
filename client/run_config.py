"""Flower run-config <-> momkd-fed Config, and the few run-level keys the Flower glue adds.

The run-config is ``to_flat(cfg)`` plus keys under ``run.`` that belong to one run, not to the experiment:

- ``run.out-dir`` (str): the coordinator's run folder (rounds.jsonl, checkpoints, summary.json).
- ``run.resume`` (bool): continue from the run folder's last checkpoint.
- ``run.state-dir`` (str): simulation only: where each virtual site keeps its private state
  (``<state-dir>/<site>``); a real site keeps it in its own cache folder (see ``client.site_state``).

``from_flat`` rejects unknown keys, so these are split off first.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from momkd_fed.config import Config, from_flat, to_flat
from momkd_fed.errors import ConfigError

RUN_PREFIX = "run."
OUT_DIR = "run.out-dir"
RESUME = "run.resume"
STATE_DIR = "run.state-dir"
RUN_KEYS = (OUT_DIR, RESUME, STATE_DIR)


@dataclass
class RunOptions:
    """The ``run.*`` keys of a run-config."""

    out_dir: str = ""
    resume: bool = False
    state_dir: str = ""


def split_run_config(run_config: Mapping[str, object]) -> tuple[Config, RunOptions]:
    """Flower run-config -> (Config, RunOptions).

    Raises
    ------
    ConfigError
        An unknown ``run.*`` key, or anything :func:`momkd_fed.config.from_flat` rejects.
    """
    flat = {}
    opts = RunOptions()
    for key, value in run_config.items():
        if not key.startswith(RUN_PREFIX):
            flat[key] = value
        elif key == OUT_DIR:
            opts.out_dir = str(value)
        elif key == RESUME:
            if not isinstance(value, bool):
                raise ConfigError(f"{RESUME}: expected true/false, got {value!r}")
            opts.resume = value
        elif key == STATE_DIR:
            opts.state_dir = str(value)
        else:
            raise ConfigError(f"{key}: unknown run-config key; allowed run keys: {', '.join(RUN_KEYS)}")
    return from_flat(flat), opts


def make_run_config(cfg: Config, opts: RunOptions) -> dict[str, bool | int | float | str]:
    """Inverse of :func:`split_run_config`: the flat run-config of a run."""
    flat = dict(to_flat(cfg))
    flat.update({OUT_DIR: opts.out_dir, RESUME: opts.resume, STATE_DIR: opts.state_dir})
    return flat
