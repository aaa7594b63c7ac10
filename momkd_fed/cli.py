"""The `momkd-fed` command line: a thin Typer layer over the package.

Every command imports its machinery lazily (nothing heavy at import time, and the method core never imports
Flower: the Flower-facing commands import `server`/`client` inside the command). Failures print one clear line
and exit non-zero.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from .errors import MomkdError

app = typer.Typer(
    name="momkd-fed",
    help="Federated MoMKD: genomics distilled into a histology-only model across hospitals, on Flower.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

log = logging.getLogger("momkd_fed")


def _setup_logging(verbose: bool, quiet: bool) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")


@app.callback()
def _main(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Warnings and errors only."),
) -> None:
    _setup_logging(verbose, quiet)


def _fail(exc: BaseException) -> None:
    typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code=2)


@app.command()
def synth(
    preset: str = typer.Option("tiny", help="Synthetic federation preset: tiny | tcga-brca."),
    out: Path = typer.Option(..., help="Folder to write the federation into (sites, manifests, h5, YAML)."),
    seed: int = typer.Option(0, help="Random seed (same seed, same files)."),
    task: str = typer.Option("her2", help="tcga-brca only: label of the federation YAML: her2 | pr | odx."),
    shared_data: Optional[Path] = typer.Option(None, help="tcga-brca only: folder with the real TCGA tables."),
) -> None:
    """Write a synthetic federation in the real on-disk formats (TRIDENT h5, manifests, genomics, YAML)."""
    from .synth import synthesize

    overrides = {}
    if preset == "tcga-brca":
        overrides["task"] = task
        if shared_data is not None:
            overrides["shared_data"] = shared_data
    try:
        yaml_path = synthesize(preset, out, seed=seed, **overrides)
    except MomkdError as exc:
        _fail(exc)
    typer.echo(f"wrote {yaml_path}")


@app.command("check-data")
def check_data(
    config: Path = typer.Option(..., "--config", "-c", help="Federation or site YAML."),
    site: Optional[str] = typer.Option(None, help="Check only this site."),
) -> None:
    """Validate a site or a whole federation against the data contract; list every problem."""
    from .config import load_config
    from .data.check import check_federation, check_site, summarize_site
    from .data.site import load_site

    try:
        cfg = load_config(config)
        sites = [cfg.site(site)] if site else cfg.sites
        if not sites:
            raise MomkdError(f"{config}: no sites configured (add a `sites:` list)")
        problems = check_federation(cfg) if site is None else check_site(sites[0], cfg)
    except MomkdError as exc:
        _fail(exc)
    errors = [p for p in problems if p.level == "error"]
    for p in problems:  # warnings and counts of excluded slides are shown, only errors fail the check
        typer.secho(str(p), err=True, fg=typer.colors.RED if p.level == "error" else None)
    if errors:
        typer.secho(f"{len(errors)} error(s) found", err=True, fg=typer.colors.RED)
        raise typer.Exit(code=1)
    try:
        for s in sites:
            typer.echo(summarize_site(load_site(s, cfg)))
    except MomkdError as exc:
        _fail(exc)
    typer.echo("data OK")


@app.command()
def train(
    config: Path = typer.Option(..., "--config", "-c", help="Federation YAML."),
    out: Path = typer.Option(..., help="Run folder to write."),
    site: Optional[str] = typer.Option(None, help="Train on this site alone."),
    pooled: bool = typer.Option(False, "--pooled", help="Train on all sites pooled (centralised)."),
    model: Optional[str] = typer.Option(None, help="Override model.name: momkd | abmil."),
) -> None:
    """Single-site or pooled (centralised) training with validation and test evaluation."""
    from .config import load_config
    from .training import run_training

    if (site is None) == (not pooled):
        _fail(MomkdError("give exactly one of --site NAME or --pooled"))
    try:
        cfg = load_config(config, overrides={"model.name": model} if model else None)
        result = run_training(cfg, out, site=site, pooled=pooled)
    except MomkdError as exc:
        _fail(exc)
    from .heads import model_label

    heads = {name: m["auc"] for name, m in result["test"].items() if isinstance(m, dict) and "auc" in m}
    primary = result.get("primary_head")
    typer.echo(f"{out / 'model.pt'}: test AUC " + ", ".join(
        f"{auc:.3f} ({model_label('model.pt', name)}{', primary' if name == primary else ''})"
        for name, auc in heads.items()))


@app.command()
def predict(
    model: Path = typer.Option(..., "--model", help="Checkpoint: best_model.pt (federation), a site's "
                                                    "personal_model.pt, or model.pt (train)."),
    features: Path = typer.Option(..., "--features", help="One .h5 feature file or a folder of them."),
    out: Path = typer.Option(..., help="Output folder."),
    heatmaps: bool = typer.Option(False, "--heatmaps", help="Also render attention heat maps as PNG."),
    head: Optional[str] = typer.Option(None, "--head", help="classifier | memory (default: the model's primary "
                                                            "head; an untrained head is refused)."),
) -> None:
    """Histology-only inference: predictions.csv (calibrated probability, label, raw score) plus per-slide
    attention (h5 and GeoJSON)."""
    from .predict import predict_paths

    if head not in (None, "classifier", "memory"):
        _fail(MomkdError(f"--head: {head!r} is not a head; use classifier or memory (or leave it out)"))
    try:
        report = predict_paths(model, features, out, heatmaps=heatmaps, head=head)
    except MomkdError as exc:
        _fail(exc)
    for path, reason in report.failed:
        typer.secho(f"failed: {path}: {reason}", err=True, fg=typer.colors.RED)
    for note in report.notes:
        typer.secho(f"note: {note}", err=True)
    cal = "calibrated probability" if report.calibration is not None else "no calibration stored"
    typer.echo(f"{len(report.ok)} slide(s) predicted with the {report.head} head ({cal}), {len(report.failed)} "
               f"failed; wrote {out / 'predictions.csv'}")
    if report.failed:
        raise typer.Exit(code=1)


@app.command()
def simulate(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="Federation YAML (default: synthesise tiny)."),
    out: Path = typer.Option(Path("runs/simulate"), help="Run folder."),
    baselines: str = typer.Option("", help="Comma list of baselines to train too: local,centralized."),
) -> None:
    """Run the whole federation on this machine with Flower's simulation engine."""
    from server.simulate import simulate as run_simulate

    wanted = [b.strip() for b in baselines.split(",") if b.strip()]
    bad = [b for b in wanted if b not in ("local", "centralized")]
    if bad:
        _fail(MomkdError(f"--baselines: unknown {bad}; allowed: local, centralized"))
    try:
        code = run_simulate(config, out, wanted)
    except MomkdError as exc:
        _fail(exc)
    raise typer.Exit(code=code)


@app.command()
def server(
    config: Path = typer.Option(..., "--config", "-c", help="Federation YAML (run settings, no site paths needed)."),
    certs: Optional[Path] = typer.Option(None, help="Coordinator bundle: <provision>/coordinator."),
    out: Path = typer.Option(Path("runs/federation"), help="Run folder (also holds the SuperLink database)."),
    resume: bool = typer.Option(False, "--resume", help="Same database; continue from the last checkpoint."),
    insecure: bool = typer.Option(False, "--insecure", help="No TLS, no node authentication (testing only!)."),
    host: str = typer.Option("127.0.0.1", help="SuperLink bind address (keep loopback: sites come through the proxy)."),
    port: int = typer.Option(8000, help="SuperLink port (Fleet, Control and Runtime API; proxy forwards Fleet only)."),
    wait_sites: float = typer.Option(600.0, help="Seconds to wait for enough sites to come online."),
) -> None:
    """Coordinator: SuperLink with TLS and node authentication, submits the run, checkpoints, reports."""
    from server.coordinator import run_server

    try:
        code = run_server(config, certs, out, resume=resume, insecure=insecure, host=host, port=port,
                          wait_sites=wait_sites)
    except MomkdError as exc:
        _fail(exc)
    raise typer.Exit(code=code)


@app.command()
def client(
    config: Path = typer.Option(..., "--config", "-c", help="Site YAML (local paths; never sent)."),
    site: str = typer.Option(..., help="This site's name."),
    certs: Optional[Path] = typer.Option(None, help="Site bundle: <provision>/sites/<site>."),
    superlink: Optional[str] = typer.Option(None, help="Coordinator address host:port (default: from the bundle)."),
    insecure: bool = typer.Option(False, "--insecure", help="No TLS, no node key (testing only!)."),
    port: Optional[int] = typer.Option(None, help="Local port of the SuperNode's Runtime API (default: a free one)."),
    state_dir: Optional[Path] = typer.Option(None, help="Folder for this site's private state and the SuperNode log."),
    max_retries: Optional[int] = typer.Option(None, help="Reconnection attempts (default: unbounded)."),
    max_wait_time: float = typer.Option(600.0, help="Seconds to wait for the coordinator (unreachable, or not "
                                        "yet knowing this site's key) before giving up."),
    warm: bool = typer.Option(True, "--warm/--cold", help="Fork each message's ClientApp process from one that "
                              "has already imported torch and flwr (default), or let Flower start it cold."),
) -> None:
    """Site: check the local data, then join the federation as a Flower SuperNode."""
    from client.site_node import run_client

    try:
        code = run_client(config, site, certs, superlink, insecure=insecure, port=port, state_dir=state_dir,
                          max_retries=max_retries, max_wait_time=max_wait_time, warm=warm)
    except MomkdError as exc:
        _fail(exc)
    raise typer.Exit(code=code)


@app.command()
def certs(
    out: Path = typer.Option(..., help="Folder for the CA, the coordinator bundle and one bundle per site."),
    sites: str = typer.Option(..., help="Comma list of site names."),
    hosts: str = typer.Option("localhost,127.0.0.1", help="Comma list of coordinator DNS names / IPs (SANs)."),
    days: int = typer.Option(825, help="Certificate validity in days."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing provision."),
) -> None:
    """Provision a federation: CA, coordinator certificate, one EC key pair and bundle per site."""
    from .certs import provision

    try:
        result = provision(out, coordinator_hosts=[h for h in hosts.split(",") if h],
                           sites=[s for s in sites.split(",") if s], days=days, force=force)
    except MomkdError as exc:
        _fail(exc)
    typer.echo(f"wrote {result}")


@app.command()
def report(run_dir: Path = typer.Argument(..., help="A run folder (simulate, server or train).")) -> None:
    """Plots and one self-contained HTML page for a run folder."""
    try:
        from .report import build_report
    except ImportError:
        _fail(MomkdError("`momkd-fed report` is not available in this build yet (reporting issue)"))
    try:
        page = build_report(run_dir)
    except MomkdError as exc:
        _fail(exc)
    typer.echo(f"wrote {page}")


def main() -> None:
    """Console entry point."""
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
