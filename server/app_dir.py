"""The Flower app folder a run submits: one ``pyproject.toml``, no code, no data.

The components are imported from the installed momkd-fed (``server.server_app:app``,
``client.client_app:app``), so the FAB Flower builds from this folder holds only the manifest (far under Flower's
10 MB cap) and the SuperLink has nothing to install (it runs with ``--disable-runtime-dependency-installation``).
The run-config is the run's whole flat config (``client.run_config.make_run_config``).
"""

from __future__ import annotations

from pathlib import Path

import tomli_w

from momkd_fed import __version__

SERVER_COMPONENT = "server.server_app:app"
CLIENT_COMPONENT = "client.client_app:app"
APP_NAME = "momkd-fed-app"
PUBLISHER = "momkd"


def write_app_dir(app_dir: str | Path, run_config: dict[str, bool | int | float | str]) -> Path:
    """Write ``app_dir/pyproject.toml`` (a Flower app manifest carrying ``run_config``); returns ``app_dir``.

    Any other file in ``app_dir`` would be packed into the FAB, so the folder must hold nothing else.
    """
    app_dir = Path(app_dir)
    app_dir.mkdir(parents=True, exist_ok=True)
    extra = [p.name for p in app_dir.iterdir() if p.name != "pyproject.toml"]
    if extra:
        raise ValueError(f"{app_dir}: the Flower app folder must hold only pyproject.toml, found {extra}")
    doc = {
        "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
        "project": {"name": APP_NAME, "version": __version__, "description": "momkd-fed federated run",
                    "license": "Apache-2.0", "dependencies": []},
        "tool": {"flwr": {"app": {"publisher": PUBLISHER,
                                  "components": {"serverapp": SERVER_COMPONENT, "clientapp": CLIENT_COMPONENT},
                                  "config": dict(run_config)}}},
    }
    (app_dir / "pyproject.toml").write_text(tomli_w.dumps(doc))
    return app_dir
