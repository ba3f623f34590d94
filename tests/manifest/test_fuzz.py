"""Hostile input, generated: every bad manifest, file or override gets a clear error (exit 1, the
file, line:column when the defect is in the file, the field path, a fix), never a traceback, never
a hang, never a printed secret; and the valid variants stay valid.

The cases (tests/manifest/fuzz_cases.py, seeded) mutate the shipped manifests in 14 categories.
A sample runs through the real CLI (``python -m sana_ray.cli validate``, a subprocess with a
timeout: a FIFO or ``/dev/zero`` would block a process, not just a function); the rest run
in-process through the same ``main()``.
"""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from .fuzz_cases import CATEGORIES, generate, run_in_process, run_subprocess, table

SEED = 13
CASES = generate(SEED)
# (category, start of the case's name): what runs as a subprocess. The files that block a reader,
# the budgets that used to exhaust memory or recursion, and one of each kind of message.
SUBPROCESS = {
    ("non-regular-files", "fifo"), ("non-regular-files", "devzero"), ("non-regular-files", "symlink-devzero"),
    ("aliases", "alias bomb, 9 levels"), ("aliases", "recursive alias in deepspeed.overrides"),
    ("sizes", "nested 300,000 deep (flow, unclosed)"), ("nan-inf", "training.optimizer.lr=.inf"),
    ("secrets", "postgresql+psycopg2://mlflow:hunter2-Xq9@db:5432/m"), ("huge-ints", "training.seed=999"),
}
IN_PROCESS_TIMEOUT_S = 30  # a case takes milliseconds (the slowest, a 1 MiB file, about a second)
SUBPROCESS_TIMEOUT_S = 120  # Python's start-up on a loaded 2-core machine included


def _in_sample(case) -> bool:
    return any(case.category == category and case.name.startswith(name) for category, name in SUBPROCESS)


def _report(results) -> str:
    bad = [r for r in results if r.verdict not in ("clear", "accepted")]
    lines = [table(results)]
    for r in bad[:20]:
        lines.append(f"--- {r.verdict}: {r.case.category} / {r.case.name[:80]} ({r.why})\n{r.stderr.strip()[-800:]}")
    return "\n".join(lines)


def test_the_generator_covers_every_category():
    counts = Counter(case.category for case in CASES)
    assert set(counts) == set(CATEGORIES)
    assert len(CASES) >= 350 and min(counts.values()) >= 7, counts
    assert sum(case.valid for case in CASES) >= 30  # valid variants: strictness must not refuse them
    sample = [c for c in CASES if _in_sample(c)]
    assert len(sample) == len(SUBPROCESS), [(c.category, c.name) for c in sample]


def test_hostile_manifests_in_process(tmp_path, capsys):
    results = []
    for i, case in enumerate(CASES):
        if not _in_sample(case):
            results.append(run_in_process(case, case.materialize(tmp_path, i), IN_PROCESS_TIMEOUT_S))
    with capsys.disabled():
        print("\n" + table(results))
    assert all(r.verdict in ("clear", "accepted") for r in results), _report(results)


def test_hostile_manifests_through_the_real_cli(tmp_path):
    chosen = [(i, c) for i, c in enumerate(CASES) if _in_sample(c)]
    files = [c.materialize(tmp_path, i) for i, c in chosen]
    with ThreadPoolExecutor(max_workers=2) as pool:  # two at a time: the machine has 2 cores
        results = list(pool.map(lambda args: run_subprocess(args[0], args[1], SUBPROCESS_TIMEOUT_S),
                                [(c, f) for (_, c), f in zip(chosen, files)]))
    assert all(r.verdict == "clear" for r in results), _report(results)
