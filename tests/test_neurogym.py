"""`neurogym:ID` tasks: neurogym's own trials, reproducible from the generator, its
fixation convention and performance measure; a clear error when the extra is missing."""

import csv
import importlib.util
import sys

import numpy as np
import pytest
import torch

from rnngrad.cli import main
from rnngrad.tasks import get_task

pytestmark = pytest.mark.usefixtures("one_thread")

HAVE = importlib.util.find_spec("neurogym") is not None
needs = pytest.mark.skipif(not HAVE, reason="neurogym is not installed (pip install "
                                            "'rnngrad[neuro]')")
KINDS = ["PerceptualDecisionMaking-v0", "DelayMatchSample-v0", "ContextDecisionMaking-v0"]


def _env(env_id):
    """The environment built straight from neurogym's registry (the reference)."""
    from neurogym.envs.registration import ALL_EXTENDED_ENVS

    module, _, attr = ALL_EXTENDED_ENVS[env_id].partition(":")
    return getattr(importlib.import_module(module), attr)()


def _seed_of(generator_seed):
    return int(torch.randint(0, 2**31 - 1, (1,),
                             generator=torch.Generator().manual_seed(generator_seed)))


@needs
@pytest.mark.parametrize("env_id", KINDS)
def test_a_batch_is_neurogyms_trials(env_id):
    task = get_task(f"neurogym:{env_id}", test_size=8)
    b = task.batch(6, generator=11)
    env = _env(env_id)
    env.seed(_seed_of(11))
    T = b.inputs.shape[0]
    assert b.inputs.dtype == torch.float32 and b.targets.dtype == torch.int64
    assert b.inputs.shape[1:] == (6, task.input_size) and b.targets.shape == (T, 6)
    longest = 0
    for i in range(6):
        env.new_trial()
        ob, gt = env.ob, env.gt
        n = ob.shape[0]
        longest = max(longest, n)
        assert np.array_equal(b.inputs[:n, i].numpy(), ob)
        assert np.array_equal(b.targets[:n, i].numpy(), gt)
        # every step of the trial counts (fixation included, label 0); the padding does not
        assert torch.equal(b.mask[:, i], (torch.arange(T) < n).float())
        assert not b.inputs[n:, i].any() and not b.targets[n:, i].any()
    assert T == longest
    assert (task.input_size, task.output_size) == (env.observation_space.shape[0],
                                                   env.action_space.n)


@needs
@pytest.mark.parametrize("env_id", KINDS + ["yang19.dms-v0", "GoNogo-v0"])
def test_batches_depend_on_the_generator_alone(env_id):
    a = get_task(f"neurogym:{env_id}", test_size=4)
    b = get_task(f"neurogym:{env_id}", test_size=4)
    first = a.batch(5, generator=3)
    a.batch(7, generator=4)  # no state carried from one batch to the next
    for u, v, w in zip(first, a.batch(5, generator=3), b.batch(5, generator=3)):
        assert torch.equal(u, v) and torch.equal(u, w)
    g = torch.Generator().manual_seed(3)
    x1, x2 = a.batch(5, generator=g).inputs, a.batch(5, generator=g).inputs
    assert torch.equal(x1, first.inputs)
    assert x1.shape != x2.shape or not torch.equal(x1, x2)
    for u, v in zip(a.test_batch(), b.test_batch()):
        assert torch.equal(u, v)


@needs
def test_variable_trial_lengths_are_padded_and_masked():
    task = get_task("neurogym:ContextDecisionMaking-v0", test_size=64)
    lengths = task.test_batch().mask.sum(0)
    assert lengths.min() < lengths.max() == task.seq_len


@needs
def test_decision_mask_counts_the_decision_period_only():
    task = get_task("neurogym:DelayMatchSample-v0", mask="decision", test_size=8)
    b = task.batch(4, generator=0)
    env = _env("DelayMatchSample-v0")
    env.seed(_seed_of(0))
    env.new_trial()
    s, e = env.start_ind["decision"], env.end_ind["decision"]
    want = torch.zeros(b.mask.shape[0])
    want[s:e] = 1
    assert torch.equal(b.mask[:, 0], want)
    assert bool((b.targets[b.mask > 0] > 0).all())  # a choice, never fixation, is asked
    with pytest.raises(ValueError, match="no period named 'decision'"):
        get_task("neurogym:DelayMatchCategory-v0", mask="decision")


@needs
def test_performance_is_neurogyms_last_step_measure():
    task = get_task("neurogym:ContextDecisionMaking-v0", test_size=40)
    b = task.test_batch()
    T, B = b.mask.shape
    K = task.output_size
    z = torch.randn(T, B, K, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    # neurogym's notebook: per trial, argmax of the output at the trial's last step == gt[-1]
    want = []
    for i in range(B):
        n = int(b.mask[:, i].sum())
        want.append(int(z[n - 1, i].argmax()) == int(b.targets[n - 1, i]))
    assert task.performance(z, b) == pytest.approx(sum(want) / B)
    # the right answer at the last step, anything before it: performance 1
    z = torch.zeros(T, B, K)
    last = (b.mask.sum(0) - 1).long()
    z[last, torch.arange(B), b.targets[last, torch.arange(B)]] = 1.0
    assert task.performance(z, b) == 1.0


@needs
def test_every_supervised_task_builds():
    from rnngrad.tasks.neurogym import neurogym_ids

    built, refused = [], []
    for env_id in neurogym_ids():
        try:
            task = get_task(f"neurogym:{env_id}", test_size=2)
        except ValueError as e:
            assert "\n" not in str(e)
            refused.append(env_id)
            continue
        b = task.batch(2, generator=0)
        assert b.inputs.shape[2] == task.input_size
        assert int(b.targets.max()) < task.output_size
        built.append(env_id)
    assert {"PerceptualDecisionMaking-v0", "DelayMatchSample-v0", "ContextDecisionMaking-v0",
            "yang19.go-v0"} <= set(built)
    # no gt; continuous actions; gt a position, not an action
    assert {"Bandit-v0", "ReachingDelayResponse-v0", "Reaching1D-v0"} <= set(refused)


@needs
@pytest.mark.parametrize("spec, kwargs, match", [
    ("neurogym:PerceptualDecisionMaking", {}, "close ones: PerceptualDecisionMaking-v0"),
    ("neurogym:PerceptualDecisionMaking-v0", {"dtt": 3}, "takes no argument.*'dtt'.*dt, "),
    ("neurogym:PerceptualDecisionMaking-v0", {"timing": 3}, "rejected its arguments"),
    ("neurogym:PerceptualDecisionMaking-v0", {"mask": "fix"}, "mask must be one of"),
    ("neurogym:PerceptualDecisionMaking-v0", {"timing": {"stimulus": "long"}},
     "could not make a trial with arguments"),
    ("neurogym:PerceptualDecisionMaking-v0", {"test_size": 0}, "test_size must be"),
    ("neurogym:Bandit-v0", {}, "defines no ground truth"),
    ("neurogym:ReachingDelayResponse-v0", {}, "need a discrete one"),
])
def test_bad_ids_and_kwargs_are_one_line_errors(spec, kwargs, match):
    with pytest.raises(ValueError, match=match) as e:
        get_task(spec, **kwargs)
    assert "\n" not in str(e.value)


def test_missing_neurogym_names_the_extra(monkeypatch):
    for name in [m for m in sys.modules if m == "neurogym" or m.startswith("neurogym.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "neurogym", None)  # import neurogym raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'rnngrad\[neuro\]'") as e:
        get_task("neurogym:PerceptualDecisionMaking-v0")
    assert isinstance(e.value, ValueError)  # the CLI answers it as bad input: exit 2


@needs
def test_cli_trains_and_reports_neurogym_performance(tmp_path):
    out = tmp_path / "run"
    argv = ["train", "--task", "neurogym:PerceptualDecisionMaking-v0", "--task-kwargs",
            '{"cohs": [51.2], "sigma": 0.5, "test_size": 128}', "--cell", "gru",
            "--hidden", "16", "--steps", "150", "--batch-size", "16", "--log-every", "50",
            "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    rows = list(csv.DictReader((out / "metrics.csv").read_text().splitlines()))
    assert float(rows[-1]["test_perf"]) > 0.9  # easy trials: BPTT learns to answer


@needs
@pytest.mark.parametrize("argv, match", [
    (["--task", "neurogym:Nope-v0"], "unknown neurogym task 'Nope-v0'"),
    (["--task", "neurogym:GoNogo-v0", "--task-kwargs", "dt"], "is not key=value"),
    (["--task", "neurogym:GoNogo-v0", "--task-kwargs", "{bad json"], "not a valid JSON"),
])
def test_cli_bad_task_exits_2_and_writes_nothing(tmp_path, capsys, argv, match):
    out = tmp_path / "run"
    assert main(["train", *argv, "--steps", "2", "--out", str(out), "--no-progress"]) == 2
    assert match in capsys.readouterr().err
    assert not out.exists()


@needs
def test_compare_records_the_performance(tmp_path):
    out = tmp_path / "cmp"
    assert main(["compare", "--task", "neurogym:GoNogo-v0", "--task-kwargs", "test_size=16",
                 "--algorithms", "bptt,eprop", "--steps", "4", "--seeds", "1", "--hidden", "8",
                 "--out", str(out), "--no-progress"]) == 0
    rows = list(csv.DictReader((out / "compare.csv").read_text().splitlines()))
    assert [r["algorithm"] for r in rows] == ["bptt", "eprop"]
    assert all(0.0 <= float(r["final_test_perf_mean"]) <= 1.0 for r in rows)
