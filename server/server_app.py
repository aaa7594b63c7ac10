"""The momkd-fed ServerApp: read the run-config, run the federation (``server.rounds``), log to the run folder."""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from client.run_config import split_run_config
from .reply_poll import QuickReplies
from .rounds import run_federation

log = logging.getLogger(__name__)

LOG_FILE = "server.log"  # in the run folder
LOGGERS = ("server", "client", "momkd_fed")

app = ServerApp()


def _file_logging(run_dir: Path) -> logging.Handler:
    """Send this package's log records (INFO and up) to ``<run_dir>/server.log`` as well."""
    run_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(run_dir / LOG_FILE)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in LOGGERS:
        lg = logging.getLogger(name)
        lg.addHandler(handler)
        lg.setLevel(logging.INFO)
    return handler


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the whole federation described by the run-config (see ``client.run_config`` for the ``run.*`` keys)."""
    cfg, opts = split_run_config(context.run_config)
    handler = _file_logging(Path(opts.out_dir)) if opts.out_dir else None
    try:
        run_federation(QuickReplies(grid), cfg, opts)  # replies collected every 0.2 s, not Flower's 3 s
    except Exception:
        log.exception("the federation failed")
        raise
    finally:
        if handler is not None:
            for name in LOGGERS:
                logging.getLogger(name).removeHandler(handler)
            handler.close()
