"""The KubeRay manifests under k8s/: valid against the KubeRay CRDs (strictly: unknown fields fail),
serveConfigV2 identical to the config file each names, every config valid as AppConfig, generated
files up to date, and every deployment's replica (a whole SP placement group included) fits in one
pod of a worker group, as Ray's KubeRay autoscaler sees the groups."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"

def _load_generator():
    import importlib.util

    spec = importlib.util.spec_from_file_location("k8s_generate", K8S / "generate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


generate = _load_generator()  # k8s/generate.py

RAYSERVICES = sorted(K8S.glob("*/rayservice.yaml"))
K8S_CONFIGS = sorted((K8S / "configs").glob("*.yaml"))


def _crd_dir() -> Path | None:
    env = os.environ.get("KUBERAY_CRD_DIR")
    if env:
        return Path(env)
    default = ROOT.parent / "shared" / "kuberay"
    return default if default.exists() else None


def _load_yaml_docs(path):
    # libyaml's loader where PyYAML has it: the CRDs are 2 MB of YAML, 2.5 s each in the pure-Python one
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return [d for d in yaml.load_all(path.read_text(), Loader=loader) if d is not None]


# --- strict CRD validation ---------------------------------------------------------------------------


def _strict(schema):
    """The CRD's openAPIV3Schema as the API server applies it: fields a structural schema does not
    declare are errors (kubectl's default strict field validation) instead of silently pruned."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items() if k != "x-kubernetes-validations"}  # CEL rules: server-side only
        if (out.get("type") == "object" and "properties" in out and "additionalProperties" not in out
                and not out.get("x-kubernetes-preserve-unknown-fields")):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


def _validator_class():
    import jsonschema

    def list_map_keys(validator, keys, instance, schema):
        # x-kubernetes-list-type: map -> items unique by these keys (e.g. containers by name)
        if not validator.is_type(instance, "array"):
            return
        seen = set()
        for item in instance:
            if isinstance(item, dict):
                key = tuple(item.get(k) for k in keys)
                if key in seen:
                    yield jsonschema.ValidationError(f"duplicate entry for list-map keys {keys}: {key}")
                seen.add(key)

    def int_or_string(validator, flag, instance, schema):
        # x-kubernetes-int-or-string: the CRD spells it as anyOf integer/string too; check it anyway
        if flag and not (validator.is_type(instance, "integer") or validator.is_type(instance, "string")):
            yield jsonschema.ValidationError(f"{instance!r} is neither an integer nor a string")

    # Unknown keywords (x-kubernetes-*, nullable, format int32/int-or-string) are ignored by jsonschema.
    return jsonschema.validators.extend(
        jsonschema.Draft7Validator,
        {"x-kubernetes-list-map-keys": list_map_keys, "x-kubernetes-int-or-string": int_or_string},
    )


@pytest.fixture(scope="module")
def crd_validators():
    crd_dir = _crd_dir()
    if crd_dir is None or not crd_dir.exists():
        pytest.skip("KubeRay CRDs not found: set KUBERAY_CRD_DIR (CI: ../shared/kuberay) to the folder with ray.io_rayservices.yaml")
    cls = _validator_class()
    out = {}
    for kind, name in (("RayService", "ray.io_rayservices.yaml"), ("RayCluster", "ray.io_rayclusters.yaml")):
        crd = next(d for d in _load_yaml_docs(crd_dir / name) if d.get("kind") == "CustomResourceDefinition")
        version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
        schema = _strict(version["schema"]["openAPIV3Schema"])
        cls.check_schema(schema)
        out[kind] = cls(schema)
    return out


def _errors(validator, doc):
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def test_there_are_three_variants():
    assert {p.parent.name for p in RAYSERVICES} >= {"nvidia", "amd", "mixed"}


@pytest.mark.parametrize("path", RAYSERVICES, ids=lambda p: p.parent.name)
def test_rayservice_validates_against_the_kuberay_crds(path, crd_validators):
    docs = _load_yaml_docs(path)
    assert [d["kind"] for d in docs] == ["RayService"]
    svc = docs[0]
    assert svc["apiVersion"] == "ray.io/v1"
    assert _errors(crd_validators["RayService"], svc) == []
    # the RayCluster KubeRay derives from it passes the RayCluster CRD too
    cluster = {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": "z-image"},
               "spec": svc["spec"]["rayClusterConfig"]}
    assert _errors(crd_validators["RayCluster"], cluster) == []


def test_the_strict_validator_catches_typos(crd_validators):
    svc = _load_yaml_docs(RAYSERVICES[0])[0]
    bad = yaml.safe_load(yaml.safe_dump(svc))
    bad["spec"]["rayClusterConfig"]["workerGroupSpec"] = bad["spec"]["rayClusterConfig"].pop("workerGroupSpecs")
    assert any("workerGroupSpec" in e for e in _errors(crd_validators["RayService"], bad))
    bad = yaml.safe_load(yaml.safe_dump(svc))
    bad["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] = [1]
    assert _errors(crd_validators["RayService"], bad)
    bad = yaml.safe_load(yaml.safe_dump(svc))
    containers = bad["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"]
    containers.append(dict(containers[0]))
    assert any("duplicate" in e for e in _errors(crd_validators["RayService"], bad))


# --- serveConfigV2 and configs -----------------------------------------------------------------------


def _config_of(svc) -> Path:
    return ROOT / svc["metadata"]["annotations"]["serve-app/config"]


@pytest.mark.parametrize("path", RAYSERVICES, ids=lambda p: p.parent.name)
def test_serve_config_v2_is_the_config_file(path):
    svc = _load_yaml_docs(path)[0]
    config = _config_of(svc)
    assert config.exists(), config
    assert yaml.safe_load(svc["spec"]["serveConfigV2"]) == yaml.safe_load(config.read_text())
    assert generate.VARIANTS[path.parent.name].config == str(config.relative_to(ROOT))


@pytest.mark.parametrize("path", sorted({_config_of(_load_yaml_docs(p)[0]) for p in RAYSERVICES} | set(K8S_CONFIGS)),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_every_config_validates_as_appconfig(path):
    from serve_app.config import AppConfig

    data = yaml.safe_load(path.read_text())
    apps = data["applications"]
    assert apps and all(a["import_path"] == "serve_app.app:build_app" for a in apps)
    for app in apps:
        AppConfig.model_validate(app["args"])


def test_generated_files_are_up_to_date():
    r = subprocess.run([sys.executable, str(K8S / "generate.py"), "--check"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr


def test_check_mode_notices_a_stale_manifest(tmp_path, monkeypatch):
    monkeypatch.setattr(generate, "K8S", tmp_path)
    assert generate.main([]) == 0  # writes everything into tmp_path
    assert generate.main(["--check"]) == 0
    (tmp_path / "amd" / "rayservice.yaml").write_text("stale\n")
    assert generate.main(["--check"]) == 1


# --- placement: what the KubeRay autoscaler sees against what each replica asks for ------------------


def _node_types(svc) -> dict:
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    cr = {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": "z-image", "namespace": "default"},
          "spec": svc["spec"]["rayClusterConfig"]}
    return _derive_autoscaling_config_from_ray_cr(cr)["available_node_types"]


def _replica_demands(args: dict) -> dict[str, dict[str, float]]:
    """What one replica of each deployment needs on ONE node (a STRICT_PACK group: its bundles summed)."""
    from serve_app.app import deployment_options, denoiser_options
    from serve_app.config import AppConfig

    cfg = AppConfig.model_validate(args)
    opts = {
        "TextEncoder": deployment_options(cfg.text_encoder_deployment, "TextEncoder"),
        "Denoiser": denoiser_options(cfg),
        "VaeDecoder": deployment_options(cfg.vae_deployment, "VaeDecoder"),
        "Ingress": deployment_options(cfg.ingress_deployment, "Ingress"),
    }
    out = {}
    for name, o in opts.items():
        if "placement_group_bundles" in o:
            assert o["placement_group_strategy"] == "STRICT_PACK"
            need: dict[str, float] = {}
            for bundle in o["placement_group_bundles"]:
                for k, v in bundle.items():
                    need[k] = need.get(k, 0) + v
        else:
            a = o["ray_actor_options"]
            need = {"CPU": a.get("num_cpus", 1), "GPU": a.get("num_gpus", 0)}
            if a.get("accelerator_type"):
                need[f"accelerator_type:{a['accelerator_type']}"] = 0.001
        out[name] = {k: v for k, v in need.items() if v}
    return out


@pytest.mark.parametrize("path", RAYSERVICES, ids=lambda p: p.parent.name)
def test_every_replica_fits_one_pod_of_some_worker_group(path):
    svc = _load_yaml_docs(path)[0]
    node_types = _node_types(svc)
    workers = {n: t for n, t in node_types.items() if n != "headgroup"}
    assert node_types["headgroup"]["resources"]["CPU"] == 0  # nothing but Serve's controller/proxy there
    for group in svc["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        res = workers[group["groupName"]]["resources"]
        gpus = int(group["rayStartParams"]["num-gpus"])
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert res["GPU"] == gpus == int(limits.get("nvidia.com/gpu", limits.get("amd.com/gpu", 0))) > 0
        acc = group["labels"]["ray.io/accelerator-type"]
        assert res[f"accelerator_type:{acc}"] == 1
        assert workers[group["groupName"]]["labels"]["ray.io/accelerator-type"] == acc

    args = yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"][0]["args"]
    for deployment, need in _replica_demands(args).items():
        fits = [n for n, t in workers.items() if all(t["resources"].get(k, 0) >= v for k, v in need.items())]
        assert fits, f"{path.parent.name}: no worker group can host one {deployment} replica needing {need}"


@pytest.mark.parametrize("path", RAYSERVICES, ids=lambda p: p.parent.name)
def test_sp_denoiser_groups_have_a_whole_sp_group_per_pod(path):
    from serve_app.config import AppConfig

    svc = _load_yaml_docs(path)[0]
    cfg = AppConfig.model_validate(yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"][0]["args"])
    groups = svc["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    actor = cfg.denoiser_deployment.actor_options()
    acc = actor.get("accelerator_type")
    candidates = [g for g in groups if acc is None or g["labels"]["ray.io/accelerator-type"] == acc]
    assert candidates, f"no worker group of accelerator {acc}"
    per_rank = actor.get("num_gpus") or 1.0
    for g in candidates:
        assert int(g["rayStartParams"]["num-gpus"]) >= cfg.denoiser.sp_degree * per_rank
    if path.parent.name == "mixed":
        assert cfg.denoiser.sp_degree == 2 and all(int(g["rayStartParams"]["num-gpus"]) >= 2 for g in candidates)


# --- pods: weights, readiness, resources -------------------------------------------------------------


@pytest.mark.parametrize("path", RAYSERVICES, ids=lambda p: p.parent.name)
def test_pods_read_weights_from_the_pvc_and_get_ready_on_health(path):
    svc = _load_yaml_docs(path)[0]
    rc = svc["spec"]["rayClusterConfig"]
    assert rc["enableInTreeAutoscaling"] is True and rc["autoscalerOptions"]["upscalingMode"]
    head = rc["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "readinessProbe" not in head  # KubeRay submits serveConfigV2 only once the head is Ready
    pvc = _load_yaml_docs(K8S / "base" / "model-cache-pvc.yaml")[0]
    for group in rc["workerGroupSpecs"]:
        spec = group["template"]["spec"]
        c = spec["containers"][0]
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env["HF_HOME"].startswith("/models/") and env["HF_HUB_OFFLINE"] == "1"
        claim = {v["name"]: v for v in spec["volumes"]}["model-cache"]["persistentVolumeClaim"]["claimName"]
        assert claim == pvc["metadata"]["name"]
        assert {m["name"]: m["mountPath"] for m in c["volumeMounts"]}["model-cache"] == "/models"
        probe = " ".join(c["readinessProbe"]["exec"]["command"])
        assert "localhost:8000/health/ready" in probe and "/-/healthz" in probe and "local_raylet_healthz" in probe
        live = " ".join(c["livenessProbe"]["exec"]["command"])
        assert "localhost:8000/health/live" in live and "local_raylet_healthz" in live
        assert spec["terminationGracePeriodSeconds"] > 300  # longer than the replicas' drain (request_timeout_s)
        assert c["resources"]["requests"] == c["resources"]["limits"]  # Guaranteed QoS: no GPU pod gets evicted first
        vendor = group["labels"]["gpu-vendor"]
        if vendor == "nvidia":
            assert env["NCCL_NVLS_ENABLE"] == "0" and "serve-app-cuda" in c["image"]
        else:
            assert "amd.com/gpu" in c["resources"]["limits"] and "serve-app-rocm" in c["image"]
            assert env["HIP_FORCE_DEV_KERNARG"] == "1"


def test_model_download_job_fills_the_same_cache():
    job = _load_yaml_docs(K8S / "base" / "model-download-job.yaml")[0]
    pvc = _load_yaml_docs(K8S / "base" / "model-cache-pvc.yaml")[0]
    assert job["apiVersion"] == "batch/v1" and job["kind"] == "Job"
    assert pvc["apiVersion"] == "v1" and "ReadWriteMany" in pvc["spec"]["accessModes"]
    spec = job["spec"]["template"]["spec"]
    c = spec["containers"][0]
    assert "Tongyi-MAI/Z-Image-Turbo" in " ".join(c["command"])
    assert {e["name"]: e.get("value") for e in c["env"]}["HF_HOME"] == generate.HF_HOME
    assert spec["volumes"][0]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]


# --- one command per variant -------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (for its built-in kustomize) is not installed")
@pytest.mark.parametrize("variant", ["nvidia", "amd", "mixed"])
def test_apply_sh_renders_the_variant_with_images_retargeted(variant):
    env = dict(os.environ, SERVE_APP_IMAGE_CUDA="registry.example.com/ml/serve-app-cuda:1.2.3",
               SERVE_APP_IMAGE_ROCM="registry.example.com/ml/serve-app-rocm:1.2.3")
    r = subprocess.run(["bash", str(K8S / "apply.sh"), variant, "--render"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    docs = [d for d in yaml.safe_load_all(r.stdout) if d]
    assert sorted(d["kind"] for d in docs) == ["Job", "PersistentVolumeClaim", "RayService"]
    svc = next(d for d in docs if d["kind"] == "RayService")
    images = {c["image"] for g in [svc["spec"]["rayClusterConfig"]["headGroupSpec"], *svc["spec"]["rayClusterConfig"]["workerGroupSpecs"]]
              for c in g["template"]["spec"]["containers"]}
    assert images and all(i.startswith("registry.example.com/ml/") and i.endswith(":1.2.3") for i in images)
    assert svc["spec"]["serveConfigV2"] == _load_yaml_docs(K8S / variant / "rayservice.yaml")[0]["spec"]["serveConfigV2"]
    assert not list(K8S.glob(".apply-*"))  # its temporary overlay is gone


# --- operations and security -------------------------------------------------------------------------


@pytest.mark.parametrize("path", RAYSERVICES, ids=lambda p: p.parent.name)
def test_ray_token_auth_api_keys_and_metrics_port_on_every_pod(path):
    """Ray's token auth on (KubeRay keeps the token in a Secret), the ingress's API keys from a Secret and
    required by the config, every pod's Ray metrics endpoint on the port the PodMonitor scrapes."""
    [rs] = _load_yaml_docs(path)
    cluster = rs["spec"]["rayClusterConfig"]
    assert cluster["authOptions"] == {"mode": "token"}
    assert yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"][0]["args"]["server"]["require_api_keys"] is True
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        assert group["rayStartParams"]["metrics-export-port"] == str(generate.METRICS_PORT)
        [container] = group["template"]["spec"]["containers"]
        assert {"containerPort": generate.METRICS_PORT, "name": "metrics"} in container["ports"]
        env = {e["name"]: e for e in container["env"]}
        assert env["SERVE_APP_API_KEYS"]["valueFrom"]["secretKeyRef"] == {"name": "z-image-api-keys", "key": "keys"}
        assert env["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"]["value"] == "serve_app.request_ids:proxy_middlewares"
        assert not any("RAY_AUTH" in name for name in env)  # KubeRay sets them from its Secret, never a value here


def test_monitoring_scrapes_the_metrics_port_and_the_dashboard_shows_every_metric():
    import json
    import re

    from serve_app.metrics import METRIC_NAMES

    [pm] = _load_yaml_docs(K8S / "monitoring" / "podmonitor.yaml")
    assert pm["kind"] == "PodMonitor" and pm["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    assert pm["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/name": "serve-app"}
    dashboard = json.loads((K8S / "monitoring" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {re.sub(r"_(bucket|sum|count)$", "", m) for e in exprs for m in re.findall(r"ray_zimage_\w+", e)}
    assert used == set(METRIC_NAMES)  # every metric shown, and no name the server does not export
