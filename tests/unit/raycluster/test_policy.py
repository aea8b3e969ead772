"""Cluster policy from the catalog: restricted, meshed namespaces; default-deny
NetworkPolicies with the platform's allows; the design's priority classes and quotas, GPU
quotas in each pool's resource name; LimitRanges; PodDisruptionBudgets."""

from __future__ import annotations

import ipaddress

from raycluster.policy import (
    render_head_pdb,
    render_limit_ranges,
    render_namespaces,
    render_network_policies,
    render_priority_classes,
    render_resource_quotas,
    render_serve_pdb,
)

DESIGN_PRIORITIES = {"production-inference": 1000, "critical-agents": 900, "training": 500,
                     "research": 100, "development": 50}


def test_five_namespaces_restricted_and_meshed(catalog, env):
    namespaces = {ns["metadata"]["name"]: ns for ns in render_namespaces(catalog, env)}
    assert set(namespaces) == {"training", "inference", "agentic", "mlops", "monitoring"}
    for ns in namespaces.values():
        labels = ns["metadata"]["labels"]
        for mode in ("enforce", "audit", "warn"):
            assert labels[f"pod-security.kubernetes.io/{mode}"] == "restricted"
            assert labels[f"pod-security.kubernetes.io/{mode}-version"] == \
                f"v{env.kubernetes_version}"
        assert ns["metadata"]["annotations"]["linkerd.io/inject"] == "enabled"


def test_priority_classes_are_the_designs(catalog):
    rendered = {pc["metadata"]["name"]: pc for pc in render_priority_classes(catalog)}
    assert {n: pc["value"] for n, pc in rendered.items()} == DESIGN_PRIORITIES
    assert not any(pc["globalDefault"] for pc in rendered.values())


def test_quotas_count_gpus_in_each_pools_resource_name(catalog):
    quotas = {q["metadata"]["namespace"]: q["spec"]["hard"]
              for q in render_resource_quotas(catalog)
              if q["metadata"]["name"] == "rayplane-quota"}
    assert set(quotas) == {"training", "inference", "agentic", "mlops"}
    gpu_names = {p.kubernetes_resource for p in catalog.gpu_pools}
    assert gpu_names == {"nvidia.com/gpu", "nvidia.com/mig-3g.40gb"}
    # each resource name on its own, as the quota admission counts them
    expected = {"training": ({"nvidia.com/gpu": 32}, "192", "1536Gi"),
                "inference": ({"nvidia.com/mig-3g.40gb": 10}, "80", "800Gi"),
                "agentic": ({"nvidia.com/mig-3g.40gb": 6}, "64", "320Gi"),
                "mlops": ({}, "32", "64Gi")}
    for ns, (gpus, cpus, memory) in expected.items():
        hard = quotas[ns]
        assert hard["requests.cpu"] == cpus and hard["requests.memory"] == memory
        for name in gpu_names:
            assert hard[f"requests.{name}"] == str(gpus.get(name, 0)), (ns, name)


def test_limit_ranges_give_defaults_within_the_quota(catalog):
    for lr in render_limit_ranges(catalog):
        limit, = lr["spec"]["limits"]
        assert limit["type"] == "Container"
        assert {"default", "defaultRequest", "max"} <= set(limit)
    mlops = next(lr for lr in render_limit_ranges(catalog)
                 if lr["metadata"]["namespace"] == "mlops")
    assert mlops["spec"]["limits"][0]["max"] == {"cpu": "32", "memory": "64Gi"}


def _policies(catalog, env):
    out = {}
    for p in render_network_policies(catalog, env):
        out[(p["metadata"]["namespace"], p["metadata"]["name"])] = p["spec"]
    return out


def test_every_namespace_denies_by_default_and_allows_dns(catalog, env):
    policies = _policies(catalog, env)
    for ns in ("training", "inference", "agentic", "mlops", "monitoring"):
        deny = policies[(ns, "default-deny")]
        assert deny["podSelector"] == {}
        assert deny["policyTypes"] == ["Ingress", "Egress"]
        assert deny["ingress"] == [] and deny["egress"] == []
        dns = policies[(ns, "allow-dns")]["egress"][0]
        assert {p["port"] for p in dns["ports"]} == {53}


def _allows(rule_list, port):
    return any(not r.get("ports") or any(p["port"] == port for p in r["ports"])
               for r in rule_list)


def test_ray_nodes_talk_to_each_other_and_prometheus_scrapes_them(catalog, env):
    policies = _policies(catalog, env)
    for ns in ("training", "inference", "agentic"):
        intra = policies[(ns, "allow-ray-cluster")]
        assert intra["podSelector"] == {"matchLabels": {"rayplane.io/ray-node": "true"}}
        assert intra["ingress"][0]["from"] == [{"podSelector": intra["podSelector"]}]
        scrape = policies[(ns, "allow-prometheus-scrape")]["ingress"][0]
        assert scrape["from"][0]["namespaceSelector"]["matchLabels"] == {
            "kubernetes.io/metadata.name": "monitoring"}
        assert _allows([scrape], 8080)
        mlflow = policies[(ns, "allow-mlflow-egress")]["egress"]
        assert _allows(mlflow, 5000)


def test_serve_ingress_is_open_on_8000_from_the_vpc_and_agents(catalog, env):
    policies = _policies(catalog, env)
    rule, = policies[("inference", "allow-serve-ingress")]["ingress"]
    assert [p["port"] for p in rule["ports"]] == [8000]
    cidrs = [f["ipBlock"]["cidr"] for f in rule["from"] if "ipBlock" in f]
    assert cidrs == [env.vpc_cidr]
    assert {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "agentic"}}} \
        in rule["from"]
    # Nothing opens the Ray dashboard (job submission) to the VPC: only submitters and the
    # KubeRay operator reach 8265.
    for (ns, _), spec in policies.items():
        for r in spec.get("ingress", []):
            if any("ipBlock" in f for f in r.get("from", [])):
                assert not _allows([r], 8265), ns


def test_mlflow_takes_clients_from_the_ray_namespaces_only(catalog, env):
    spec = _policies(catalog, env)[("mlops", "allow-mlflow")]
    sources = {f["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
               for f in spec["ingress"][0]["from"]}
    assert sources == {"training", "inference", "agentic", "monitoring"}


def test_egress_to_the_vpc_is_limited_to_storage_ports(catalog, env):
    vpc = ipaddress.ip_network(env.vpc_cidr)
    for spec in _policies(catalog, env).values():
        for rule in spec.get("egress", []):
            for peer in rule.get("to", []):
                block = peer.get("ipBlock")
                if block and ipaddress.ip_network(block["cidr"]) == vpc:
                    ports = {p["port"] for p in rule["ports"]}
                    assert ports <= {2049, 6379, 5432, 9100, 10250}


def test_disruption_budgets_let_drains_through_one_pod_at_a_time():
    # maxUnavailable 0 on the one head made every drain of the cpu pool hang (issue 15)
    head = render_head_pdb("agents", "agentic")
    assert head["spec"]["maxUnavailable"] == 1
    assert head["spec"]["selector"]["matchLabels"] == {"rayplane.io/cluster": "agents",
                                                       "rayplane.io/node-type": "head"}
    serve = render_serve_pdb("openai", "inference")
    assert serve["spec"]["maxUnavailable"] == 1
    assert serve["spec"]["selector"]["matchLabels"]["rayplane.io/node-type"] == "worker"


def test_pdb_selectors_match_the_pods_rendered(catalog, env):
    """A PDB that selects nothing protects nothing: its labels are the pod templates'."""
    from raycluster.render import load_inputs, render_objects

    objects = render_objects(catalog, env, load_inputs(env))
    templates = []
    for o in objects:
        spec = o.get("spec", {})
        cluster = spec.get("rayClusterConfig") or (spec if o["kind"] == "RayCluster" else None)
        if cluster:
            templates.append((o["metadata"]["namespace"],
                              cluster["headGroupSpec"]["template"]["metadata"]["labels"]))
            templates += [(o["metadata"]["namespace"], g["template"]["metadata"]["labels"])
                          for g in cluster["workerGroupSpecs"]]
    for pdb in (o for o in objects if o["kind"] == "PodDisruptionBudget"):
        want = pdb["spec"]["selector"]["matchLabels"]
        ns = pdb["metadata"]["namespace"]
        assert any(n == ns and want.items() <= labels.items() for n, labels in templates), \
            pdb["metadata"]["name"]


def test_gateway_proxies_reach_serve_and_are_reached_by_the_load_balancer(catalog, env):
    """With a Gateway class, each RayService's Gateway proxy pods (Istio's, in the service's
    namespace) take HTTP 80 from the internal load balancer and, in inference, from the
    agents; forward to the Serve pods on 8000; fetch config from istiod. Default deny would
    drop all of it."""
    assert env.serving and env.serving.gateway_class
    policies = {(p["metadata"]["namespace"], p["metadata"]["name"]): p["spec"]
                for p in render_network_policies(catalog, env)}
    gateway_pods = {"matchExpressions": [{"key": "gateway.networking.k8s.io/gateway-name",
                                          "operator": "Exists"}]}
    for ns in ("inference", "agentic"):
        gw = policies[(ns, "allow-gateway")]
        assert gw["podSelector"] == gateway_pods
        http = next(r for r in gw["ingress"] if r["ports"] == [{"protocol": "TCP", "port": 80}])
        cidrs = {p["ipBlock"]["cidr"] for p in http["from"] if "ipBlock" in p}
        assert cidrs == set(env.serve_ingress_cidrs)
        from_agents = any(p.get("namespaceSelector", {}).get("matchLabels", {}).get(
            "kubernetes.io/metadata.name") == "agentic" for p in http["from"])
        assert from_agents == (ns == "inference")
        assert any(r["ports"] == [{"protocol": "TCP", "port": 15021}] for r in gw["ingress"])
        egress_ports = {p["port"] for r in gw["egress"] for p in r["ports"]}
        assert egress_ports == {8000, 15012}
        serve = policies[(ns, "allow-serve-ingress")]["ingress"][0]
        assert {"podSelector": gateway_pods} in serve["from"]
    model = policies[("agentic", "allow-model-egress")]["egress"]
    assert any(r["ports"] == [{"protocol": "TCP", "port": 80}]
               and r["to"][0]["podSelector"] == gateway_pods for r in model)
    # no Gateway class: no gateway policy
    plain = env.model_copy(update={"serving": None})
    assert not [p for p in render_network_policies(catalog, plain)
                if p["metadata"]["name"] == "allow-gateway"]


def test_a_priority_class_the_namespace_may_not_use_is_refused_at_render(catalog):
    import pytest

    from raycluster.policy import check_priority_class
    from raycluster.spec import SpecError

    check_priority_class(catalog, "research", "clusters[1].priority_class", "training")
    with pytest.raises(SpecError) as err:
        check_priority_class(catalog, "production-inference", "clusters[1].priority_class",
                             "training")
    assert str(err.value).startswith("clusters[1].priority_class: 'production-inference' is "
                                     "not allowed in namespace 'training'")
    assert "valid: training, research, development" in str(err.value)
