"""Micro-batching of concurrent calls, cancellation, error isolation, backpressure, and streaming."""

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from aligner_core import Aligner, EmptyAnswerError
from aligner_core.engines.local.scheduler import SchedulerClosedError


def pair(i: int) -> tuple[str, str]:
    return f"Question number {i}?", f"Answer {i}: " + "spiders have eight legs. " * (i % 4 + 1)


@pytest.fixture
def aligner(tiny_model, tiny_tokenizer):
    a = Aligner.from_model(
        tiny_model,
        tiny_tokenizer,
        template="aligner-v1",
        max_new_tokens=8,
        max_batch_tokens=8192,
        max_wait_ms=20,
    )
    yield a
    a.close()


def test_hundreds_of_concurrent_acorrect_calls_each_get_their_own_result(aligner):
    n = 240
    pairs = [pair(i) for i in range(n)]
    # A greedy result depends only on its own input: batched == sequential (tested elsewhere), so
    # the reference comes from one planned batch.
    expected = [c.text for c in aligner.correct_batch(pairs)]

    async def main():
        return await asyncio.gather(*(aligner.acorrect(q, a) for q, a in pairs))

    got = asyncio.run(main())
    assert [c.question for c in got] == [q for q, _ in pairs]
    assert [c.original for c in got] == [a for _, a in pairs]
    assert [c.text for c in got] == expected
    assert aligner.engine.scheduler.batches_run < n / 4, "concurrent calls must share batches"


def test_correct_from_many_threads_shares_batches(aligner):
    pairs = [pair(i) for i in range(64)]
    expected = [c.text for c in aligner.correct_batch(pairs)]
    barrier = threading.Barrier(16)

    def call(p):
        if pairs.index(p) < 16:
            barrier.wait()
        return aligner.correct(*p)

    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(call, pairs))
    assert [c.text for c in got] == expected
    assert aligner.engine.scheduler.batches_run < 64


def test_acorrect_batch_keeps_order_and_isolates_bad_items(aligner):
    pairs = [pair(0), ("q", "  "), pair(2)]

    async def main():
        return await aligner.acorrect_batch(pairs, return_exceptions=True)

    out = asyncio.run(main())
    assert isinstance(out[1], EmptyAnswerError)
    assert [out[0].question, out[2].question] == [pairs[0][0], pairs[2][0]]
    with pytest.raises(EmptyAnswerError):
        asyncio.run(aligner.acorrect_batch(pairs))


def test_cancelled_callers_do_not_break_the_batch_or_the_worker(aligner):
    pairs = [pair(i) for i in range(40)]
    expected = [c.text for c in aligner.correct_batch(pairs)]

    async def main():
        tasks = [asyncio.ensure_future(aligner.acorrect(q, a)) for q, a in pairs]
        await asyncio.sleep(0)
        for t in tasks[::3]:
            t.cancel()
        return await asyncio.gather(*tasks, return_exceptions=True)

    out = asyncio.run(main())
    for i, r in enumerate(out):
        if i % 3 == 0:
            assert isinstance(r, asyncio.CancelledError)
        else:
            assert r.text == expected[i]
    assert aligner.correct(*pairs[0]).text == expected[0]  # the worker still serves


class Poison:
    """Makes the model raise for any forward pass whose input holds a marker token sequence."""

    def __init__(self, model, marker_ids):
        self.model, self.marker = model, marker_ids
        self.original = model.forward

    def __enter__(self):
        def forward(*args, **kwargs):
            ids = kwargs["input_ids"]
            rows = ids.tolist()
            m = len(self.marker)
            for row in rows:
                if any(row[j : j + m] == self.marker for j in range(len(row) - m + 1)):
                    raise ValueError("poisoned request")
            return self.original(*args, **kwargs)

        self.model.forward = forward
        return self

    def __exit__(self, *exc):
        del self.model.forward


def test_one_failing_request_fails_only_itself(aligner, tiny_model, tiny_tokenizer):
    marker = "zzqx@@##"
    marker_ids = tiny_tokenizer(marker, add_special_tokens=False)["input_ids"][1:-1]
    pairs = [pair(i) for i in range(12)]
    pairs[5] = ("poison?", f"this answer holds {marker} inside")
    expected = [c.text for c in aligner.correct_batch(pairs[:5] + pairs[6:])]

    async def main():
        return await asyncio.gather(*(aligner.acorrect(q, a) for q, a in pairs), return_exceptions=True)

    with Poison(tiny_model, marker_ids):
        out = asyncio.run(main())
    assert isinstance(out[5], ValueError) and "poisoned" in str(out[5])
    good = [r.text for i, r in enumerate(out) if i != 5]
    assert good == expected


def test_bounded_queue_gives_backpressure_without_losing_requests(tiny_model, tiny_tokenizer):
    a = Aligner.from_model(
        tiny_model, tiny_tokenizer, template="aligner-v1", max_new_tokens=4, max_queue=2, max_wait_ms=1
    )
    pairs = [pair(i) for i in range(30)]
    expected = [c.text for c in a.correct_batch(pairs)]

    async def main():
        return await asyncio.gather(*(a.acorrect(q, x) for q, x in pairs))

    with a:
        assert [c.text for c in asyncio.run(main())] == expected
    with pytest.raises(SchedulerClosedError, match="closed"):
        a.correct(*pairs[0])


def test_event_loop_is_not_blocked_while_the_model_runs(aligner):
    ticks = []

    async def ticker(stop):
        while not stop.is_set():
            ticks.append(1)
            await asyncio.sleep(0.001)

    async def main():
        stop = asyncio.Event()
        t = asyncio.ensure_future(ticker(stop))
        await asyncio.gather(*(aligner.acorrect(*pair(i), max_new_tokens=8) for i in range(32)))
        stop.set()
        await t

    asyncio.run(main())
    assert len(ticks) > 3


# -- streaming ---------------------------------------------------------------------------------


@pytest.mark.parametrize("i", range(6))
def test_stream_concatenates_to_the_correction(aligner, i):
    q, a = pair(i)
    reference = aligner.correct(q, a, max_new_tokens=16)
    stream = aligner.stream(q, a, max_new_tokens=16)
    deltas = list(stream)
    assert "".join(deltas) == reference.text
    assert stream.correction is not None and stream.correction.text == reference.text
    assert stream.correction.completion_tokens == reference.completion_tokens


def test_stream_with_stop_strings_matches_correct(aligner):
    q, a = pair(3)
    plain = aligner.correct(q, a, max_new_tokens=16).text
    stop = plain[3:5]
    reference = aligner.correct(q, a, max_new_tokens=16, stop=[stop])
    assert "".join(aligner.stream(q, a, max_new_tokens=16, stop=[stop])) == reference.text


def test_astream_concatenates_to_the_correction(aligner):
    q, a = pair(2)
    reference = aligner.correct(q, a, max_new_tokens=16)

    async def main():
        s = aligner.astream(q, a, max_new_tokens=16)
        return [d async for d in s], s.correction

    deltas, correction = asyncio.run(main())
    assert "".join(deltas) == reference.text == correction.text


def test_closing_a_stream_stops_generation_and_the_worker_goes_on(aligner):
    q, a = pair(1)
    stream = aligner.stream(q, a, max_new_tokens=64)
    stream.close()
    list(stream)
    assert aligner.correct(q, a).finish_reason in ("stop", "length")


def test_stream_errors_reach_the_consumer(aligner, tiny_model):
    with Poison(tiny_model, [0]), pytest.raises(ValueError, match="poisoned"):  # BOS is in every prompt
        list(aligner.stream(*pair(0)))


def test_calls_with_different_lengths_share_a_batch(aligner):
    pairs = [pair(i) for i in range(8)]
    limits = [2, 4, 6, 8, 3, 5, 7, 8]
    expected = [c.text for c in aligner.correct_batch(pairs, max_new_tokens=limits)]

    async def main():
        return await asyncio.gather(
            *(aligner.acorrect(q, a, max_new_tokens=n) for (q, a), n in zip(pairs, limits))
        )

    before = aligner.engine.scheduler.batches_run
    out = asyncio.run(main())
    assert [c.text for c in out] == expected
    assert [c.completion_tokens <= n for c, n in zip(out, limits)] == [True] * 8
    assert aligner.engine.scheduler.batches_run - before <= 2
