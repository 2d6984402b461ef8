"""A user's first-hour mistakes, each through the real CLI: exit code, one clear line, no traceback, nothing left.

Every case runs `python -m launcher.cli ...` from the repo root with HF_HUB_OFFLINE=1 (no network). Almost all
fail in the launcher's pre-flight within seconds, before any rank starts; `RANK_CASES` start two tiny ranks.

    python -m tests.test_badinput          # prints the table of cases and what each prints now (markdown)
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.helpers import run_cli

pytestmark = pytest.mark.badinput

FAST = ["train.max_steps=2", "train.warmup_steps=0", "train.global_batch_size=2", "train.micro_batch_size=1"]
FAST += [
    "train.exact_match_eval=false",
    "train.check_packing=false",
    "train.export=false",
    "logging.wandb_mode=disabled",
]
GOOD_ROW = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def jl(*rows) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


@dataclass
class Case:
    id: str
    args: list[str]
    expect: list[str]  # substrings (regexes when starting with "re:") the one stderr line must contain
    files: dict[str, str | bytes] = field(default_factory=dict)  # written under tmp before the run
    code: int = 2
    command: str = "launch"
    ranks: bool = False  # starts ranks (slower): the launcher prints the rank's error
    what: str = ""


def data(path: str) -> list[str]:
    """One user source and no eval data (so no eval settings either: they would be ignored, an error)."""
    return [f"data.sources=[{{path: {path}}}]", "train.eval_every=0", "train.exact_match_eval=false"]


CASES = [
    # ---- compose: Hydra's detail plus "did you mean" ----
    Case("type", ["train.max_steps=ten"], ["train.max_steps='ten'", "expected integer"]),
    Case(
        "enum", ["model.attention=flash"], ["model.attention='flash'", "flash_attention_2", "sdpa", "eager"]
    ),
    Case(
        "enum_in_list",
        ["data.sources=[{path: x.jsonl, format: sharegtp}]"],
        ["format", "did you mean 'sharegpt'"],
    ),
    Case(
        "key_in_list",
        ["data.sources=[{path: x, formt: sharegpt}]"],
        ["data.sources", "formt", "did you mean 'format'"],
    ),
    Case("top_key", ["trian.max_steps=3"], ["'trian'", "did you mean 'train'", "re:^(?!.*\\+trian)"]),
    Case("plus_key", ["+train.max_stepz=3"], ["train.max_stepz", "did you mean 'max_steps'"]),
    Case("nested_key", ["train.max_stepz=3"], ["train.max_stepz", "did you mean 'max_steps'"]),
    Case("group_option", ["model=tnyi"], ["model=tnyi", "did you mean 'tiny'", "hf, tiny"]),
    Case("no_equals", ["train.max_steps"], ["cannot parse override", "train.max_steps", "key=value"]),
    Case(
        "float_in_list",
        ["data.sources=[{path: a.jsonl, weight: heavy}]"],
        ["weight='heavy'", "expected float"],
    ),
    # ---- values validate() catches before anything starts ----
    Case("log_every", ["train.log_every=0"], ["train.log_every=0 must be >= 1"]),
    Case("global_batch_0", ["train.global_batch_size=0"], ["train.global_batch_size=0 must be positive"]),
    Case("global_batch_7", ["train.global_batch_size=7"], ["global_batch_size=7 must be divisible"]),
    Case("save_every", ["train.save_every=-1"], ["train.save_every=-1 must be >= 0"]),
    Case(
        "sp_heads",
        ["train.sequence_parallel_size=2", "model.init.num_key_value_heads=1", "train.global_batch_size=4"],
        [
            "train.sequence_parallel_size=2 must divide the model's attention heads (4) and key/value heads (1)"
        ],
    ),
    Case(
        "sp_linear_attention",
        ["train.sequence_parallel_size=2", "model.init.model_type=qwen3_5_text", "train.global_batch_size=4"],
        [
            "train.sequence_parallel_size=2: Qwen3.5 (dense, text): linear-attention and short-convolution layers",
            "a recurrence split across ranks would need its state passed between them",
            "set train.sequence_parallel_size=1",
        ],
    ),
    Case("eval_every", ["train.eval_every=-5"], ["train.eval_every=-5 must be >= 0"]),
    Case("grad_clip", ["train.grad_clip=-1.0"], ["train.grad_clip=-1.0 must be >= 0"]),
    Case("eval_size", ["data.eval_size=-3"], ["data.eval_size=-3 must be >= 0"]),
    Case("num_proc", ["data.num_proc=0"], ["data.num_proc=0 must be >= 1"]),
    Case("lr", ["train.lr=0"], ["train.lr=0"]),
    Case("beta2", ["train.adam_beta2=1.0"], ["train.adam_beta2=1.0 must be in [0, 1)"]),
    Case("timeout", ["deepspeed.timeout_minutes=0"], ["deepspeed.timeout_minutes=0.0 must be positive"]),
    Case(
        "sample_fraction",
        [
            "data.sources=[{path: a.jsonl, sample_fraction: 1.5}]",
            "train.eval_every=0",
            "train.exact_match_eval=false",
        ],
        ["re:^error: invalid config: data.sources\\[0\\].sample_fraction=1.5 must be in \\(0, 1\\]$"],
    ),
    Case(
        "checkpoint_offload_without_checkpointing",
        ["model.checkpoint_offload=true"],
        ["re:^error: invalid config: model.checkpoint_offload=true needs model.gradient_checkpointing=true"],
    ),
    # ---- the command line ----
    Case("nproc_missing", ["--nproc"], ["sft launch: argument --nproc: expected one argument"]),
    Case("nproc_word", ["--nproc", "two"], ["argument --nproc", "positive whole number, got 'two'"]),
    Case("command_typo", [], ["unknown command 'lanch'", "did you mean 'launch'"], command="lanch"),
    Case("preview_n", ["-n"], ["sft preview: argument -n: expected one argument"], command="preview"),
    # ---- model, tokenizer, hub ----
    Case(
        "model_dir_missing",
        ["model=hf", "model.name_or_path={tmp}/no-such-model"],
        ["model.name_or_path", "{tmp}/no-such-model", "no local directory"],
    ),
    Case(
        "model_hub_typo_offline",
        ["model=hf", "model.name_or_path=Qwen/Qwen2.5-0.5B-Instrcut"],
        ["Qwen/Qwen2.5-0.5B-Instrcut", "no local directory", "hub is offline"],
    ),
    Case(
        "model_is_file",
        ["model=hf", "model.name_or_path={tmp}/model.bin"],
        ["model.name_or_path", "is a file"],
        files={"model.bin": "x"},
    ),
    Case(
        "model_dir_no_config",
        ["model=hf", "model.name_or_path={tmp}/m"],
        ["{tmp}/m", "has no config.json"],
        files={"m/README.md": "x"},
    ),
    Case(
        "model_dir_no_weights",
        ["model=hf", "model.name_or_path={tmp}/m"],
        ["{tmp}/m", "has no weights"],
        files={"m/config.json": "{}"},
    ),
    Case(
        "tokenizer_missing",
        ["model.tokenizer={tmp}/tok"],
        ["model.tokenizer", "{tmp}/tok", "no local directory"],
    ),
    Case("data_oasst_offline", ["data=oasst"], ["OpenAssistant/oasst1", "hub is offline"]),
    # ---- files the run needs ----
    Case(
        "data_file_missing",
        data("{tmp}/chats.jsonl"),
        ["data.sources[0].path", "{tmp}/chats.jsonl", "no such file"],
    ),
    Case(
        "data_file_type",
        data("{tmp}/chats.txt"),
        ["chats.txt", "unsupported file type '.txt'"],
        files={"chats.txt": "hi"},
    ),
    Case(
        "ds_config_missing",
        ["deepspeed.config_file={tmp}/ds.json"],
        ["deepspeed.config_file", "{tmp}/ds.json", "no such file"],
    ),
    Case(
        "ds_config_bad_json",
        ["deepspeed.config_file={tmp}/ds.json"],
        ["ds.json:3:", "malformed JSON"],
        files={"ds.json": '{\n  "a": 1,\n  oops\n}'},
    ),
    Case(
        "ds_config_not_object",
        ["deepspeed.config_file={tmp}/ds.json"],
        ["ds.json", "expected a JSON object"],
        files={"ds.json": "[1]"},
    ),
    Case(
        "resume_auto_default_dir",
        ["train.resume=auto", "run_dir=runs/${now:%Y%m%d-%H%M%S}"],  # the default, spelled out
        ["train.resume=auto needs the run's own run_dir"],
    ),
    Case("eval_ignored", ["data.eval_fraction=0.02"], ["data.eval_fraction=0.02 would be ignored"]),
    Case(
        "eval_every_no_eval_data",
        ["data.sources=[{path: {tmp}/chats.jsonl}]", "train.exact_match_eval=false"],
        ["train.eval_every=100 but there is no eval data"],
        files={"chats.jsonl": jl(GOOD_ROW)},
    ),
    Case("resume_missing", ["train.resume={tmp}/ckpt"], ["train.resume", "{tmp}/ckpt", "no such directory"]),
    Case(
        "resume_not_ckpt",
        ["train.resume={tmp}/ckpt"],
        ["train.resume", "no step<N> dir with a manifest.json"],
        files={"ckpt/x": ""},
    ),
    Case(
        "run_dir_under_file",
        ["run_dir={tmp}/afile/run"],
        ["run_dir", "afile is a file"],
        files={"afile": "x"},
    ),
    Case("run_dir_impossible", ["run_dir=/proc/sft-run"], ["run_dir=/proc/sft-run", "cannot write in /proc"]),
    Case(
        "cache_dir_impossible", ["cache_dir=/proc/sft-cache"], ["cache_dir=/proc/sft-cache", "cannot write"]
    ),
    Case("bf16_on_cpu", ["model.dtype=bf16"], ["model.dtype=bf16 on CPU"]),
    # ---- data rows: file, 1-based line/row, field or byte offset ----
    Case(
        "non_utf8",
        data("{tmp}/d.jsonl"),
        ["d.jsonl:2", "not UTF-8", "byte 0xff", "byte offset"],
        files={"d.jsonl": jl(GOOD_ROW).encode() + b'{"messages": "\xff"}\n'},
    ),
    Case(
        "malformed_json",
        data("{tmp}/d.jsonl"),
        ["d.jsonl:3", "malformed JSON at column 15", "byte offset"],
        files={"d.jsonl": jl(GOOD_ROW, GOOD_ROW, '{"messages": [}')},
    ),
    Case(
        "json_array_row",
        data("{tmp}/d.json"),
        ["d.json: row 2", "expected a JSON object"],
        files={"d.json": json.dumps([GOOD_ROW, 7])},
    ),
    Case(
        "json_array_field",
        data("{tmp}/d.json"),
        ["d.json: row 1", "messages[1] needs 'role' and 'content'"],
        files={
            "d.json": json.dumps([{"messages": [{"role": "user", "content": "a"}, {"role": "assistant"}]}])
        },
    ),
    Case(
        "csv_non_utf8",
        [*data("{tmp}/d.csv")],
        ["d.csv:3", "not UTF-8"],
        files={"d.csv": b"prompt,completion\na,b\nc,\xe9\n"},
    ),
    Case(
        "starts_with_assistant",
        data("{tmp}/d.jsonl"),
        ["d.jsonl:2", "messages[0] is the assistant's"],
        files={
            "d.jsonl": jl(
                GOOD_ROW,
                {
                    "messages": [
                        {"role": "assistant", "content": "a"},
                        {"role": "user", "content": "b"},
                        {"role": "assistant", "content": "c"},
                    ]
                },
            )
        },
    ),
    Case(
        "two_user_turns",
        data("{tmp}/d.jsonl"),
        ["d.jsonl:1", "messages[1] is a second user turn"],
        files={
            "d.jsonl": jl(
                {
                    "messages": [
                        {"role": "user", "content": "a"},
                        {"role": "user", "content": "b"},
                        {"role": "assistant", "content": "c"},
                    ]
                }
            )
        },
    ),
    Case("empty_file", data("{tmp}/d.jsonl"), ["no training rows left", "read 0"], files={"d.jsonl": ""}),
    Case(
        "max_length_below_overhead",
        [*data("{tmp}/d.jsonl"), "data.max_length=4"],
        ["no training rows left", "data.max_length=4", "overlong=1"],
        files={"d.jsonl": jl(GOOD_ROW)},
    ),
    # ---- found only inside the ranks: printed once by the launcher, traceback kept in the run dir ----
    Case(
        "model_init_invalid",
        ["model.init.num_attention_heads=3"],
        ["model.init", "not a multiple of the number of attention heads"],
    ),
    Case(
        "attention_needs_cuda",
        ["model.attention=torch_varlen"],
        ["model.attention=torch_varlen is refused: it needs CUDA", "model.attention=auto picks sdpa"],
    ),
    Case(
        "rank_bad_deepspeed_json",
        [*FAST, "deepspeed.config_file={tmp}/ds.json"],
        ["re:^error \\(rank \\d\\): ", "stage", "traceback: "],
        files={"ds.json": '{"zero_optimization": {"stage": "three"}}'},
        ranks=True,
    ),
]


def materialise(case: Case, tmp: Path) -> list[str]:
    for rel, content in case.files.items():
        p = tmp / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content if isinstance(content, bytes) else content.encode())
    args = [a.replace("{tmp}", str(tmp)) for a in case.args]
    extra = []
    if case.command in ("launch", "train", "prepare") and not any(
        a.startswith("--") or a == "-n" for a in args
    ):
        extra = [f"run_dir={tmp}/run", f"cache_dir={tmp}/cache"]
        extra = [e for e in extra if not any(a.startswith(e.split("=")[0] + "=") for a in args)]
    nproc = (
        ["--nproc", "2"]
        if case.command == "launch" and not any(a.startswith("--nproc") for a in args)
        else []
    )
    return [case.command, *nproc, *args, *extra]


def run_case(case: Case, tmp: Path) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.time()
    proc = run_cli(
        materialise(case, tmp), {"OMP_NUM_THREADS": "1", "SFT_DEBUG": ""}, timeout=600 if case.ranks else 120
    )
    return proc, time.time() - t0


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.strip()]


# A compose, a model and a data case run in `make test-fast` (each case is a new interpreter, ~3 s);
# all of them run in `make test`.
FAST_CASES = {"type", "model_dir_missing", "data_file_missing"}


@pytest.mark.parametrize(
    "case", [pytest.param(c, id=c.id, marks=() if c.id in FAST_CASES else pytest.mark.slow) for c in CASES]
)
def test_bad_input_is_one_clear_line(case, tmp_path):
    if case.id == "bf16_on_cpu":
        import torch

        if torch.cuda.is_available():
            pytest.skip("bf16 is fine on this GPU")
    proc, took = run_case(case, tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == case.code, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    lines = error_lines(proc)
    assert len(lines) == 1, f"expected exactly one line on stderr, got {len(lines)}:\n" + proc.stderr[-3000:]
    for want in case.expect:
        want = want.replace("{tmp}", str(tmp_path))
        if want.startswith("re:"):
            assert re.search(want[3:], lines[0]), (want, lines[0])
        else:
            assert want in lines[0], (want, lines[0])
    run_dir = tmp_path / "run"
    if not case.ranks:
        # Failed before anything started: no run dir, no ranks, no launch line.
        assert not run_dir.exists(), sorted(p.name for p in run_dir.iterdir())
        assert "launching:" not in proc.stdout
        assert took < 60, f"pre-flight took {took:.0f}s"
    else:
        # Nothing a later run would take for a finished or resumable one; the rank's traceback is kept.
        assert not (run_dir / "results.json").exists() and not (run_dir / "checkpoints" / "latest").exists()
        assert not (run_dir / "export").exists()
        tb = re.search(r"traceback: (\S+)\]", lines[0]).group(1)
        assert Path(tb).is_file() and Path(tb).is_relative_to(run_dir) and "Traceback" in Path(tb).read_text()


def test_help_and_version():
    for command in ("launch", "train", "prepare", "preview", "check", "config"):
        proc = run_cli([command, "--help"], expect_code=0)
        assert proc.stderr == "", proc.stderr
        assert proc.stdout.startswith(f"usage: sft {command}") and "model      hf, tiny" in proc.stdout
        assert "sft config" in proc.stdout  # how to list every key
    proc = run_cli(["--version"], expect_code=0)
    assert re.fullmatch(r"sft-launcher \S+\n", proc.stdout), proc.stdout


def table(tmp_root: Path) -> str:
    """The cases and what each prints now, as a markdown table (generated, for the closing note)."""
    rows = ["| case | command line | exit | seconds | what it prints (stderr) |", "|---|---|---|---|---|"]
    for case in CASES:
        tmp = tmp_root / case.id
        tmp.mkdir(parents=True)
        proc, took = run_case(case, tmp)
        line = " / ".join(error_lines(proc)).replace(str(tmp), "$TMP").replace("|", "\\|")
        cmd = " ".join(materialise(case, tmp)).replace(str(tmp), "$TMP").replace("|", "\\|")
        cmd = re.sub(r" run_dir=\$TMP/run| cache_dir=\$TMP/cache", "", cmd)
        rows.append(f"| {case.id} | `sft {cmd}` | {proc.returncode} | {took:.1f} | {line} |")
    return "\n".join(rows)


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        print(table(Path(d)))


SECRETS = {
    "WANDB_API_KEY": "fake-wandb-key-0123456789abcdef",
    "HF_TOKEN": "hf_fakeTokenValue0123456789",
    "MY_SERVICE_TOKEN": "fake-service-token-abcdef",
}


@pytest.mark.slow
def test_a_run_keeps_secrets_out_and_third_party_noise_off(tmp_path):
    """A tiny real run with fake secrets in the environment: none of them lands in any file of the run dir
    (config.yaml, metrics, logs, wandb's offline files), and the console carries no deprecation noise."""
    run_dir = tmp_path / "run"
    args = ["launch", "--nproc", "2", *FAST, "logging.wandb_mode=offline", "train.export=true"]
    args += [f"run_dir={run_dir}", f"cache_dir={tmp_path / 'cache'}"]
    proc = run_cli(args, {**SECRETS, "OMP_NUM_THREADS": "1"}, expect_code=0, timeout=600)
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert any(p.suffix == ".wandb" for p in files) and (run_dir / "config.yaml").exists(), files
    for p in files:
        blob = p.read_bytes()
        for name, value in SECRETS.items():
            assert value.encode() not in blob, f"{name} leaked into {p}"
    console = proc.stdout + proc.stderr
    for noise in ("FutureWarning", "DeprecationWarning", "Writing model shards", "Loading checkpoint shards"):
        assert noise not in console, console[-3000:]


def test_sft_debug_shows_the_traceback():
    proc = run_cli(["config", "train.max_stepz=3"], {"SFT_DEBUG": "1"}, expect_code=1)
    assert "Traceback" in proc.stderr and "max_stepz" in proc.stderr, proc.stderr[-2000:]
    plain = run_cli(["config", "train.max_stepz=3"], {"SFT_DEBUG": ""}, expect_code=2)
    assert "Traceback" not in plain.stderr
