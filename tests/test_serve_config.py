"""The app builders and the shipped configs, without a cluster: what Serve would deploy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from deploy.app import app, build_app
from deploy.settings import split_args
from lora_cluster import ClusterConfig
from lora_cluster.errors import ConfigError

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def _server(application: Any) -> Any:
    """The LoRAServer deployment inside a built application (ingress → server)."""
    ingress = application._bound_deployment
    assert ingress.name == "OpenAIIngress"
    return ingress.init_args[0]._bound_deployment


def test_builder_reserves_a_placement_group_per_replica() -> None:
    server = _server(build_app(ClusterConfig(model="/m", device="cuda", tp_size=2, ep_size=2),
                               replicas=3, spill_threshold=7))
    assert server.name == "LoRAServer" and server._deployment_config.num_replicas == 3
    bundles = server._replica_config.placement_group_bundles
    assert bundles[0] == {"CPU": 0.1} and len(bundles) == 5
    assert all(b["GPU"] == 1.0 for b in bundles[1:])
    assert server._replica_config.placement_group_strategy == "PACK"
    router = server._deployment_config.request_router_config
    assert router.request_router_class == "deploy.router.AdapterAffinityRouter"
    assert router.request_router_kwargs == {"spill_threshold": 7}
    config = server.init_args[0]
    assert config.device == "cuda" and config.dtype == "bfloat16"  # resolved, not "auto"


def test_cpu_ranks_ask_for_exactly_their_bundle() -> None:
    server = _server(build_app(ClusterConfig(model="/m", device="cpu", num_cpus_per_rank=0.25)))
    bundles = server._replica_config.placement_group_bundles
    assert bundles == [{"CPU": 0.1}, {"CPU": 0.25}]
    assert server.init_args[0].num_cpus_per_rank == 0.25  # what RayRankGroup will request


def test_serve_run_builder_takes_one_dict_of_strings() -> None:
    server = _server(app({"model": "/m", "device": "cpu", "replicas": "2", "max_loras": "4"}))
    assert server._deployment_config.num_replicas == 2 and server.init_args[0].max_loras == 4
    with pytest.raises(ConfigError, match="replicaz"):
        app({"model": "/m", "replicaz": 2})
    # What `serve run deploy.app:app model=...` does with the import path and its arguments.
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    built = call_user_app_builder_with_args_if_necessary(app, {"model": "/m", "device": "cpu"})
    assert _server(built).init_args[0].model == "/m"


@pytest.mark.parametrize("serve_config", ["serve_config.yaml", "kuberay/rayservice.yaml"])
def test_shipped_configs_validate(serve_config: str) -> None:
    docs = list(yaml.safe_load_all((DEPLOY / serve_config).read_text()))
    if serve_config.startswith("kuberay"):
        service = docs[-1]
        assert service["kind"] == "RayService"
        config = yaml.safe_load(service["spec"]["serveConfigV2"])
    else:
        config = docs[0]
    schema = ServeDeploySchema.model_validate(config)
    (application,) = schema.applications
    assert application.import_path == "deploy.app:app"
    cluster, settings = split_args(application.args)
    assert cluster.device == "cuda" and cluster.adapter_roots == ("/adapters",)
    assert settings.replicas >= 1


def test_kuberay_spells_out_gpus_and_the_adapter_volume() -> None:
    docs = list(yaml.safe_load_all((DEPLOY / "kuberay" / "rayservice.yaml").read_text()))
    kinds = {d["kind"]: d for d in docs}
    assert kinds["PersistentVolumeClaim"] and "Secret" in kinds
    cluster = kinds["RayService"]["spec"]["rayClusterConfig"]
    args = yaml.safe_load(kinds["RayService"]["spec"]["serveConfigV2"])["applications"][0]["args"]
    ranks = args["tp_size"] * args["ep_size"]
    (workers,) = cluster["workerGroupSpecs"]
    container = workers["template"]["spec"]["containers"][0]
    gpus = int(container["resources"]["limits"]["nvidia.com/gpu"])
    assert gpus % ranks == 0 and workers["replicas"] * gpus // ranks >= args["replicas"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts["/adapters"] == "adapters" and "/models" in mounts
    volumes = {v["name"]: v for v in workers["template"]["spec"]["volumes"]}
    assert volumes["adapters"]["persistentVolumeClaim"]["claimName"] == "lora-cluster-adapters"
    env = {e["name"] for e in container["env"]}
    assert "LORA_CLUSTER_ADMIN_TOKEN" in env
