"""Read SFT sources and normalise every row to OpenAI-style messages, counting whatever is dropped.

Formats (detected per source from its columns, or set with `format`):
- messages:           {"messages": [{"role", "content"}, ...]}   roles system/user/assistant/tool
- sharegpt:           {"conversations": [{"from", "value"}, ...]} human/gpt/system/function_call/observation
- alpaca:             {"instruction", "input"?, "output"}        (also Dolly's instruction/context/response)
- prompt_completion:  {"prompt", "completion" | "response"}      (prompt may itself be a message list)
- oasst:              an OpenAssistant tree, {"prompt": node} or a root node itself, where a node is
                      {"text", "role": prompter|assistant, "rank"?, "deleted"?, "review_result"?, "replies": [...]};
                      or oasst1's flat message table (message_id, parent_id, role, text, ...), assembled into trees

Column names can be remapped per source (`columns: {messages: dialog}`). A `tools` column (function schemas: a
list, or a JSON string of one) is passed to the chat template; ShareGPT's `function_call` turns become assistant
`tool_calls` and `observation` turns `tool` messages, as in OpenAI-style messages rows.
"""

from __future__ import annotations

import csv
import io
import json
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROLES = {"system", "user", "assistant", "tool"}
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "function_call": "assistant",
    "observation": "tool",
    "tool": "tool",
}


class RowError(ValueError):
    """A row that cannot be read; the message names source, row and field."""


@dataclass
class SourceReport:
    name: str
    rows_read: int = 0
    dropped: Counter = field(default_factory=Counter)
    kept: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    truncated: int = 0
    truncated_trained_tokens: int = 0
    extra_from_trees: int = 0  # conversations beyond one per row (OASST tree_paths=all)
    duplicates: int = 0  # exact repeats of an earlier conversation of this source (dropped with data.dedup)

    def drop(self, reason: str, n: int = 1) -> None:
        self.dropped[reason] += n

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "rows_read": self.rows_read,
            "dropped": dict(sorted(self.dropped.items())),
            "kept": self.kept,
            "tokens": self.tokens,
            "trained_tokens": self.trained_tokens,
            "truncated": self.truncated,
            "truncated_trained_tokens": self.truncated_trained_tokens,
            "extra_from_trees": self.extra_from_trees,
            "duplicates": self.duplicates,
        }


def source_name(src: Any) -> str:
    return src.name or Path(str(src.path)).name or str(src.path)


# ---- reading ----


def read_rows(src: Any, on_error: str, report: SourceReport) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield (location, row) from a local file, a local dataset dir, or a hub dataset.

    A flat OpenAssistant message table (oasst1's parquet: one message per row, linked by parent_id) is
    assembled into one tree row per conversation tree first.
    """
    rows = _read_rows(src, on_error, report)
    first = next(rows, None)
    if first is None:
        return
    if src.format.value in ("auto", "oasst") and _is_flat_oasst(first[1]):
        yield from assemble_oasst_trees([first, *rows])
        return
    yield first
    yield from rows


def _is_flat_oasst(row: dict[str, Any]) -> bool:
    return {"message_id", "parent_id", "role", "text"} <= set(row) and "replies" not in row


def assemble_oasst_trees(rows: list[tuple[str, dict[str, Any]]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Group flat OASST messages into trees: one row per root, `{"prompt": root, <root's scalar fields>}`.

    Filters then apply to the root message's fields (e.g. `include: {lang: [en]}`); a message whose parent
    is missing is reported with its location.
    """
    nodes: dict[str, dict[str, Any]] = {}
    where_of: dict[str, str] = {}
    for where, row in rows:
        if not _is_flat_oasst(row):
            raise RowError(f"{where}: expected an OASST message (message_id, parent_id, role, text)")
        if row["message_id"] in nodes:
            raise RowError(f"{where}: message_id {row['message_id']!r} repeats {where_of[row['message_id']]}")
        nodes[row["message_id"]] = {**row, "replies": []}
        where_of[row["message_id"]] = where
    roots = []
    for mid, node in nodes.items():
        parent = node.get("parent_id")
        if parent is None:
            roots.append(mid)
        elif parent in nodes:
            nodes[parent]["replies"].append(node)
        else:
            raise RowError(f"{where_of[mid]}: parent_id {parent!r} is not a message in this source")
    reached, stack = 0, [nodes[mid] for mid in roots]
    while stack:
        reached += 1
        stack += stack.pop()["replies"]
    if reached < len(nodes):  # a parent_id cycle: those messages hang off no root
        raise RowError(
            f"{len(nodes) - reached} OASST messages are not under any root message (parent_id cycle)"
        )
    for mid in roots:
        root = nodes[mid]
        scalars = {k: v for k, v in root.items() if isinstance(v, (str, int, float, bool)) or v is None}
        yield where_of[mid], {**scalars, "prompt": root}


def _read_rows(src: Any, on_error: str, report: SourceReport) -> Iterator[tuple[str, dict[str, Any]]]:
    path = Path(str(src.path)).expanduser()
    suffix = path.suffix.lower()
    if path.is_file() and suffix == ".jsonl":
        for offset, lineno, data in jsonl_blocks(path):
            for _, where, row in parse_jsonl_block(path, data, offset, lineno, on_error, report):
                yield where, row
    elif path.is_file() and suffix == ".json":
        text = _decode(path.read_bytes(), path, None, 0)
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise RowError(
                f"{path}:{e.lineno}: malformed JSON at column {e.colno} "
                f"(byte offset {len(text[: e.pos].encode())}): {e.msg}"
            ) from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise RowError(f"{path}: expected a JSON array of rows (or JSON Lines in a .jsonl file)")
        for i, row in enumerate(data, 1):  # rows numbered from 1, like lines
            if not isinstance(row, dict):
                if on_error == "skip":
                    report.rows_read += 1
                    report.drop("not_an_object")
                    continue
                raise RowError(f"{path}: row {i}: expected a JSON object, got {type(row).__name__}")
            yield f"{path}: row {i}", row
    elif path.is_file() and suffix == ".csv":
        text = _decode(path.read_bytes(), path, None, 0)
        reader = csv.DictReader(io.StringIO(text, newline=""))
        for row in reader:
            yield f"{path}:{reader.line_num}", dict(row)
    elif path.is_file() and suffix == ".parquet":
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(path).to_pylist(), 1):
            yield f"{path}: row {i}", row
    elif path.is_file():
        raise ValueError(f"data source {path}: unsupported file type {suffix!r} (json, jsonl, csv, parquet)")
    elif suffix in (".json", ".jsonl", ".csv", ".parquet"):
        raise ValueError(f"data source {path}: no such file")
    else:
        yield from _read_hf(src, path)


BLOCK_BYTES = (
    1 << 20
)  # JSON Lines are read (and handed to workers) in blocks of whole lines of about this size


def _line_start(f: Any, pos: int) -> int:
    """The first line start at or after byte `pos`."""
    if pos == 0:
        return 0
    f.seek(pos - 1)
    while True:
        block = f.read(1 << 16)
        if not block:
            return f.tell()
        nl = block.find(b"\n")
        if nl >= 0:
            return f.tell() - len(block) + nl + 1


def jsonl_range(path: Path, shard: int, shards: int) -> tuple[int, int]:
    """Byte range [start, end) of shard `shard` of `shards`: the lines that start in that share of the file."""
    size = path.stat().st_size
    with path.open("rb") as f:
        return _line_start(f, size * shard // shards), _line_start(f, size * (shard + 1) // shards)


def jsonl_blocks(
    path: Path, start: int = 0, end: int | None = None, block_bytes: int = BLOCK_BYTES
) -> Iterator[tuple[int, int, bytes]]:
    """(byte offset, 1-based line number, data) of blocks of whole lines from `start` (a line start) to `end`."""
    with path.open("rb") as f:
        lineno = 1
        if start:  # the line number of a shard that starts mid-file: count the lines before it
            f.seek(0)
            left = start
            while left:
                block = f.read(min(left, 1 << 24))
                lineno += block.count(b"\n")
                left -= len(block)
        end = path.stat().st_size if end is None else end
        f.seek(start)
        offset = start
        while offset < end:
            data = f.read(min(block_bytes, end - offset))
            if not data:
                break
            if not data.endswith(b"\n") and offset + len(data) < end:
                data += f.readline()  # whole lines only; `end` is a line start, so this stops before it
            yield offset, lineno, data
            offset += len(data)
            lineno += data.count(b"\n")


def parse_jsonl_block(
    path: Path, data: bytes, offset: int, lineno: int, on_error: str, report: SourceReport
) -> Iterator[tuple[int, str, dict[str, Any]]]:
    """(byte offset, location, row) for each non-blank line; malformed lines raise with file, line and byte offset
    (or, with on_error=skip, are read, dropped and counted)."""
    pos, n = 0, len(data)
    while pos < n:
        nl = data.find(b"\n", pos)
        stop = n if nl < 0 else nl + 1
        raw, line_start = data[pos:stop], offset + pos
        pos = stop
        line = _decode(raw, path, lineno, line_start)
        lineno += 1
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if on_error == "skip":
                report.rows_read += 1  # read, then dropped: the count matches the file's lines
                report.drop("malformed_json")
                continue
            raise RowError(
                f"{path}:{lineno - 1}: malformed JSON at column {e.colno} "
                f"(byte offset {line_start + len(line[: e.pos].encode())}): {e.msg}"
            ) from None
        if not isinstance(row, dict):
            if on_error == "skip":
                report.rows_read += 1
                report.drop("not_an_object")
                continue
            raise RowError(f"{path}:{lineno - 1}: expected a JSON object, got {type(row).__name__}")
        yield line_start, f"{path}:{lineno - 1}", row


def _read_hf(src: Any, path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    import datasets

    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[src.split]
    elif path.exists() or "/" in str(src.path):
        # A local dataset script/dir or a hub id: the real loader (network only for hub ids).
        ds = datasets.load_dataset(str(src.path), name=src.subset, split=src.split)
    else:
        raise ValueError(f"data source {src.path!r}: no such file or directory (and not a hub id 'org/name')")
    for i, row in enumerate(ds, 1):
        yield f"{src.path} ({src.split}): row {i}", row


def _decode(raw: bytes, path: Path, lineno: int | None, start: int) -> str:
    """UTF-8 text, or a RowError naming the file, the 1-based line and the byte offset of the bad byte."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        if lineno is None:
            lineno = raw.count(b"\n", 0, e.start) + 1
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise RowError(
            f"{path}:{lineno}: not UTF-8: byte 0x{raw[e.start]:02x} at byte offset {start + e.start} "
            f"(byte {column} of the line); re-encode the file as UTF-8"
        ) from None


# ---- normalising ----


def detect_format(row: dict[str, Any], columns: dict[str, str]) -> str:
    def has(name: str) -> bool:
        return columns.get(name, name) in row

    if has("messages"):
        return "messages"
    if isinstance(row.get(columns.get("prompt", "prompt")), dict) or {"message_id", "role", "replies"} <= set(
        row
    ):
        return "oasst"
    if has("conversations"):
        return "sharegpt"
    if has("instruction") and (has("output") or has("response")):
        return "alpaca"
    if has("prompt") and (has("completion") or has("response")):
        return "prompt_completion"
    raise RowError(
        f"cannot detect the format from columns {sorted(row)}: expected messages, conversations, "
        "instruction+output, or prompt+completion (set format= and columns= on the source)"
    )


def _text(value: Any, where: str, fld: str) -> str:
    if not isinstance(value, str):
        raise RowError(f"{where}: field {fld!r} must be a string, got {type(value).__name__}")
    return value


def _col(row: dict[str, Any], columns: dict[str, str], name: str, where: str, required: bool = True) -> Any:
    key = columns.get(name, name)
    if key not in row:
        if required:
            raise RowError(f"{where}: missing field {key!r}")
        return None
    return row[key]


def to_messages(row: dict[str, Any], fmt: str, columns: dict[str, str], where: str) -> list[dict[str, str]]:
    """Normalise one row to messages; raises RowError naming the field on malformed input."""
    if fmt == "messages":
        raw = _col(row, columns, "messages", where)
        if not isinstance(raw, list):
            raise RowError(f"{where}: field 'messages' must be a list, got {type(raw).__name__}")
        msgs = []
        for j, m in enumerate(raw):
            if not isinstance(m, dict) or "role" not in m or "content" not in m and not m.get("tool_calls"):
                raise RowError(f"{where}: messages[{j}] needs 'role' and 'content'")
            if m["role"] not in ROLES:
                raise RowError(f"{where}: messages[{j}].role={m['role']!r} is not one of {sorted(ROLES)}")
            msg = {"role": m["role"]}
            if m["role"] == "assistant" and m.get("tool_calls"):
                msg["tool_calls"] = _tool_calls(m["tool_calls"], where, f"messages[{j}].tool_calls")
                msg["content"] = _text(m.get("content") or "", where, f"messages[{j}].content")
            else:
                msg["content"] = _text(m["content"], where, f"messages[{j}].content")
            for key in ("name", "tool_call_id"):  # which call a tool result answers
                if m["role"] == "tool" and isinstance(m.get(key), str):
                    msg[key] = m[key]
            msgs.append(msg)
        return msgs
    if fmt == "sharegpt":
        raw = _col(row, columns, "conversations", where)
        if not isinstance(raw, list):
            raise RowError(f"{where}: field 'conversations' must be a list, got {type(raw).__name__}")
        msgs = []
        system = row.get(columns.get("system", "system"))
        if isinstance(system, str) and system:
            msgs.append({"role": "system", "content": system})
        for j, m in enumerate(raw):
            if not isinstance(m, dict) or "from" not in m or "value" not in m:
                raise RowError(f"{where}: conversations[{j}] needs 'from' and 'value'")
            role = SHAREGPT_ROLES.get(m["from"])
            if role is None:
                raise RowError(
                    f"{where}: conversations[{j}].from={m['from']!r} is not one of {sorted(SHAREGPT_ROLES)}"
                )
            value = _text(m["value"], where, f"conversations[{j}].value")
            if m["from"] == "function_call":
                msgs.append(
                    {"role": "assistant", "content": "", "tool_calls": _call_from_json(value, where, j)}
                )
            else:
                msgs.append({"role": role, "content": value})
        return msgs
    if fmt == "alpaca":
        instruction = _text(_col(row, columns, "instruction", where), where, "instruction")
        extra = row.get(columns.get("input", "input"), row.get(columns.get("context", "context")))
        # Alpaca's `output`, else Dolly's `response`; a present-but-null field is a type error, not "missing".
        out_key = columns.get("output", "output")
        if out_key not in row and columns.get("response", "response") in row:
            out_key = columns.get("response", "response")
        output = _col(row, {"output": out_key}, "output", where)
        user = instruction + (f"\n\n{_text(extra, where, 'input')}" if extra else "")
        msgs = [
            {"role": "user", "content": user},
            {"role": "assistant", "content": _text(output, where, "output")},
        ]
        system = row.get(columns.get("system", "system"))
        return ([{"role": "system", "content": system}] if isinstance(system, str) and system else []) + msgs
    if fmt == "prompt_completion":
        prompt = _col(row, columns, "prompt", where)
        comp_key = columns.get("completion", "completion")
        if comp_key not in row and columns.get("response", "response") in row:
            comp_key = columns.get("response", "response")
        completion = _col(row, {"completion": comp_key}, "completion", where)
        head = (
            to_messages({"messages": prompt}, "messages", {}, where)
            if isinstance(prompt, list)
            else [{"role": "user", "content": _text(prompt, where, "prompt")}]
        )
        tail = (
            to_messages({"messages": completion}, "messages", {}, where)
            if isinstance(completion, list)
            else [{"role": "assistant", "content": _text(completion, where, "completion")}]
        )
        return head + tail
    raise ValueError(f"unknown format {fmt!r}")


def _call_from_json(value: str, where: str, j: int) -> list[dict[str, Any]]:
    """A ShareGPT function_call turn (`{"name": ..., "arguments": {...}}`, or a list of them) as tool_calls."""
    fld = f"conversations[{j}].value"
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as e:
        raise RowError(
            f"{where}: {fld} of a function_call turn is not JSON ({e.msg} at column {e.colno})"
        ) from None
    return _tool_calls(parsed if isinstance(parsed, list) else [parsed], where, fld)


def _tool_calls(raw: Any, where: str, fld: str) -> list[dict[str, Any]]:
    """OpenAI-style tool calls, `[{"type": "function", "function": {"name", "arguments"}}]`, checked."""
    if not isinstance(raw, list):
        raise RowError(f"{where}: field {fld} must be a list of tool calls, got {type(raw).__name__}")
    calls = []
    for k, call in enumerate(raw):
        fn = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise RowError(f"{where}: field {fld}[{k}] needs a function name")
        args = fn.get("arguments", {})
        if isinstance(args, str):  # OpenAI's wire format: arguments as a JSON string
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                raise RowError(f"{where}: field {fld}[{k}].arguments is not JSON") from None
        calls.append({"type": "function", "function": {"name": fn["name"], "arguments": args}})
    return calls


def read_tools(row: dict[str, Any], columns: dict[str, str], where: str) -> list[dict[str, Any]] | None:
    """The row's function schemas (`tools` column: a list or a JSON string of one), OpenAI style; None if none."""
    raw = row.get(columns.get("tools", "tools"))
    if raw is None or raw == "" or raw == []:
        return None
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as e:
            raise RowError(f"{where}: field 'tools' is not JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(raw, list) or not all(isinstance(t, dict) for t in raw):
        raise RowError(f"{where}: field 'tools' must be a list of function schemas")
    tools = []
    for k, t in enumerate(raw):
        fn = t.get("function", t)
        if not isinstance(fn.get("name"), str):
            raise RowError(f"{where}: field tools[{k}] needs a function name")
        tools.append(t if "function" in t else {"type": "function", "function": t})
    return tools


OASST_ROLES = {"prompter": "user", "assistant": "assistant"}


def to_conversations(
    row: dict[str, Any], fmt: str, columns: dict[str, str], where: str, tree_paths: str = "best"
) -> list[list[dict[str, str]]]:
    """The conversations in one row: one, except for OASST trees with tree_paths=all."""
    if fmt != "oasst":
        return [to_messages(row, fmt, columns, where)]
    root = row.get(columns.get("prompt", "prompt"), row)
    if not isinstance(root, dict):
        raise RowError(f"{where}: field 'prompt' must be an OASST message node")
    paths: list[list[dict[str, str]]] = []
    _walk_tree(root, [], tree_paths == "all", paths, where, "prompt")
    out, seen = [], set()
    for path in paths:
        # A path that ends on a user turn has nothing to learn at its end: cut back to its last assistant turn.
        while path and path[-1]["role"] != "assistant":
            path = path[:-1]
        key = tuple(m["content"] for m in path)
        if key not in seen:  # sibling user leaves cut back to the same conversation
            seen.add(key)
            out.append(path)
    return out or [[]]


def _usable(node: dict[str, Any]) -> bool:
    return not node.get("deleted", False) and node.get("review_result", True) is not False


def _walk_tree(
    node: dict[str, Any], prefix: list[dict[str, str]], every: bool, out: list, where: str, fld: str
) -> None:
    role = OASST_ROLES.get(node.get("role"))
    if role is None:
        raise RowError(f"{where}: {fld}.role={node.get('role')!r} is not one of {sorted(OASST_ROLES)}")
    path = prefix + [{"role": role, "content": _text(node.get("text"), where, f"{fld}.text")}]
    replies = node.get("replies") or []
    if not isinstance(replies, list):
        raise RowError(f"{where}: field {fld}.replies must be a list, got {type(replies).__name__}")
    usable = [(i, r) for i, r in enumerate(replies) if isinstance(r, dict) and _usable(r)]
    if not usable:
        out.append(path)
        return
    if not every:  # best: rank 0 first; unranked replies after ranked ones, in file order
        usable = [min(usable, key=lambda ir: (ir[1].get("rank") is None, ir[1].get("rank") or 0, ir[0]))]
    for i, reply in usable:
        _walk_tree(reply, path, every, out, where, f"{fld}.replies[{i}]")


def apply_system_policy(msgs: list[dict[str, str]], policy: str) -> list[dict[str, str]]:
    if policy == "keep":
        return msgs
    systems = [m["content"] for m in msgs if m["role"] == "system"]
    rest = [m for m in msgs if m["role"] != "system"]
    if policy == "drop" or not systems:
        return rest
    # fold: the system text leads the first user turn, for templates/models that ignore system prompts
    for i, m in enumerate(rest):
        if m["role"] == "user":
            rest[i] = {"role": "user", "content": "\n\n".join(systems + [m["content"]])}
            break
    return rest


def conversation_problem(msgs: list[dict[str, str]]) -> str | None:
    """Reason to drop a conversation we cannot train on, or None."""
    if not msgs:
        return "empty"
    if not any(m["role"] == "assistant" for m in msgs):
        return "no_assistant"
    if any(m["role"] == "assistant" and not m["content"].strip() and not m.get("tool_calls") for m in msgs):
        return "empty_assistant"
    return None


def role_order_problem(msgs: list[dict[str, str]]) -> tuple[str, str] | None:
    """(reason, detail) when the turns are out of order: a conversation that starts with the assistant (after any
    system prompt), or two user turns in a row. Tool turns may sit between assistant turns."""
    turns = [(j, m["role"]) for j, m in enumerate(msgs) if m["role"] != "system"]
    if turns and turns[0][1] == "assistant":
        return "starts_with_assistant", f"messages[{turns[0][0]}] is the assistant's, before any user turn"
    for (_, a), (j, b) in zip(turns, turns[1:]):
        if a == b == "user":
            return "consecutive_user_turns", f"messages[{j}] is a second user turn in a row"
    return None


def passes_filters(row: dict[str, Any], src: Any) -> str | None:
    """Reason the row is filtered out by include/exclude, or None."""
    for col, allowed in src.include.items():
        if row.get(col) not in list(allowed):
            return f"include:{col}"
    for col, banned in src.exclude.items():
        if row.get(col) in list(banned):
            return f"exclude:{col}"
    return None


def sample_positions(n: int, src: Any, seed: int, report: SourceReport | None = None) -> np.ndarray:
    """Positions (into a source's n kept rows) of a seeded subsample (sample or sample_fraction), then repeated
    and sampled by the mixture weight; rows removed by either are counted in `report` (`sampled_out`,
    `weighted_out`). Python's `random` draws them, as it always has: the same rows for the same seed."""
    rng = random.Random(f"{seed}:{src.path}:{src.subset}")
    pos = np.arange(n, dtype=np.int64)
    if src.sample is not None and src.sample < n:
        pos = np.asarray(rng.sample(range(n), src.sample), dtype=np.int64)
    elif src.sample_fraction is not None:
        pos = np.asarray(rng.sample(range(n), round(n * src.sample_fraction)), dtype=np.int64)
    if report is not None and len(pos) < n:
        report.drop("sampled_out", n - len(pos))
    whole, frac = divmod(float(src.weight), 1.0)
    out = np.tile(pos, int(whole))
    if frac:
        extra = np.asarray(rng.sample(range(len(pos)), round(len(pos) * frac)), dtype=np.int64)
        out = np.concatenate([out, pos[extra]])
    if report is not None and not whole and len(out) < len(pos):
        report.drop("weighted_out", len(pos) - len(out))
    return out


def sample_rows(items: list, src: Any, seed: int, report: SourceReport | None = None) -> list:
    """`sample_positions` applied to a list."""
    return [items[i] for i in sample_positions(len(items), src, seed, report).tolist()]
