"""What cannot run here is validated offline: deployment.yaml's structure and the Kubernetes
GPU job template rendered with the job variables a user sets."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import yaml

REPO = Path(__file__).resolve().parent.parent


def test_deployment_yaml_declares_the_deployments_and_pools():
    spec = yaml.safe_load((REPO / "deployment.yaml").read_text())
    deps = {d["name"]: d for d in spec["deployments"]}
    assert set(deps) == {"train", "retrain-weekly", "watch-data", "train-gpu", "batch-predict"}
    assert deps["train-gpu"]["work_pool"]["name"] == "gpu"
    assert deps["train-gpu"]["concurrency_limit"] == 1
    assert {deps[n]["work_pool"]["name"] for n in ("train", "retrain-weekly", "watch-data",
                                                   "batch-predict")} == {"cpu"}
    assert deps["watch-data"]["schedules"][0]["interval"] == 900
    [trigger] = deps["train"]["triggers"]
    assert trigger["expect"] == ["petalflow.dataset.changed"]
    assert trigger["parameters"] == {"params": "{{ event.payload.params }}"}
    sched = deps["retrain-weekly"]["schedules"][0]
    assert sched["cron"] == "0 3 * * 1" and sched["timezone"]
    for dep in deps.values():
        path, func = dep["entrypoint"].split(":")
        assert (REPO / path).exists() and f"def {func}(" in (REPO / path).read_text()
        assert dep["enforce_parameter_schema"] is True


def test_k8s_gpu_job_template_renders_with_user_job_variables():
    from prefect.utilities.templating import apply_values

    template = json.loads((REPO / "infra" / "k8s" / "gpu-base-job-template.json").read_text())
    user = {"image": "registry.example/petalflow-worker:1.2", "gpu_count": 2,
            "gpu_type": "NVIDIA-A100-SXM4-80GB", "memory": "64Gi",
            "env": {"MLFLOW_TRACKING_URI": "https://mlflow.internal"}}
    schema = template["variables"]
    jsonschema.validate(user, schema)
    values = {k: v.get("default") for k, v in schema["properties"].items()}
    values.update(user)
    rendered = apply_values(template["job_configuration"], values)
    pod = rendered["job_manifest"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["image"] == "registry.example/petalflow-worker:1.2"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert container["resources"]["limits"]["memory"] == "64Gi"
    assert pod["nodeSelector"]["nvidia.com/gpu.product"] == "NVIDIA-A100-SXM4-80GB"
    assert rendered["env"] == {"MLFLOW_TRACKING_URI": "https://mlflow.internal"}
    assert "{{" not in json.dumps(rendered)
    # A missing image is refused by the pool's variable schema.
    try:
        jsonschema.validate({"gpu_count": 1}, schema)
    except jsonschema.ValidationError as exc:
        assert "image" in str(exc)
    else:
        raise AssertionError("a job without an image must be refused")
