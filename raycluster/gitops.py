"""GitOps: the Argo CD Application that syncs the rendered folder."""

from __future__ import annotations

from raycluster.environments import Environment
from raycluster.policy import meta


def render_argocd_application(env: Environment, *, exclude: str) -> dict:
    """``exclude``: the file the Application itself is written to (it does not manage itself)."""
    return {"apiVersion": "argoproj.io/v1alpha1", "kind": "Application",
            "metadata": meta(f"rayplane-{env.name}", env.gitops.argocd_namespace),
            "spec": {
                "project": "default",
                "source": {"repoURL": env.gitops.repo_url,
                           "targetRevision": env.gitops.revision,
                           "path": env.gitops.path,
                           # The Application is applied once by `rayplane apply`; it does not
                           # manage itself.
                           "directory": {"recurse": False,
                                         "exclude": exclude}},
                "destination": {"server": "https://kubernetes.default.svc"},
                "syncPolicy": {"automated": {"prune": True, "selfHeal": True},
                               "syncOptions": ["ServerSideApply=true",
                                               "CreateNamespace=false"]},
            }}
