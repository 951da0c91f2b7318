"""cluster.yaml is a valid Ray autoscaler config (checked offline against Ray's own JSON schema)."""

import json
from pathlib import Path

import jsonschema
import ray.autoscaler
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _config():
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_cluster_yaml_validates_against_rays_schema():
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(_config(), schema)


def test_head_runs_no_tasks_and_workers_autoscale():
    cfg = _config()
    types = cfg["available_node_types"]
    assert types[cfg["head_node_type"]]["resources"] == {"CPU": 0}
    assert "--num-cpus=0" in " ".join(cfg["head_start_ray_commands"])
    gpu = types["gpu_worker"]
    assert gpu["min_workers"] == 0 < gpu["max_workers"] and gpu["node_config"]["InstanceType"].startswith("g")
    assert types["cpu_worker"]["max_workers"] > 0
    assert any("pip install" in c and "tokenfactory" in c for c in cfg["setup_commands"])
