"""``meshc explain``: the policies that shape a service's bundle, in precedence order, and the losers.

On the seed (``policies/``), its targetRef twin, and a mixed repo committed in a real Git repo in
a temp dir (read with ``--ref`` while the work tree says something else). The explanation's rules
are checked against the compiled bundle itself, so a drift between the two fails here.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_git_ref import git, meshc
from test_properties import _layout, _sources, policy_sets

from compiler.cli import main
from compiler.explain import explain as explain_data
from compiler.explain import line_finder
from compiler.migrate_cli import convert_repo
from compiler.pipeline import compile_dir, compile_resolved
from compiler.source import SourceSet, read_policy_dir

REPO = Path(__file__).resolve().parents[2]
POLICIES = REPO / "policies"
TWIN = REPO / "docs" / "examples" / "targetref"


def _magnanimo_timeout(name: str, connect: str) -> str:
    return f"""---
apiVersion: kuma.io/v1alpha1
kind: MeshTimeout
metadata:
  name: {name}
  labels:
    kuma.io/mesh: default
spec:
  targetRef:
    kind: MeshService
    name: magnanimo
  to:
    - targetRef:
        kind: MeshService
        name: benigno
      default:
        connectionTimeout: {connect}
"""


MESH_TIMEOUTS = """apiVersion: kuma.io/v1alpha1
kind: MeshTimeout
metadata:
  name: all-timeouts
  labels:
    kuma.io/mesh: default
spec:
  targetRef:
    kind: Mesh
  to:
    - targetRef:
        kind: Mesh
      default:
        connectionTimeout: 3s
        idleTimeout: 30s
""" + _magnanimo_timeout("magnanimo-timeouts", "1s")
TIE = _magnanimo_timeout("magnanimo-timeout-a", "4s")


def explain(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    capsys.readouterr()
    code = main(["explain", *args, "--format", "json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    data: dict[str, Any] = json.loads(out)
    return data


def field(x: dict[str, Any], dst: str | None, name: str) -> dict[str, Any]:
    sections = (
        x["inbound"] if dst is None else next(o for o in x["outbound"] if o["destination"] == dst)["kinds"]
    )
    found: dict[str, Any] = next(s for s in sections if s["field"] == name)
    return found


def who(items: list[dict[str, Any]]) -> list[tuple[str, str, str, int]]:
    return [(p["kind"], p["name"], p["file"], p["line"]) for p in items]


def bundle_rules(policy_dir: Path, key: str, dst: str | None, name: str) -> Any:
    bundle = json.loads(compile_dir(policy_dir).bundles[key])
    return bundle["inbound"][name] if dst is None else bundle["outbound"][dst][name]


def test_the_seed_names_each_policy_at_its_line(capsys: pytest.CaptureFixture[str]) -> None:
    x = explain(capsys, "magnanimo", str(POLICIES))
    assert (x["format"], x["bundle"], x["service_doc"]["line"]) == (1, "default/magnanimo", 3)
    assert x["digest"] == compile_dir(POLICIES).digests["default/magnanimo"]
    p = str(POLICIES.relative_to(REPO))  # paths as the compile reports them (from the repo root)
    expected = {
        "route": ("TrafficRoute", "route-1", f"{p}/traffic-route.yaml", 10),
        "timeout": ("Timeout", "benigno-timeout", f"{p}/benigno-timeout.yaml", 10),
        "retry": ("Retry", "benigno-retry", f"{p}/benigno-retry.yaml", 10),
    }
    for name, policy in expected.items():
        s = field(x, "benigno", name)
        assert who(s["policies"]) == [policy]
        assert s["policies"][0]["dialect"] == "legacy" and s["shadowed"] == []
        assert s["rules"] == bundle_rules(POLICIES, "default/magnanimo", "benigno", name)
        assert s["default_rule"] is None  # the policy's rule is unconditional: no default closes it
    perms = field(x, None, "permissions")
    assert who(perms["policies"]) == [
        ("TrafficPermission", "gateway-to-magnanimo", f"{p}/permission-gateway-magnanimo.yaml", 13)
    ]
    assert perms["policies"][0]["peer"] == {"kuma.io/service": "edge-gateway"}


def test_a_destination_no_policy_names_shows_the_mesh_default(capsys: pytest.CaptureFixture[str]) -> None:
    x = explain(capsys, "benigno", str(POLICIES), "--to", "magnanimo")
    (out,) = x["outbound"]
    assert out["source"] == "*"  # benigno's bundle has no entry: its sidecar reads the mesh bundle's
    timeout = field(x, "magnanimo", "timeout")
    assert timeout["policies"] == [] and timeout["default_rule"] == 0
    assert timeout["rules"][0]["conf"]["connect_timeout_ms"] == 5000


def test_the_twin_explains_the_same_rules_by_targetref_items(capsys: pytest.CaptureFixture[str]) -> None:
    legacy = explain(capsys, "magnanimo", str(POLICIES))
    twin = explain(capsys, "magnanimo", str(TWIN))
    p = str(TWIN.relative_to(REPO))
    t = field(twin, "benigno", "timeout")
    assert who(t["policies"]) == [("MeshTimeout", "benigno-timeout", f"{p}/benigno-timeout.yaml", 13)]
    (item,) = t["policies"]
    assert (item["dialect"], item["targetRef"], item["item"]) == ("targetRef", "Mesh", "to[0] MeshService")
    assert item["sets"] == ["connectionTimeout", "http.requestTimeout"] and item["overridden"] == []
    route = field(twin, "benigno", "route")["policies"][0]
    assert (route["name"], route["line"], route["targetRef"]) == ("route-1", 15, "MeshSubset")
    for name in ("route", "timeout", "retry", "circuit_breaker", "health_check"):
        assert field(twin, "benigno", name)["rules"] == field(legacy, "benigno", name)["rules"], name


def test_a_gateway_lists_its_gateway_policies(capsys: pytest.CaptureFixture[str]) -> None:
    x = explain(capsys, "edge-gateway", str(POLICIES))
    assert x["inbound"] is None
    names = [(p["kind"], p["name"], p["line"]) for p in x["gateway"]["policies"]]
    assert ("MeshGateway", "edge", 3) in names and ("MeshGatewayRoute", "route1", 3) in names
    bundle = json.loads(compile_dir(POLICIES).bundles["default/edge-gateway"])
    assert x["gateway"]["conf"] == bundle["gateway"]
    ((listener,),) = [lst["rules"] for lst in x["gateway"]["listeners"]]
    assert (listener["kind"], listener["name"], listener["line"], listener["rule"]) == (
        "MeshGatewayRoute", "route1", 16, 0
    )  # fmt: skip
    assert listener["match"] == bundle["gateway"]["listeners"][0]["rules"][0]["matches"]
    # The twin's MeshHTTPRoute on the gateway: the line of its match as written (to[0].rules[0].matches[0]).
    twin = explain(capsys, "edge-gateway", str(TWIN))
    ((rule,),) = [lst["rules"] for lst in twin["gateway"]["listeners"]]
    assert (rule["kind"], rule["line"]) == ("MeshHTTPRoute", 18)


def test_a_more_specific_legacy_policy_shadows_a_broader_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = tmp_path / "policies"
    shutil.copytree(POLICIES, repo)
    specific = (POLICIES / "benigno-timeout.yaml").read_text().replace('"*"', "magnanimo")
    (repo / "magnanimo-timeout.yaml").write_text(specific.replace("name: benigno-timeout", "name: mb"))
    x = explain(capsys, "magnanimo", str(repo), "--to", "benigno")
    t = field(x, "benigno", "timeout")
    assert [p["name"] for p in t["policies"]] == ["mb"]
    (sh,) = t["shadowed"]
    assert (sh["name"], sh["line"], sh["by"]["name"], sh["code"]) == ("benigno-timeout", 10, "mb", None)
    assert sh["reason"] == "more specific selectors: 2 exact and 0 wildcard tag(s) > 1 and 1"


def _mixed(root: Path) -> Path:
    """The seed plus targetRef timeouts (a Mesh-wide one, two that tie by name), committed."""
    git(root, "init", "-q")
    repo = root / "policies"
    shutil.copytree(POLICIES, repo)
    (repo / "mesh-timeouts.yaml").write_text(MESH_TIMEOUTS + TIE)
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "mixed")
    # The work tree drops the tie: --ref HEAD must still see it.
    (repo / "mesh-timeouts.yaml").write_text(MESH_TIMEOUTS)
    return repo


def test_a_mixed_repo_at_a_ref_gives_the_order_lines_and_reasons(tmp_path: Path) -> None:
    repo = _mixed(tmp_path)
    proc = meshc(repo, "explain", "magnanimo", ".", "--ref", "HEAD", "--to", "benigno", "--format", "json")
    assert proc.returncode == 0, proc.stderr
    t = field(json.loads(proc.stdout), "benigno", "timeout")
    f = "policies/mesh-timeouts.yaml"
    assert who(t["policies"]) == [
        ("MeshTimeout", "magnanimo-timeout-a", f, 45),
        ("MeshTimeout", "all-timeouts", f, 11),
    ]
    top, mesh_wide = t["policies"]
    assert top["sets"] == ["connectionTimeout"] and top["overridden"] == []
    assert mesh_wide["sets"] == ["connectionTimeout", "idleTimeout"]
    assert mesh_wide["overridden"] == [
        {
            "field": "connectionTimeout",
            "by": "MeshTimeout magnanimo-timeout-a",
            "reason": "more specific targetRef MeshService > Mesh",
        }
    ]
    tie, legacy = t["shadowed"]
    assert (tie["name"], tie["line"], tie["by"]["name"], tie["code"]) == (
        "magnanimo-timeouts", 28, "magnanimo-timeout-a", "W3004"
    )  # fmt: skip
    assert "name-order tie: 'magnanimo-timeout-a' sorts before 'magnanimo-timeouts'" in tie["reason"]
    assert (legacy["kind"], legacy["name"], legacy["file"], legacy["line"]) == (
        "Timeout", "benigno-timeout", "policies/benigno-timeout.yaml", 10
    )  # fmt: skip
    assert (legacy["code"], legacy["by"]["name"]) == ("W3005", "magnanimo-timeout-a")
    assert legacy["reason"] == "a targetRef policy shadows the legacy one (as in Kuma)"
    assert t["rules"][0]["conf"]["connect_timeout_ms"] == 4000
    assert t["rules"][0]["conf"]["tcp_idle_timeout_ms"] == 30000  # all-timeouts' idleTimeout is kept
    # Retries stay legacy (nothing targetRef configures them): no shadowing there.
    assert [p["name"] for p in field(json.loads(proc.stdout), "benigno", "retry")["policies"]] == [
        "benigno-retry"
    ]

    work = meshc(repo, "explain", "magnanimo", ".", "--to", "benigno", "--format", "json")
    assert work.returncode == 0, work.stderr
    t = field(json.loads(work.stdout), "benigno", "timeout")
    assert [p["name"] for p in t["policies"]] == ["magnanimo-timeouts", "all-timeouts"]
    assert [s["code"] for s in t["shadowed"]] == ["W3005"]


def test_the_text_fits_100_columns_and_says_why(tmp_path: Path) -> None:
    repo = _mixed(tmp_path)
    proc = meshc(repo, "explain", "magnanimo", ".", "--ref", "HEAD")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert max(len(line) for line in lines) <= 100
    text = " ".join(x.strip() for x in lines)
    assert "shadowed: MeshTimeout magnanimo-timeouts  policies/mesh-timeouts.yaml:28" in text
    assert "a targetRef policy shadows the legacy one (as in Kuma) [W3005]" in text
    assert "outbound -> benigno" in text and "W3004" in text


def test_an_unknown_service_names_the_closest_and_exits_2() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "compiler.cli", "explain", "benign", str(POLICIES)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2
    assert "no service 'benign'" in proc.stderr and "closest: benigno" in proc.stderr
    assert proc.stdout == ""


def test_a_repo_with_errors_is_not_explained(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    repo = tmp_path / "policies"
    shutil.copytree(POLICIES, repo)
    (repo / "broken.yaml").write_text("kind: Timeout\nmesh: default\nname: x\nsources: 3\n")
    capsys.readouterr()
    assert main(["explain", "benigno", str(repo)]) == 1
    assert "fix them first" in capsys.readouterr().err


def test_a_load_balancer_and_a_route_both_shape_the_route_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = tmp_path / "twin"
    shutil.copytree(TWIN, repo)
    (repo / "lb.yaml").write_text(
        "apiVersion: kuma.io/v1alpha1\nkind: MeshLoadBalancingStrategy\n"
        "metadata: {name: benigno-lb, labels: {kuma.io/mesh: default}}\n"
        "spec:\n  targetRef: {kind: Mesh}\n"
        "  to: [{targetRef: {kind: MeshService, name: benigno}, default: {loadBalancer: {type: Random}}}]\n"
    )
    route = field(explain(capsys, "magnanimo", str(repo), "--to", "benigno"), "benigno", "route")
    assert [(p["kind"], p["name"], p["targetRef"]) for p in route["policies"]] == [
        ("MeshHTTPRoute", "route-1", "MeshSubset"),
        ("MeshLoadBalancingStrategy", "benigno-lb", "Mesh"),
    ]
    assert route["policies"][1]["sets"] == ["loadBalancer.type"] and route["shadowed"] == []
    (rule,) = route["rules"]
    assert rule["conf"]["load_balancer"]["type"] == "random" and len(rule["conf"]["split"]) == 2


INBOUND_REPO = """apiVersion: kuma.io/v1alpha1
kind: Mesh
metadata: {name: default}
spec: {mtls: {enabledBackend: ca, backends: [{name: ca, type: builtin}]}}
---
apiVersion: meshc/v1alpha1
kind: Service
mesh: default
metadata: {name: web}
spec: {port: 80}
---
apiVersion: meshc/v1alpha1
kind: Service
mesh: default
metadata: {name: api}
spec: {port: 81}
---
apiVersion: kuma.io/v1alpha1
kind: MeshTrafficPermission
metadata: {name: allow-all, labels: {kuma.io/mesh: default}}
spec:
  targetRef: {kind: Mesh}
  rules: [{default: {allow: [{spiffeID: {type: Prefix, value: 'spiffe://default'}}]}}]
---
apiVersion: kuma.io/v1alpha1
kind: MeshTimeout
metadata: {name: api-in, labels: {kuma.io/mesh: default}}
spec:
  targetRef: {kind: MeshService, name: api}
  rules:
    - default: {connectionTimeout: 2s, http: {requestTimeout: 3s}}
    - matches: [{spiffeID: {type: Exact, value: 'spiffe://default/web'}}]
      default: {http: {requestTimeout: 1s}}
---
apiVersion: kuma.io/v1alpha1
kind: MeshCircuitBreaker
metadata: {name: api-cb, labels: {kuma.io/mesh: default}}
spec:
  targetRef: {kind: MeshService, name: api}
  from: [{targetRef: {kind: Mesh}, default: {connectionLimits: {maxConnections: 2}}}]
---
apiVersion: kuma.io/v1alpha1
kind: MeshAccessLog
metadata: {name: all-in, labels: {kuma.io/mesh: default}}
spec:
  targetRef: {kind: Mesh}
  from: [{targetRef: {kind: Mesh}, default: {backends: [{type: File, file: {path: /tmp/in.log}}]}}]
"""


def test_the_inbound_timeout_limits_and_logs_are_explained(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = tmp_path / "policies"
    repo.mkdir()
    (repo / "p.yaml").write_text(INBOUND_REPO)
    x = explain(capsys, "api", str(repo))
    timeout = field(x, None, "timeout")
    assert [(p["name"], p["item"], p["rule"]) for p in timeout["policies"]] == [
        ("api-in", "rules[1] spiffeID Exact spiffe://default/web", 0),
        ("api-in", "rules[0] all callers", 0),
        ("api-in", "rules[0] all callers", 1),
    ]
    assert [r["peer"] for r in timeout["rules"]] == [{"kuma.io/service": "web"}, {}]
    assert timeout["policies"][1]["overridden"][0]["field"] == "http.requestTimeout"
    cb = field(x, None, "circuit_breaker")
    assert [(p["name"], p["line"]) for p in cb["policies"]] == [("api-cb", 40)]
    assert cb["rules"][0]["conf"]["thresholds"]["max_connections"] == 2
    log = field(x, None, "traffic_log")
    assert [p["name"] for p in log["policies"]] == ["all-in"]
    assert log["rules"][0]["conf"]["backend"]["path"] == "/tmp/in.log"
    assert [s["field"] for s in x["inbound"]] == [
        "circuit_breaker", "fault_injection", "permissions", "rate_limit", "timeout", "traffic_log"
    ]  # fmt: skip
    web = explain(capsys, "web", str(repo))
    assert field(web, None, "timeout")["rules"] == [] and field(web, None, "traffic_log")["rules"]


def _repos() -> list[Path]:
    fixtures = Path(__file__).resolve().parent / "fixtures" / "good"
    return [POLICIES, TWIN, *sorted(p for p in fixtures.iterdir() if p.is_dir())]


def _accounted(src: SourceSet, read: Callable[[str], str]) -> int:
    """Explain every service of a compiled repo: the explanation's rules are the bundle's, and
    each rule is one a listed policy produced or meshc's default (nothing unexplained, nothing
    invented); every file:line is a line of that file. Returns the number of policies named."""
    result, resolved, parsed = compile_resolved(src)
    assert not result.errors, [(d.file, d.message) for d in result.diagnostics if d.severity == "error"]
    lines, named = line_finder(parsed), 0
    for mesh, r in resolved.items():
        for service in r.info.services:
            x = explain_data(result, resolved, mesh, service, lines)
            bundle = json.loads(result.bundles[f"{mesh}/{service}"])
            # The targetRef-only inbound fields are left out of a bundle while empty.
            sections = [(s, bundle["inbound"].get(s["field"], [])) for s in x["inbound"] or ()]
            for o in x["outbound"]:
                key = f"{mesh}/{service}" if o["source"] != "*" else mesh
                b = json.loads(result.bundles[key])
                dest = (b["outbound"] if o["source"] != "*" else b["destinations"])[o["destination"]]
                sections += [(s, dest[s["field"]]) for s in o["kinds"]]
            for s, rules in sections:
                assert s["rules"] == rules, (service, s["field"])
                produced = {p["rule"] for p in s["policies"]} | {s["default_rule"]}
                assert set(range(len(rules))) <= produced, (service, s["field"], s)
                for p in [*s["policies"], *s["shadowed"]]:
                    text = read(p["file"]).splitlines()
                    assert 1 <= p["line"] <= len(text) and text[p["line"] - 1].strip(), p
                    named += 1
    return named


@pytest.mark.parametrize("repo", _repos(), ids=lambda p: p.name)
def test_every_rule_of_every_bundle_is_accounted_for(repo: Path) -> None:
    assert _accounted(read_policy_dir(repo), lambda f: (REPO / f).read_text()) > 0  # paths from the root


@settings(max_examples=15, derandomize=True, database=None, deadline=None)
@given(docs=policy_sets(), forms=st.lists(st.booleans(), min_size=1, max_size=4), half=st.booleans())
def test_generated_mixed_repos_are_explained(
    docs: list[dict[str, Any]], forms: list[bool], half: bool
) -> None:
    """Generated legacy repos with half their files converted (both dialects on the same pairs)."""
    files = _layout(docs, [0, 1, 2, 3], forms, "p")
    converted, _ = convert_repo(files)
    mixed = {
        k: (converted[k] if (i % 2 == 0) == half else v) for i, (k, v) in enumerate(sorted(files.items()))
    }
    _accounted(_sources(mixed), mixed.__getitem__)


def test_a_service_in_two_meshes_needs_its_mesh_and_an_unknown_destination_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = tmp_path / "policies"
    repo.mkdir()
    docs = []
    for mesh in ("default", "other"):
        docs.append(f"apiVersion: kuma.io/v1alpha1\nkind: Mesh\nmetadata: {{name: {mesh}}}\nspec: {{}}\n")
        docs.append(
            f"apiVersion: meshc/v1alpha1\nkind: Service\nmesh: {mesh}\n"
            "metadata: {name: web}\nspec: {port: 80}\n"
        )
    (repo / "catalog.yaml").write_text("---\n".join(docs))
    capsys.readouterr()
    assert main(["explain", "web", str(repo)]) == 2
    assert "in several meshes; name one of default/web, other/web" in capsys.readouterr().err
    x = explain(capsys, "other/web", str(repo))
    assert (x["mesh"], x["bundle"]) == ("other", "other/web")
    assert main(["explain", "other/web", str(repo), "--to", "nowhere"]) == 2
    assert "has no outbound destination 'nowhere'" in capsys.readouterr().err
