"""A run as a plain dict: checked keys, the one model factory, the task it names."""

import json

import pytest
import torch

import rnngrad
from rnngrad.runs import DEFAULTS, check_config, make_model, make_task, run


def test_defaults_are_json_and_complete():
    assert json.loads(json.dumps(DEFAULTS)) == DEFAULTS
    assert check_config({}) == DEFAULTS


@pytest.mark.parametrize("bad, message", [
    ({"hiden": 3}, "unknown configuration key(s) 'hiden'"),
    ({"hidden": 0}, "hidden must be a positive int, got 0"),
    ({"lr": -1.0}, "lr must be a positive number, got -1.0"),
    ({"clip": 0}, "clip must be a positive number or None"),
    ({"dtype": "float16"}, "dtype must be one of float32, float64, got 'float16'"),
    ({"cell": "gru2"}, "unknown cell 'gru2'; known cells: elman"),
    ({"algorithm": "nope"}, "unknown algorithm 'nope'"),
    ({"optimizer": "rmsprop"}, "unknown optimizer 'rmsprop'"),
    ({"seed": -1}, "seed must be an int >= 0"),
])
def test_bad_configurations_name_what_was_given(bad, message):
    with pytest.raises(ValueError) as info:
        check_config(bad)
    assert message in str(info.value)


def test_make_model_is_the_seeded_rnn_and_leaves_the_global_generator_alone():
    task = make_task({"task": "adding", "seq_len": 5})
    state = torch.get_rng_state()
    m = make_model({**DEFAULTS, "hidden": 6, "seed": 3, "init": "orthogonal"}, task)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(3)
    ref = rnngrad.RNN(2, 6, 1, init="orthogonal")
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), ref.parameters()))


def test_stream_needs_the_streaming_task():
    with pytest.raises(ValueError, match="stream needs a streaming task"):
        make_task({"task": "digits", "stream": True})
    assert make_task({"task": "stream_add", "stream": True}).streaming


def test_run_records_its_configuration(tmp_path):
    run({"task": "adding", "seq_len": 4, "hidden": 3, "steps": 2, "log_every": 2},
        out=tmp_path)
    recorded = json.loads((tmp_path / "config.json").read_text())
    assert recorded["run"] == check_config({"task": "adding", "seq_len": 4, "hidden": 3,
                                            "steps": 2, "log_every": 2})
    assert recorded["model"]["parameters"]["W_rec"] == [3, 3]
