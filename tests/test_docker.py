"""The Docker image, built and run for real: docker/Dockerfile on a local debootstrap base (CPU torch, no
flash-attn) trains with 2 CPU ranks in one container, and as two nodes in two containers on a user-defined
network, writing into a run dir mounted from the host.

`docker/test-env.sh` provides the daemon (as root with apt it installs docker.io and starts dockerd when none
answers; the tests stop that daemon at the end) and the base image. Without root/apt the tests skip, saying why.
The daemon's data root persists, so the base image and the build cache survive between runs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.helpers import ROOT

pytestmark = [pytest.mark.docker, pytest.mark.slow]

IMAGE = "sft-launcher:test"
LABEL = "sft-launcher-test"  # on every container and network the tests make, so leftovers can be found
# A tiny run: 2-layer model, 256 demo conversations, 4 steps; the packing self-check and wandb (offline) on.
TRAIN = [
    "model.init.num_hidden_layers=2",
    "model.init.hidden_size=64",
    "model.init.intermediate_size=128",
    "data.max_length=256",
    "data.sources.0.sample=256",
    "train.max_steps=4",
    "train.warmup_steps=1",
    "train.log_every=1",
    "train.exact_match_eval=false",
    "train.check_packing=true",
    "logging.wandb_mode=offline",
    "logging.progress=false",
]


def say(msg: str) -> None:
    """Measured times go to the terminal (pytest -s) and stderr of the test report."""
    print(f"[docker] {msg}", file=sys.stderr, flush=True)


def stop_daemon(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGTERM)  # dockerd stops its containers and its containerd on the way out
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.5)
    os.kill(pid, signal.SIGKILL)


class Docker:
    def __init__(self, client: str):
        self.client = client

    def __call__(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [self.client, *args], capture_output=True, text=True, timeout=timeout, env=self.env()
        )
        if check:
            assert proc.returncode == 0, f"docker {' '.join(args[:3])}...: {proc.stderr[-3000:]}"
        return proc

    def env(self) -> dict:
        return {**os.environ, "DOCKER_BUILDKIT": "1"}

    def remove_leftovers(self) -> None:
        """Containers and networks of an earlier, interrupted run."""
        ids = self("ps", "-aq", "--filter", f"label={LABEL}").stdout.split()
        if ids:
            self("rm", "-f", *ids, check=False)
        self("network", "prune", "-f", "--filter", f"label={LABEL}", check=False)

    def wait(self, name: str, timeout: float) -> tuple[int, str, str]:
        """Exit code, stdout and stderr of a detached container. `docker wait` under a timeout: a timed-out
        `docker run` client would leave the container running (the caller removes it)."""
        try:
            code = int(self("wait", name, timeout=timeout).stdout.strip())
        except subprocess.TimeoutExpired:
            code = -1
        logs = self("logs", name, check=False)
        return code, logs.stdout, logs.stderr


@pytest.fixture(scope="session")
def docker():
    try:
        proc = subprocess.run(
            ["bash", str(ROOT / "docker" / "test-env.sh")], capture_output=True, text=True, timeout=900
        )
    except subprocess.TimeoutExpired:
        pytest.fail("docker/test-env.sh took more than 15 minutes")
    if proc.returncode == 3:
        pytest.skip(proc.stderr.strip().splitlines()[-1])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    env = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    d = Docker(env["DOCKER"])
    d.base = env["BASE_IMAGE"]
    d.remove_leftovers()
    yield d
    d.remove_leftovers()
    if env["DOCKERD_PID"]:
        stop_daemon(int(env["DOCKERD_PID"]))


def torch_version() -> str:
    """The one pin: docker/Dockerfile's TORCH_VERSION."""
    return re.search(r"^ARG TORCH_VERSION=(\S+)$", (ROOT / "docker/Dockerfile").read_text(), re.M)[1]


def cpu_torch_wheels() -> list[Path]:
    """This machine's CPU torch wheels in pip's find-links (a plain `pip install torch` in the container would
    fetch the multi-GB CUDA build)."""
    links = os.environ.get("PIP_FIND_LINKS", "").split()
    conf = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True)
    links += [w for m in re.findall(r"find-links='([^']*)'", conf.stdout) for w in m.split()]
    dirs = {
        Path(link.removeprefix("file://")) for link in links if "://" not in link or link.startswith("file:")
    }
    return sorted({w for d in dirs if d.is_dir() for w in d.glob(f"torch-{torch_version()}+cpu-*.whl")})


def build_context(dest: Path, wheels: list[Path]) -> None:
    """The repository's files (tracked and untracked, not ignored), with docker/local/ filled: this machine's
    extra CA certificates (its TLS is re-signed) and the CPU torch wheel. Nothing lands in the checkout."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.split(b"\0")
    for rel in filter(None, (f.decode() for f in files)):
        if (ROOT / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dest / rel)
    local = dest / "docker" / "local"
    (local / "certs").mkdir(parents=True)
    (local / "wheels").mkdir()
    for crt in Path("/usr/local/share/ca-certificates").glob("**/*.crt"):
        shutil.copy(crt, local / "certs" / crt.name)
    for wheel in wheels:
        try:
            os.link(wheel, local / "wheels" / wheel.name)
        except OSError:
            shutil.copy(wheel, local / "wheels" / wheel.name)


@pytest.fixture(scope="session")
def image(docker, tmp_path_factory):
    """The image built from docker/Dockerfile with BASE_IMAGE = the debootstrap import; its (uid, gid)."""
    wheels = cpu_torch_wheels()
    if not wheels:
        pytest.skip(f"no CPU wheel of torch=={torch_version()} in pip's find-links to copy into the build")
    ctx = tmp_path_factory.mktemp("docker-context")
    build_context(ctx, wheels)
    cmd = ["build", "-f", "docker/Dockerfile", "-t", IMAGE, "--build-arg", f"BASE_IMAGE={docker.base}"]
    cmd += ["--build-arg", "FLASH_ATTN=0", "."]
    t0 = time.monotonic()
    proc = subprocess.run(
        [docker.client, *cmd], cwd=ctx, env=docker.env(), capture_output=True, text=True, timeout=2400
    )
    shutil.rmtree(ctx)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    # The image this build replaced, now untagged (its layers stay cached while anything uses them).
    docker("image", "prune", "-f", "--filter", "label=org.opencontainers.image.title=sft-launcher")
    size = int(docker("image", "inspect", "-f", "{{.Size}}", IMAGE).stdout)
    say(f"image build {time.monotonic() - t0:.1f} s, image size {size / 1e9:.2f} GB")
    ids = docker("run", "--rm", "--network", "none", "--entrypoint", "sh", IMAGE, "-c", "id -u; id -g")
    uid, gid = map(int, ids.stdout.split())
    return uid, gid


PROBE = r"""
import importlib.util, json, subprocess, sys
import deepspeed.ops.comm.deepspeed_shm_comm_op  # prebuilt: no compiler at first use
import os
import launcher
from launcher.config import compose
cfg = compose()  # the defaults land in the /runs mount: data cache and run dir
freeze = subprocess.run([sys.executable, "-m", "pip", "freeze"], capture_output=True, text=True).stdout
print(json.dumps({
    "launcher": launcher.__file__,
    "dirs": [cfg.cache_dir, os.path.abspath(cfg.run_dir)],
    "flash_attn": importlib.util.find_spec("flash_attn") is not None,
    "freeze": freeze.splitlines(),
}))
"""


def test_image_runs_as_non_root_with_sft_and_the_locked_versions(docker, image):
    uid, _ = image
    config = json.loads(docker("image", "inspect", IMAGE).stdout)[0]["Config"]
    assert config["Entrypoint"] == ["sft"] and config["User"] == str(uid) and uid != 0, config
    # `sft config` from the installed package (not editable: no checkout in the image), in a container.
    out = docker("run", "--rm", "--network", "none", IMAGE, "config", "train.max_steps=7").stdout
    assert "max_steps: 7" in out, out
    probe = docker("run", "--rm", "--network", "none", "--entrypoint", "python", IMAGE, "-c", PROBE)
    got = json.loads(probe.stdout.strip().splitlines()[-1])
    assert got["launcher"].startswith("/opt/venv/lib/") and "site-packages" in got["launcher"], got[
        "launcher"
    ]
    assert not got["flash_attn"], "FLASH_ATTN=0 installs no flash-attn"
    assert got["dirs"][0] == "/runs/.cache/sft" and got["dirs"][1].startswith("/runs/"), got["dirs"]
    lock = dict(
        line.split("==") for line in (ROOT / "requirements-lock.txt").read_text().splitlines() if "==" in line
    )
    installed = dict(line.split("==") for line in got["freeze"] if "==" in line)
    norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()  # noqa: E731
    locked = {norm(k): v for k, v in lock.items()}
    mismatched = {k: (v, locked[norm(k)]) for k, v in installed.items() if locked.get(norm(k), v) != v}
    assert not mismatched, f"installed != locked: {mismatched}"
    assert {"deepspeed", "transformers", "accelerate"} <= {norm(k) for k in installed}
    # RDMA userspace for NCCL: libibverbs with its providers, and ibv_devinfo to check a node's HCAs.
    libs = docker("run", "--rm", "--network", "none", "--entrypoint", "sh", IMAGE, "-c", "ldconfig -p")
    assert "libibverbs.so.1" in libs.stdout and "librdmacm.so.1" in libs.stdout
    docker("run", "--rm", "--network", "none", "--entrypoint", "sh", IMAGE, "-c", "command -v ibv_devinfo")


def writable_run_dir(path: Path, uid: int, gid: int) -> Path:
    path.mkdir()
    os.chown(path, uid, gid)  # the container's non-root user writes here
    return path


def assert_trained(runs: Path, steps: int, uid: int) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    job = runs / "job"
    rows = [json.loads(line) for line in (job / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, steps + 1)), rows
    assert all(r["loss"] > 0 for r in rows if "loss" in r)
    model = AutoModelForCausalLM.from_pretrained(job / "export")
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 64
    assert len(AutoTokenizer.from_pretrained(job / "export")) == model.config.vocab_size
    assert (job / "export" / "model.safetensors").stat().st_uid == uid != 0, "written by the non-root user"


def test_sft_launch_in_a_container_trains_two_cpu_ranks(docker, image, tmp_path):
    uid, gid = image
    runs = writable_run_dir(tmp_path / "runs", uid, gid)
    name = f"sft-test-{uuid.uuid4().hex[:8]}"
    # --network none: no network needed (bundled data and tokenizer); torchrun --standalone wants localhost.
    cmd = ["run", "-d", "--name", name, "--label", LABEL, "--network", "none", "--hostname", "localhost"]
    cmd += ["--user", f"{uid}:{gid}", "-v", f"{runs}:/runs", IMAGE, "launch", "--nproc", "2", *TRAIN]
    t0 = time.monotonic()
    try:
        docker(*cmd, "run_dir=/runs/job")
        code, out, err = docker.wait(name, timeout=600)
    finally:
        docker("rm", "-f", name, check=False)
    say(f"sft launch (2 CPU ranks) in a container: {time.monotonic() - t0:.1f} s")
    assert code == 0, out[-3000:] + err[-5000:]
    assert "x 2 ranks" in out and out.strip().splitlines()[-1] == "run_dir: /runs/job", out[-3000:]
    assert_trained(runs, 4, uid)


@pytest.mark.faults
def test_docker_stop_saves_a_checkpoint(docker, image, tmp_path):
    """`docker stop` sends SIGTERM to the container's PID 1, `sft launch`: the ranks agree on a step and save it
    within the grace period, and the container exits 75 with the launcher's one line."""
    uid, gid = image
    runs = writable_run_dir(tmp_path / "runs", uid, gid)
    name = f"sft-test-{uuid.uuid4().hex[:8]}"
    cmd = ["run", "-d", "--name", name, "--label", LABEL, "--network", "none", "--hostname", "localhost"]
    cmd += ["--user", f"{uid}:{gid}", "-v", f"{runs}:/runs", IMAGE, "launch", "--nproc", "2", *TRAIN]
    try:
        docker(*cmd, "train.max_steps=2000", "train.save_every=0", "run_dir=/runs/job")
        deadline = time.monotonic() + 300
        metrics = runs / "job" / "metrics.jsonl"
        while time.monotonic() < deadline and not (metrics.exists() and '"step": 2' in metrics.read_text()):
            time.sleep(0.2)
        docker("stop", "-t", "120", name, timeout=180)
        code, out, err = docker.wait(name, timeout=60)
    finally:
        docker("rm", "-f", name, check=False)
    assert code == 75, out[-3000:] + err[-5000:]
    found = re.search(
        r"^stopped on SIGTERM: checkpoint /runs/job/checkpoints/step(\d+) saved; resume with: ", err, re.M
    )
    assert found, err[-3000:]
    assert (runs / "job" / "checkpoints" / f"step{found[1]}" / "manifest.json").exists()


@pytest.mark.multinode
def test_two_node_containers_train_one_job(docker, image, tmp_path):
    """Two containers, one rank each, on a user-defined network: node 1 finds node 0 by its container name."""
    uid, gid = image
    runs = writable_run_dir(tmp_path / "runs", uid, gid)
    tag = uuid.uuid4().hex[:8]
    net, names = f"sft-test-net-{tag}", [f"sft-test-node{n}-{tag}" for n in (0, 1)]
    t0 = time.monotonic()
    docker("network", "create", "--label", LABEL, net)
    try:
        for node, name in enumerate(names):
            cmd = ["run", "-d", "--name", name, "--hostname", name, "--label", LABEL, "--network", net]
            cmd += ["--user", f"{uid}:{gid}", "-v", f"{runs}:/runs", "-e", "OMP_NUM_THREADS=1"]
            cmd += ["--entrypoint", "torchrun", IMAGE, "--nnodes=2", f"--node_rank={node}"]
            cmd += ["--nproc_per_node=1", f"--master_addr={names[0]}", "--master_port=29500"]
            docker(*cmd, "-m", "launcher.cli", "train", *TRAIN, "run_dir=/runs/job")
        results = [docker.wait(name, timeout=600) for name in names]
    finally:
        docker("rm", "-f", *names, check=False)
        docker("network", "rm", net, check=False)
    say(f"two-node job in two containers: {time.monotonic() - t0:.1f} s")
    logs = [out + err for _, out, err in results]
    assert [code for code, _, _ in results] == [0, 0], logs[0][-4000:] + logs[1][-4000:]
    assert "x 2 ranks" in results[0][1], logs[0][-3000:]
    assert_trained(runs, 4, uid)
    # One data cache on the shared mount: both nodes' local rank 0 built it at once, one copy landed.
    assert [p.name[:9] for p in (runs / ".cache" / "sft").iterdir()] == ["prepared-"]
