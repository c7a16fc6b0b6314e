"""launch/k8s.py: rendered manifests validate offline, and their container command really trains.

Schemas: Service / Job / PersistentVolumeClaim and the PyTorchJob's pod template are checked by
``kubernetes-validate`` (the Kubernetes OpenAPI schemas, strict: unknown fields fail). The
PyTorchJob itself is checked against a JSON schema derived from the training operator's
OpenAPI models shipped in ``kubeflow-training`` (every field, its type, required fields,
``additionalProperties: false``) plus the enums the CRD documents for the fields we emit.

The slow test runs the exact container command of the rendered Job as two "pods" (two torchrun
process groups on this machine, c10d rendezvous on localhost, gloo), kills pod 1 mid-training,
starts its replacement as the Job controller would, and checks that pod 0's torchrun restarted
its group, training resumed from the last checkpoint and ended with the losses of an
uninterrupted single-process run.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
from conftest import REPO
from magitrain.launch import k8s

kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install -e .[dev] (kubernetes-validate)")
kf_models = pytest.importorskip("kubeflow.training.models", reason="pip install -e .[dev] (kubeflow-training)")
jsonschema = pytest.importorskip("jsonschema")
from kubeflow.training.configuration import Configuration

K8S_VERSION = kubernetes_validate.latest_version()


def render(*argv) -> dict:
    args = k8s.parse_args(list(argv))
    return k8s.render(args)


BASIC = ["--name", "magi", "--nodes", "4", "--gpus-per-node", "8", "--image", "registry.example.com/magitrain:0.1",
         "--config", "configs/magi1_4.5b.yaml", "--pvc-size", "2Ti", "--storage-class", "nfs",
         "--env", "NCCL_SOCKET_IFNAME=eth0", "--namespace", "train", "--workdir", "/workspace",
         "parallel.dp=32", "train.steps=1000"]


# ------------------------------------------------------------------------------------------
# PyTorchJob schema, derived from the operator's OpenAPI models
# ------------------------------------------------------------------------------------------

_PRIMITIVES = {"str": {"type": "string"}, "int": {"type": "integer"}, "bool": {"type": "boolean"},
               "float": {"type": "number"}, "object": {}}
# Enums the training operator's CRD documents (kubeflow.org_pytorchjobs.yaml) for fields we emit.
_ENUMS = {
    ("KubeflowOrgV1ReplicaSpec", "restartPolicy"): ["Always", "OnFailure", "Never", "ExitCode"],
    ("KubeflowOrgV1RunPolicy", "cleanPodPolicy"): ["All", "Running", "None"],
    ("KubeflowOrgV1ElasticPolicy", "rdzvBackend"): ["c10d", "etcd", "etcd-v2"],
}


def _required(cls, attr: str) -> bool:
    """The generated setters raise ValueError on None for required fields."""
    obj = cls.__new__(cls)
    obj.local_vars_configuration = Configuration()
    try:
        setattr(obj, attr, None)
    except ValueError:
        return True
    return False


def model_schema(type_name: str) -> dict:
    """JSON schema of an OpenAPI-generated type name ('KubeflowOrgV1ReplicaSpec', 'dict(str, X)', ...).

    Kubernetes core types (V1PodTemplateSpec, V1ObjectMeta, ...) become plain objects here: they
    are validated with kubernetes-validate's own schemas instead.
    """
    if type_name in _PRIMITIVES:
        return dict(_PRIMITIVES[type_name])
    if m := re.fullmatch(r"list\[(.+)\]", type_name):
        return {"type": "array", "items": model_schema(m.group(1))}
    if m := re.fullmatch(r"dict\(str, (.+)\)", type_name):
        return {"type": "object", "additionalProperties": model_schema(m.group(1))}
    if not type_name.startswith("KubeflowOrg"):
        return {"type": "object"}
    cls = getattr(kf_models, type_name)
    props = {}
    for attr, t in cls.openapi_types.items():
        key = cls.attribute_map[attr]
        props[key] = model_schema(t)
        if (type_name, key) in _ENUMS:
            props[key]["enum"] = _ENUMS[(type_name, key)]
    required = [cls.attribute_map[a] for a in cls.openapi_types if _required(cls, a)]
    return {"type": "object", "properties": props, "required": required, "additionalProperties": False}


def pytorchjob_schema() -> dict:
    schema = model_schema("KubeflowOrgV1PyTorchJob")
    schema["properties"]["apiVersion"]["const"] = "kubeflow.org/v1"
    schema["properties"]["kind"]["const"] = "PyTorchJob"
    schema["required"] = sorted(set(schema["required"]) | {"apiVersion", "kind", "metadata", "spec"})
    specs = schema["properties"]["spec"]["properties"]["pytorchReplicaSpecs"]
    specs["propertyNames"] = {"enum": ["Master", "Worker"]}  # the operator's replica types
    specs["minProperties"] = 1
    return schema


def validate_pytorchjob(doc: dict) -> None:
    jsonschema.validate(doc, pytorchjob_schema())
    for replica in doc["spec"]["pytorchReplicaSpecs"].values():
        # the pod template (and the job's metadata) against the Kubernetes schemas
        wrapper = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": doc["metadata"],
                   "template": replica["template"]}
        kubernetes_validate.validate(wrapper, K8S_VERSION, strict=True)


def validate(doc: dict) -> None:
    if doc["kind"] == "PyTorchJob":
        validate_pytorchjob(doc)
    else:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_schema_derivation_is_strict():
    """The derived schema has teeth: required fields, types, unknown keys, enums."""
    schema = pytorchjob_schema()
    spec = schema["properties"]["spec"]
    assert "pytorchReplicaSpecs" in spec["required"]
    assert spec["properties"]["elasticPolicy"]["properties"]["maxRestarts"] == {"type": "integer"}
    assert spec["properties"]["pytorchReplicaSpecs"]["additionalProperties"]["properties"]["replicas"] == \
        {"type": "integer"}


def test_manifests_validate(tmp_path):
    files = render(*BASIC)
    assert sorted(files) == ["magi-ckpt-pvc.yaml", "magi-job.yaml", "magi-pytorchjob.yaml"]
    kinds = []
    for docs in files.values():
        for doc in docs:
            validate(doc)
            kinds.append(doc["kind"])
    assert sorted(kinds) == ["Job", "PersistentVolumeClaim", "PyTorchJob", "Service"]


@pytest.mark.parametrize("path, value", [
    (("spec", "pytorchReplicaSpecs", "Worker", "replicas"), "4"),  # wrong type
    (("spec", "pytorchReplicaSpecs", "Worker", "restartPolicy"), "Sometimes"),  # not in the enum
    (("spec", "elasticPolicy", "maxRestart"), 3),  # unknown field
    (("spec", "pytorchReplicaSpecs", "Launcher"), {}),  # not a PyTorchJob replica type
    (("spec", "pytorchReplicaSpecs", "Worker", "template", "spec", "containers", 0, "resource"), {}),
    (("spec", "pytorchReplicaSpecs", "Worker", "template", "spec", "volumes", 1, "emptyDir", "sizeLimit"), [1]),
])
def test_broken_pytorchjob_is_rejected(path, value):
    doc = render(*BASIC)["magi-pytorchjob.yaml"][0]
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(jsonschema.ValidationError):
        validate(doc)


def test_broken_job_is_rejected():
    service, job = render(*BASIC)["magi-job.yaml"]
    job["spec"]["completionMode"] = ["Indexed"]
    with pytest.raises(jsonschema.ValidationError):
        validate(job)
    del service["spec"]["ports"][0]["port"]  # required
    with pytest.raises(jsonschema.ValidationError):
        validate(service)


def _container(doc: dict) -> dict:
    if doc["kind"] == "PyTorchJob":
        return doc["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
    return doc["spec"]["template"]["spec"]["containers"][0]


def _env(container: dict) -> dict:
    return {e["name"]: e["value"] for e in container["env"]}


def test_manifest_contents():
    files = render(*BASIC)
    pj = files["magi-pytorchjob.yaml"][0]
    service, job = files["magi-job.yaml"]
    assert pj["spec"]["elasticPolicy"] == {"rdzvBackend": "c10d", "minReplicas": 4, "maxReplicas": 4, "maxRestarts": 3}
    assert pj["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 4
    assert _container(pj)["name"] == "pytorch"  # the operator finds the container by this name
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["completions"] == 4
    assert job["spec"]["template"]["spec"]["subdomain"] == service["metadata"]["name"] == "magi"
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"].items() <= job["spec"]["template"]["metadata"]["labels"].items()
    # the same command in both; only the rendezvous host differs
    assert _container(pj)["command"] == _container(job)["command"]
    cmd = _container(job)["command"]
    assert cmd[:8] == ["torchrun", "--nnodes=4:4", "--nproc-per-node=8", "--rdzv-backend=c10d",
                       "--rdzv-endpoint=$(MAGITRAIN_RDZV_ENDPOINT)", "--rdzv-id=magi", "--max-restarts=3", "-m"]
    assert cmd[8:] == ["magitrain.train", "--config", "configs/magi1_4.5b.yaml", "log.progress=false",
                       "run.dir=$(MAGITRAIN_RUN_DIR)", "ckpt.resume=auto", "parallel.dp=32", "train.steps=1000"]
    assert _env(_container(pj))["MAGITRAIN_RDZV_ENDPOINT"] == "magi-worker-0:29400"
    assert _env(_container(job))["MAGITRAIN_RDZV_ENDPOINT"] == "magi-0.magi:29400"
    for doc in (pj, job):
        c = _container(doc)
        env = _env(c)
        assert env["MAGITRAIN_RUN_DIR"] == "/checkpoints/magi" and env["NCCL_SOCKET_IFNAME"] == "eth0"
        assert env["OMP_NUM_THREADS"] == "4" and env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
        assert c["resources"]["limits"]["nvidia.com/gpu"] == "8" and c["workingDir"] == "/workspace"
        spec = doc["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"] if doc is pj else \
            doc["spec"]["template"]["spec"]
        vols = {v["name"]: v for v in spec["volumes"]}
        assert vols["checkpoints"]["persistentVolumeClaim"]["claimName"] == "magi-ckpt"
        assert vols["shm"]["emptyDir"]["medium"] == "Memory"
        assert {m["mountPath"] for m in c["volumeMounts"]} == {"/checkpoints", "/dev/shm"}
        assert doc["metadata"]["namespace"] == "train"
    pvc = files["magi-ckpt-pvc.yaml"][0]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"] and pvc["spec"]["storageClassName"] == "nfs"


@pytest.mark.parametrize("argv, message", [
    (["--nodes", "0"], "--nodes must be >= 1"),
    (["--nodes", "2", "--gpus-per-node", "8", "--procs-per-node", "4"], "--procs-per-node=4"),
    (["--nodes", "2", "--name", "Magi_1"], "--name 'Magi_1'"),
    (["--nodes", "2", "ckpt.resume=/x"], "the launcher sets ckpt.resume"),
    (["--nodes", "2", "run.dir=/x"], "use --run-dir"),
    (["--nodes", "2", "--env", "NOVALUE"], "expected KEY=VALUE"),
])
def test_bad_arguments(argv, message):
    base = {"--gpus-per-node": "8", "--image": "i", "--config": "configs/tiny.yaml"}
    extra = [x for k, v in base.items() if k not in argv for x in (k, v)]
    with pytest.raises(ValueError, match=re.escape(message)):
        k8s.parse_args(extra + argv)


def test_cli_writes_files_and_checks_the_config(tmp_path):
    base = [sys.executable, "-m", "magitrain.launch.k8s", "--name", "tiny", "--nodes", "2", "--gpus-per-node", "1",
            "--image", "i", "--config", "configs/tiny.yaml", "--out", str(tmp_path)]
    ok = subprocess.run(base + ["parallel.dp=2"], cwd=REPO, capture_output=True, text=True, check=False, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert sorted(os.listdir(tmp_path)) == ["tiny-job.yaml", "tiny-pytorchjob.yaml"]
    import yaml

    with open(tmp_path / "tiny-job.yaml") as f:
        docs = list(yaml.safe_load_all(f))
    assert [d["kind"] for d in docs] == ["Service", "Job"]
    bad = subprocess.run(base + ["parallel.dp=1"], cwd=REPO, capture_output=True, text=True, check=False, timeout=120)
    assert bad.returncode == 2 and "but the job has 2 processes" in bad.stderr


# ------------------------------------------------------------------------------------------
# The container command, run as two local "pods"
# ------------------------------------------------------------------------------------------

STEPS = 10
TRAIN = ["parallel.dp=2", f"train.steps={STEPS}", "ckpt.every=2", "log.tensorboard=false", "parallel.timeout_s=60"]


def pod_argv(doc: dict, env_over: dict) -> tuple[list[str], dict]:
    """The container's command with $(VAR) expanded from its env, as the kubelet does."""
    c = _container(doc)
    env = {**_env(c), **env_over}
    argv = [re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), a) for a in c["command"]]
    return argv, env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _descendants(pid: int) -> list[int]:
    """pid and every process below it (torchrun starts its workers in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def kill_pod(proc: subprocess.Popen) -> None:
    """What losing a pod does: every process in it dies at once."""
    for pid in _descendants(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)


def _rows(run_dir) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.mark.slow
def test_pod_loss_restarts_group_and_resumes(tmp_path):
    job = render("--name", "tiny", "--nodes", "2", "--gpus-per-node", "1", "--cpu", "1", "--memory", "4Gi",
                 "--max-restarts", "2", "--image", "magitrain:test", "--config", "configs/tiny.yaml",
                 *TRAIN)["tiny-job.yaml"][1]
    run_dir, port = str(tmp_path / "run"), _free_port()
    # pod DNS -> localhost, the claim -> tmp_path; LOGLEVEL=INFO makes torchrun log its restarts
    argv, env = pod_argv(job, {"MAGITRAIN_RDZV_ENDPOINT": f"localhost:{port}", "MAGITRAIN_RUN_DIR": run_dir,
                               "LOGLEVEL": "INFO"})
    assert argv[:2] == ["torchrun", "--nnodes=2:2"] and f"run.dir={run_dir}" in argv
    assert env["OMP_NUM_THREADS"] == "1"

    # reference: the same training, uninterrupted, in one process
    ref = subprocess.run([sys.executable, "-m", "magitrain.train", "--config", "configs/tiny.yaml",
                          f"run.dir={tmp_path}/ref", "log.progress=false", *TRAIN, "parallel.dp=1"],
                         cwd=REPO, capture_output=True, text=True, check=False, timeout=300)
    assert ref.returncode == 0, ref.stderr[-3000:]

    pods, logs = [], []

    def start_pod(i):
        logs.append(tmp_path / f"pod{i}-{len(pods)}.log")
        with open(logs[-1], "w") as log:  # the child keeps its own descriptor
            pods.append(subprocess.Popen(argv, cwd=REPO, env={**os.environ, **env}, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True))
        return pods[-1]

    def all_logs() -> str:
        return "\n".join(f"== {p}\n{p.read_text()[-4000:]}" for p in logs)

    def wait_until(cond, what, timeout=240):
        t0 = time.time()
        while not cond():
            assert time.time() - t0 < timeout, f"timed out waiting for {what}\n{all_logs()}"
            assert pods[0].poll() is None, f"pod 0 exited early\n{all_logs()}"
            time.sleep(0.5)

    try:
        pod0 = start_pod(0)
        wait_until(lambda: _listening(port), "pod 0's rendezvous store")  # pod 0 hosts it
        pod1 = start_pod(1)
        ckpt = os.path.join(run_dir, "checkpoints", "step_00000002", "COMPLETE")
        wait_until(lambda: os.path.exists(ckpt) and len(_rows(run_dir)) >= 3, "a checkpoint mid-training")
        kill_pod(pod1)  # the pod is lost
        killed_at = len(_rows(run_dir))
        start_pod(1)  # the Job controller's replacement pod
        for p in (pod0, pods[-1]):
            assert p.wait(timeout=300) == 0, all_logs()
    finally:
        for p in pods:
            if p.poll() is None:
                kill_pod(p)

    text = "\n".join(p.read_text() for p in logs)
    assert killed_at < STEPS, "training finished before the pod was killed; the test proves nothing"
    # pod 0's torchrun (never restarted itself) restarted its worker group
    assert "will restart worker group" in logs[0].read_text(), \
        all_logs()
    resumed = re.search(r"resumed from \S+step_(\d+) at step (\d+)", text)
    assert resumed and 2 <= int(resumed.group(1)) <= killed_at, text
    rows, reference = _rows(run_dir), _rows(f"{tmp_path}/ref")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    # dp=2 vs one process: the same global batch, sums in another order
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in reference], rel=1e-5)
