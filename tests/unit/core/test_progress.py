"""Progress that moves: tokens and finished rows reach the callback while the batch is still decoding."""

from __future__ import annotations

import json

import pytest

from aligner_core.progress import Progress, ProgressUpdate

PAIRS = [
    ("What is the capital of Australia?", "Sydney."),
    ("How many legs does a spider have?", "Six."),
    ("How long do I boil an egg?", "Nine minutes, then cool it."),
    ("What is twelve times twelve?", "It is 124."),
]
#: One limit per pair, so the random tiny model (which never says EOS) ends its rows at different steps.
LIMITS = [3, 6, 9, 12]


def _recorder() -> tuple[list[ProgressUpdate], Progress]:
    """A tracker that reports every engine step (no throttle), recording each snapshot."""
    seen: list[ProgressUpdate] = []
    return seen, Progress(seen.append, min_interval_s=0)


@pytest.mark.parametrize("options", [{}, {"speculative": False}], ids=["drafting-loop", "generate"])
def test_tokens_and_rows_move_during_one_batch(tiny_aligner, options):
    seen, progress = _recorder()
    results = tiny_aligner.correct_batch(PAIRS, max_new_tokens=LIMITS, progress=progress, **options)

    tokens = [u.tokens for u in seen]
    assert tokens == sorted(tokens), "token counts never go backwards"
    assert len(set(tokens)) >= max(LIMITS), "tokens were reported every decoding step"
    # Rows are counted as each one ends, not all at the end of the batch.
    assert {1, 2, 3} <= {u.rows for u in seen}
    assert any(u.tokens > 0 and u.rows == 0 for u in seen)
    assert seen[-1].rows == len(PAIRS)
    assert seen[-1].tokens == sum(c.completion_tokens for c in results) == sum(LIMITS)


def test_callback_gets_final_totals_and_the_bar_shows_tokens(tiny_aligner, capsys):
    seen: list[ProgressUpdate] = []
    pairs = [*PAIRS, ("Is this fine?", "   ")]  # an empty answer fails before any compute
    results = tiny_aligner.correct_batch(
        pairs, return_exceptions=True, show_progress=True, progress=seen.append
    )

    final = seen[-1]
    assert final.final and final.total == len(pairs) and final.rows == len(pairs)
    assert final.tokens == sum(c.completion_tokens for c in results if not isinstance(c, Exception))
    assert final.tokens_per_s > 0
    assert [u for u in seen if u.final] == [final]
    bar = capsys.readouterr().err
    assert f"{len(pairs)}/{len(pairs)}" in bar and f"{final.tokens} tok" in bar and "tok/s" in bar


def test_shared_progress_adds_up_over_calls(tiny_aligner):
    seen, progress = _recorder()
    first = tiny_aligner.correct_batch(PAIRS[:2], progress=progress)
    second = tiny_aligner.correct_batch(PAIRS[2:], progress=progress, speculative=False)
    assert not any(u.final for u in seen), "a shared tracker is closed by its owner"
    progress.close()
    assert seen[-1].final and seen[-1].rows == len(PAIRS)
    assert seen[-1].tokens == sum(c.completion_tokens for c in first + second)


def test_demo_progress_moves(tiny_model_dir, capsys):
    from aligner_core.cli.demo import run_demo, sample_pairs

    total = len(sample_pairs())
    seen: list[ProgressUpdate] = []
    progress = Progress(seen.append, total=total, min_interval_s=0)
    assert run_demo(str(tiny_model_dir), max_new_tokens=8, progress=progress) == 0

    during = [u for u in seen if u.rows < total]
    assert len({u.tokens for u in during}) > 2, "the demo's count moved before every sample was done"
    assert seen[-1].rows == total and seen[-1].total == total
    printed = capsys.readouterr()
    assert f"{seen[-1].tokens} tok" in printed.err  # the bar shows the tokens too
    assert f"{total} pairs corrected" in printed.out


def test_file_job_reports_within_a_chunk(tiny_aligner, tmp_path):
    from aligner_core.jobs.files import correct_jsonl

    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    records = [{"question": q, "answer": a} for q, a in PAIRS] + [{"question": "no answer field"}]
    src.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    seen: list[ProgressUpdate] = []

    stats = correct_jsonl(
        tiny_aligner,
        src,
        out,
        chunk_size=64,
        show_progress=False,
        progress=seen.append,
        max_new_tokens=LIMITS[-1],
    )
    lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert stats.written == len(records)
    assert seen[-1].final and seen[-1].total == len(records) and seen[-1].rows == len(records)
    assert seen[-1].tokens == sum(r["aligner"]["completion_tokens"] for r in lines if r.get("aligner"))

    # One chunk holds the whole file, yet the count moves while it decodes.
    seen, progress = _recorder()
    correct_jsonl(
        tiny_aligner,
        src,
        out,
        chunk_size=64,
        show_progress=False,
        progress=progress,
        overwrite=True,
        max_new_tokens=LIMITS[-1],
    )
    during = [u for u in seen if u.rows < len(records)]
    assert len({u.tokens for u in during}) > 2
    assert seen[-1].rows == len(records)


def test_tokens_of_a_batch_retried_after_out_of_memory_are_taken_back(tiny_aligner, tiny_model):
    import torch

    original, full_batch_calls = tiny_model.forward, []

    def forward(*args, **kwargs):  # the whole batch runs out of memory a few decoding steps in
        if kwargs["input_ids"].shape[0] == len(PAIRS):
            full_batch_calls.append(1)
            if len(full_batch_calls) == 3:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(*args, **kwargs)

    seen, progress = _recorder()
    tiny_model.forward = forward
    try:
        results = tiny_aligner.correct_batch(PAIRS, max_new_tokens=8, progress=progress)
    finally:
        del tiny_model.forward
    tokens = [u.tokens for u in seen]
    assert any(later < earlier for earlier, later in zip(tokens, tokens[1:])), (
        "the lost batch's tokens were retracted"
    )
    assert seen[-1].rows == len(PAIRS)
    assert seen[-1].tokens == sum(c.completion_tokens for c in results)
