"""Kubernetes manifests for a magitrain run: ``python -m magitrain.launch.k8s``.

    python -m magitrain.launch.k8s --name magi --nodes 4 --gpus-per-node 8 \\
        --image registry.example.com/magitrain:0.1 --config configs/magi1_4.5b.yaml \\
        --pvc magitrain-ckpt --out k8s/ parallel.dp=32 train.steps=100000

writes two alternatives (apply one of them):

- ``<name>-pytorchjob.yaml``: a Kubeflow ``PyTorchJob`` (training operator), N ``Worker``
  replicas with an elastic policy;
- ``<name>-job.yaml``: a headless ``Service`` and an indexed ``Job`` of N pods, for clusters
  without the operator (pod i is reachable as ``<name>-i.<name>``);
- ``<name>-pvc.yaml`` too when ``--pvc-size`` is given (else the claim must exist).

Every pod runs the same container command, one ``torchrun`` per pod::

    torchrun --nnodes=N:N --nproc-per-node=G --rdzv-backend=c10d
             --rdzv-endpoint=$(MAGITRAIN_RDZV_ENDPOINT) --rdzv-id=<name> --max-restarts=K
             -m magitrain.train --config CONFIG run.dir=$(MAGITRAIN_RUN_DIR) ckpt.resume=auto ...

(Kubernetes expands ``$(VAR)`` from the container's env.) If a pod is lost, the training
processes of the others fail, their torchrun agents restart the group (up to K times) and wait
at the rendezvous until the replacement pod (recreated by the Job / operator) joins; every
start resumes from the newest complete checkpoint in the run dir, which lives on the
persistent volume claim (``ReadWriteMany``: all pods write their own shards into it). The
rendezvous store runs in pod 0's torchrun, so losing pod 0 itself fails the attempt and the
restart goes through the Job's ``backoffLimit`` / the operator's ``restartPolicy``.

MIN:MAX is N:N: the trainer's layout (``parallel.dp x cp x tp``) fixes the world size, so
the group waits for all N pods rather than shrinking.
"""

from __future__ import annotations

import argparse
import os
import sys

import yaml

RDZV_PORT = 29400
CKPT_MOUNT = "/checkpoints"
LABEL = "magitrain.io/job"
ENDPOINT_VAR = "MAGITRAIN_RDZV_ENDPOINT"
RUN_DIR_VAR = "MAGITRAIN_RUN_DIR"
_RESERVED = {"run.dir": "--run-dir", "ckpt.resume": "copying the checkpoint folder into <run dir>/checkpoints/"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m magitrain.launch.k8s", description=__doc__.splitlines()[0])
    p.add_argument("--name", default="magitrain", help="job name (also the rendezvous id and run dir name)")
    p.add_argument("--nodes", type=int, required=True, help="pods, one torchrun each")
    p.add_argument("--gpus-per-node", type=int, required=True, help="GPUs per pod (0: CPU pods)")
    p.add_argument("--procs-per-node", type=int, default=None,
                   help="training processes per pod (default: --gpus-per-node, or 1 for CPU pods)")
    p.add_argument("--image", required=True, help="container image with magitrain installed")
    p.add_argument("--config", required=True, help="config path inside the image (relative to --workdir)")
    p.add_argument("--workdir", default="", help="container working directory (default: the image's)")
    p.add_argument("--namespace", default="", help="namespace for every object (default: kubectl's)")
    p.add_argument("--cpu", default="32", help="CPU request per pod (also the limit)")
    p.add_argument("--memory", default="256Gi", help="memory request per pod (also the limit)")
    p.add_argument("--shm", default="16Gi", help="size of /dev/shm (memory-backed) for dataloader workers")
    p.add_argument("--pvc", default="", help="persistent volume claim for checkpoints (default: <name>-ckpt)")
    p.add_argument("--pvc-size", default="", help="also render the claim, this size (e.g. 2Ti)")
    p.add_argument("--storage-class", default="", help="storage class of the rendered claim")
    p.add_argument("--run-dir", default="", help=f"run dir (default: {CKPT_MOUNT}/<name>, on the claim)")
    p.add_argument("--max-restarts", type=int, default=3, help="torchrun group restarts per pod")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra container env (repeatable), e.g. NCCL_SOCKET_IFNAME=eth0")
    p.add_argument("--kind", choices=("all", "pytorchjob", "job"), default="all", help="which manifests")
    p.add_argument("--out", default=".", help="output folder, or - for stdout")
    p.add_argument("overrides", nargs="*", help="key.sub=value config overrides (OmegaConf dotlist)")
    args = p.parse_args(argv)
    check_args(args)
    return args


def check_args(args: argparse.Namespace) -> None:
    """Reject what would render a broken job; ValueError names the option."""
    if args.nodes < 1:
        raise ValueError(f"--nodes must be >= 1, got {args.nodes}")
    if args.gpus_per_node < 0:
        raise ValueError(f"--gpus-per-node must be >= 0, got {args.gpus_per_node}")
    if args.procs_per_node is None:
        args.procs_per_node = args.gpus_per_node or 1
    if args.procs_per_node < 1 or (args.gpus_per_node and args.procs_per_node != args.gpus_per_node):
        raise ValueError(f"--procs-per-node={args.procs_per_node}: must be >= 1 and equal --gpus-per-node on GPU pods")
    if args.max_restarts < 0:
        raise ValueError(f"--max-restarts must be >= 0, got {args.max_restarts}")
    if not args.name.replace("-", "").isalnum() or not args.name.islower() or len(args.name) > 40 \
            or not args.name[0].isalpha():
        raise ValueError(f"--name {args.name!r}: use lowercase letters, digits and '-', starting with a letter, "
                         "at most 40 characters (it names pods and DNS records)")
    for kv in args.env:
        if "=" not in kv:
            raise ValueError(f"--env {kv!r}: expected KEY=VALUE")
    for o in args.overrides:
        key = o.split("=", 1)[0]
        if "=" not in o:
            raise ValueError(f"override {o!r}: expected key.sub=value")
        if key in _RESERVED:
            raise ValueError(f"override {o!r}: the launcher sets {key} so restarts resume from the run's newest "
                             f"checkpoint; use {_RESERVED[key]} instead")
    args.pvc = args.pvc or f"{args.name}-ckpt"
    args.run_dir = args.run_dir or f"{CKPT_MOUNT}/{args.name}"


def check_config(args: argparse.Namespace) -> None:
    """If the config is here too, validate it against the job's world size now, not in the pods."""
    if not os.path.exists(args.config):
        print(f"note: {args.config} is not here; it is checked only when the pods start", file=sys.stderr)
        return
    from magitrain.config import load_config

    load_config(args.config, train_overrides(args), world_size=args.nodes * args.procs_per_node)


def train_overrides(args: argparse.Namespace) -> list[str]:
    return ["log.progress=false", f"run.dir=$({RUN_DIR_VAR})", "ckpt.resume=auto", *args.overrides]


def torchrun_command(args: argparse.Namespace) -> list[str]:
    """The container command: one elastic torchrun per pod, c10d rendezvous at pod 0."""
    return ["torchrun", f"--nnodes={args.nodes}:{args.nodes}", f"--nproc-per-node={args.procs_per_node}",
            "--rdzv-backend=c10d", f"--rdzv-endpoint=$({ENDPOINT_VAR})", f"--rdzv-id={args.name}",
            f"--max-restarts={args.max_restarts}", "-m", "magitrain.train", "--config", args.config,
            *train_overrides(args)]


def _env(args: argparse.Namespace, rdzv_host: str) -> list[dict]:
    cpus = int(float(args.cpu.rstrip("m")) / (1000 if args.cpu.endswith("m") else 1))
    env = {
        ENDPOINT_VAR: f"{rdzv_host}:{RDZV_PORT}",
        RUN_DIR_VAR: args.run_dir,
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": str(max(1, cpus // args.procs_per_node)),
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",  # a lost peer fails the collective instead of hanging
        "NCCL_DEBUG": "WARN",
        # torch 2.13: with the shared rendezvous TCPStore, a surviving rank-0 agent keeps the
        # store address of its first round and never publishes it for later rounds, so a
        # replacement pod waits for it forever (measured). Unshared, every round publishes it.
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
    }
    env.update(kv.split("=", 1) for kv in args.env)
    return [{"name": k, "value": v} for k, v in env.items()]


def _resources(args: argparse.Namespace) -> dict:
    amounts = {"cpu": args.cpu, "memory": args.memory}
    if args.gpus_per_node:
        amounts["nvidia.com/gpu"] = str(args.gpus_per_node)
    return {"requests": dict(amounts), "limits": dict(amounts)}


def pod_spec(args: argparse.Namespace, container_name: str, rdzv_host: str) -> dict:
    container = {
        "name": container_name,
        "image": args.image,
        "imagePullPolicy": "IfNotPresent",
        "command": torchrun_command(args),
        "env": _env(args, rdzv_host),
        "ports": [{"name": "rdzv", "containerPort": RDZV_PORT}],
        "resources": _resources(args),
        "volumeMounts": [{"name": "checkpoints", "mountPath": CKPT_MOUNT}, {"name": "shm", "mountPath": "/dev/shm"}],
    }
    if args.workdir:
        container["workingDir"] = args.workdir
    return {
        "containers": [container],
        "volumes": [
            {"name": "checkpoints", "persistentVolumeClaim": {"claimName": args.pvc}},
            {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": args.shm}},
        ],
    }


def _metadata(args: argparse.Namespace, name: str) -> dict:
    meta = {"name": name, "labels": {"app.kubernetes.io/name": "magitrain", LABEL: args.name}}
    if args.namespace:
        meta["namespace"] = args.namespace
    return meta


def pytorchjob(args: argparse.Namespace) -> dict:
    """Kubeflow training operator: N Worker replicas (the operator names pod i's service <name>-worker-i)."""
    n = args.nodes
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": _metadata(args, args.name),
        "spec": {
            "elasticPolicy": {"rdzvBackend": "c10d", "minReplicas": n, "maxReplicas": n,
                              "maxRestarts": args.max_restarts},
            "nprocPerNode": str(args.procs_per_node),
            "runPolicy": {"cleanPodPolicy": "None", "backoffLimit": max(1, args.max_restarts) * n},
            "pytorchReplicaSpecs": {
                "Worker": {
                    "replicas": n,
                    "restartPolicy": "OnFailure",
                    "template": {"metadata": {"labels": _metadata(args, args.name)["labels"]},
                                 "spec": pod_spec(args, "pytorch", f"{args.name}-worker-0")},
                },
            },
        },
    }


def indexed_job(args: argparse.Namespace) -> list[dict]:
    """A headless Service (stable DNS <name>-i.<name>) and an indexed Job of N pods."""
    n, labels = args.nodes, _metadata(args, args.name)["labels"]
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(args, args.name),
        "spec": {"clusterIP": "None", "publishNotReadyAddresses": True, "selector": {LABEL: args.name},
                 "ports": [{"name": "rdzv", "port": RDZV_PORT, "targetPort": RDZV_PORT}]},
    }
    spec = pod_spec(args, "trainer", f"{args.name}-0.{args.name}")
    spec.update({"subdomain": args.name, "restartPolicy": "OnFailure"})
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _metadata(args, args.name),
        "spec": {
            "completionMode": "Indexed",
            "completions": n,
            "parallelism": n,
            "backoffLimit": max(1, args.max_restarts) * n,
            "template": {"metadata": {"labels": labels}, "spec": spec},
        },
    }
    return [service, job]


def claim(args: argparse.Namespace) -> dict:
    spec = {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": args.pvc_size}}}
    if args.storage_class:
        spec["storageClassName"] = args.storage_class
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": _metadata(args, args.pvc), "spec": spec}


def render(args: argparse.Namespace) -> dict[str, list[dict]]:
    """File name -> the documents in it."""
    files = {}
    if args.kind in ("all", "pytorchjob"):
        files[f"{args.name}-pytorchjob.yaml"] = [pytorchjob(args)]
    if args.kind in ("all", "job"):
        files[f"{args.name}-job.yaml"] = indexed_job(args)
    if args.pvc_size:
        files[f"{args.pvc}-pvc.yaml"] = [claim(args)]
    return files


def main(argv: list[str] | None = None) -> int:
    from magitrain.config import ConfigError

    try:
        args = parse_args(argv)
        check_config(args)
    except (ValueError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for fname, docs in render(args).items():
        text = yaml.safe_dump_all(docs, sort_keys=False, width=1000)
        if args.out == "-":
            sys.stdout.write(f"# {fname}\n---\n{text}")
            continue
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, fname)
        with open(path, "w") as f:
            f.write(text)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
