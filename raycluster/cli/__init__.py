"""The ``rayplane`` command line: the composition root.

This package is the one place that may import every layer. It builds the Typer app here and
adds each command explicitly; the command modules beside it (``pools``, ``platform``,
``render``, ``models``, ``serve``, ``demo``) are thin functions over library calls and never
import this app. Libraries raise :class:`~raycluster.errors.RayplaneError` (a ``SpecError``
for a wrong field, a ``PlatformError`` for a platform in the wrong state); :func:`main` turns
it into one line on stderr and exit code 2, with no traceback.
"""

from __future__ import annotations

import sys

import click
import typer

from raycluster.cli import agents, demo, features, models, platform, pools, render, serve
from raycluster.cli.common import err_console
from raycluster.errors import RayplaneError


def build_app() -> typer.Typer:
    app = typer.Typer(name="rayplane", no_args_is_help=True, add_completion=False,
                      help="The Ray layer of the GPU platform: pools, local cluster, rendering.")
    # The local platform.
    app.command("up")(platform.up_cmd)
    app.command("down")(platform.down_cmd)
    app.command("status")(platform.status_cmd)
    app.command("env")(platform.env_cmd)
    app.command("demo")(demo.demo_cmd)
    # Kubernetes.
    app.command("render")(render.render_cmd)
    app.command("apply")(render.apply_cmd)
    # The pool catalog, the model registry, the Serve application.
    app.add_typer(pools.pools_app, name="pools")
    app.add_typer(models.models_app, name="models")
    app.add_typer(serve.serve_app, name="serve")
    app.add_typer(agents.agents_app, name="agents")
    app.add_typer(features.features_app, name="features")
    return app


def main() -> None:
    """Console-script entry: user errors are one line on stderr and exit code 2."""
    try:
        rv = build_app()(standalone_mode=False)
        sys.exit(rv if isinstance(rv, int) else 0)
    except RayplaneError as err:
        err_console.print(f"[red]error:[/red] {err}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except (typer.Abort, click.exceptions.Abort):
        err_console.print("aborted")
        sys.exit(130)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
    except click.exceptions.ClickException as err:  # usage errors: click's own message
        err.show()
        sys.exit(err.exit_code)


__all__ = ["build_app", "main"]
