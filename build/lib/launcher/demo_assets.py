"""Deterministic generator for the bundled demo assets.

Writes (relative to this package)::

    assets/demo/train.jsonl   ~4000 chat rows
    assets/demo/eval.jsonl    ~200 held-out chat rows (no eval prompt appears in train)
    assets/tokenizer/         small byte-level BPE tokenizer with a ChatML template

Each JSONL row is ``{"messages": [...], "task": "<name>"}`` where ``messages`` is an
optional short system message followed by one or two user/assistant exchanges. The final
assistant ``content`` is the exact reference answer (checked by string equality).

Everything is seeded and offline; rerunning produces byte-identical files::

    python -m launcher.demo_assets [--out DIR] [--seed N]
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from pathlib import Path

SEED = 1234
N_TRAIN = 4000
N_EVAL = 200
P_TWO_TURN = 0.15
P_SYSTEM = 0.10
VOCAB_SIZE = 1000

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END]

# Qwen2-style ChatML; no default system prompt is injected.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Qwen2 pre-tokenizer regex: every digit is its own pre-token (so digits are never merged),
# letters group into words with at most one leading non-letter, newlines stay separate.
PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "Answer with only the result.",
    "Be brief.",
    "You are a concise assistant. Reply with the answer only.",
    "Give short answers.",
    "You are a careful calculator and speller.",
]

WORDS = [
    "cat",
    "dog",
    "sun",
    "map",
    "cup",
    "pen",
    "box",
    "hat",
    "red",
    "sky",
    "tree",
    "fish",
    "bird",
    "milk",
    "rain",
    "star",
    "moon",
    "book",
    "door",
    "lamp",
    "cake",
    "ship",
    "frog",
    "bell",
    "leaf",
    "wind",
    "snow",
    "gold",
    "ring",
    "road",
    "apple",
    "table",
    "chair",
    "water",
    "light",
    "green",
    "river",
    "stone",
    "bread",
    "house",
    "plant",
    "cloud",
    "music",
    "paper",
    "train",
    "horse",
    "mouse",
    "smile",
    "clock",
    "fruit",
]

# (from_unit, to_unit, factor); factors are powers of ten so answers are digit copies + zeros.
CONVERSIONS = [
    ("km", "m", 1000),
    ("m", "cm", 100),
    ("cm", "mm", 10),
    ("m", "mm", 1000),
    ("kg", "g", 1000),
    ("L", "mL", 1000),
]

Example = tuple[str, str]  # (user prompt, assistant answer)


def _add(rng: random.Random) -> Example:
    a, b = rng.randint(0, 12), rng.randint(0, 12)
    phr = rng.choice(
        [
            "What is {a} + {b}?",
            "What is {a} plus {b}?",
            "Compute {a} + {b}.",
            "Add {a} and {b}.",
            "{a} + {b} = ?",
            "Calculate the sum of {a} and {b}.",
            "What do you get when you add {a} to {b}?",
            "Find {a} + {b}.",
        ]
    )
    return phr.format(a=a, b=b), str(a + b)


def _subtract(rng: random.Random) -> Example:
    a = rng.randint(0, 15)
    b = rng.randint(0, a)
    phr = rng.choice(
        [
            "What is {a} - {b}?",
            "What is {a} minus {b}?",
            "Compute {a} - {b}.",
            "Subtract {b} from {a}.",
            "{a} - {b} = ?",
            "Take {b} away from {a}.",
            "Calculate the difference {a} - {b}.",
            "Find {a} minus {b}.",
        ]
    )
    return phr.format(a=a, b=b), str(a - b)


def _convert_units(rng: random.Random) -> Example:
    src, dst, factor = rng.choice(CONVERSIONS)
    v = rng.randint(1, 99)
    phr = rng.choice(
        [
            "Convert {v} {s} to {d}.",
            "How many {d} are in {v} {s}?",
            "What is {v} {s} in {d}?",
            "Express {v} {s} in {d}.",
            "{v} {s} = ? {d}",
            "Convert {v} {s} into {d}.",
        ]
    )
    return phr.format(v=v, s=src, d=dst), f"{v * factor} {dst}"


def _word(rng: random.Random, max_len: int = 5) -> str:
    return rng.choice([w for w in WORDS if len(w) <= max_len])


def _uppercase(rng: random.Random) -> Example:
    w = _word(rng)
    phr = rng.choice(
        [
            "Uppercase the word {w}.",
            "Write {w} in capital letters.",
            "Convert '{w}' to uppercase.",
            "What is {w} in all caps?",
            "Make this uppercase: {w}",
            "Capitalize every letter of {w}.",
        ]
    )
    return phr.format(w=w), w.upper()


def _reverse(rng: random.Random) -> Example:
    w = _word(rng, max_len=4)
    phr = rng.choice(
        [
            "Reverse the word {w}.",
            "Spell {w} backwards.",
            "Write '{w}' in reverse.",
            "What is {w} reversed?",
            "Reverse the letters of {w}.",
        ]
    )
    return phr.format(w=w), w[::-1]


def _repeat(rng: random.Random) -> Example:
    w = _word(rng)
    n = rng.randint(2, 4)
    phr = rng.choice(
        [
            "Repeat the word {w} {n} times.",
            "Say {w} {n} times.",
            "Write {w} {n} times, separated by spaces.",
            "Repeat '{w}' {n} times.",
            "Print the word {w} {n} times.",
        ]
    )
    return phr.format(w=w, n=n), " ".join([w] * n)


def _count_letters(rng: random.Random) -> Example:
    w = _word(rng)
    phr = rng.choice(
        [
            "How many letters are in the word {w}?",
            "Count the letters in '{w}'.",
            "What is the length of the word {w}?",
            "How many characters does {w} have?",
            "How long is the word {w}?",
        ]
    )
    return phr.format(w=w), str(len(w))


def _first_letter(rng: random.Random) -> Example:
    w = _word(rng)
    phr = rng.choice(
        [
            "What is the first letter of {w}?",
            "Give the first letter of the word '{w}'.",
            "Which letter does {w} start with?",
            "Name the first letter of {w}.",
            "What letter begins the word {w}?",
        ]
    )
    return phr.format(w=w), w[0]


def _last_letter(rng: random.Random) -> Example:
    w = _word(rng)
    phr = rng.choice(
        [
            "What is the last letter of {w}?",
            "Give the last letter of the word '{w}'.",
            "Which letter does {w} end with?",
            "Name the last letter of {w}.",
            "What letter ends the word {w}?",
        ]
    )
    return phr.format(w=w), w[-1]


# name -> (generator, sampling weight)
TASKS: dict[str, tuple[Callable[[random.Random], Example], float]] = {
    # Arithmetic is a fact table (the hardest part for a tiny model), so it gets more rows;
    # the string tasks are single-token lookups over WORDS and are learned quickly.
    "add": (_add, 1.6),
    "subtract": (_subtract, 1.6),
    "convert_units": (_convert_units, 1.0),
    "uppercase": (_uppercase, 0.8),
    "reverse": (_reverse, 0.8),
    "repeat": (_repeat, 0.8),
    "count_letters": (_count_letters, 0.8),
    "first_letter": (_first_letter, 0.7),
    "last_letter": (_last_letter, 0.7),
}


def _pick_task(rng: random.Random) -> str:
    names = list(TASKS)
    return rng.choices(names, weights=[TASKS[n][1] for n in names], k=1)[0]


def _make_row(rng: random.Random, task: str, banned: set[str] | None = None) -> dict:
    """One conversation whose final exchange is ``task``. Resamples any user turn in ``banned``."""

    def sample(name: str) -> Example:
        while True:
            ex = TASKS[name][0](rng)
            if banned is None or ex[0] not in banned:
                return ex

    messages: list[dict[str, str]] = []
    if rng.random() < P_SYSTEM:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    if rng.random() < P_TWO_TURN:
        q, a = sample(_pick_task(rng))
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    q, a = sample(task)
    messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return {"messages": messages, "task": task}


def generate(seed: int = SEED, n_train: int = N_TRAIN, n_eval: int = N_EVAL) -> tuple[list[dict], list[dict]]:
    """Return ``(train_rows, eval_rows)``. Eval is balanced over tasks with unique final prompts;
    no user turn in train equals any eval final prompt."""
    rng = random.Random(seed)
    names = list(TASKS)
    eval_rows: list[dict] = []
    eval_prompts: set[str] = set()
    i = 0
    while len(eval_rows) < n_eval:
        row = _make_row(rng, names[i % len(names)])
        prompt = row["messages"][-2]["content"]
        if prompt in eval_prompts:
            continue
        eval_prompts.add(prompt)
        eval_rows.append(row)
        i += 1
    train_rows = [_make_row(rng, _pick_task(rng), banned=eval_prompts) for _ in range(n_train)]
    return train_rows, eval_rows


def write_jsonl(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _training_text(rows: list[dict]):
    for row in rows:
        for m in row["messages"]:
            yield m["role"]
            yield m["content"]


def build_tokenizer(train_rows: list[dict], vocab_size: int = VOCAB_SIZE):
    """Train a byte-level BPE on the training text and wrap it as a ``PreTrainedTokenizerFast``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_text(train_rows), trainer=trainer)

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        additional_special_tokens=[IM_START, IM_END],
        model_max_length=1024,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def check_tokenizer(tokenizer, rows: list[dict]) -> None:
    """Digits are single tokens and the ChatML rendering tokenizes piecewise-stably."""
    for d in "0123456789":
        ids = tokenizer.encode(d, add_special_tokens=False)
        assert len(ids) == 1, (d, ids)
    for t in SPECIAL_TOKENS:
        assert len(tokenizer.encode(t, add_special_tokens=False)) == 1, t
    for row in rows:
        msgs = row["messages"]
        full = tokenizer.apply_chat_template(msgs, tokenize=False)
        ids = tokenizer.encode(full, add_special_tokens=False)
        pieces: list[int] = []
        for m in msgs:
            if m["role"] == "assistant":  # prompt header and answer split exactly where labels start
                pieces += tokenizer.encode(f"{IM_START}assistant\n", add_special_tokens=False)
                pieces += tokenizer.encode(f"{m['content']}{IM_END}\n", add_special_tokens=False)
            else:
                pieces += tokenizer.encode(
                    f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n", add_special_tokens=False
                )
        assert ids == pieces, f"unstable tokenization for {msgs!r}"
        assert tokenizer.decode(ids) == full
        gen = tokenizer.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
        assert full.startswith(gen) and full[len(gen) :] == f"{msgs[-1]['content']}{IM_END}\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "assets")
    p.add_argument("--seed", type=int, default=SEED)
    args = p.parse_args(argv)

    train_rows, eval_rows = generate(args.seed)
    write_jsonl(train_rows, args.out / "demo" / "train.jsonl")
    write_jsonl(eval_rows, args.out / "demo" / "eval.jsonl")

    tokenizer = build_tokenizer(train_rows)
    check_tokenizer(tokenizer, train_rows + eval_rows)
    tok_dir = args.out / "tokenizer"
    tok_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(tok_dir))
    print(
        f"wrote {len(train_rows)} train / {len(eval_rows)} eval rows and a {len(tokenizer)}-token "
        f"tokenizer under {args.out}"
    )


if __name__ == "__main__":
    main()
