#!/usr/bin/env bash
# The build steps of docker/Dockerfile, run inside the image being built, one step per RUN (layers cache apart).
# The same steps serve a CUDA + PyTorch base (Python and torch already there) and a bare Debian/Ubuntu base.
#
#   system  apt: RDMA userspace, C++ compiler and Python headers, Python where the base has none; extra CAs
#   python  /opt/venv on top of the base's Python (its torch is kept); torch==TORCH_VERSION where there is none
#   deps    DeepSpeed with its ops prebuilt, the locked dependencies of pyproject.toml, flash-attn (FLASH_ATTN=1)
#
# Reads the build args TORCH_VERSION, FLASH_ATTN, FLASH_ATTN_VERSION, FLASH_ATTN_WHEELS, TORCH_CUDA_ARCH_LIST,
# and docker/local/{certs,wheels} when the build context has them (see the Dockerfile).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
venv=/opt/venv
src=/tmp/sft # pyproject.toml and requirements-lock.txt, bind-mounted where a step needs them

# The base's Python that imports torch, if any (before /opt/venv exists).
base_python() {
  local py
  for py in python3 python; do
    if command -v "$py" >/dev/null && "$py" -c "import torch" 2>/dev/null; then
      command -v "$py"
      return
    fi
  done
}

step_system() {
  # rdma-core's userspace libraries without the rdma-core package itself (udev and daemons: the host's job).
  local pkgs=(ca-certificates g++ libibverbs1 ibverbs-providers librdmacm1 ibverbs-utils)
  local py
  py=$(base_python)
  if [ -z "$py" ]; then
    pkgs+=(python3 python3-venv python3-dev)
  else
    # A system Python (e.g. NGC's) may lack headers or ensurepip; a conda Python ships both.
    "$py" -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(sysconfig.get_paths()["include"] + "/Python.h"))' ||
      pkgs+=(python3-dev)
    "$py" -c 'import ensurepip' 2>/dev/null || pkgs+=(python3-venv)
  fi
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${pkgs[@]}"
  rm -rf /var/lib/apt/lists/*
  if compgen -G "$here/local/certs/*.crt" >/dev/null; then
    cp "$here"/local/certs/*.crt /usr/local/share/ca-certificates/
    update-ca-certificates
  fi
}

step_python() {
  local py
  py=$(base_python)
  "${py:-/usr/bin/python3}" -m venv --system-site-packages "$venv"
  if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
    local links=()
    if [ -d "$here/local/wheels" ]; then links=(--find-links "$here/local/wheels"); fi
    "$venv/bin/pip" install "${links[@]}" -c "$src/requirements-lock.txt" "torch==${TORCH_VERSION:?}"
  fi
  "$venv/bin/python" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)'
}

step_deps() {
  local lock=$src/requirements-lock.txt
  local cuda
  cuda=$(python -c 'import torch; print(torch.version.cuda or "")')
  # setuptools from the lock: DeepSpeed and the project build without isolation, against the installed torch.
  pip install -c "$lock" setuptools
  # DeepSpeed builds with no GPU in sight: name the accelerator, and prebuild the ops our runs load.
  if [ -n "$cuda" ]; then
    DS_ACCELERATOR=cuda DS_BUILD_FUSED_ADAM=1 DS_BUILD_UTILS=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:?}" \
      pip install --no-build-isolation -c "$lock" deepspeed
  else
    # The shared-memory communication op the CPU accelerator compiles at first use otherwise.
    DS_ACCELERATOR=cpu DS_BUILD_SHM_COMM=1 pip install --no-build-isolation -c "$lock" deepspeed
    python -c 'import deepspeed.ops.comm.deepspeed_shm_comm_op'
  fi
  python - "$src/pyproject.toml" >/tmp/requirements.txt <<'PY'
import sys, tomllib
print("\n".join(tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]))
PY
  pip install -c "$lock" -r /tmp/requirements.txt
  rm /tmp/requirements.txt
  if [ "${FLASH_ATTN:?}" = 1 ]; then
    [ -n "$cuda" ] || { echo "FLASH_ATTN=1 needs a CUDA torch in the base image (set FLASH_ATTN=0)" >&2; exit 1; }
    local wheel
    wheel=$(python -c 'import platform, sys, torch
tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
cuda = torch.version.cuda.replace(".", "")
torch_mm = ".".join(torch.__version__.split("+")[0].split(".")[:2])
print(f"flash_attn-{sys.argv[1]}+cu{cuda}torch{torch_mm}-{tag}-{tag}-linux_{platform.machine()}.whl")' "${FLASH_ATTN_VERSION:?}")
    echo "flash-attn: ${FLASH_ATTN_WHEELS:?}/$wheel"
    # --no-deps: its dependencies (torch, einops) are in place; pip must not swap the base's torch.
    pip install --no-deps "$FLASH_ATTN_WHEELS/${wheel//+/%2B}"
    python -c 'import flash_attn; print("flash_attn", flash_attn.__version__)'
  fi
}

case "${1:-}" in
system | python | deps) "step_$1" ;;
*)
  echo "usage: $0 system|python|deps" >&2
  exit 2
  ;;
esac
