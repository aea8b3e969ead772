"""The agents Serve application: the platform's graphs behind LangGraph's server API, threads
and runs in PostgreSQL. ``build_agents_app`` is the Serve config's ``import_path`` target
(``agents.server.app:build_agents_app``)."""

from agents.server.app import DEPLOYMENT, IMPORT_PATH, AgentsApi, build_agents_app, create_app

__all__ = ["DEPLOYMENT", "IMPORT_PATH", "AgentsApi", "build_agents_app", "create_app"]
