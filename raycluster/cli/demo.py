"""``rayplane demo`` (``make demo``): the platform's main path on the local default.

1. bring the local platform up (``rayplane up``);
2. a ``ray job submit`` smoke job on every pool, with the cluster token, proving placement;
3. train the demo model through ``ray job submit`` (``python -m train.fit``): Ray Train on
   the pool the config names, checkpoints, MLflow tracking, held-out evaluation, and
   registration with the alias ``candidate`` when it passes the gate;
4. promote that version to ``champion`` and deploy the serve config that names
   ``models:/rayplane-tool-llm@champion`` (``rayplane serve up``);
5. one chat completion through the official openai client;
6. the agents app (``rayplane agents up``): the ``tools`` graph, over the LangGraph server API
   with the official ``langgraph-sdk`` client, answers "What is 12 times 7?" after the
   calculator ran and a question about the a100-mig pool's free GPU units from the live
   cluster; each run's MLflow trace is printed;
then print the URLs and how to submit jobs. The platform is left running (``make down``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import typer

from raycluster.cli.agents import deploy_agents
from raycluster.cli.common import CatalogOpt, StateOpt, console
from raycluster.cli.platform import print_urls
from raycluster.cli.serve import cluster_target
from raycluster.errors import PlatformError
from raycluster.local import LocalCluster
from serve.deploy import chat_once, deploy
from train import tracking
from train.config import TrainConfig
from train.tools import TOOLS

#: What ``ray job submit --working-dir`` uploads: the repository root, where the top-level
#: packages are importable exactly as on the cluster.
REPO = Path(__file__).resolve().parents[2]


def ray_job_submit(cluster: LocalCluster, entrypoint: list[str],
                   resources: dict[str, float] | None = None,
                   timeout: float = 1800) -> tuple[int, str]:
    """Submit ``entrypoint`` with ``ray job submit --working-dir <repo>`` exactly as a user
    does (the token comes from the cluster's env), stream its output, return (code, text)."""
    env = {**os.environ, **cluster.env(),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    cmd = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--working-dir", str(REPO)]
    if resources:
        cmd += ["--entrypoint-resources", json.dumps(resources)]
    cmd += ["--", *entrypoint]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=REPO)
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            lines.append(line)
            text = line.rstrip()
            # The job's own output; Ray's timestamped INFO lines about the submission are noise.
            if text and (not text.startswith("20") or "RAYPLANE" in text):
                console.print(f"  {text}", style="dim", highlight=False, markup=False)
            if time.monotonic() > deadline:
                proc.kill()
                raise PlatformError(f"job {' '.join(entrypoint)} took longer than {timeout:.0f}s")
        code = proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        raise
    return code, "".join(lines)


def run_smoke_jobs(cluster: LocalCluster) -> dict[str, dict]:
    results = {}
    for pool in cluster.catalog.pools:
        console.print(f"[bold]smoke job on pool {pool.name}[/bold] "
                      f"(ray job submit --entrypoint-resources '{{\"{pool.ray_resource}\": 1}}')")
        code, out = ray_job_submit(cluster, ["python", "-m", "raycluster.smoke", "--pool",
                                             pool.name], resources={pool.ray_resource: 1},
                                   timeout=600)
        line = next((l for l in out.splitlines() if "RAYPLANE_SMOKE" in l), None)
        if code != 0 or line is None:
            raise PlatformError(f"smoke job on pool {pool.name} failed (exit {code}); "
                            f"see `ray job logs` on {cluster.dashboard_url}")
        results[pool.name] = json.loads(line.split("RAYPLANE_SMOKE", 1)[1])
        console.print(f"  [green]ok[/green]: ran on the {pool.name} node")
    return results


def demo_cmd(catalog_file: CatalogOpt = None, state_dir: StateOpt = None,
             train_config: Path = typer.Option(REPO / "train/configs/demo.yaml", "--train",
                                               help="Training config of the demo model."),
             serve_config: Path = typer.Option(REPO / "serve/configs/local.yaml", "--serve",
                                               help="Serve config that serves it."),
             agents_config: Path = typer.Option(REPO / "agents/configs/local.yaml", "--agents",
                                                help="Agents config the demo deploys."),
             smoke_only: bool = typer.Option(False, "--smoke-only",
                                             help="Only the smoke jobs, no training.")) -> None:
    """Bring the local platform up and run the main job on it (what `make demo` runs)."""
    if smoke_only:
        train_config = None  # type: ignore[assignment]
    cluster = LocalCluster.attach(state_dir)
    if not cluster.is_up():
        cluster = LocalCluster(state_dir, catalog_path=catalog_file)
        with console.status("starting the local platform") as spinner:
            cluster.up(progress=lambda msg: spinner.update(msg))
    console.print(f"[bold]local platform up[/bold]: {len(cluster.node_plan())} Ray nodes, "
                  "token auth on")
    run_smoke_jobs(cluster)
    if train_config is not None:
        version = train_and_register(cluster, train_config)
        serve_and_chat(cluster, version, serve_config)
        ask_the_agent(cluster, agents_config)
    console.print()
    print_urls(cluster)
    console.print("stop it with: make down")


def train_and_register(cluster: LocalCluster, config_path: Path) -> str:
    """Submit the training job and return the version it registered (alias candidate)."""
    cfg = TrainConfig.from_file(config_path)
    # The job runs in the uploaded working directory: name the config relative to it.
    job_config = Path(config_path).resolve().relative_to(REPO)
    console.print(f"[bold]training {cfg.name}[/bold] on pool {cfg.pool} "
                  f"(ray job submit -- python -m train.fit --config {job_config})")
    code, _ = ray_job_submit(cluster, ["python", "-m", "train.fit", "--config",
                                       str(job_config)], timeout=3600)
    if code != 0:
        raise PlatformError(f"training job failed (exit {code}); see `ray job logs` on "
                        f"{cluster.dashboard_url}")
    model_name = cfg.mlflow.registered_model
    c = tracking.client(cluster.mlflow_uri)
    try:
        mv = c.get_model_version_by_alias(model_name, tracking.CANDIDATE)
    except Exception as err:  # noqa: BLE001 - MLflow raises its own RestException
        raise PlatformError(f"training finished but no version of {model_name} has the alias "
                        f"{tracking.CANDIDATE!r} (did it pass the evaluation gate?): "
                        f"{err}") from None
    console.print(f"  registered {model_name} version {mv.version} "
                  f"(alias {tracking.CANDIDATE}) in {cluster.mlflow_uri}")
    tracking.promote(cluster.mlflow_uri, model_name, str(mv.version))
    console.print(f"  promoted version {mv.version} to {tracking.CHAMPION}")
    return str(mv.version)


def serve_and_chat(cluster: LocalCluster, version: str, config_path: Path) -> None:
    console.print(f"[bold]deploying {config_path}[/bold] (rayplane serve up)")
    with console.status("waiting for the Serve application") as spinner:
        _, base_url = deploy(config_path, cluster_target(cluster),
                             tracking_uri=cluster.mlflow_uri,
                             progress=lambda msg: spinner.update(str(msg)))
    question = "What is 12 times 7?"
    # The tools the model was trained with: declared, its tool call comes back as tool_calls.
    model, resp = chat_once(question, base_url=base_url,
                            api_key=cluster.api_key_path.read_text().strip(), tools=TOOLS)
    choice = resp.choices[0]
    answer = choice.message.content or "; ".join(
        f"tool call {t.function.name}({t.function.arguments})"
        for t in choice.message.tool_calls or [])
    console.print(f"  {model} (version {version}) at {base_url}")
    console.print(f"  user: {question}")
    console.print(f"  assistant ({choice.finish_reason}): {answer}", markup=False)



AGENT_QUESTIONS = ("What is 12 times 7?", "How many free GPU units does the a100-mig pool have?")


def _trace_url(mlflow_uri: str, thread_id: str, attempts: int = 20) -> str | None:
    """The MLflow UI link of the run's trace (its session is the thread id). Traces are
    exported in the background by the replica: look a few times."""
    from mlflow import MlflowClient

    from agents.tracing import DEFAULT_EXPERIMENT

    mlflow_client = MlflowClient(mlflow_uri)
    experiment = mlflow_client.get_experiment_by_name(DEFAULT_EXPERIMENT)
    for _ in range(attempts):
        if experiment is None:
            experiment = mlflow_client.get_experiment_by_name(DEFAULT_EXPERIMENT)
        if experiment is not None:
            traces = mlflow_client.search_traces(
                locations=[experiment.experiment_id],
                filter_string=f"metadata.`mlflow.trace.session` = '{thread_id}'")
            if traces:
                trace_id = traces[0].info.trace_id
                return (f"{mlflow_uri}/#/experiments/{experiment.experiment_id}/traces"
                        f"?selectedEvaluationId={trace_id}")
        time.sleep(0.5)
    return None


def ask_the_agent(cluster: LocalCluster, config_path: Path) -> None:
    """Deploy the agents app and ask the tools graph the demo's questions through the
    LangGraph server API, printing each tool call, its result and the answer."""
    from langgraph_sdk import get_sync_client

    console.print(f"[bold]deploying {config_path}[/bold] (rayplane agents up)")
    with console.status("waiting for the agents app") as spinner:
        at = deploy_agents(cluster, config_path, progress=spinner.update)
    key = cluster.api_key_path.read_text().strip()
    client = get_sync_client(url=at["api"], api_key=key, timeout=120)
    for question in AGENT_QUESTIONS:
        thread = client.threads.create()["thread_id"]
        state = client.runs.wait(thread, "tools", input={
            "messages": [{"role": "user", "content": question}]})
        console.print(f"  user: {question}", markup=False)
        for message in state.get("messages", [])[1:]:
            if message["type"] == "ai" and message.get("tool_calls"):
                for call in message["tool_calls"]:
                    console.print(f"    tool call {call['name']}({json.dumps(call['args'])})",
                                  markup=False)
            elif message["type"] == "tool":
                console.print(f"    tool result {message['content']}", markup=False)
            elif message["type"] == "ai":
                console.print(f"  agent: {message['content']}", markup=False)
        url = _trace_url(cluster.mlflow_uri, thread)
        console.print(f"    trace: {url or 'not exported yet (MLflow: rayplane-agents)'}",
                      markup=False)
    console.print(f"  agents API {at['api']} (langgraph-sdk); MCP {at.get('mcp', '-')}")
