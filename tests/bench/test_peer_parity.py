"""Second-order MAML meta-gradients agree across peers (issue 6; parity rule of issue 11 §3).

higher, TorchOpt (object-oriented and functional), learn2learn and a plain
``torch.autograd.grad`` reference must agree to 1e-5 relative; metaopt's ``MAML`` (when
importable) to 1e-4, float32, with each rewrite level passed explicitly
(``rewrites="exact"``, the default, and ``"none"``); both are bit-identical to the
reference. learn2learn needs ``scripts/peers/install_learn2learn.sh``.

The parity figures of ``scripts/bench_maml_peers.py`` hold on the small problems: in
float64 metaopt's meta-gradient equals each peer's within 1e-10 relative, and in float32
its error against the float64 reference is at most 1.5x the worst peer's own.

Parameters whose reference gradient is at float32 noise level (``max|g_ref,param| <
common.NOISE_REL = 1e-5`` x the largest over all parameters; in the conv net: the conv
biases, whose meta-gradient through training-mode BatchNorm is analytically zero) are
held to an *absolute* bound at that noise level instead of a relative one.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))

from peers import common, reference  # noqa: E402
from peers.metaopt_peer import metaopt_available  # noqa: E402

PEER_TOL = 1e-5
METAOPT_TOL = 1e-4

# (id, model, meta_batch, inner_steps, conv channels)
PROBLEMS = [("mlp", "mlp", 3, 2, 64), ("conv8", "conv", 2, 2, 8)]


def _peer_step(name: str) -> common.MakeStep:
    """The ``make_step`` of a peer, skipping the test when the library is not importable."""
    if name == "higher":
        pytest.importorskip("higher", reason="higher is not installed (pip install '.[bench]')")
        return importlib.import_module("peers.higher_peer").make_step
    if name in ("torchopt", "torchopt_func"):
        pytest.importorskip("torchopt", reason="torchopt is not installed (pip install '.[bench]')")
        module = importlib.import_module("peers.torchopt_peer")
        return module.make_step if name == "torchopt" else module.make_step_functional
    if name == "learn2learn":
        try:
            importlib.import_module("learn2learn")
        except Exception as exc:
            pytest.skip(f"learn2learn not importable ({type(exc).__name__}: {exc}); "
                        "run scripts/peers/install_learn2learn.sh")
        return importlib.import_module("peers.l2l_peer").make_step
    raise ValueError(name)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny problems: one intra-op thread is faster and steadier on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


_PEER_RESULTS: dict[tuple[str, str], tuple] = {}


@pytest.fixture(scope="module", params=PROBLEMS, ids=[p[0] for p in PROBLEMS])
def problem_and_reference(request):
    _, model, meta_batch, inner_steps, channels = request.param
    problem = common.make_problem(model, meta_batch, inner_steps, seed=3, channels=channels)
    loss, grads = _run(reference.make_step, problem)
    assert torch.isfinite(loss)
    assert max(g.abs().max().item() for g in grads.values()) > 0
    return problem, loss, grads


def _run(make_step: common.MakeStep, problem: common.Problem):
    return common.run_meta_gradient(
        make_step, problem.model_factory_state, problem.tasks,
        problem.inner_steps, problem.inner_lr, problem.loss_fn,
    )


def _run_peer(peer: str, problem: common.Problem):
    """A peer's ``(loss, grads)`` on ``problem``, computed once per module."""
    key = (problem.key + str(problem.state[next(iter(problem.state))].shape), peer)
    if key not in _PEER_RESULTS:
        _PEER_RESULTS[key] = _run(_peer_step(peer), problem)
    return _PEER_RESULTS[key]


@pytest.mark.parametrize("peer", ["higher", "torchopt", "torchopt_func", "learn2learn"])
def test_peer_matches_reference(problem_and_reference, peer):
    problem, ref_loss, ref_grads = problem_and_reference
    loss, grads = _run_peer(peer, problem)
    assert abs(loss.item() - ref_loss.item()) <= PEER_TOL * abs(ref_loss.item())
    assert common.max_rel_diff(grads, ref_grads) <= PEER_TOL


@pytest.mark.parametrize("rewrites", ["exact", "none"])
def test_metaopt_matches_reference_and_peers(problem_and_reference, rewrites):
    ok, why = metaopt_available()
    if not ok:
        pytest.skip(f"metaopt.algorithms.MAML not importable: {why}")
    from peers import metaopt_peer

    problem, ref_loss, ref_grads = problem_and_reference
    loss, grads = _run(metaopt_peer.configured(rewrites=rewrites), problem)
    _assert_matches_reference_and_peers(loss, grads, ref_loss, ref_grads, problem)


def _assert_matches_reference_and_peers(loss, grads, ref_loss, ref_grads, problem) -> None:
    assert abs(loss.item() - ref_loss.item()) <= METAOPT_TOL * abs(ref_loss.item())
    _assert_metaopt_close(grads, ref_grads, "reference")
    for peer in ("higher", "torchopt", "learn2learn"):
        try:
            _, peer_grads = _run_peer(peer, problem)
        except pytest.skip.Exception:
            continue
        _assert_metaopt_close(grads, peer_grads, peer)


def _assert_metaopt_close(grads, expected, who: str) -> None:
    """1e-4 relative on every parameter above noise level; noise-level ones absolutely."""
    signal, noise_abs = common.signal_rel_diff(grads, expected)
    assert signal <= METAOPT_TOL, who
    scale = max(g.abs().max().item() for g in expected.values())
    for name, diff in noise_abs.items():
        assert diff <= common.NOISE_REL * scale, (who, name, diff)


@pytest.mark.parametrize("rewrites", [None, "none"], ids=["default", "none"])
def test_metaopt_default_and_without_rewrites_are_bit_identical(problem_and_reference,
                                                                 rewrites):
    ok, why = metaopt_available()
    if not ok:
        pytest.skip(f"metaopt.algorithms.MAML not importable: {why}")
    from peers import metaopt_peer

    problem, ref_loss, ref_grads = problem_and_reference
    loss, grads = _run(metaopt_peer.configured(rewrites=rewrites), problem)
    assert loss.item() == ref_loss.item()
    assert common.max_rel_diff(grads, ref_grads) == 0.0


def test_bench_parity_figures_meet_the_rule(problem_and_reference):
    """``bench_maml_peers.parity``: float64 within 1e-10 of every peer, float32 error at
    most 1.5x the worst peer library's (the figures the benchmark records)."""
    ok, why = metaopt_available()
    if not ok:
        pytest.skip(f"metaopt.algorithms.MAML not importable: {why}")
    import bench_maml_peers as bench
    from peers import metaopt_peer

    problem, _, _ = problem_and_reference
    contenders = {"metaopt": metaopt_peer.make_step, "reference": reference.make_step}
    for peer in ("higher", "torchopt"):
        try:
            contenders[peer] = _peer_step(peer)
        except pytest.skip.Exception:
            continue
    if len(contenders) == 2:
        pytest.skip("no peer library installed")
    results = {name: {"grads": _run(make, problem)[1]} for name, make in contenders.items()}
    bench.parity(problem, contenders, results)
    for peer in contenders:
        fields = bench.parity_fields(results["metaopt"], results[peer])
        assert fields["parity_f64_ok"], (peer, fields["f64_rel_diff"])
        assert fields["parity_f32_ok"], (fields["metaopt_f32_err"], fields["worst_peer_f32_err"])
    assert 0 < results["metaopt"]["f32_err"] < 1e-3  # float32 rounding, measured


def test_noise_level_rule_finds_the_conv_biases_only(problem_and_reference):
    problem, _, ref_grads = problem_and_reference
    noise = common.noise_level_params(ref_grads)
    if problem.model == "mlp":
        assert noise == []
    else:  # conv biases (before training-mode BatchNorm): analytically zero gradients
        conv_biases = [f"{4 * i}.bias" for i in range(4)]
        assert noise == conv_biases


def test_signal_rel_diff_detects_a_wrong_gradient(problem_and_reference):
    _, _, ref_grads = problem_and_reference
    noise = set(common.noise_level_params(ref_grads))
    name = next(n for n in ref_grads if n not in noise)
    wrong = {n: g.clone() for n, g in ref_grads.items()}
    wrong[name] += 1e-3 * ref_grads[name].abs().max()
    signal, _ = common.signal_rel_diff(wrong, ref_grads)
    assert signal == pytest.approx(1e-3, rel=1e-3)


def test_max_rel_diff_detects_a_wrong_gradient(problem_and_reference):
    _, _, ref_grads = problem_and_reference
    wrong = {name: g.clone() for name, g in ref_grads.items()}
    name = next(iter(wrong))
    wrong[name] += 1e-3 * ref_grads[name].abs().max()
    assert common.max_rel_diff(wrong, ref_grads) == pytest.approx(1e-3, rel=1e-3)


def test_metaopt_default_after_its_first_meta_batch_matches_reference(problem_and_reference):
    """The default runs the first meta-batch of a shape in the per-task loop and later
    ones as the memory budget decides (``vmap`` for the MLP, the loop for the conv
    net): every meta-batch matches the reference and the peers."""
    ok, why = metaopt_available()
    if not ok:
        pytest.skip(f"metaopt.algorithms.MAML not importable: {why}")
    from metaopt.algorithms import MAML

    problem, ref_loss, ref_grads = problem_and_reference
    seen = []

    def make_step(model, inner_steps, inner_lr, loss_fn):
        maml = MAML(model, inner_lr=inner_lr, inner_steps=inner_steps)

        def step(tasks):
            for _ in range(2):  # the second meta-batch runs the budget's choice
                model.zero_grad(set_to_none=True)
                loss = maml.meta_loss(*tasks, loss_fn)
                loss.backward()
                seen.append(maml.last_strategy)
            return loss.detach()

        return step

    loss, grads = _run(make_step, problem)
    assert seen == ["loop", "vmap" if problem.model == "mlp" else "loop"]
    _assert_matches_reference_and_peers(loss, grads, ref_loss, ref_grads, problem)
