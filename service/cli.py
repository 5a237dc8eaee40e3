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

from service.errors import VigilError

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
    registry: Optional[Path] = RegistryOption,
) -> None:
    """Validate a model against its reference data and add it to the registry as a new version."""
    from service.registry import register_model

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
    try:
        card = register_model(name, model, reference, target=target, task=task,  # type: ignore[arg-type]
                              version=version, registry=registry, metadata=meta, pii=pii_map)
    except VigilError as exc:
        _fail(exc.message)
    out.print(f"registered [bold]{card.name}:{card.version}[/] ({card.task}, {len(card.features)} features, "
              f"sha256 {card.sha256[:12]}…)", highlight=False)


@models_app.command("list")
def list_models(registry: Optional[Path] = RegistryOption) -> None:
    """List every registered model and its versions."""
    from service.registry import Registry

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
    from service.registry import Registry

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
    from service.registry import Registry

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


def main() -> None:  # pragma: no cover - console entry point
    """Entry point for ``python -m service.cli``."""
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
