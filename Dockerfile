# syntax=docker/dockerfile:1
# The moco_ray GPU image: every node of cluster/kuberay/*.yaml and cluster/ray-cluster-aws.yaml
# runs it, under the tag those files name. Build from the repo root, with the MoCo task files
# copied in first (docs/cluster.md):
#   mkdir -p data && cp -r ../shared/data/moco data/moco
#   docker build -t registry.example.com/moco-ray:0.1.0-vllm0.32.0 .
# Tag: <project version>-vllm<the vllm pin>; tests/test_cluster_manifests.py checks the
# manifests name it. NOT BUILT OR RUN in the project's dev environment (no docker, no network).
#
# Base: CUDA 13 "devel", not "runtime": vllm 0.32.0 runs on torch 2.13.0 built for CUDA 13 (the
# wheels bring their own CUDA libraries), and at run time Triton compiles its launchers with gcc
# against Python.h, and FlashInfer JIT-compiles kernels with nvcc; the runtime image has neither.
# Nodes need an NVIDIA driver that runs CUDA 13 (>= 580).
ARG BASE_IMAGE=nvidia/cuda:13.0.0-devel-ubuntu24.04
FROM ${BASE_IMAGE}

# python3-dev: Triton's launcher build. wget: KubeRay's exec health probes. rsync and
# openssh-client: the Ray cluster launcher's file sync.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3 python3-venv python3-dev build-essential wget rsync openssh-client ca-certificates \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/moco_ray
# install.sh builds the venv here; it is first on PATH for `ray start`, `ray job submit` and
# `moco-ray`, including login shells (KubeRay starts Ray with `bash -l`).
ENV MOCO_RAY_VENV=/opt/venv \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1
RUN echo 'export PATH=/opt/venv/bin:$PATH' > /etc/profile.d/moco-ray-venv.sh

# The package and its installer first: a change elsewhere (configs, data, docs) reuses this layer.
# pip's cache survives rebuilds (BuildKit), so a code change does not download vllm again.
COPY pyproject.toml README.md ./
COPY cluster/install.sh cluster/install.sh
COPY moco_ray moco_ray
RUN --mount=type=cache,target=/root/.cache/pip bash cluster/install.sh gpu

COPY . .
# MoCo task files, read on the driver (moco_ray/tasks/loaders.py). The build stops here when
# they were not copied into ./data/moco.
ENV MOCO_RAY_DATA=/opt/moco_ray/data/moco
RUN ls "$MOCO_RAY_DATA"/*.json >/dev/null 2>&1 \
    || { echo "no MoCo task files in ./data/moco: copy them in before building (docs/cluster.md)" >&2; exit 1; }
