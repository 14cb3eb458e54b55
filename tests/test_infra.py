"""infra/ and dashboards/ checked against the code, so they cannot drift: every manifest parses, the fields a
deployment needs are there, commands name real kdray options and files, auth is on, secrets are not literal,
and the dashboard asks only for metrics kdray exports."""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from kdray.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
YAMLS = sorted(p for p in (ROOT / "infra").rglob("*") if p.suffix in (".yaml", ".yml"))


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def kind(path: Path, k: str) -> dict:
    return next(d for d in docs(path) if d.get("kind") == k)


def search_options() -> set[str]:
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["search"]
    return {o for a in sub._actions for o in a.option_strings}


def check_kdray_command(line: str) -> None:
    """``kdray search SPACE --opt ...``: a real subcommand, options it has, a space file that exists."""
    words = shlex.split(line)
    i = words.index("kdray")
    assert words[i + 1] == "search", line
    space = words[i + 2]
    assert (ROOT / re.sub(r"^/home/ray/kdray/", "", space)).is_file() or "$" in space, space
    unknown = {w for w in words[i + 3:] if w.startswith("--")} - search_options()
    assert not unknown, f"options kdray search does not have: {unknown}"


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_manifest_parses(path):
    assert docs(path)


def test_ray_cluster_launcher_config():
    c = docs(ROOT / "infra/cluster/aws.yaml")[0]
    assert c["provider"]["type"] == "aws" and c["head_node_type"] in c["available_node_types"]
    head = c["available_node_types"][c["head_node_type"]]
    workers = [t for n, t in c["available_node_types"].items() if n != c["head_node_type"]]
    assert head.get("resources", {}).get("GPU", 0) == 0 and head.get("max_workers", 0) == 0
    gpu = [w for w in workers if "g5" in json.dumps(w["node_config"]) or w.get("resources", {}).get("GPU", 0) >= 1]
    assert gpu and all(w["max_workers"] > w.get("min_workers", 0) for w in gpu)  # an autoscaling GPU group
    start = " ".join(c["head_start_ray_commands"] + c["worker_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in start and "RAY_AUTH_TOKEN" in start
    assert "--dashboard-host=127.0.0.1" in start or "--dashboard-host 127.0.0.1" in start
    assert re.search(r"RAY_AUTH_TOKEN=[0-9a-f]{16,}", yaml.safe_dump(c)) is None  # no literal token
    assert "kdray" in " ".join(c.get("setup_commands", []) + [c.get("docker", {}).get("head_image", ""),
                                                                c.get("docker", {}).get("worker_image", "")])


def test_kuberay_cluster_and_job():
    rc = kind(ROOT / "infra/kuberay/raycluster.yaml", "RayCluster")
    spec = rc["spec"]
    groups = spec["workerGroupSpecs"]
    assert any("nvidia.com/gpu" in json.dumps(g) for g in groups)
    assert all(g["maxReplicas"] >= g["minReplicas"] >= 0 for g in groups)
    containers = [c for g in [spec["headGroupSpec"], *groups] for c in g["template"]["spec"]["containers"]]
    for c in containers:
        env = {e["name"]: e for e in c.get("env", [])}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"]  # from a Secret, never literal
    job = kind(ROOT / "infra/kuberay/rayjob.yaml", "RayJob")
    check_kdray_command(job["spec"]["entrypoint"])
    secrets = docs(ROOT / "infra/kuberay/secrets.example.yaml")
    assert all(d["kind"] == "Secret" for d in secrets)
    values = [v for d in secrets for k, v in (d.get("stringData") or {}).items() if re.search("token|password", k)]
    assert values and all(re.search(r"CHANGE|REPLACE|EXAMPLE|<", str(v), re.I) for v in values)  # placeholders


def test_mlflow_stack():
    c = docs(ROOT / "infra/mlflow/docker-compose.yaml")[0]
    services = c["services"]
    assert {"postgres", "minio", "mlflow"} <= set(services)
    for name, svc in services.items():  # only the TLS proxy may listen beyond loopback
        if name != "caddy":
            assert all(str(p).startswith("127.0.0.1:") for p in svc.get("ports", [])), (name, svc.get("ports"))
    text = (ROOT / "infra/mlflow/docker-compose.yaml").read_text()
    for line in re.findall(r"^\s*\w*(?:PASSWORD|SECRET)\w*:\s*(.+)$", text, re.M):
        assert line.strip().startswith("${"), f"a literal secret: {line}"
    entry = (ROOT / "infra/mlflow/entrypoint.py").read_text()
    assert "basic-auth" in entry and "--allowed-hosts" in entry and "postgresql" in entry
    assert (ROOT / "infra/mlflow/Caddyfile").is_file() and (ROOT / "infra/mlflow/.env.example").is_file()


def test_container_image_installs_kdray_on_the_ray_image():
    text = (ROOT / "infra/docker/Dockerfile").read_text()
    assert re.search(r"^FROM rayproject/ray:", text, re.M)
    assert "pip install" in text and "USER ray" in text


def test_readmes_name_only_commands_and_files_that_exist():
    commands = set(next(a for a in build_parser()._actions if a.dest == "command").choices)
    for readme in ("infra/README.md", "dashboards/README.md", "README.md"):
        text = (ROOT / readme).read_text()
        for sub in re.findall(r"`kdray ([a-z]+)", text):
            assert sub in commands, f"{readme}: kdray {sub}"
        for path in set(re.findall(r"\b((?:infra|dashboards|search_spaces|configs|benchmarks)/[\w./-]+\.\w+)", text)):
            if not path.endswith("/.env"):  # made by the user from .env.example
                assert (ROOT / path).exists(), f"{readme}: {path}"
    for line in re.findall(r"\bkdray search [^\n`\\]*", (ROOT / "infra/README.md").read_text()):
        if "search_spaces/" in line:
            check_kdray_command(line)


def test_dashboard_asks_only_for_metrics_kdray_and_ray_export():
    from kdray.search import prometheus as metrics

    source = (ROOT / "kdray/search/prometheus.py").read_text()
    exported = set(re.findall(r'(?:Gauge|Counter|Histogram)\("(kdray_\w+)"', source))
    assert exported >= {"kdray_trials", "kdray_epoch_seconds", "kdray_best_val_acc", "kdray_cache_hits"}
    assert set(metrics.STATES) == {"running", "finished", "pruned", "errored"}
    board = json.loads((ROOT / "dashboards/grafana/kdray.json").read_text())
    exprs = " ".join(t["expr"] for p in board["panels"] for t in p.get("targets", []))
    asked = set(re.findall(r"ray_(kdray_\w+)", exprs))
    assert asked
    for name in asked:
        base = re.sub(r"_(total|bucket|count|sum)$", "", name)
        assert base in exported, f"the dashboard asks for {name}, kdray exports {sorted(exported)}"
    assert set(re.findall(r'state="(\w+)"', exprs)) <= set(metrics.STATES)
