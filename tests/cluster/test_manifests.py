"""cluster/: KubeRay and cluster-launcher manifests parse, carry required fields and match the
pins."""

import json
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"


def ray_pin() -> str:
    text = (ROOT / "pyproject.toml").read_text()
    return re.search(r'"ray\[[^\]]+\]==([0-9.]+)"', text).group(1)


def load(name):
    return yaml.safe_load((CLUSTER / name).read_text())


AUTH_SECRET = "raydapt-ray-auth"


def env_vars(obj):
    """Every container env entry anywhere in a manifest."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == "env" and isinstance(v, list):
                yield from v
            else:
                yield from env_vars(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from env_vars(v)


def images(obj):
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == "image" and isinstance(v, str):
                yield v
            else:
                yield from images(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from images(v)


@pytest.mark.parametrize(
    "name,kind",
    [
        ("raycluster.yaml", "RayCluster"),
        ("rayjob.yaml", "RayJob"),
        ("rayservice.yaml", "RayService"),
    ],
)
def test_kuberay_manifest(name, kind):
    doc = load(name)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == kind and doc["metadata"]["name"]
    spec = doc["spec"]
    cluster = {
        "RayCluster": spec,
        "RayJob": spec.get("rayClusterSpec"),
        "RayService": spec.get("rayClusterConfig"),
    }[kind]
    assert cluster["rayVersion"] == ray_pin()
    assert cluster["headGroupSpec"]["template"]["spec"]["containers"]
    for group in cluster["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        res = group["template"]["spec"]["containers"][0]["resources"]
        assert res["limits"]["nvidia.com/gpu"] == res["requests"]["nvidia.com/gpu"]
    # token authentication on, the token from a Secret the operator does not generate per cluster
    auth = cluster["authOptions"]
    assert auth["mode"] == "token" and auth["secretName"] == AUTH_SECRET, auth
    assert (
        f"kubectl create secret generic {AUTH_SECRET} --from-literal=auth_token="
        in (CLUSTER / name).read_text()
    )
    # nothing turns it off again or puts a token in the manifest itself
    for env in env_vars(doc):
        assert not (env["name"] == "RAY_AUTH_MODE" and env.get("value") != "token"), env
        assert not (env["name"] == "RAY_AUTH_TOKEN" and "value" in env), "a token in plain text"
    assert "RAY_AUTH_MODE" not in json.dumps(
        cluster.get("headGroupSpec", {}).get("rayStartParams", {})
    )
    imgs = list(images(doc))
    assert imgs and all(f"ray{ray_pin()}" in i for i in imgs), imgs
    if kind == "RayJob":
        assert "python -m raydapt run jobs/" in spec["entrypoint"]
        job = spec["entrypoint"].split()[-1]
        assert (ROOT / job).is_file(), job
    if kind == "RayService":
        app = yaml.safe_load(spec["serveConfigV2"])["applications"][0]
        module, attr = app["import_path"].split(":")
        mod = __import__(module, fromlist=[attr])
        assert callable(getattr(mod, attr)), app["import_path"]


def test_rayservice_builder_binds_the_app(tiny_model_dir, monkeypatch):
    """The builder the RayService manifest names builds a real Serve application."""
    from ray.serve import Application

    from raydapt.errors import UserError
    from raydapt.serve.app import build_from_env

    monkeypatch.delenv("RAYDAPT_SERVE_MODEL", raising=False)
    with pytest.raises(UserError, match="RAYDAPT_SERVE_MODEL"):
        build_from_env({})
    monkeypatch.setenv("RAYDAPT_SERVE_MODEL", str(tiny_model_dir))
    assert isinstance(build_from_env({"max_replicas": "2"}), Application)


def test_launcher_yaml():
    doc = load("launcher-aws.yaml")
    for key in (
        "cluster_name",
        "provider",
        "available_node_types",
        "head_node_type",
        "max_workers",
    ):
        assert key in doc, key
    assert doc["head_node_type"] in doc["available_node_types"]
    assert f"ray{ray_pin()}" in doc["docker"]["image"]
    # token authentication on every node, the token copied in from a file (not in the YAML)
    opts = doc["docker"]["run_options"]
    assert "--env RAY_AUTH_MODE=token" in opts, opts
    path = next(o.split("=", 1)[1] for o in opts if o.startswith("--env RAY_AUTH_TOKEN_PATH="))
    assert path in doc["file_mounts"], doc["file_mounts"]
    assert not any("RAY_AUTH_TOKEN=" in o for o in opts)


def test_dockerfile_base_matches_pin():
    text = (CLUSTER / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{ray_pin()}-" in text
