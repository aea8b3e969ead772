"""``rayplane render`` and ``rayplane apply``: the Kubernetes manifests of an environment,
written as a folder Argo CD syncs, and applied server-side when a kubeconfig is given. Plain
functions over ``raycluster.render``; the root (``raycluster.cli``) registers them."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from raycluster.catalog import load_catalog
from raycluster.cli.common import CatalogOpt, console
from raycluster.environments import load_environment
from raycluster.render import (
    REPO,
    apply_objects,
    load_inputs,
    read_objects,
    render_objects,
    write_objects,
)
from raycluster.terraform import tfvars_path, write_tfvars


def render_cmd(
    env: Annotated[str, typer.Option("--env", "-e", help="Environment name "
                                     "(raycluster/environments/NAME.yaml) or file.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write the manifests "
                                      "to (one file per kind).")],
    catalog_file: CatalogOpt = None,
    tfvars: Annotated[Path | None, typer.Option(
        "--tfvars", help="Also write the Terraform node pools here (default: "
        "infra/terraform/environments/ENV/pools.auto.tfvars.json).")] = None,
    no_tfvars: Annotated[bool, typer.Option("--no-tfvars",
                                            help="Do not write the Terraform node pools.")] = False,
    repo_root: Annotated[Path, typer.Option("--repo-root", help="Where the training and serve "
                                            "configs named by the environment live.")] = REPO,
) -> None:
    """Render every Kubernetes object of an environment from the pool catalog."""
    catalog = load_catalog(catalog_file)
    environment = load_environment(env)
    objects = render_objects(catalog, environment, load_inputs(environment, repo_root))
    files = write_objects(objects, out, environment.name)
    counts = Counter(o["kind"] for o in objects)
    table = Table(title=f"rayplane render --env {environment.name} -> {out}")
    table.add_column("file")
    table.add_column("objects", justify="right")
    for path in files:
        kind = next(k for k in counts if path.name.endswith(f"-{k.lower()}.yaml"))
        table.add_row(path.name, str(counts[kind]))
    console.print(table)
    if not no_tfvars:
        from_default = tfvars is None
        target = tfvars or tfvars_path(environment.name)
        write_tfvars(catalog, target)
        console.print(f"terraform node pools: {target}"
                      + (" (default path)" if from_default else ""))


def apply_cmd(
    folder: Annotated[Path, typer.Argument(help="A folder written by `rayplane render`.")],
    kubeconfig: Annotated[Path, typer.Option("--kubeconfig", envvar="KUBECONFIG",
                                             help="Cluster to apply to.")],
    context: Annotated[str | None, typer.Option("--context", help="kubeconfig context "
                                                   "(default: the current one).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Server-side dry run: validate "
                                          "against the cluster, change nothing.")] = False,
) -> None:
    """Server-side apply a rendered folder (field manager `rayplane`), in file order."""
    objects = read_objects(folder)
    results = apply_objects(objects, kubeconfig, context=context, dry_run=dry_run,
                            progress=lambda ident: console.print(f"  {ident}", highlight=False))
    console.print(f"{len(results)} objects {'validated (dry run)' if dry_run else 'applied'}")


__all__ = ["apply_cmd", "render_cmd"]
