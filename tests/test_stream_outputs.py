"""Streamed outputs are snapshots: each shows the sequence as it was when it was made, though
they share the growing history instead of copying it (dsjax/engine/delivery.py)."""
from __future__ import annotations

import pickle

import pytest

from dsjax import SamplingParams
from dsjax.engine.delivery import TrackedRequest


def test_each_streamed_output_keeps_its_own_prefix_while_the_sequence_grows():
    outputs = []
    params = SamplingParams(n=2, temperature=1.0, max_tokens=50, logprobs=1, ignore_eos=True)
    tracked = TrackedRequest("r", None, [1, 2], params, outputs.append, True, lambda: None,
                             None)
    for step in range(50):
        for index in (0, 1):
            token = 100 * index + step
            tracked.add_token(index, token, -0.5, {token: -0.5}, float(step),
                              "length" if step == 49 else None)
        assert tracked.deliver() == []
    assert len(outputs) == 50 and outputs[-1].finished
    for step, out in enumerate(outputs):   # read only now, after every token was added
        assert out.token_ids == list(range(step + 1))          # the first sequence's
        assert out.token_timestamps == [float(t) for t in range(step + 1)]
        assert out.logprobs == [{t: -0.5} for t in range(step + 1)]
        assert out.new_token_ids == [step]
        assert out.num_tokens == step + 1
        assert out.outputs[0].token_at(step) == (step, float(step), {step: -0.5})
        second = out.outputs[1]
        assert second.token_ids == [100 + t for t in range(step + 1)]
        assert second.cumulative_logprob == -0.5 * (step + 1)
    copied = pickle.loads(pickle.dumps(outputs[9].outputs[1]))   # as sent to a process
    assert copied.token_ids == [100 + t for t in range(10)] and copied.history.token_ids == \
        copied.token_ids and copied.token_at(9)[0] == 109
    with pytest.raises(IndexError):
        outputs[3].outputs[0].token_at(4)   # past what that output covers
    # A consumer may replace what it read (the server's tests do); others are unaffected.
    outputs[3].outputs[0].token_ids = []
    assert outputs[3].token_ids == [] and outputs[4].token_ids == [0, 1, 2, 3, 4]
