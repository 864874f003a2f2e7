"""The deployment files in deploy/, each checked by the tool that reads it.

promtool (Debian's prometheus package) checks the Prometheus configuration and
runs the alert unit tests; kubernetes-validate checks every Kubernetes manifest
against the schemas it bundles, and deploy/kubernetes/schemas/ the KEDA ones;
check-jsonschema checks the compose file against the Compose Specification it
bundles. None of them needs a Docker engine, a cluster or the network.

The other tests are cross-checks no single tool makes: metric names and labels
against shared/metrics.py, setting names against shared/settings.py, ports
against shared/service.py and queue names against shared/topology.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import promql_parser
import psycopg
import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase
from yamllint import linter
from yamllint.config import YamlLintConfig

import shared.metrics
from services.admin.cli import SERVICES
from shared.metrics import Outcome, Stage
from shared.service import DEFAULT_METRICS_PORTS
from shared.settings import Settings
from shared.topology import Topology

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
PROMETHEUS = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "mailroom.json"

# The oldest Kubernetes the manifests support, and the newest one known.
K8S_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
KEDA_SCHEMAS = {
    "ScaledObject": K8S / "schemas" / "keda-scaledobject.json",
    "TriggerAuthentication": K8S / "schemas" / "keda-triggerauthentication.json",
}
SECRET_SETTINGS = {"MAILROOM_DATABASE_URL", "MAILROOM_AMQP_URL", "MAILROOM_SECRET_KEYS"}
ADMIN_PORT = 8080
# Pods and containers must answer probes and scrapes on their own address.
ALL_INTERFACES = "0.0.0.0"  # noqa: S104

# Series of RabbitMQ's rabbitmq_prometheus plugin used by the rules and the
# dashboard: /metrics/detailed (job rabbitmq-queues) serves them for the
# families queue_coarse_metrics and queue_consumer_count.
RABBITMQ_SERIES = {
    f"rabbitmq_detailed_queue_{name}": {"vhost", "queue"}
    for name in ("messages_ready", "messages_unacked", "messages", "consumers")
}
PROMETHEUS_SERIES: dict[str, set[str]] = {"up": set()}
TARGET_LABELS = {"job", "instance"}
ENUM_LABELS = {"stage": {s.value for s in Stage}, "outcome": {o.value for o in Outcome}}
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$channel": ".*"}


def load_all(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def run_tool(*argv: str) -> subprocess.CompletedProcess[str]:
    tool = shutil.which(argv[0])
    assert tool, f"{argv[0]} is missing: scripts/install-test-servers.sh installs it"
    return subprocess.run(
        [tool, *argv[1:]], capture_output=True, text=True, timeout=120, check=False
    )


def exposed_series() -> dict[str, set[str]]:
    """Every series name shared/metrics.py exposes, with its label names."""
    series: dict[str, set[str]] = {}
    for metric in vars(shared.metrics).values():
        if not isinstance(metric, MetricWrapperBase):
            continue
        labels = set(metric._labelnames)
        if metric._type == "counter":
            series[f"{metric._name}_total"] = labels
        elif metric._type == "histogram":
            series[f"{metric._name}_bucket"] = labels | {"le"}
            series[f"{metric._name}_sum"] = labels
            series[f"{metric._name}_count"] = labels
        else:
            series[metric._name] = labels
    return series


def known_series() -> dict[str, set[str]]:
    return {**exposed_series(), **RABBITMQ_SERIES, **PROMETHEUS_SERIES}


def selectors(expr: str) -> list[promql_parser.VectorSelector]:
    found: list[promql_parser.VectorSelector] = []

    def visit(node: promql_parser.Expr) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            found.append(node)

    promql_parser.walk(promql_parser.parse(expr), visit)
    return found


def promql_problems(expr: str) -> list[str]:
    """What in ``expr`` names a series, label or label value that never exists."""
    series = known_series()
    problems = []
    for selector in selectors(expr):
        labels = series.get(selector.name or "")
        if labels is None:
            problems.append(f"unknown series {selector.name!r}")
            continue

        for matcher in selector.matchers.matchers:
            if matcher.name not in labels | TARGET_LABELS:
                problems.append(f"{selector.name} has no label {matcher.name!r}")
            allowed = ENUM_LABELS.get(matcher.name)
            if allowed is None or "NotRe" in str(matcher.op):
                continue
            values = (
                matcher.value.split("|") if "Re" in str(matcher.op) else [matcher.value]
            )
            problems += [
                f"{matcher.name}={value!r} is not a value of {selector.name}"
                for value in values
                if value not in allowed
            ]
    return problems


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [
        target["expr"]
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    ]
    for name, value in GRAFANA_VARIABLES.items():
        exprs = [expr.replace(name, value) for expr in exprs]
    return exprs


def kustomization() -> dict[str, Any]:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


def manifests() -> list[dict[str, Any]]:
    """Every resource kustomization.yaml applies."""
    return [
        doc for name in kustomization()["resources"] for doc in load_all(K8S / name)
    ]


def of_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in manifests() if d["kind"] == kind}


def containers() -> Iterator[tuple[str, dict[str, Any]]]:
    for kind in ("Deployment", "Job"):
        for name, item in of_kind(kind).items():
            for container in item["spec"]["template"]["spec"]["containers"]:
                yield name, container


def compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


def env_example() -> dict[str, str]:
    lines = (DEPLOY / ".env.example").read_text().splitlines()
    pairs = [line.split("=", 1) for line in lines if line and not line.startswith("#")]
    return {key: value for key, value in pairs}


def settings_from(environ: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    for name in [n for n in os.environ if n.startswith("MAILROOM_")]:
        monkeypatch.delenv(name)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    return Settings()


# Prometheus


def test_promtool_accepts_the_prometheus_configuration_and_its_rules() -> None:
    result = run_tool("promtool", "check", "config", str(PROMETHEUS / "prometheus.yml"))

    assert 0 == result.returncode, result.stdout + result.stderr


def test_promtool_accepts_the_alert_rules() -> None:
    result = run_tool("promtool", "check", "rules", str(PROMETHEUS / "alerts.yml"))

    assert 0 == result.returncode, result.stdout + result.stderr


def test_the_alert_unit_tests_pass_under_promtool() -> None:
    result = run_tool("promtool", "test", "rules", str(PROMETHEUS / "alerts_test.yml"))

    assert 0 == result.returncode, result.stdout + result.stderr


def test_every_alert_has_a_unit_test_in_which_it_fires() -> None:
    tests = yaml.safe_load((PROMETHEUS / "alerts_test.yml").read_text())["tests"]
    firing = {
        case["alertname"]
        for test in tests
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }

    assert {rule["alert"] for rule in alert_rules()} == firing


def test_every_alert_has_a_severity_a_summary_and_a_description() -> None:
    incomplete = [
        rule["alert"]
        for rule in alert_rules()
        if rule.get("labels", {}).get("severity") not in {"warning", "critical"}
        or not {"summary", "description"} <= set(rule.get("annotations", {}))
    ]

    assert [] == incomplete


def test_alert_rules_use_only_series_labels_and_values_that_exist() -> None:
    problems = {rule["alert"]: promql_problems(rule["expr"]) for rule in alert_rules()}

    assert {} == {alert: found for alert, found in problems.items() if found}


def test_prometheus_scrapes_each_worker_on_its_default_metrics_port() -> None:
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    ports = {
        job["job_name"].removeprefix("mailroom-"): sd["port"]
        for job in config["scrape_configs"]
        for sd in job.get("dns_sd_configs", [])
    }

    assert {**DEFAULT_METRICS_PORTS, "admin": ADMIN_PORT} == ports


def test_the_rule_checker_rejects_a_misspelt_series_and_outcome() -> None:
    expr = (
        "rate(mailroom_message_total[5m])"
        ' + rate(mailroom_messages_total{outcome="fail"}[5m])'
    )

    assert [
        "unknown series 'mailroom_message_total'",
        "outcome='fail' is not a value of mailroom_messages_total",
    ] == promql_problems(expr)


# Grafana


def test_the_dashboard_queries_use_only_series_labels_and_values_that_exist() -> None:
    problems = {expr: promql_problems(expr) for expr in dashboard_exprs()}

    assert {} == {expr: found for expr, found in problems.items() if found}


def test_the_dashboard_variables_list_labels_that_exist() -> None:
    templating = json.loads(DASHBOARD.read_text())["templating"]["list"]
    queries = [v["definition"] for v in templating if v["type"] == "query"]
    series = known_series()
    listed = [re.fullmatch(r"label_values\((\w+), *(\w+)\)", q) for q in queries]

    unknown = [
        query
        for query, match in zip(queries, listed, strict=True)
        if not match or match[2] not in series.get(match[1], set())
    ]

    assert [] == unknown


def test_promtool_parses_every_dashboard_query(tmp_path: Path) -> None:
    rules = [
        {"record": f"mailroom:dashboard_query_{n}", "expr": expr}
        for n, expr in enumerate(dashboard_exprs())
    ]
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))

    result = run_tool("promtool", "check", "rules", str(path))

    assert 0 == result.returncode, result.stdout + result.stderr


def test_every_dashboard_panel_reads_the_provisioned_prometheus() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    datasource = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text()
    )["datasources"][0]
    variable = dashboard["templating"]["list"][0]
    sources = {
        json.dumps(target["datasource"])
        for panel in dashboard["panels"]
        if panel["type"] != "row"
        for target in [panel, *panel["targets"]]
    }

    assert ("datasource", datasource["uid"]) == (
        variable["name"],
        variable["current"]["value"],
    )
    assert {json.dumps({"type": "prometheus", "uid": "${datasource}"})} == sources


def test_dashboard_panels_have_unique_ids_and_fit_the_grid() -> None:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    misplaced = [
        p["title"] for p in panels if p["gridPos"]["x"] + p["gridPos"]["w"] > 24
    ]

    assert len(panels) == len({p["id"] for p in panels})
    assert [] == misplaced


def test_grafana_loads_dashboards_from_where_compose_mounts_them() -> None:
    provider = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/dashboards/mailroom.yml").read_text()
    )["providers"][0]
    mounts = dict(
        volume.rsplit(":", 2)[:2]
        for volume in compose()["services"]["grafana"]["volumes"]
    )

    assert provider["options"]["path"] == mounts["./grafana/dashboards"]
    assert (DEPLOY / "grafana/dashboards/mailroom.json").is_file()


# Kubernetes


def test_every_kubernetes_manifest_matches_its_schema() -> None:
    errors = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in load_all(path):
            if doc["apiVersion"].startswith("keda.sh/"):
                schema = json.loads(KEDA_SCHEMAS[doc["kind"]].read_text())
                validator = jsonschema.Draft202012Validator(schema)
                errors += [
                    f"{path.name}: {e.message}" for e in validator.iter_errors(doc)
                ]
                continue
            for version in K8S_VERSIONS:
                try:
                    kubernetes_validate.validate(doc, version, strict=True)
                except kubernetes_validate.ValidationError as exc:
                    errors.append(f"{path.name} ({version}): {exc.message}")

    assert [] == errors


def test_keda_scaling_behaviour_is_a_valid_autoscaler_behaviour() -> None:
    errors = []
    for name, scaled in of_kind("ScaledObject").items():
        advanced = scaled["spec"].get("advanced", {})
        behavior = advanced.get("horizontalPodAutoscalerConfig", {}).get("behavior")
        if behavior is None:
            continue
        autoscaler = {
            "apiVersion": "autoscaling/v2",
            "kind": "HorizontalPodAutoscaler",
            "metadata": {"name": name},
            "spec": {
                "scaleTargetRef": scaled["spec"]["scaleTargetRef"]
                | {"kind": "Deployment"},
                "maxReplicas": scaled["spec"]["maxReplicaCount"],
                "behavior": behavior,
            },
        }
        try:
            kubernetes_validate.validate(autoscaler, K8S_VERSIONS[0], strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{name}: {exc.message}")

    assert [] == errors


def test_the_keda_schema_rejects_a_numeric_queue_length() -> None:
    scaled = of_kind("ScaledObject")["mailroom-router"]
    scaled["spec"]["triggers"][0]["metadata"]["value"] = 100
    schema = json.loads(KEDA_SCHEMAS["ScaledObject"].read_text())

    errors = jsonschema.Draft202012Validator(schema).iter_errors(scaled)

    assert {("spec", "triggers", 0, "metadata", "value")} == {
        tuple(error.absolute_path) for error in errors
    }


def test_kustomization_applies_every_manifest_but_the_secret_example() -> None:
    listed = set(kustomization()["resources"])
    present = {p.name for p in K8S.glob("*.yaml")}

    assert present - {"kustomization.yaml", "secret.example.yaml"} == listed
    # Fields beyond these would change the manifests in ways the tests do not see.
    assert {"apiVersion", "kind", "namespace", "labels", "images", "resources"} >= set(
        kustomization()
    )


def test_each_worker_runs_its_service_with_probes_on_its_metrics_port() -> None:
    seen = {}
    for service in DEFAULT_METRICS_PORTS:
        pod = of_kind("Deployment")[f"mailroom-{service}"]["spec"]["template"]
        container = pod["spec"]["containers"][0]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        seen[service] = (
            container["args"],
            ports[container["livenessProbe"]["httpGet"]["port"]],
            container["livenessProbe"]["httpGet"]["path"],
            container["readinessProbe"]["httpGet"]["path"],
            pod["metadata"]["annotations"]["prometheus.io/port"],
        )

    assert {
        service: (["run", service], port, "/livez", "/readyz", str(port))
        for service, port in DEFAULT_METRICS_PORTS.items()
    } == seen


def test_every_container_sets_cpu_and_memory_requests_and_limits() -> None:
    incomplete = [
        name
        for name, container in containers()
        if any(
            set(container["resources"].get(kind, {})) != {"cpu", "memory"}
            for kind in ("requests", "limits")
        )
    ]

    assert [] == incomplete


def test_secret_settings_come_only_from_the_secret() -> None:
    configmap = of_kind("ConfigMap")["mailroom-config"]["data"]
    secret = load_all(K8S / "secret.example.yaml")[0]
    sources = {
        (name, env["name"]): env.get("valueFrom", {})
        .get("secretKeyRef", {})
        .get("name")
        for name, container in containers()
        for env in container.get("env", [])
        if env["name"] in SECRET_SETTINGS
    }
    authentications = {
        (ref["name"], ref["key"])
        for auth in of_kind("TriggerAuthentication").values()
        for ref in auth["spec"]["secretTargetRef"]
    }

    assert set() == SECRET_SETTINGS & set(configmap)
    assert SECRET_SETTINGS == set(secret["stringData"])
    assert {secret["metadata"]["name"]} == set(sources.values())
    assert {secret["metadata"]["name"]} == {name for name, _ in authentications}
    assert {key for _, key in authentications} <= SECRET_SETTINGS


def test_the_configmap_holds_every_other_setting_at_its_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    configmap = of_kind("ConfigMap")["mailroom-config"]["data"]
    every = {f"MAILROOM_{name.upper()}" for name in Settings.model_fields}
    defaults = settings_from({}, monkeypatch).model_dump()

    configured = settings_from(configmap, monkeypatch).model_dump()

    assert every - SECRET_SETTINGS - {"MAILROOM_METRICS_PORT"} == set(configmap)
    assert {**defaults, "metrics_host": ALL_INTERFACES} == configured


def test_keda_scales_routers_and_senders_on_the_queues_they_consume() -> None:
    prefix = of_kind("ConfigMap")["mailroom-config"]["data"]["MAILROOM_BROKER_PREFIX"]
    topology = Topology(prefix=prefix)
    queues = {
        name: (
            scaled["spec"]["scaleTargetRef"]["name"],
            trigger["metadata"]["queueName"],
        )
        for name, scaled in of_kind("ScaledObject").items()
        for trigger in scaled["spec"]["triggers"]
        if trigger["type"] == "rabbitmq"
    }

    assert {
        "mailroom-router": ("mailroom-router", topology.raw_queue),
        "mailroom-sender": ("mailroom-sender", topology.outbound_queue),
    } == queues


def test_every_keda_reference_names_a_resource_of_the_kustomization() -> None:
    references = {
        (trigger["authenticationRef"]["name"], scaled["spec"]["scaleTargetRef"]["name"])
        for scaled in of_kind("ScaledObject").values()
        for trigger in scaled["spec"]["triggers"]
    }

    assert {a for a, _ in references} <= set(of_kind("TriggerAuthentication"))
    assert {d for _, d in references} <= set(of_kind("Deployment"))


def test_every_selector_matches_the_pods_it_is_meant_for() -> None:
    pods = {
        name: d["spec"]["template"]["metadata"]["labels"]
        for name, d in of_kind("Deployment").items()
    }
    selectors_by_kind = {
        kind: {
            name: item["spec"]["selector"].get("matchLabels", item["spec"]["selector"])
            for name, item in of_kind(kind).items()
        }
        for kind in ("Deployment", "PodDisruptionBudget", "Service")
    }
    unmatched = [
        (kind, name)
        for kind, selected in selectors_by_kind.items()
        for name, labels in selected.items()
        if not labels.items() <= pods.get(name, {}).items()
    ]

    assert [] == unmatched
    assert set(DEFAULT_METRICS_PORTS) | {"admin"} == {
        name.removeprefix("mailroom-")
        for name in selectors_by_kind["PodDisruptionBudget"]
    }


def test_the_poller_scaling_query_counts_the_active_channels(clean_db: str) -> None:
    trigger = of_kind("ScaledObject")["mailroom-poller"]["spec"]["triggers"][0]
    with psycopg.connect(clean_db, autocommit=True) as conn:
        conn.execute(
            """
            WITH campaign AS (
                INSERT INTO campaigns (key, name) VALUES ('general', 'General')
                RETURNING id
            )
            INSERT INTO channels (name, default_campaign_id, active)
            SELECT channel.name, campaign.id, channel.active
            FROM campaign, (VALUES ('a', true), ('b', true), ('c', false))
                AS channel (name, active)
            """
        )

        row = conn.execute(trigger["metadata"]["query"]).fetchone()

    assert ("postgresql", (2,)) == (trigger["type"], row)


# docker compose and the image


def test_the_compose_file_matches_the_compose_specification() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "check_jsonschema",
            "--builtin-schema",
            "vendor.compose-spec",
            str(DEPLOY / "docker-compose.yml"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert 0 == result.returncode, result.stdout + result.stderr


def test_compose_runs_each_service_with_a_health_check_on_its_port() -> None:
    services = compose()["services"]
    expected = {**DEFAULT_METRICS_PORTS, "admin": ADMIN_PORT}
    checked = {}
    for name in expected:
        url = re.search(
            r"http://127\.0\.0\.1:(\d+)/readyz",
            " ".join(services[name]["healthcheck"]["test"]),
        )
        checked[name] = int(url.group(1)) if url else None

    assert expected == checked
    assert {s: ["run", s] for s in SERVICES} == {
        s: services[s]["command"] for s in SERVICES
    }


def test_compose_dependencies_and_mounted_files_exist() -> None:
    services = compose()["services"]
    missing = [
        f"{name} depends on {dependency}"
        for name, service in services.items()
        for dependency in service.get("depends_on", [])
        if dependency not in services
    ] + [
        f"{name} mounts {source}"
        for name, service in services.items()
        for source in [v.split(":")[0] for v in service.get("volumes", [])]
        if source.startswith(".") and not (DEPLOY / source).exists()
    ]

    assert [] == missing


def test_every_compose_variable_is_in_the_env_example_or_has_a_default() -> None:
    text = (DEPLOY / "docker-compose.yml").read_text()
    variables = re.findall(r"\$\{([A-Z0-9_]+)(:?[-?])?", text)
    undefined = {
        name
        for name, operator in variables
        if not operator.endswith("-") and name not in env_example()
    }

    assert set() == undefined


def test_deploy_files_name_only_settings_that_exist(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    files = [
        DEPLOY / "Dockerfile",
        DEPLOY / "docker-compose.yml",
        DEPLOY / ".env.example",
        *K8S.glob("*.yaml"),
    ]
    named = {
        n for f in files for n in re.findall(r"\bMAILROOM_[A-Z0-9_]+", f.read_text())
    }
    defined = {f"MAILROOM_{name.upper()}" for name in Settings.model_fields}
    example = {k: v for k, v in env_example().items() if k.startswith("MAILROOM_")}

    assert set() == named - defined
    assert "mailroom" == settings_from(example, monkeypatch).broker_prefix


def test_the_image_runs_mailroom_as_a_non_root_user_on_python_311_slim() -> None:
    lines = (DEPLOY / "Dockerfile").read_text().splitlines()
    instructions = [
        line.split(None, 1) for line in lines if re.match(r"^[A-Z]+ ", line)
    ]
    bases = [arg.split()[0] for op, arg in instructions if op == "FROM"]
    user = [arg for op, arg in instructions if op == "USER"][-1]

    assert ["python:3.11-slim", "python:3.11-slim"] == bases
    assert user.split(":")[0] not in {"0", "root"}
    assert ('["mailroom"]', '["--help"]') == (
        [arg for op, arg in instructions if op == "ENTRYPOINT"][-1],
        [arg for op, arg in instructions if op == "CMD"][-1],
    )


def test_the_image_copies_only_paths_that_exist_and_are_not_ignored() -> None:
    lines = (DEPLOY / "Dockerfile").read_text().splitlines()
    sources = [
        source
        for line in lines
        if line.startswith("COPY ") and "--from=" not in line
        for source in line.split()[1:-1]
    ]
    included = {
        line[1:].rstrip("/")
        for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
        if line.startswith("!")
    }

    assert [] == [s for s in sources if not (ROOT / s).exists()]
    assert set(sources) == included


# Every YAML file


def test_yamllint_finds_no_duplicate_keys_or_syntax_errors() -> None:
    config = YamlLintConfig(
        "extends: default\n"
        "rules:\n"
        "  document-start: disable\n"
        "  line-length: disable\n"
        "  comments: {min-spaces-from-content: 1}\n"
        "  truthy: {check-keys: false}\n"
    )
    files = [*DEPLOY.rglob("*.yml"), *DEPLOY.rglob("*.yaml")]
    problems = [
        f"{path.relative_to(DEPLOY)}:{problem.line}: {problem.message}"
        for path in files
        for problem in linter.run(path.read_text(), config)
    ]

    assert [] == problems
