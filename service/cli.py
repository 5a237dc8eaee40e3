"""The ``vigil`` command: register and inspect models, serve them."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Optional

import typer
import yaml
from rich.console import Console
from rich.table import Table

from monitoring.store import Store, command_store
from service.core.errors import VigilError

app = typer.Typer(help="Vigil: serve registered ONNX models with monitoring built in.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
models_app = typer.Typer(help="Register and inspect model versions.", no_args_is_help=True)
app.add_typer(models_app, name="models")

out = Console()
err = Console(stderr=True)

RegistryOption = typer.Option(None, "--registry", help="Registry directory (default: $VIGIL_REGISTRY, else ./models).")


def _fail(message: str, code: int = 1) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


@models_app.command("register")
def register(
    name: str = typer.Argument(..., help="Model name, e.g. 'cancer'."),
    model: Path = typer.Option(..., "--model", help="The ONNX file."),
    reference: Path = typer.Option(..., "--reference", help="Reference data (.csv or .parquet): training inputs, with the target column."),
    target: Optional[str] = typer.Option(None, "--target", help="Name of the target column in the reference data."),
    task: Optional[str] = typer.Option(None, "--task", help="classification or regression (inferred from the model when omitted)."),
    version: Optional[str] = typer.Option(None, "--version", help="Version name (default: next integer)."),
    metadata: Optional[Path] = typer.Option(None, "--metadata", help="JSON/YAML with training parameters and metrics for the card."),
    pii: list[str] = typer.Option([], "--pii", help="FEATURE=hash|drop: personal data, never logged in clear (repeatable)."),
    fallback: Optional[Path] = typer.Option(None, "--fallback", help="YAML declaring the fallback: rules or bucket_median (default: prior/median of the reference)."),
    output_range: Optional[str] = typer.Option(None, "--output-range", metavar="MIN,MAX", help="Allowed range of regression outputs (default: the reference range widened by the deploy policy's margin)."),
    registry: Optional[Path] = RegistryOption,
) -> None:
    """Validate a model against its reference data and add it to the registry as a new version."""
    from service.registry.register import register_model

    if task is not None and task not in ("classification", "regression"):
        _fail(f"--task must be 'classification' or 'regression', got '{task}'", 2)
    meta: dict[str, Any] | None = None
    if metadata is not None:
        try:
            meta = yaml.safe_load(metadata.read_text())
        except (OSError, yaml.YAMLError) as exc:
            _fail(f"cannot read --metadata {metadata}: {exc}", 2)
        if not isinstance(meta, dict):
            _fail(f"--metadata {metadata} must hold a mapping", 2)
    pii_map = {}
    for item in pii:
        feature, sep, treatment = item.rpartition("=")
        if not sep or not feature:
            _fail(f"--pii expects FEATURE=hash or FEATURE=drop, got '{item}'", 2)
        pii_map[feature] = treatment
    declared = None
    if fallback is not None:
        try:
            declared = yaml.safe_load(fallback.read_text())
        except (OSError, yaml.YAMLError) as exc:
            _fail(f"cannot read --fallback {fallback}: {exc}", 2)
        if not isinstance(declared, dict):
            _fail(f"--fallback {fallback} must hold a mapping with a 'kind'", 2)
    bounds = None
    if output_range is not None:
        try:
            low, high = (float(v) for v in output_range.split(","))
        except ValueError:
            _fail(f"--output-range expects MIN,MAX, got '{output_range}'", 2)
        if not low < high:
            _fail(f"--output-range: MIN must be below MAX, got '{output_range}'", 2)
        bounds = (low, high)
    try:
        card = register_model(name, model, reference, target=target, task=task,  # type: ignore[arg-type]
                              version=version, registry=registry, metadata=meta, pii=pii_map,
                              fallback=declared, output_range=bounds)
    except VigilError as exc:
        _fail(exc.message)
    out.print(f"registered [bold]{card.name}:{card.version}[/] ({card.task}, {len(card.features)} features, "
              f"sha256 {card.sha256[:12]}…)", highlight=False)


@models_app.command("list")
def list_models(registry: Optional[Path] = RegistryOption) -> None:
    """List every registered model and its versions."""
    from service.registry.store import Registry

    reg = Registry(registry)
    names = reg.names()
    if not names:
        out.print(f"no models registered in {reg.root}")
        return
    table = Table("model", "versions", "latest", "task", "features")
    for name in names:
        versions = reg.versions(name)
        try:
            card = reg.card(name, versions[-1])
            table.add_row(name, ", ".join(versions), versions[-1], card.task, str(len(card.features)))
        except VigilError as exc:
            table.add_row(name, ", ".join(versions), versions[-1] if versions else "-", "[red]invalid[/]", exc.message)
    out.print(table)


@models_app.command("show")
def show(
    ref: str = typer.Argument(..., metavar="NAME[:VERSION]", help="Model, optionally with a version."),
    registry: Optional[Path] = RegistryOption,
    as_json: bool = typer.Option(False, "--json", help="Print the card as JSON."),
) -> None:
    """Print a version's card (the newest version when none is given)."""
    from service.registry.store import Registry

    name, _, version = ref.partition(":")
    try:
        card = Registry(registry).card(name, version or None)
    except VigilError as exc:
        _fail(exc.message)
    data = card.model_dump(mode="json", exclude_none=True)
    if as_json:
        print(json.dumps(data, indent=2))
    else:
        print(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), end="")


@app.command()
def serve(
    port: int = typer.Option(3000, "--port", help="Port to listen on."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind."),
    registry: Optional[Path] = RegistryOption,
    workers: Optional[int] = typer.Option(None, "--workers", min=1, help="Worker processes (default: $VIGIL_WORKERS, else 1)."),
) -> None:
    """Serve every registered model over HTTP with BentoML (foreground; Ctrl-C stops it)."""
    from service.registry.store import Registry

    env = dict(os.environ)
    if registry is not None:
        env["VIGIL_REGISTRY"] = str(registry.resolve())
    if workers is not None:
        env["VIGIL_WORKERS"] = str(workers)
    env.setdefault("BENTOML_DO_NOT_TRACK", "True")
    reg = Registry(env.get("VIGIL_REGISTRY"))
    if not reg.names():
        err.print(f"[yellow]warning:[/] no models registered in {reg.root.resolve()}; serving nothing", highlight=False)
    project_root = Path(__file__).resolve().parent.parent
    argv = [sys.executable, "-m", "bentoml", "serve", "service.app:Vigil",
            "--working-dir", str(project_root), "--host", host, "--port", str(port)]
    # exec, so signals (Ctrl-C, SIGTERM from a supervisor) reach BentoML directly.
    os.execvpe(argv[0], argv, env)


# ---------------------------------------------------------------------- deploy


deploy_app = typer.Typer(help="Stable and canary versions: status, canary, promote, rollback.", no_args_is_help=True)
app.add_typer(deploy_app, name="deploy")

DeployOption = typer.Option(None, "--deploy", help="Deploy config (default: $VIGIL_DEPLOY, else ./deploy.yaml).")
DataDirOption = typer.Option(None, "--data-dir", help="Data directory (default: the store of $VIGIL_STORE, else "
                                                         "$VIGIL_DATA_DIR, else ./var).")
UrlOption = typer.Option("http://127.0.0.1:3000", "--url", envvar="VIGIL_URL", help="The running service, asked to reload.")


def _data_dir(data_dir: Optional[Path]) -> Store:
    """Where the rollback state is: ``--data-dir``, else the service's store (``VIGIL_STORE``, ``VIGIL_DATA_DIR``)."""
    return command_store(data_dir)


def _ask_reload(url: str) -> None:
    """Ask the running service to reload now; it also notices the file change by itself within a second."""
    import httpx

    token = os.environ.get("VIGIL_ADMIN_TOKEN")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        response = httpx.post(f"{url.rstrip('/')}/admin/reload", headers=headers, timeout=30)
    except httpx.HTTPError:
        out.print(f"service at {url} not reachable; a running service picks the change up from the file")
        return
    if response.status_code == 200:
        out.print(f"service at {url} reloaded")
    else:
        out.print(f"service at {url} did not reload now ({response.status_code}); it picks the change up from the file")


def _edit(deploy: Optional[Path], registry: Optional[Path], change: Any) -> Any:
    from service.registry.store import Registry
    from service.serving.deploy import deploy_path, edit_deploy

    reg = Registry(registry)
    versions = {name: reg.versions(name) for name in reg.names()}
    try:
        return edit_deploy(deploy_path(deploy), change, versions)
    except VigilError as exc:
        _fail(exc.message)


@deploy_app.command("status")
def deploy_status(
    deploy: Optional[Path] = DeployOption,
    data_dir: Optional[Path] = DataDirOption,
    registry: Optional[Path] = RegistryOption,
    url: str = UrlOption,
) -> None:
    """Stable (with the fleet's promotion, if any), canary, traffic, live comparison figures and the last rollback."""
    import httpx

    from service.registry.store import Registry
    from service.serving.deploy import load_deploy, load_state

    try:
        config = load_deploy(deploy)
        state = load_state(_data_dir(data_dir))
    except VigilError as exc:
        _fail(exc.message)
    live: dict[str, Any] = {}
    try:
        live = {m["name"]: m for m in httpx.get(f"{url.rstrip('/')}/models", timeout=5).json()["models"]}
    except (httpx.HTTPError, ValueError, KeyError):
        out.print(f"(service at {url} not reachable: no live figures)")
    reg = Registry(registry)
    table = Table("model", "stable", "canary", "traffic", "live canary vs stable", "last rollback")
    for name in sorted(set(reg.names()) | set(config.models)):
        policy = config.policy(name)
        stable = policy.stable or (reg.versions(name) or ["-"])[-1]
        canary = policy.canary.version if policy.canary else "-"
        promotion = state.promoted(name, stable)
        if promotion is not None:
            stable = promotion.describe()
            canary = "-" if canary == promotion.version else canary
        traffic = f"{state.canary_traffic(name, policy):.2f}" + (f" (of {policy.canary.traffic:.2f})" if policy.canary else "")
        figures = "-"
        comparison = (live.get(name, {}).get("canary") or {}).get("comparison")
        if comparison:
            s, c = comparison["stable"], comparison["canary"]
            figures = (f"req {int(c['requests'])}/{int(s['requests'])}, err {c['error_rate']:.3f}/{s['error_rate']:.3f}, "
                       f"p95 {c['p95_latency_seconds'] * 1000:.1f}/{s['p95_latency_seconds'] * 1000:.1f} ms, "
                       f"psi {comparison['prediction_psi']:.3f}")
        record = state.rollbacks.get(name)
        last = f"{record.version}: {record.reason} at {record.at:%Y-%m-%d %H:%M:%S} ({record.by})" if record else "-"
        table.add_row(name, stable, canary, traffic, figures, last)
    out.print(table)


@deploy_app.command("canary")
def deploy_canary(
    model: str = typer.Argument(...),
    version: str = typer.Argument(...),
    traffic: float = typer.Option(0.1, "--traffic", min=0.0, max=1.0, help="Share of requests for the canary."),
    deploy: Optional[Path] = DeployOption,
    data_dir: Optional[Path] = DataDirOption,
    registry: Optional[Path] = RegistryOption,
    url: str = UrlOption,
) -> None:
    """Start (or re-enable) a canary: VERSION gets --traffic of MODEL's requests."""
    from service.serving.deploy import clear_rollback, set_canary

    _edit(deploy, registry, lambda doc: set_canary(doc, model, version, traffic))
    clear_rollback(_data_dir(data_dir), model)
    out.print(f"{model}: canary {version} at {traffic:.0%} of requests")
    _ask_reload(url)


@deploy_app.command("promote")
def deploy_promote(
    model: str = typer.Argument(...),
    deploy: Optional[Path] = DeployOption,
    data_dir: Optional[Path] = DataDirOption,
    registry: Optional[Path] = RegistryOption,
    url: str = UrlOption,
) -> None:
    """Make MODEL's canary its stable version."""
    from service.serving.deploy import clear_rollback, promote

    promoted: list[str] = []
    _edit(deploy, registry, lambda doc: promoted.append(promote(doc, model)))
    clear_rollback(_data_dir(data_dir), model)
    out.print(f"{model}: {promoted[0]} is now stable")
    _ask_reload(url)


@deploy_app.command("rollback")
def deploy_rollback(
    model: str = typer.Argument(...),
    to: Optional[str] = typer.Option(None, "--to", help="Serve this version as stable (drops the canary)."),
    deploy: Optional[Path] = DeployOption,
    data_dir: Optional[Path] = DataDirOption,
    registry: Optional[Path] = RegistryOption,
    url: str = UrlOption,
) -> None:
    """Turn MODEL's canary off (it stays off until re-enabled), or serve --to VERSION as stable."""
    from datetime import datetime, timezone

    from service.serving.deploy import RollbackRecord, load_deploy, record_rollback, rollback_to

    if to is not None:
        _edit(deploy, registry, lambda doc: rollback_to(doc, model, to))
        out.print(f"{model}: stable is {to}, no canary")
    else:
        try:
            policy = load_deploy(deploy).policy(model)
        except VigilError as exc:
            _fail(exc.message)
        if policy.canary is None:
            _fail(f"models.{model}.canary: there is no canary to roll back (use --to VERSION)")
        record_rollback(_data_dir(data_dir), model, RollbackRecord(
            version=policy.canary.version, reason="manual", at=datetime.now(timezone.utc), by="operator"))
        out.print(f"{model}: canary {policy.canary.version} rolled back; stable serves every request")
    _ask_reload(url)


def _mount_observing_commands() -> None:
    # The drift job's commands live beside it; registered here so `vigil` is one command.
    from monitoring.jobs.cli import drift_app, predlog_app
    from monitoring.jobs.cli_quality import performance_app

    app.add_typer(drift_app, name="drift")
    app.add_typer(predlog_app, name="predlog")
    app.add_typer(performance_app, name="performance")


_mount_observing_commands()


def main() -> None:  # pragma: no cover - console entry point
    """Entry point for ``python -m service.cli``: every command is attached by now."""
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
