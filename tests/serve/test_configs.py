"""The Serve config files deploy the same application, with valid settings and autoscaling."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from serve.settings import ServeSettings

CONFIGS = sorted((Path(__file__).parents[2] / "serve" / "configs").glob("*.yaml"))
DEPLOYMENTS = {"Ingress", "TextEncoder", "ImageEncoder", "GalleryIndex", "Generator", "RegistryWatcher"}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_file_is_a_valid_serve_config_of_our_app(path):
    schema = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    (app,) = schema.applications
    module, _, attr = app.import_path.partition(":")
    assert callable(getattr(importlib.import_module(module), attr))
    ServeSettings(**app.args)  # the args are exactly the settings: a typo would fail here
    assert {d.name for d in app.deployments} == DEPLOYMENTS


def test_cluster_generator_gets_a_gpu_and_scales_to_zero():
    schema = ServeDeploySchema.model_validate(yaml.safe_load((CONFIGS[0].parent / "cluster.yaml").read_text()))
    gen = next(d for d in schema.applications[0].deployments if d.name == "Generator")
    assert gen.ray_actor_options.num_gpus == 1
    assert gen.autoscaling_config["min_replicas"] == 0


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_replicas_that_reserve_a_gpu_compute_on_it(path):
    """On a GPU node, each replica's device under the file's settings: the GPU where its ray_actor_options
    reserve one (cluster.yaml's Generator), the CPU elsewhere (never a reserved GPU left idle)."""
    from serve.deployments import replica_device

    (app,) = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text())).applications
    settings = ServeSettings(**app.args)
    for d in app.deployments:
        gpus = getattr(d.ray_actor_options, "num_gpus", None)  # unset options are a sentinel without it
        gpu_ids = [0] if gpus else []  # what ray.get_gpu_ids() gives such a replica
        assert replica_device(settings.device, gpu_ids, cuda_available=True) == ("cuda" if gpus else "cpu"), d.name
