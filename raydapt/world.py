"""The embedded default world: generated tasks with exact answers, plus a stochastic language.

The demo and the tests run with no downloads, so raydapt carries its own small world:

- procedure tasks with worked steps (`add`, `base`) and short exact tasks (`sort`, `reverse`):
  each step depends on nearby tokens, which a small model learns quickly, and the worked
  steps are reasoning traces a teacher can distill;
- `markov`: free text from a random order-2 Markov language whose true entropy rate is known
  exactly, an honest floor to report beside held-out losses (soft targets matter here);
- held-out problems chosen by a hash of the prompt, so they are never in the training split
  whatever the counts asked for.

Metrics: `exact_match` of the final answer (the text after `####`) and the entropy floor.

    python -m raydapt.world --out runs/world   # writes train.jsonl and heldout.jsonl
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ANSWER_MARK = "####"


@dataclass(frozen=True)
class Problem:
    task: str
    prompt: str
    response: str
    answer: str

    def to_row(self) -> dict:
        """A prompt+response row; an open instruction is a prompt-only row (to be answered)."""
        row = {"task": self.task, "prompt": self.prompt}
        return {**row, "response": self.response, "answer": self.answer} if self.response else row


def _add(rng: random.Random, digits: int = 3) -> Problem:
    a, b = rng.randrange(10**digits), rng.randrange(10**digits)
    sa, sb = f"{a:0{digits}d}", f"{b:0{digits}d}"
    steps, carry, out = [], 0, []
    for da, db in zip(reversed(sa), reversed(sb)):
        s = int(da) + int(db) + carry
        steps.append(f"{da}+{db}+{carry}={s}")
        carry, digit = divmod(s, 10)
        out.append(str(digit))
    if carry:
        out.append("1")
    answer = str(a + b)
    assert "".join(reversed(out)).lstrip("0") == answer.lstrip("0")
    return Problem("add", f"add {sa} {sb}", " ; ".join(steps) + f" {ANSWER_MARK} {answer}", answer)


def _base(rng: random.Random) -> Problem:
    n = rng.randrange(2, 256)
    steps, m, bits = [], n, []
    while m:
        q, r = divmod(m, 2)
        steps.append(f"{m}/2={q} r{r}")
        bits.append(str(r))
        m = q
    answer = "".join(reversed(bits))
    assert int(answer, 2) == n
    return Problem("base", f"bin {n}", " ; ".join(steps) + f" {ANSWER_MARK} {answer}", answer)


def _sort(rng: random.Random) -> Problem:
    xs = [rng.randrange(10) for _ in range(rng.randrange(3, 7))]
    answer = " ".join(map(str, sorted(xs)))
    return Problem("sort", "sort " + " ".join(map(str, xs)), f"{ANSWER_MARK} {answer}", answer)


def _reverse(rng: random.Random) -> Problem:
    xs = [rng.choice("abcdefghij") for _ in range(rng.randrange(3, 7))]
    answer = " ".join(reversed(xs))
    return Problem("reverse", "reverse " + " ".join(xs), f"{ANSWER_MARK} {answer}", answer)


# Open instructions for a real chat teacher to answer: no reference response and no exact
# answer, so they train only through the teacher's generations (teach.kind generate).
_INSTRUCTIONS = (
    "Give two facts about {}.",
    "Explain in one sentence what makes {} interesting.",
    "Write a short poem about {}.",
    "List three words that describe {}.",
    "Describe {} to a child in two sentences.",
    "What is one surprising thing about {}?",
    "Why do people care about {}? Answer briefly.",
    "Write a one-sentence story about {}.",
    "Give one tip for someone learning about {}.",
    "Compare {} to something from everyday life.",
)
_TOPICS = (
    "owls", "the moon", "bread", "rivers", "volcanoes", "bicycles", "honey", "chess", "rain",
    "the ocean", "trees", "coffee", "music", "mountains", "bees", "libraries", "snow", "tea",
    "deserts", "whales", "clocks", "maps", "gardens", "trains", "penguins", "stars", "cheese",
    "wind", "islands", "candles", "bridges", "forests", "salt", "kites", "rainbows", "frogs",
    "lighthouses", "glaciers", "mushrooms", "violins",
)  # fmt: skip


def _instruct(rng: random.Random) -> Problem:
    prompt = rng.choice(_INSTRUCTIONS).format(rng.choice(_TOPICS))
    return Problem("instruct", prompt, "", "")


# The tasks with exact answers: the default world, and what exact-match is measured on.
EXACT_TASKS = ("add", "base", "sort", "reverse")

TASKS: dict[str, Callable[[random.Random], Problem]] = {
    "add": _add,
    "base": _base,
    "sort": _sort,
    "reverse": _reverse,
    "instruct": _instruct,
}


def is_heldout(prompt: str, fraction: float = 0.1) -> bool:
    """Membership by hash of the prompt: stable across counts and seeds."""
    h = int(hashlib.sha256(prompt.encode()).hexdigest()[:8], 16)
    return h % 10_000 < fraction * 10_000


def generate_problems(
    tasks: list[str], n_train: int, n_heldout: int, seed: int = 0
) -> tuple[list[Problem], list[Problem]]:
    """Unique problems, split by prompt hash; held-out prompts never occur in train."""
    rng = random.Random(seed)
    train: dict[str, Problem] = {}
    held: dict[str, Problem] = {}
    attempts = 0
    limit = 50 * (n_train + n_heldout) + 1000
    while (len(train) < n_train or len(held) < n_heldout) and attempts < limit:
        attempts += 1
        p = TASKS[tasks[attempts % len(tasks)]](rng)
        pool, want = (held, n_heldout) if is_heldout(p.prompt) else (train, n_train)
        if len(pool) < want:
            pool.setdefault(p.prompt, p)
    return list(train.values()), list(held.values())


def extract_answer(text: str) -> str:
    """The final answer: what follows the last `####`, up to the end of the line."""
    if ANSWER_MARK not in text:
        return ""
    return text.rsplit(ANSWER_MARK, 1)[1].strip().split("\n")[0].strip()


def exact_match(predictions: list[str], answers: list[str]) -> float:
    if not answers:
        return 0.0
    return sum(extract_answer(p) == a for p, a in zip(predictions, answers)) / len(answers)


class MarkovLanguage:
    """A random order-2 Markov chain over `n_symbols` letters, with Dirichlet(alpha) rows."""

    SYMBOLS = "abcdefghijklmnopqrstuvwxyzABCDEF"

    def __init__(self, n_symbols: int = 32, alpha: float = 0.2, seed: int = 0):
        assert n_symbols <= len(self.SYMBOLS)
        self.n = n_symbols
        rng = np.random.default_rng(seed)
        self.P = rng.dirichlet([alpha] * n_symbols, size=(n_symbols, n_symbols))  # (S, S, S)

    def entropy_rate(self) -> float:
        """Exact entropy rate in nats/symbol: sum over pair states of pi(a,b) H(P[a,b])."""
        n = self.n
        # pair-state transition (a,b) -> (b,c) with prob P[a,b,c]
        pi = np.full((n, n), 1.0 / (n * n))
        for _ in range(2000):
            new = np.einsum("ab,abc->bc", pi, self.P)
            if np.abs(new - pi).max() < 1e-13:
                pi = new
                break
            pi = new
        h = -(self.P * np.log(np.clip(self.P, 1e-300, None))).sum(-1)  # (S, S)
        return float((pi * h).sum())

    def sample(self, length: int, rng: np.random.Generator) -> str:
        a, b = rng.integers(self.n, size=2)
        out = [a, b]
        for _ in range(length - 2):
            c = rng.choice(self.n, p=self.P[out[-2], out[-1]])
            out.append(c)
        return " ".join(self.SYMBOLS[i] for i in out)


def markov_docs(n_docs: int, length: int = 64, seed: int = 0) -> Iterator[dict]:
    lang = MarkovLanguage(seed=seed)
    rng = np.random.default_rng(seed + 1)
    for _ in range(n_docs):
        yield {"task": "markov", "text": lang.sample(length, rng)}


def write_world(
    out: str | Path,
    tasks: list[str] | None = None,
    n_train: int = 4000,
    n_heldout: int = 200,
    n_markov: int = 0,
    seed: int = 0,
) -> dict:
    """Write train.jsonl and heldout.jsonl (problems + markov text) and return a summary."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    train, held = generate_problems(tasks or list(EXACT_TASKS), n_train, n_heldout, seed)
    held_md = max(n_markov // 10, 1) if n_markov else 0
    md = list(markov_docs(n_markov + held_md, seed=seed))
    with open(out / "train.jsonl", "w") as f:
        for row in [p.to_row() for p in train] + md[:n_markov]:
            f.write(json.dumps(row) + "\n")
    with open(out / "heldout.jsonl", "w") as f:
        for row in [p.to_row() for p in held] + md[n_markov:]:
            f.write(json.dumps(row) + "\n")
    summary = {"train": len(train) + n_markov, "heldout": len(held) + held_md}
    if n_markov:
        summary["markov_entropy_rate"] = MarkovLanguage(seed=seed).entropy_rate()
    return summary


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", required=True)
    ap.add_argument("--train", type=int, default=4000)
    ap.add_argument("--heldout", type=int, default=200)
    ap.add_argument("--markov", type=int, default=0)
    args = ap.parse_args()
    print(write_world(args.out, None, args.train, args.heldout, args.markov))
