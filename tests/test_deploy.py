"""What deploy/ ships is checked, not trusted: the Dockerfile passes hadolint and keeps its
promises (multi-stage, non-root, health check, nothing secret), every Kubernetes manifest
validates against the Kubernetes schemas and keeps the security settings the issue names,
the systemd units pass `systemd-analyze verify`, every shell script passes shellcheck, and
every argument list a manifest, unit or image passes to `keyproxy` is accepted by the real
CLI parser, with each configuration file it names passing `keyproxy check`.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]  # ships no type information
import pytest
import yaml

from keyproxy import config
from keyproxy.cli import _parser, main
from tests.helpers.cli import BIN

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
K8S = DEPLOY / "kubernetes"
SYSTEMD = DEPLOY / "systemd"
# The oldest Kubernetes the base supports (preStop `sleep` is on by default from 1.30) and
# the newest kubernetes-validate knows.
K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
PROXY_LABELS = {"app.kubernetes.io/name": "keyproxy", "app.kubernetes.io/component": "proxy"}


def tool(name: str) -> str:
    """A linter from the dev extra, next to this Python (pip install -e '.[dev]')."""
    path = BIN / name
    if not path.is_file():
        pytest.fail(f"{name} is not installed next to {sys.executable}: pip install -e '.[dev]'")
    return str(path)


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)


def parse_keyproxy_args(args: list[str], where: str) -> Any:
    """The real `keyproxy` parser's verdict on `args`; a refusal fails the test."""
    try:
        return _parser().parse_args(args)
    except SystemExit:
        pytest.fail(f"{where}: keyproxy refuses the arguments {args}")


def check_config(path: Path, monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    """`keyproxy check` accepts the file, in exactly the environment given."""
    for name in ("VAULT_ADDR", "BAO_ADDR"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["check", "-c", str(path)]) == 0, f"keyproxy check refused {path}"


# ---------------------------------------------------------------------------- shell scripts


def test_shell_scripts_pass_shellcheck() -> None:
    """Every shell script in deploy/ and vault-dev/ passes shellcheck with no finding."""
    scripts = sorted([*DEPLOY.rglob("*.sh"), *(REPO / "vault-dev").rglob("*.sh")])
    assert len(scripts) >= 6
    done = run(tool("shellcheck"), "--severity=style", "--external-sources", *map(str, scripts))
    assert done.returncode == 0, done.stdout + done.stderr


# ---------------------------------------------------------------------------- container image


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    text = DOCKERFILE.read_text(encoding="utf-8")
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    out = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_passes_hadolint() -> None:
    """hadolint finds nothing in deploy/docker/Dockerfile, at any severity."""
    done = run(tool("hadolint"), "--no-color", "--failure-threshold", "style", str(DOCKERFILE))
    assert done.returncode == 0, done.stdout + done.stderr


def test_dockerfile_is_multistage_non_root_and_health_checked() -> None:
    """The image is built in one stage and run from another, runs as a numeric non-root
    user, never writes bytecode (read-only root), and checks /healthz."""
    steps = dockerfile_instructions()
    froms = [i for i, (word, _) in enumerate(steps) if word == "FROM"]
    assert len(froms) >= 2
    final = steps[froms[-1] :]
    users = [args for word, args in final if word == "USER"]
    assert users, "the final stage sets no USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit(), "USER must be numeric, so runAsNonRoot can check it"
    assert int(uid) != 0, "USER must not be root"
    envs = " ".join(args for word, args in final if word == "ENV")
    assert "PYTHONDONTWRITEBYTECODE=1" in envs
    checks = [args for word, args in final if word == "HEALTHCHECK"]
    assert len(checks) == 1
    assert "/healthz" in checks[0]
    assert any(word == "COPY" and args.startswith("--from=build") for word, args in final)


def test_dockerfile_bakes_in_no_secret() -> None:
    """No ARG or ENV names a credential, only package sources are copied in, and the build
    context file lets nothing but those sources through."""
    secretish = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|API_KEY|ROLE_ID|CREDENTIAL", re.I)
    for word, args in dockerfile_instructions():
        if word in ("ARG", "ENV"):
            assert not secretish.search(args), f"{word} {args}"
        if word in ("COPY", "ADD") and not args.startswith("--from="):
            sources = args.split()[:-1]
            assert set(sources) <= {"pyproject.toml", "README.md", "keyproxy"}, args
    ignore = (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text(encoding="utf-8")
    rules = [ln for ln in ignore.splitlines() if ln and not ln.startswith("#")]
    assert rules[0] == "*", "the build context must start from nothing"


def test_dockerfile_command_is_accepted_by_the_cli() -> None:
    """ENTRYPOINT is keyproxy and the default CMD is a `serve` the real parser accepts,
    listening on the exposed port that HEALTHCHECK probes."""
    steps = dict(dockerfile_instructions())
    assert yaml.safe_load(steps["ENTRYPOINT"]) == ["keyproxy"]
    args = yaml.safe_load(steps["CMD"])  # JSON exec form
    parsed = parse_keyproxy_args(args, "Dockerfile CMD")
    assert parsed.command == "serve"
    assert parsed.config == "/etc/keyproxy/keyproxy.yaml"
    assert str(parsed.port) == steps["EXPOSE"]
    assert f"127.0.0.1:{parsed.port}/healthz" in steps["HEALTHCHECK"]


# ---------------------------------------------------------------------------- Kubernetes


def manifests() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if doc:
                yield path, doc


def resources() -> dict[tuple[str, str], dict[str, Any]]:
    return {(doc["kind"], doc["metadata"]["name"]): doc for _, doc in manifests()}


def pod_spec(resource: dict[str, Any]) -> dict[str, Any]:
    spec = resource["spec"]
    if resource["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    result: dict[str, Any] = spec["template"]["spec"]
    return result


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_kubernetes_manifests_validate_against_the_schemas(version: str) -> None:
    """Every manifest in deploy/kubernetes/ is valid for Kubernetes `version`, strictly (an
    unknown field is an error)."""
    seen = []
    for path, doc in manifests():
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{path.name} {doc['kind']}/{doc['metadata']['name']}: {exc.message}")
        seen.append(doc["kind"])
    expected = {
        "Namespace",
        "ServiceAccount",
        "ConfigMap",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "NetworkPolicy",
        "CronJob",
    }
    assert set(seen) == expected


def test_kubernetes_validation_catches_a_typo() -> None:
    """The schema check is strict enough to matter: a misspelt field fails it."""
    deployment = resources()[("Deployment", "keyproxy")]
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[0], strict=True)


def test_kustomization_lists_every_manifest() -> None:
    """kustomization.yaml names each manifest in the folder exactly once, and nothing else."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text(encoding="utf-8"))
    listed = kustomization["resources"]
    files = sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(listed) == files
    assert len(set(listed)) == len(listed)


def test_kustomize_build_validates() -> None:
    """`kubectl kustomize` renders the base, and everything it renders validates."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with its built-in kustomize) is not installed on this machine")
    done = run(kubectl, "kustomize", str(K8S))
    assert done.returncode == 0, done.stderr
    rendered = [d for d in yaml.safe_load_all(done.stdout) if d]
    assert len(rendered) == len(list(manifests()))
    for doc in rendered:
        kubernetes_validate.validate(doc, K8S_VERSIONS[0], strict=True)
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "keyproxy"


def test_deployment_is_hardened_replicated_and_probed() -> None:
    """The proxy runs several spread replicas as non-root with a read-only root, no
    capabilities, no Kubernetes API token, resource limits, and /healthz and /readyz probes."""
    deployment = resources()[("Deployment", "keyproxy")]
    assert deployment["spec"]["replicas"] >= 2
    spec = pod_spec(deployment)
    assert spec["automountServiceAccountToken"] is False
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    keys = {c["topologyKey"] for c in spec["topologySpreadConstraints"]}
    assert keys == {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}
    for constraint in spec["topologySpreadConstraints"]:
        assert constraint["labelSelector"]["matchLabels"] == PROXY_LABELS
    (container,) = spec["containers"]
    ctx = container["securityContext"]
    assert ctx["readOnlyRootFilesystem"] is True
    assert ctx["allowPrivilegeEscalation"] is False
    assert ctx["capabilities"]["drop"] == ["ALL"]
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])
    assert "memory" in container["resources"]["limits"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    port = parse_keyproxy_args(container["args"], "Deployment").port
    assert container["ports"][0]["containerPort"] == port


def test_configmap_updates_reach_the_pod_without_a_rollout() -> None:
    """The configuration directory is mounted whole (no subPath), so the kubelet's ConfigMap
    updates reach the pod, where `keyproxy serve` watches the file and reloads it."""
    deployment = resources()[("Deployment", "keyproxy")]
    spec = pod_spec(deployment)
    (container,) = spec["containers"]
    args = parse_keyproxy_args(container["args"], "Deployment")
    assert args.watch
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "config"]
    assert "subPath" not in mount
    assert str(Path(args.config).parent) == mount["mountPath"]
    (volume,) = [v for v in spec["volumes"] if v["name"] == "config"]
    sources = volume["projected"]["sources"]
    assert any(s.get("configMap", {}).get("name") == "keyproxy-config" for s in sources)


def test_systemd_reload_sends_sighup_to_the_main_process() -> None:
    """`systemctl reload keyproxy` sends SIGHUP to the parent, which passes it to each worker."""
    assert unit_values(SYSTEMD / "keyproxy.service", "ExecReload") == ["/bin/kill -HUP $MAINPID"]


@pytest.mark.parametrize(
    ("kind", "name", "account"),
    [("Deployment", "keyproxy", "keyproxy"), ("CronJob", "keyproxy-rotate", "keyproxy-rotate")],
)
def test_vault_login_uses_a_projected_token_for_vault(kind: str, name: str, account: str) -> None:
    """Each workload has its own service account and logs in to Vault with a projected token
    whose audience is "vault", at the path its configuration's vault.auth.jwt_file names."""
    resource = resources()[(kind, name)]
    spec = pod_spec(resource)
    assert spec["serviceAccountName"] == account
    assert ("ServiceAccount", account) in resources()
    files = mounted_files(resource)
    cfg = yaml.safe_load(files[config_path(resource)])
    auth = cfg["vault"]["auth"]
    assert auth["method"] == "kubernetes"
    assert auth["jwt_file"] in files
    assert files[auth["jwt_file"]] == "<serviceAccountToken audience=vault>"


def test_cronjob_rotates_due_keys_without_overlap() -> None:
    """The CronJob runs `keyproxy rotate --due`, forbids concurrent runs and never retries a
    failed run by itself (the next schedule does)."""
    cron = resources()[("CronJob", "keyproxy-rotate")]
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    job = cron["spec"]["jobTemplate"]["spec"]
    assert job["backoffLimit"] == 0
    (container,) = pod_spec(cron)["containers"]
    parsed = parse_keyproxy_args(container["args"], "CronJob")
    assert (parsed.command, parsed.due, parsed.route) == ("rotate", True, None)
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]


def test_selectors_find_the_proxy_pods() -> None:
    """The Service, PodDisruptionBudget, NetworkPolicy and HorizontalPodAutoscaler all point
    at the Deployment's pods."""
    r = resources()
    labels = r[("Deployment", "keyproxy")]["spec"]["template"]["metadata"]["labels"]
    assert labels == PROXY_LABELS
    assert r[("Deployment", "keyproxy")]["spec"]["selector"]["matchLabels"] == PROXY_LABELS
    assert r[("Service", "keyproxy")]["spec"]["selector"] == PROXY_LABELS
    assert r[("PodDisruptionBudget", "keyproxy")]["spec"]["selector"]["matchLabels"] == labels
    assert r[("NetworkPolicy", "keyproxy")]["spec"]["podSelector"]["matchLabels"] == labels
    target = r[("HorizontalPodAutoscaler", "keyproxy")]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "keyproxy")
    assert r[("HorizontalPodAutoscaler", "keyproxy")]["spec"]["minReplicas"] >= 2
    service_port = r[("Service", "keyproxy")]["spec"]["ports"][0]
    assert service_port["targetPort"] == "http"


def test_network_policy_fences_the_proxy() -> None:
    """Ingress only from namespaces labelled as agent namespaces, to the proxy port, and from
    the monitoring namespace, to the admin port; egress only to Vault (8200), DNS (53), the
    state store (6379) and upstream APIs (443)."""
    policy = resources()[("NetworkPolicy", "keyproxy")]["spec"]
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"}
    rule, monitoring = policy["ingress"]
    (source,) = rule["from"]
    assert set(source) == {"namespaceSelector"}
    assert source["namespaceSelector"]["matchLabels"] == {"keyproxy.io/agents": "true"}
    assert [p["port"] for p in rule["ports"]] == [8080]
    (source,) = monitoring["from"]
    assert source["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "monitoring"
    }
    assert [p["port"] for p in monitoring["ports"]] == [9090]
    deployment = resources()[("Deployment", "keyproxy")]
    (container,) = pod_spec(deployment)["containers"]
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {
        "http": 8080,
        "admin": 9090,
    }
    egress_ports = {(p["protocol"], p["port"]) for r in policy["egress"] for p in r["ports"]}
    assert egress_ports == {("TCP", 8200), ("UDP", 53), ("TCP", 53), ("TCP", 443), ("TCP", 6379)}
    for r in policy["egress"]:
        assert r["to"], "an egress rule without `to` would allow every destination"


def config_path(resource: dict[str, Any]) -> str:
    (container,) = pod_spec(resource)["containers"]
    path: str = parse_keyproxy_args(container["args"], resource["kind"]).config
    return path


def mounted_files(resource: dict[str, Any]) -> dict[str, str]:
    """Absolute path in the container → content (ConfigMap data) or a description of a
    projected service-account token, for the ConfigMaps defined in this base."""
    configmaps = {n: d.get("data", {}) for (k, n), d in resources().items() if k == "ConfigMap"}
    spec = pod_spec(resource)
    (container,) = spec["containers"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    files: dict[str, str] = {}
    for mount in container["volumeMounts"]:
        volume = volumes[mount["name"]]
        sources = volume.get("projected", {}).get("sources", [])
        if "configMap" in volume:
            sources = [{"configMap": volume["configMap"]}]
        for source in sources:
            if "serviceAccountToken" in source:
                token = source["serviceAccountToken"]
                path = f"{mount['mountPath']}/{token['path']}"
                files[path] = f"<serviceAccountToken audience={token['audience']}>"
            elif "configMap" in source:
                data = configmaps.get(source["configMap"]["name"], {})
                for item in source["configMap"].get("items", []):
                    path = f"{mount['mountPath']}/{item['path']}"
                    files[path] = data.get(item["key"], "<from a ConfigMap the operator creates>")
    return files


@pytest.mark.parametrize(
    ("kind", "name"), [("Deployment", "keyproxy"), ("CronJob", "keyproxy-rotate")]
)
def test_kubernetes_config_passes_keyproxy_check(
    kind: str, name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The configuration file a workload's args name is mounted from the example ConfigMap
    and passes `keyproxy check` with the VAULT_ADDR the workload sets; every file it names
    (Vault token, issuer keys) is mounted too."""
    resource = resources()[(kind, name)]
    files = mounted_files(resource)
    path = config_path(resource)
    assert path in files, f"{kind} names {path}, which no volume provides"
    local = tmp_path / Path(path).name
    local.write_text(files[path], encoding="utf-8")
    (container,) = pod_spec(resource)["containers"]
    env = {e["name"]: e["value"] for e in container.get("env", [])}
    assert "VAULT_ADDR" in env
    check_config(local, monkeypatch, {"VAULT_ADDR": env["VAULT_ADDR"]})
    cfg = config.load(local, env={"VAULT_ADDR": env["VAULT_ADDR"]})
    if kind == "Deployment":
        for issuer in cfg.identity:
            assert issuer.jwks_file is None or str(issuer.jwks_file) in files


def test_configmap_proxy_and_rotation_configs_agree() -> None:
    """The proxy's and the rotation job's configurations have the same routes and issuers and
    differ in their Vault role, so rotation rotates exactly what the proxy serves."""
    data = resources()[("ConfigMap", "keyproxy-config")]["data"]
    proxy, rotation = yaml.safe_load(data["keyproxy.yaml"]), yaml.safe_load(data["rotation.yaml"])
    assert proxy["routes"] == rotation["routes"]
    assert proxy["identity"] == rotation["identity"]
    assert proxy["vault"]["auth"]["role"] == "keyproxy-proxy"
    assert rotation["vault"]["auth"]["role"] == "keyproxy-rotation"


# ---------------------------------------------------------------------------- systemd


def unit_entries(path: Path) -> list[tuple[str, str, str]]:
    """(section, key, value) for every assignment, in order (systemd allows repeated keys)."""
    section, out = "", []
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.append((section, key.strip(), value.strip()))
    return out


def unit_values(path: Path, key: str) -> list[str]:
    return [v for _, k, v in unit_entries(path) if k == key]


UNITS = ("keyproxy.service", "keyproxy-rotate.service", "keyproxy-rotate.timer")
SERVICES = ("keyproxy.service", "keyproxy-rotate.service")


def installed_copies(tmp_path: Path) -> list[Path]:
    """The units with /opt/keyproxy/bin/keyproxy pointed at this checkout's keyproxy, since
    verify insists that the executables exist."""
    out = []
    for name in UNITS:
        text = (SYSTEMD / name).read_text(encoding="utf-8")
        copy = tmp_path / name
        copy.write_text(text.replace("/opt/keyproxy/bin/keyproxy", str(BIN / "keyproxy")))
        out.append(copy)
    return out


def systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        pytest.skip("systemd-analyze is not installed on this machine")
    return found


def test_systemd_units_pass_verify(tmp_path: Path) -> None:
    """`systemd-analyze verify` accepts the units without a single warning."""
    done = run(systemd_analyze(), "verify", *map(str, installed_copies(tmp_path)))
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == "", done.stderr
    done = run(systemd_analyze(), "verify", str(tmp_path / "missing.service"))
    assert done.returncode != 0, "verify must fail on a unit it cannot load"


@pytest.mark.parametrize("name", SERVICES)
def test_systemd_services_are_sandboxed(name: str, tmp_path: Path) -> None:
    """Each service runs as the dedicated user with the hardening the issue names, and
    `systemd-analyze security` rates its exposure 2.0 or better (0 is best, 10 worst)."""
    path = SYSTEMD / name
    values = {k: v for _, k, v in unit_entries(path)}
    assert values["User"] == "keyproxy"
    assert values["ProtectSystem"] == "strict"
    assert values["NoNewPrivileges"] == "yes"
    assert values["PrivateTmp"] == "yes"
    assert values["CapabilityBoundingSet"] == ""
    if name == "keyproxy.service":
        assert values["Restart"] == "on-failure"
    sysusers = (SYSTEMD / "keyproxy.sysusers.conf").read_text(encoding="utf-8")
    assert re.search(r"^u keyproxy ", sysusers, re.M)
    copies = {p.name: p for p in installed_copies(tmp_path)}
    done = run(systemd_analyze(), "security", "--offline=true", "--threshold=20", str(copies[name]))
    assert done.returncode == 0, done.stdout[-3000:]


def test_systemd_timer_starts_the_rotation_service() -> None:
    """The timer runs keyproxy-rotate.service every minute; that service is a oneshot."""
    timer = SYSTEMD / "keyproxy-rotate.timer"
    assert unit_values(timer, "Unit") == ["keyproxy-rotate.service"]
    assert unit_values(timer, "OnCalendar") == ["minutely"]
    assert unit_values(SYSTEMD / "keyproxy-rotate.service", "Type") == ["oneshot"]


@pytest.mark.parametrize("name", SERVICES)
def test_systemd_commands_are_accepted_and_their_configs_check(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every keyproxy command line in the unit is accepted by the real parser; the config it
    names (shipped as deploy/systemd/<file>) passes `keyproxy check`; and the AppRole files
    the config names are exactly the credentials the unit loads (LoadCredential=)."""
    path = SYSTEMD / name
    commands = unit_values(path, "ExecStartPre") + unit_values(path, "ExecStart")
    assert commands
    credentials = {
        f"/run/credentials/{name}/{v.partition(':')[0]}"
        for v in unit_values(path, "LoadCredential")
    }
    for line in commands:
        argv = shlex.split(line)
        assert argv[0] == "/opt/keyproxy/bin/keyproxy"
        parsed = parse_keyproxy_args(argv[1:], f"{name}: {line}")
        shipped = SYSTEMD / Path(parsed.config).name
        assert parsed.config == f"/etc/keyproxy/{shipped.name}"
        assert shipped.is_file()
        check_config(shipped, monkeypatch, {})
        auth = config.load(shipped, env={}).vault.auth
        assert {str(auth.role_id_file), str(auth.secret_id_file)} == credentials
    if name == "keyproxy-rotate.service":
        assert parsed.command == "rotate"
        assert parsed.due
    else:
        assert parsed.command == "serve"
