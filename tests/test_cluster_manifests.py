"""The launch artifacts agree with each other: Dockerfile, KubeRay RayCluster / RayJob / PVC
(cluster/kuberay/), the Ray cluster launcher config (cluster/ray-cluster-aws.yaml), install.sh
and pyproject's `gpu` extra. None of these runs here (no docker, Kubernetes or GPU); this checks
what would break silently on a real cluster: a node on another image, the shared volume missing
on one group or mounted elsewhere, a run's storage or the HF cache off the shared volume, a GPU
worker group whose Ray GPU count differs from what Kubernetes gives it, a job with no retry or
deadline, the vllm pin drifting between install.sh, pyproject and the image tag, task files that
`ray job submit --working-dir .` would not ship.

`cluster_problems(root)` lists every disagreement; the mutation tests edit one value in a copy of
the files and check that it is reported.
"""
from __future__ import annotations

import json
import re
import shlex
import shutil
import tomllib
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import dockerfile
import jsonschema
import pytest
import ray.autoscaler
import yaml
from packaging.requirements import Requirement

from moco_ray.tasks.loaders import SHIPPED_DATA
from moco_ray.workflows.runtime import FORWARDED_ENV, TRAIN_POLL_ENV

ROOT = Path(__file__).resolve().parents[1]
RAYCLUSTER = "cluster/kuberay/raycluster.yaml"
RAYJOB = "cluster/kuberay/rayjob.yaml"
PVC = "cluster/kuberay/pvc.yaml"
LAUNCHER = "cluster/ray-cluster-aws.yaml"
INSTALL = "cluster/install.sh"
# Variables whose dirs every node must read: the Hugging Face cache and the zoo cache.
SHARED_ENV = ("HF_HOME", "MOCO_RAY_CACHE")
FILES = (RAYCLUSTER, RAYJOB, PVC, LAUNCHER, INSTALL, "Dockerfile", ".dockerignore", ".gitignore",
         "pyproject.toml")


@dataclass
class Image:
    """What the Dockerfile sets up: the repo's dir in the image, ENV, and RUN commands."""

    workdir: str
    env: dict[str, str]
    runs: list[str]

    @classmethod
    def parse(cls, path: Path) -> Image:
        workdir, env, runs = "/", {}, []
        for c in dockerfile.parse_file(str(path)):
            if c.cmd == "WORKDIR":
                workdir = c.value[0]
            elif c.cmd == "ENV":
                env.update(zip(c.value[::2], c.value[1::2]))
            elif c.cmd == "RUN":
                runs.append(" ".join(c.value))
        return cls(workdir, env, runs)


def _yaml(root: Path, rel: str):
    return yaml.safe_load((root / rel).read_text())


def _under(path: str | None, mount: str) -> bool:
    return bool(path) and Path(path).is_absolute() and Path(path).is_relative_to(mount)


def _groups(spec: dict):
    """(group name, group) of a RayCluster spec: the head, then each worker group."""
    yield "head", spec["headGroupSpec"]
    for g in spec.get("workerGroupSpecs", []):
        yield g["groupName"], g


def _ray_container(group: dict) -> dict:
    return group["template"]["spec"]["containers"][0]  # KubeRay's Ray container is the first


def _shared_mount(group: dict, claim: str) -> str | None:
    """Where the Ray container of `group` mounts the PVC `claim`, or None."""
    pod = group["template"]["spec"]
    names = {v["name"] for v in pod.get("volumes", [])
             if v.get("persistentVolumeClaim", {}).get("claimName") == claim}
    paths = [m["mountPath"] for m in _ray_container(group).get("volumeMounts", [])
             if m["name"] in names]
    return paths[0] if paths else None


def vllm_pin(root: Path) -> str | None:
    """The exact vllm version of pyproject's `gpu` extra, or None if it is not one `==` pin."""
    extra = tomllib.loads((root / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]["gpu"]
    reqs = [Requirement(r) for r in extra if Requirement(r).name == "vllm"]
    specs = list(reqs[0].specifier) if len(reqs) == 1 else []
    return specs[0].version if len(specs) == 1 and specs[0].operator == "==" else None


def _pin_problems(root: Path, image: Image) -> tuple[list[str], str | None]:
    problems = []
    pin = vllm_pin(root)
    if pin is None:
        problems.append("pyproject's gpu extra must pin vllm to one version (vllm==X)")
    code = "\n".join(line for line in (root / INSTALL).read_text().splitlines()
                     if not line.lstrip().startswith("#"))
    mentions = re.findall(r"\bvllm\b(?!-)(==[\w.]+)?", code)
    if not mentions or set(mentions) != {f"=={pin}"}:
        problems.append(f"{INSTALL} must install vllm=={pin} (pyproject's gpu extra); it has "
                        f"{['vllm' + m for m in mentions]}")
    if not any("cluster/install.sh gpu" in r for r in image.runs):
        problems.append("the Dockerfile must RUN `bash cluster/install.sh gpu`")
    return problems, pin


def _image_problems(root: Path, images: dict[str, str], pin: str | None) -> list[str]:
    version = tomllib.loads((root / "pyproject.toml").read_text())["project"]["version"]
    want_tag = f"{version}-vllm{pin}"
    problems = []
    if len(set(images.values())) != 1:
        problems.append(f"every node must run the same image; got {images}")
    for where, ref in images.items():
        if ref.rpartition(":")[2] != want_tag:
            problems.append(f"{where}: image {ref!r} should be tagged {want_tag!r} (project "
                            "version and the vllm pin)")
    return problems


def _env_problems(where: str, env: dict, mount: str, image: Image) -> list[str]:
    problems = [f"{where}: {k}={env.get(k)!r} is not on the shared volume {mount}"
                for k in SHARED_ENV if not _under(env.get(k), mount)]
    if "MOCO_RAY_DATA" in env and env["MOCO_RAY_DATA"] != image.env.get("MOCO_RAY_DATA"):
        problems.append(f"{where}: MOCO_RAY_DATA={env['MOCO_RAY_DATA']!r} is not where the "
                        f"image keeps the task files ({image.env.get('MOCO_RAY_DATA')!r})")
    return problems


def _entrypoint_problems(root: Path, entrypoint: str, mount: str, image: Image) -> list[str]:
    args = shlex.split(entrypoint)
    if args[:2] != ["moco-ray", "run"] or len(args) < 3:
        return [f"{RAYJOB}: entrypoint {entrypoint!r} is not `moco-ray run CONFIG ...`"]
    config = Path(args[2])
    if not config.is_relative_to(image.workdir):
        return [f"{RAYJOB}: config {config} is not in the image's repo dir {image.workdir}"]
    local = root / config.relative_to(image.workdir)
    if not local.is_file():
        return [f"{RAYJOB}: config {config} is not in the repo ({local} missing)"]
    storage = next((args[i + 1] for i, a in enumerate(args[:-1])
                    if a in ("--storage", "--output-dir")), None)
    if storage is None:
        raw = yaml.safe_load(local.read_text())
        storage = raw.get("storage", raw.get("output_dir", "runs"))
    if not _under(storage, mount):
        return [f"{RAYJOB}: the run's storage {storage!r} is not on the shared volume {mount}"]
    return []


def _cluster_spec_problems(where: str, spec: dict, claim: str, mount: str) -> list[str]:
    problems = []
    head = spec["headGroupSpec"]
    if str(head.get("rayStartParams", {}).get("num-cpus")) != "0":
        problems.append(f"{where}: the head must start with num-cpus \"0\" (no engine or "
                        "trainer beside the driver)")
    gpu_groups = 0
    for name, group in _groups(spec):
        at = _shared_mount(group, claim)
        if at != mount:
            problems.append(f"{where} group {name}: PVC {claim!r} mounted at {at}, not {mount}")
        if name == "head":
            continue
        res = _ray_container(group).get("resources", {})
        limit = res.get("limits", {}).get("nvidia.com/gpu")
        request = res.get("requests", {}).get("nvidia.com/gpu", limit)
        ray_gpus = group.get("rayStartParams", {}).get("num-gpus")
        if limit is None and ray_gpus is None:
            continue
        gpu_groups += 1
        if limit is None or ray_gpus is None or float(limit) != float(ray_gpus) \
                or str(request) != str(limit):
            problems.append(f"{where} group {name}: nvidia.com/gpu limit {limit} / request "
                            f"{request} must equal rayStartParams num-gpus {ray_gpus}")
    if not gpu_groups:
        problems.append(f"{where}: no GPU worker group")
    return problems


def _launcher_problems(root: Path, mount: str, image: Image) -> list[str]:
    cfg = _yaml(root, LAUNCHER)
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    try:
        jsonschema.validate(cfg, schema)
    except jsonschema.ValidationError as e:
        return [f"{LAUNCHER}: not a valid launcher config (Ray's schema): {e.message}"]
    opts = [a for o in cfg.get("docker", {}).get("run_options", []) for a in shlex.split(o)]
    problems = []
    if f"{mount}:{mount}" not in opts:
        problems.append(f"{LAUNCHER}: docker run_options must mount the shared volume "
                        f"(-v {mount}:{mount})")
    if not any("mount" in c and c.rstrip(")").endswith(f" {mount}")
               for c in cfg.get("initialization_commands", [])):
        problems.append(f"{LAUNCHER}: no initialization command mounts the shared volume at "
                        f"{mount} on the hosts")
    env = dict(v.split("=", 1) for flag, v in pairwise(opts) if flag in ("-e", "--env"))
    problems += _env_problems(f"{LAUNCHER} docker env", env, mount, image)
    if cfg.get("file_mounts", {}).get(image.workdir) != ".":
        problems.append(f"{LAUNCHER}: file_mounts must sync the checkout to the image's repo "
                        f"dir ({image.workdir}: .), where $MOCO_RAY_DATA points")
    return problems


def _data_problems(root: Path, image: Image) -> list[str]:
    # What `ray job submit --working-dir .` uploads is decided by Ray's own ignore rules
    # (.gitignore, .rayignore); .dockerignore is read the same (gitignore-style) way, which
    # excludes at least what Docker would.
    from ray._private.runtime_env.packaging import _get_ignore_file

    problems = []
    want = f"{image.workdir}/{SHIPPED_DATA}"
    if image.env.get("MOCO_RAY_DATA") != want:
        problems.append(f"Dockerfile: MOCO_RAY_DATA={image.env.get('MOCO_RAY_DATA')!r}; the "
                        f"task files are copied to {want} (./{SHIPPED_DATA} of the build context)")
    task_file = root / SHIPPED_DATA / "gsm8k.json"
    for name in (".gitignore", ".rayignore", ".dockerignore"):
        ignored = _get_ignore_file(root, name)
        if ignored is not None and ignored(task_file):
            problems.append(f"{name} leaves out {task_file.relative_to(root)}: the task files "
                            "would not reach the job or the image")
    return problems


def cluster_problems(root: Path) -> list[str]:
    """Every disagreement between the launch artifacts under `root` (empty: they agree)."""
    image = Image.parse(root / "Dockerfile")
    problems, pin = _pin_problems(root, image)
    cluster, job, pvc = _yaml(root, RAYCLUSTER), _yaml(root, RAYJOB), _yaml(root, PVC)
    claim = pvc["metadata"]["name"]
    if "ReadWriteMany" not in pvc["spec"].get("accessModes", []):
        problems.append(f"{PVC}: the shared volume must be ReadWriteMany (every node writes)")
    mount = _shared_mount(cluster["spec"]["headGroupSpec"], claim) or "<no mount>"
    specs = {RAYCLUSTER: cluster["spec"], RAYJOB: job["spec"]["rayClusterSpec"]}
    images = {f"{where} {name}": _ray_container(g)["image"]
              for where, spec in specs.items() for name, g in _groups(spec)}
    images[LAUNCHER] = _yaml(root, LAUNCHER)["docker"]["image"]
    problems += _image_problems(root, images, pin)
    for where, spec in specs.items():
        problems += _cluster_spec_problems(where, spec, claim, mount)
    for name, g in _groups(cluster["spec"]):
        env = {e["name"]: e.get("value") for e in _ray_container(g).get("env", [])}
        problems += _env_problems(f"{RAYCLUSTER} group {name} env", env, mount, image)

    spec = job["spec"]
    for key, least in (("backoffLimit", 0), ("activeDeadlineSeconds", 1)):
        if not isinstance(spec.get(key), int) or spec[key] < least:
            problems.append(f"{RAYJOB}: spec.{key} must be an integer >= {least} (got "
                            f"{spec.get(key)!r})")
    if spec.get("shutdownAfterJobFinishes") is not True:
        problems.append(f"{RAYJOB}: shutdownAfterJobFinishes must be true")
    problems += _entrypoint_problems(root, spec.get("entrypoint", ""), mount, image)
    env = (yaml.safe_load(spec.get("runtimeEnvYAML") or "{}") or {}).get("env_vars", {})
    problems += _env_problems(f"{RAYJOB} runtimeEnvYAML", env, mount, image)
    resent = sorted(set(env) & {*FORWARDED_ENV, TRAIN_POLL_ENV})  # job_env() sets them again
    if resent and env.get("RAY_OVERRIDE_JOB_RUNTIME_ENV") != "1":
        problems.append(f"{RAYJOB}: runtimeEnvYAML sets {resent}, "
                        "which `moco-ray run` passes to ray.init again; without "
                        "RAY_OVERRIDE_JOB_RUNTIME_ENV: \"1\" Ray refuses the driver")
    problems += _launcher_problems(root, mount, image)
    problems += _data_problems(root, image)
    return problems


def test_launch_artifacts_agree():
    assert cluster_problems(ROOT) == []


def _copy(tmp_path: Path) -> Path:
    for rel in FILES:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, tmp_path / rel)
    shutil.copytree(ROOT / "configs" / "gpu", tmp_path / "configs" / "gpu")
    return tmp_path


IMAGE = "image: registry.example.com/moco-ray:0.1.0-vllm0.32.0"
W16, W18 = " " * 16, " " * 18  # indents of the RayCluster / RayJob worker's container keys
# name: (file, old text, new text, a phrase of the problem the edit must cause)
MUTATIONS = {
    "worker on another image": (RAYJOB, W16 + IMAGE, W16 + IMAGE.replace("32", "31"),
                                "same image"),
    "launcher on another image": (LAUNCHER, IMAGE, IMAGE.replace("0.1.0-vllm0.32.0", "latest"),
                                  "same image"),
    "vllm pin bumped in pyproject only": ("pyproject.toml", 'gpu = ["vllm==0.32.0"]',
                                          'gpu = ["vllm==0.33.0"]', "install vllm==0.33.0"),
    "vllm unpinned in pyproject": ("pyproject.toml", 'gpu = ["vllm==0.32.0"]',
                                   'gpu = ["vllm>=0.32"]', "pin vllm to one version"),
    "vllm unpinned in install.sh": (INSTALL, 'install "vllm==0.32.0"', "install vllm",
                                    "must install vllm==0.32.0"),
    "image no longer runs install.sh gpu": ("Dockerfile", "bash cluster/install.sh gpu",
                                            "bash cluster/install.sh cpu", "install.sh gpu"),
    "worker mounts the volume elsewhere": (RAYCLUSTER, W16 + "- {name: shared, mountPath: /mnt/moco}",
                                           W16 + "- {name: shared, mountPath: /mnt/data}",
                                           "mounted at /mnt/data"),
    "job worker without the volume": (RAYJOB, W18 + "- {name: shared, mountPath: /mnt/moco}\n",
                                      "", "mounted at None"),
    "volume not ReadWriteMany": (PVC, "accessModes: [ReadWriteMany]",
                                 "accessModes: [ReadWriteOnce]", "ReadWriteMany"),
    "storage off the volume": (RAYJOB, "--storage /mnt/moco/runs", "--storage /tmp/runs",
                               "storage '/tmp/runs'"),
    "storage left to the config": (RAYJOB, " --storage /mnt/moco/runs", "",
                                   "the run's storage"),
    "ray GPUs differ from k8s GPUs": (RAYCLUSTER, 'num-gpus: "8"', 'num-gpus: "4"',
                                      "must equal rayStartParams num-gpus 4"),
    "head takes CPUs": (RAYJOB, '        num-cpus: "0"', '        num-cpus: "1"', "num-cpus"),
    "no backoffLimit": (RAYJOB, "  backoffLimit: 2                 # retries of the whole job",
                        "  # retries of the whole job", "spec.backoffLimit"),
    "no activeDeadlineSeconds": (RAYJOB, "activeDeadlineSeconds: 86400", "suspend: false",
                                 "spec.activeDeadlineSeconds"),
    "HF cache off the volume": (RAYJOB, "HF_HOME: /mnt/moco/hf", "HF_HOME: /root/.cache/hf",
                                "HF_HOME='/root/.cache/hf'"),
    "no runtime env override": (RAYJOB, '      RAY_OVERRIDE_JOB_RUNTIME_ENV: "1"\n', "",
                                "RAY_OVERRIDE_JOB_RUNTIME_ENV"),
    "job reads task files the image lacks": (RAYJOB, "MOCO_RAY_DATA: /opt/moco_ray/data/moco",
                                             "MOCO_RAY_DATA: /data/moco", "MOCO_RAY_DATA"),
    "launcher key misspelt": (LAUNCHER, "  pull_before_run: true", "  pull_before_runs: true",
                              "Ray's schema"),
    "launcher hosts without the volume": (LAUNCHER, "-v /mnt/moco:/mnt/moco", "-v /mnt:/mnt",
                                          "-v /mnt/moco:/mnt/moco"),
    "cluster env cache off the volume": (RAYCLUSTER, "{name: MOCO_RAY_CACHE, value: /mnt/moco/cache}",
                                         "{name: MOCO_RAY_CACHE, value: /tmp/c}",
                                         "MOCO_RAY_CACHE='/tmp/c'"),
    "task files git-ignored": (".gitignore", "/runs/\n", "/runs/\ndata/\n",
                               ".gitignore leaves out"),
    "task files docker-ignored": (".dockerignore", ".venv\n", ".venv\ndata\n",
                                  ".dockerignore leaves out"),
    "image keeps data elsewhere": ("Dockerfile", "ENV MOCO_RAY_DATA=/opt/moco_ray/data/moco",
                                   "ENV MOCO_RAY_DATA=/opt/data", "MOCO_RAY_DATA='/opt/data'"),
}


@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_a_changed_value_is_reported(tmp_path, name):
    rel, old, new, phrase = MUTATIONS[name]
    root = _copy(tmp_path)
    text = (root / rel).read_text()
    assert text.count(old) == 1, f"mutation {name!r} no longer applies to {rel}"
    (root / rel).write_text(text.replace(old, new))
    problems = cluster_problems(root)
    assert any(phrase in p for p in problems), problems
