"""VeLO parity against the JAX reference's golden data, plus contract checks.

Golden data (described in ``/work/shared/golden/README.md``): a perturbed
theta in the release format, 30 recorded steps with their gradients and losses, the full
optimizer state after every step and VeLO's internals (LSTM input, controls, lr_mult).
"""

from __future__ import annotations

import copy
import importlib.util
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from metaopt.lopt.base import ARCHITECTURES
from metaopt.lopt.release import ReleaseFormatError, flatten_tree, read_release_params
from metaopt.lopt.velo import (
    VeLO,
    factored_dims,
    loss_buffer_features,
    loss_buffer_init,
    loss_buffer_step,
    loss_buffer_update,
)

_CANDIDATES = [Path(__file__).resolve().parents[1] / "data" / "golden",
               Path("/work/shared/golden")]
GOLDEN = next((p for p in _CANDIDATES if (p / "velo_trajectory.npz").exists()), None)
pytestmark = pytest.mark.skipif(GOLDEN is None, reason="VeLO golden data not found")

GIN = {"HyperV2.lstm_hidden_size": 512, "HyperV2.param_inits": 256,
       "HyperV2.use_bugged_loss_features": False}
TOL = 1e-5  # max |Δθ| / (1 + |θ|), float32


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny matmuls: one thread avoids spin-waiting on a shared, busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def golden():
    """(theta as ``/``-joined leaves read from the msgpack, trajectory, states)."""
    tree = read_release_params(GOLDEN / "velo_theta.msgpack")
    theta = {"/".join(path): leaf for path, leaf in flatten_tree(tree).items()}
    traj = np.load(GOLDEN / "velo_trajectory.npz")
    states = np.load(GOLDEN / "velo_opt_state.npz")
    return theta, {k: traj[k] for k in traj.files}, {k: states[k] for k in states.files}


@pytest.fixture(scope="module")
def velo(golden):
    theta, _, _ = golden
    return VeLO.from_release(theta, GIN)


def _keys(traj):
    return [str(k) for k in traj["tensor_order"]]


def _t(a):
    return torch.from_numpy(np.array(a))


def _state_at(states, keys, t):
    """The recorded reference state after ``t`` updates, in this port's layout."""
    return {
        "mom": {k: _t(states[f"mom_rolling/m/{k}"][t]) for k in keys},
        "rms": {k: _t(states[f"rms_rolling/rms/{k}"][t]) for k in keys},
        "v_row": {k: _t(states[f"fac_rolling/v_row/{k}"][t]) for k in keys},
        "v_col": {k: _t(states[f"fac_rolling/v_col/{k}"][t]) for k in keys},
        "v_diag": {k: _t(states[f"fac_rolling/v_diag/{k}"][t]) for k in keys},
        "lstm_hidden": dict(zip(keys, _t(states["lstm_hidden_state/hidden"][t]).unbind(0))),
        "lstm_cell": dict(zip(keys, _t(states["lstm_hidden_state/cell"][t]).unbind(0))),
        "loss_buffer": {n: _t(states[f"loss_buffer/{n}"][t])
                        for n in ("means", "running_min", "decays", "iteration")},
        "iteration": _t(states["iteration"][t]),
        "num_steps": _t(states["num_steps"][t]),
    }, {k: _t(states[f"params/{k}"][t]) for k in keys}


def _rel_err(ours, ref):
    return float(np.max(np.abs(ours - ref) / (1.0 + np.abs(ref))))


# ------------------------------------------------------------------------ (1) import


def test_msgpack_leaves_equal_reference_arrays(golden):
    """Every leaf read from the release msgpack equals the reference's own arrays."""
    theta, _, _ = golden
    npz = GOLDEN / "velo_theta.npz"
    if not npz.exists():
        npz = Path("/work/shared/golden/velo_theta.npz")
    if not npz.exists():
        pytest.skip("velo_theta.npz (the npz copy of theta) not available")
    ref = np.load(npz)
    assert sorted(ref.files) == sorted(theta)
    for key in ref.files:
        assert theta[key].dtype == ref[key].dtype and np.array_equal(theta[key], ref[key]), key


def test_every_leaf_round_trips_exactly(golden, velo):
    theta, _, _ = golden
    back = velo.release_params()
    assert sorted(back) == sorted(theta)
    for key, ref in theta.items():
        # Bitwise: the import only transposes and permutes blocks (the forget gate's +1
        # lives in a separate bias vector, so it never rounds the stored bias).
        assert back[key].shape == ref.shape, key
        assert np.array_equal(back[key], ref), f"leaf {key} changed on import"


def test_import_layout_conventions(golden, velo):
    """Haiku (in, out) weights and LSTM gate order i, g, f, o map to PyTorch's layout."""
    theta, _, _ = golden
    h = 512
    w = theta["rnn_params/rnn/linear/w"]
    b = theta["rnn_params/rnn/linear/b"]
    # torch LSTMCell rows are gates (i, f, g, o); haiku columns are (i, g, f, o).
    assert np.array_equal(velo.lstm.weight_ih[h:2 * h].detach().numpy(), w[:h, 2 * h:3 * h].T)
    assert np.array_equal(velo.lstm.weight_hh[2 * h:3 * h].detach().numpy(), w[h:, h:2 * h].T)
    assert np.array_equal(velo.lstm.bias_ih[:h].detach().numpy(), b[:h])
    assert np.all(velo.lstm.bias_hh[h:2 * h].detach().numpy() == 1.0)
    assert np.array_equal(velo.mix_in.weight.detach().numpy(), theta["rnn_params/linear_2/w"].T)
    # w0 groups are concatenated in numeric (not lexicographic) order: w0__2 is channel 2.
    assert np.array_equal(velo.ff_weights[0][:, 2:3].detach().numpy(),
                          theta["ff_mod_stack/~/w0__2"])
    assert np.array_equal(velo.ff_weights[0][:, 27:30].detach().numpy(),
                          theta["ff_mod_stack/~/w0__13"])


def test_release_errors_list_bad_keys(golden):
    theta, _, _ = golden
    bad = dict(theta)
    del bad["rnn_params/step_size/w"]
    bad["rnn_params/extra/w"] = np.zeros(3, np.float32)
    bad["ff_mod_stack/~/b0"] = np.zeros((256, 5), np.float32)
    with pytest.raises(ReleaseFormatError) as err:
        VeLO.from_release(bad, GIN)
    msg = str(err.value)
    assert "rnn_params/step_size/w" in msg and "rnn_params/extra/w" in msg
    assert "ff_mod_stack/~/b0" in msg
    # Without the gin bindings HyperV2's defaults (hidden 128, 64 inits) apply: mismatch.
    with pytest.raises(ReleaseFormatError, match="lstm_hidden_size=128"):
        VeLO.from_release(theta, {})


def test_release_config_defaults_and_nested_tree(golden):
    theta, _, _ = golden
    assert VeLO.release_config({})["use_bugged_loss_features"] is True
    assert VeLO.release_config(GIN)["use_bugged_loss_features"] is False
    with pytest.raises(NotImplementedError):
        VeLO.release_config({"HyperV2.precondition_output": True})
    # Nested maps as the msgpack decodes them, with the old flax LSTMState layout.
    nested: dict = {}
    for key, value in theta.items():
        parts = key.replace("rnn/linear", "rnn\0linear").split("/")
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part.replace("\0", "/"), {})
        node[parts[-1]] = value
    init = nested["lstm_init_state"]
    nested["lstm_init_state"] = {"name": "LSTMState", "fields": ["hidden", "cell"],
                                 "values": {"0": init["hidden"], "1": init["cell"]}}
    lopt = VeLO.from_release({"params": nested, "gen_id": "x", "step": 0}, GIN)
    assert torch.equal(lopt.lstm_init_cell.detach(), torch.from_numpy(theta[
        "lstm_init_state/cell"]))


def test_registered():
    assert ARCHITECTURES["velo"] is VeLO


# ------------------------------------------------------------- (2) teacher-forced steps


def test_teacher_forced_steps_match_reference(golden, velo):
    _, traj, states = golden
    keys = _keys(traj)
    worst = {}
    for t in range(int(traj["num_steps"])):
        state, params = _state_at(states, keys, t)
        grads = {k: _t(traj[f"grads/{k}"][t]) for k in keys}
        with torch.no_grad():
            new_p, new_s, internals = velo.update_with_internals(
                grads, state, params, loss=_t(traj["losses"][t]))
        ref_state, ref_params = _state_at(states, keys, t + 1)
        diag = {n: traj[f"velo_diag/{n}"][t] for n in (
            "lstm_input", "controls", "lr_mult", "next_lstm_hidden", "next_lstm_cell",
            "loss_features")}
        for name, ref in diag.items():
            err = float(np.max(np.abs(internals[name].numpy() - ref)))
            worst[name] = max(worst.get(name, 0.0), err)
        for k in keys:
            step_ref = states[f"params/{k}"][t + 1] - states[f"params/{k}"][t]
            step = new_p[k].numpy() - states[f"params/{k}"][t]
            # The step itself to 1e-3 of its size, up to one float32 ulp of θ (the steps
            # are ~1e-5 of θ, i.e. a few hundred ulps); θ itself to TOL.
            ulp = np.spacing(np.abs(states[f"params/{k}"][t + 1])).max()
            assert np.max(np.abs(step - step_ref)) <= 1e-3 * np.max(np.abs(step_ref)) + ulp, \
                (t, k)
            assert _rel_err(new_p[k].numpy(), ref_params[k].numpy()) <= TOL
            for group in ("mom", "rms", "v_row", "v_col", "v_diag"):
                np.testing.assert_allclose(new_s[group][k].numpy(),
                                           ref_state[group][k].numpy(), rtol=1e-5, atol=1e-12)
        for k in keys:
            np.testing.assert_allclose(new_s["lstm_hidden"][k].numpy(),
                                       ref_state["lstm_hidden"][k].numpy(), atol=1e-4)
        for n in ("means", "running_min"):
            np.testing.assert_allclose(new_s["loss_buffer"][n].numpy(),
                                       ref_state["loss_buffer"][n].numpy(), rtol=1e-6)
        assert int(new_s["iteration"]) == int(ref_state["iteration"])
    # Internals: float32 noise only. Loss features amplify last-bit differences of the
    # buffer (README §3.2), hence their looser bound.
    assert worst["lstm_input"] <= 1e-3 and worst["loss_features"] <= 1e-3, worst
    for name in ("controls", "lr_mult", "next_lstm_hidden", "next_lstm_cell"):
        assert worst[name] <= 1e-4, worst


def test_init_matches_reference_state(golden, velo):
    _, traj, states = golden
    keys = _keys(traj)
    params = {k: _t(traj[f"init/{k}"]) for k in keys}
    state = velo.init(params, int(traj["num_steps"]))
    ref, _ = _state_at(states, keys, 0)
    for group in ("mom", "rms", "v_row", "v_col", "v_diag"):
        for k in keys:
            assert state[group][k].shape == ref[group][k].shape, (group, k)
    for k in keys:
        assert torch.equal(state["lstm_hidden"][k], ref["lstm_hidden"][k])
    # decays: the reference's logspace/exp may differ from torch's in the last bit.
    np.testing.assert_allclose(state["loss_buffer"]["decays"], ref["loss_buffer"]["decays"],
                               rtol=1e-7)


# -------------------------------------------------------------- (3) open-loop replay


def _replay(lopt, traj, keys, n=None):
    params = {k: _t(traj[f"init/{k}"]) for k in keys}
    state = lopt.init(params, int(traj["num_steps"]))
    out = []
    for t in range(n or int(traj["num_steps"])):
        grads = {k: _t(traj[f"grads/{k}"][t]) for k in keys}
        with torch.no_grad():
            params, state = lopt.update(grads, state, params, loss=_t(traj["losses"][t]))
        out.append({k: v.clone() for k, v in params.items()})
    return out, state


def test_open_loop_replay_functional(golden, velo):
    _, traj, _ = golden
    keys = _keys(traj)
    steps, _ = _replay(velo, traj, keys)
    for t, params in enumerate(steps):
        for k in keys:
            assert _rel_err(params[k].numpy(), traj[f"traj/{k}"][t + 1]) <= TOL, (t, k)
    # Stricter: the total movement agrees to 1e-3 of itself.
    for k in keys:
        move_ref = traj[f"traj/{k}"][-1] - traj[f"traj/{k}"][0]
        move = steps[-1][k].numpy() - traj[f"traj/{k}"][0]
        assert np.max(np.abs(move - move_ref)) <= 1e-3 * np.max(np.abs(move_ref)), k


def _movement_error(lopt, traj, keys):
    steps, state = _replay(lopt, traj, keys)
    num = sum(float(np.sum((steps[-1][k].numpy() - traj[f"traj/{k}"][-1]) ** 2)) for k in keys)
    den = sum(float(np.sum((traj[f"traj/{k}"][-1] - traj[f"traj/{k}"][0]) ** 2)) for k in keys)
    return (num / den) ** 0.5, state


def test_compatibility_flags_change_the_trajectory(golden):
    """Both bug flags are implemented and the golden data tells them apart (README §1)."""
    theta, traj, _ = golden
    keys = _keys(traj)
    bugged_lstm = VeLO.from_release(theta, {**GIN, "HyperV2.use_bugged_next_lstm_state": True})
    err, state = _movement_error(bugged_lstm, traj, keys)
    assert err > 0.3, err  # reference: ~104 % of the movement
    init_h = bugged_lstm.lstm_init_hidden.detach()[0]
    for k in keys:  # never carried forward
        assert torch.equal(state["lstm_hidden"][k], init_h)
    bugged_loss = VeLO.from_release(theta, {**GIN, "HyperV2.use_bugged_loss_features": True})
    err, state = _movement_error(bugged_loss, traj, keys)
    assert 0.03 < err < 0.5, err  # reference: ~12 %
    np.testing.assert_allclose(state["loss_buffer"]["decays"][-1], np.exp(-1 / 10), rtol=1e-6)


def _golden_release_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "velo_release"
    folder.mkdir()
    shutil.copy(GOLDEN / "velo_theta.msgpack", folder / "params")
    shutil.copy(GOLDEN / "velo_config.gin", folder / "config.gin")
    return folder


_HAVE_CHECKPOINT = importlib.util.find_spec("metaopt.lopt.checkpoint") is not None
_HAVE_SHELL = importlib.util.find_spec("metaopt.lopt.torch_optimizer") is not None


@pytest.mark.skipif(not _HAVE_CHECKPOINT, reason="metaopt.lopt.checkpoint not available yet")
def test_open_loop_replay_through_public_path(golden, tmp_path):
    """``load_checkpoint(release_folder).optimizer(...)`` reproduces all 30 steps."""
    from metaopt.lopt import load_checkpoint

    theta, traj, _ = golden
    keys = _keys(traj)
    lopt = load_checkpoint(_golden_release_folder(tmp_path))
    assert isinstance(lopt, VeLO)
    assert lopt.use_bugged_loss_features is False and lopt.lstm_hidden_size == 512
    back = lopt.release_params()
    for key, ref in theta.items():  # the msgpack reader also gives every leaf exactly
        assert np.array_equal(back[key], ref), key
    tensors = [torch.nn.Parameter(_t(traj[f"init/{k}"])) for k in keys]  # sorted-key order
    opt = lopt.optimizer(tensors, num_steps=int(traj["num_steps"]))
    for t in range(int(traj["num_steps"])):
        for k, p in zip(keys, tensors):
            p.grad = _t(traj[f"grads/{k}"][t])
        opt.step(loss=_t(traj["losses"][t]))
        for k, p in zip(keys, tensors):
            assert _rel_err(p.detach().numpy(), traj[f"traj/{k}"][t + 1]) <= TOL, (t, k)


@pytest.mark.skipif(not _HAVE_SHELL, reason="metaopt.lopt.torch_optimizer not available yet")
def test_shell_without_loss_is_a_clear_error():
    torch.manual_seed(0)  # a random init's step can fall below float32 resolution at |p| = 1
    lopt = VeLO(lstm_hidden_size=8, param_inits=4)
    p = torch.nn.Parameter(torch.full((3, 2), 1e-3))
    opt = lopt.optimizer([p], num_steps=10)
    p.grad = torch.ones(3, 2)
    with pytest.raises((ValueError, RuntimeError, TypeError), match=r"(?i)loss"):
        opt.step()
    opt.step(loss=torch.tensor(1.0))  # and with a loss it works
    assert not torch.equal(p.detach(), torch.full((3, 2), 1e-3))


def test_functional_update_without_loss_is_a_clear_error():
    lopt = VeLO(lstm_hidden_size=8, param_inits=4)
    params = {"w": torch.ones(3, 2)}
    state = lopt.init(params, 10)
    with pytest.raises(ValueError, match="loss"):
        lopt.update({"w": torch.ones(3, 2)}, state, params)


# ---------------------------------------------------------------------- unit checks


def test_factored_dims_conventions():
    assert factored_dims((8, 4)) == (1, 0)
    assert factored_dims((3, 3, 2, 4)) == (1, 3)
    assert factored_dims((5, 5)) == (0, 1)
    assert factored_dims((7,)) is None and factored_dims(()) is None


def test_loss_features_zero_for_two_steps_then_bounded():
    buf = loss_buffer_init(100)
    for i, loss in enumerate([5.0, 4.0, 3.5, 3.0, 10.0, 2.0]):
        buf = loss_buffer_update(buf, torch.tensor(loss))
        feats = loss_buffer_features(buf)
        assert feats.shape == (9,)
        if i < 2:
            assert torch.all(feats == 0)
        assert torch.all(feats.abs() <= 1)
    assert torch.any(feats != 0)


def test_loss_buffer_step_is_update_then_features_bitwise():
    """The step's fused form (one shared bias correction) equals the two public calls."""
    buf_a = buf_b = loss_buffer_init(1000)
    for loss in [5.0, 4.0, 3.5, 3.0, 10.0, 2.0, 2.5, 1e6, 0.5]:
        buf_a = loss_buffer_update(buf_a, torch.tensor(loss))
        feats_a = loss_buffer_features(buf_a)
        buf_b, feats_b = loss_buffer_step(buf_b, torch.tensor(loss))
        assert torch.equal(feats_a, feats_b)
        assert buf_a.keys() == buf_b.keys()
        for k in buf_a:
            assert torch.equal(buf_a[k], buf_b[k]) and buf_a[k].dtype == buf_b[k].dtype, k


def test_meta_gradient_flows_through_update():
    """update is differentiable in the meta-parameters (for truncated BPTT)."""
    torch.manual_seed(0)
    lopt = VeLO(lstm_hidden_size=8, param_inits=4)
    with torch.no_grad():
        lopt.rnn_to_controls.weight.normal_()
    params = {"b": torch.randn(5), "w": torch.randn(4, 3), "s": torch.randn(())}
    state = lopt.init(params, 10)
    for _ in range(2):
        grads = {k: 2 * v for k, v in params.items()}
        loss = sum((v ** 2).sum() for v in params.values())
        params, state = lopt.update(grads, state, params, loss=loss.detach())
    out = sum((v ** 2).sum() for v in params.values())
    out.backward()
    assert lopt.step_size.weight.grad is not None
    assert float(lopt.step_size.weight.grad.abs().sum()) > 0
    assert float(lopt.ff_weights[0].grad.abs().sum()) > 0
    assert params["s"].shape == ()


def test_scalar_and_mixed_dtype_tensors_keep_shape_and_dtype():
    lopt = VeLO(lstm_hidden_size=8, param_inits=4)
    params = {"s": torch.tensor(1.5), "h": torch.ones(4, dtype=torch.float64),
              "w": torch.ones(2, 3, 4)}
    state = lopt.init(params, 5)
    grads = {k: torch.full_like(v, 0.1) for k, v in params.items()}
    new_p, _ = lopt.update(grads, state, params, loss=1.0)
    for k, v in params.items():
        assert new_p[k].shape == v.shape and new_p[k].dtype == v.dtype


@pytest.mark.parametrize("backend", ["cpu_kernels", "reference"])
def test_fast_path_matches_autograd_path(backend):
    """The no-grad step with ``backend`` (the fused C kernel for float32 vectors and
    matrices, the reference for the rest) computes the same trajectory as the
    differentiable path, for 2-d, 4-d, 1-d and scalar tensors."""
    from metaopt.lopt import cpu_kernels

    if backend == "cpu_kernels" and not cpu_kernels.kernels_available():
        pytest.skip("no C compiler")
    torch.manual_seed(0)
    lopt = VeLO(lstm_hidden_size=8, param_inits=4)
    with torch.no_grad():
        lopt.rnn_to_controls.weight.normal_()
    params = {"w": torch.randn(6, 5), "c": torch.randn(3, 2, 4, 5), "b": torch.randn(5),
              "s": torch.randn(())}
    runs = []
    for grad_mode in (True, False):
        p, state = dict(params), lopt.init(params, 10)
        p = {k: v.clone().requires_grad_(grad_mode) for k, v in p.items()}
        with torch.set_grad_enabled(grad_mode):
            for t in range(4):
                grads = {k: torch.sin(v.detach() * (t + 1)) for k, v in p.items()}
                p, state = lopt.update(grads, state, p, loss=float(3 - t),
                                       backend=None if grad_mode else backend)
        runs.append(({k: v.detach() for k, v in p.items()}, state))
    (p_ref, s_ref), (p_fast, s_fast) = runs
    for k in params:
        torch.testing.assert_close(p_fast[k], p_ref[k], rtol=1e-5, atol=1e-6)
        for group in ("mom", "rms", "v_row", "v_col", "v_diag"):
            assert s_fast[group][k].shape == s_ref[group][k].shape
            torch.testing.assert_close(s_fast[group][k], s_ref[group][k].detach(),
                                       rtol=1e-5, atol=1e-7)


def test_derived_meta_parameters_fold_mixing_into_lstm():
    """``derived_meta_parameters`` folds ``mix_in`` into the LSTM input weights; ``rnn``
    on that snapshot agrees with the module path at the released sizes. The snapshot is
    a copy: an in-place change of the module's weights is seen by the module path only,
    and by the fast path once a new snapshot is taken."""
    torch.manual_seed(0)
    lopt = VeLO()
    x = torch.randn(7, 30)
    h, c = torch.randn(7, 512) * 0.5, torch.randn(7, 512) * 0.5
    meta = lopt.derived_meta_parameters()
    assert {"lstm_fold", "lstm_bias", "gates_h", "head_w", "packed_mlps"} <= meta.keys()
    assert not any(t.requires_grad for t in meta.values())
    for change in range(2):
        with torch.enable_grad():
            ref = lopt.rnn(x, h, c)
        with torch.no_grad():
            fast = lopt.rnn(x, h, c, meta)
        for a, b in zip(fast, ref):
            torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6)
        with torch.no_grad():
            (lopt.mix_in.weight if change == 0 else lopt.lstm.weight_ih).mul_(1.5)
            stale = lopt.rnn(x, h, c, meta)
            moved = lopt.rnn(x, h, c)
        assert not torch.allclose(stale[2], moved[2])  # the snapshot is not the module
        meta = lopt.derived_meta_parameters()


def test_shell_snapshots_meta_parameters_until_refreshed():
    """The torch.optim shell treats the meta-parameters as constants: an in-place change
    of the module's weights is not seen by its steps until ``refresh_meta_parameters()``
    (documented contract), after which it matches a shell built on the changed weights.
    The pure ``update`` always uses the weights it is given."""
    torch.manual_seed(0)
    lopt = VeLO(lstm_hidden_size=16, param_inits=8)
    with torch.no_grad():
        lopt.rnn_to_controls.weight.normal_(0.0, 0.5)
    model = torch.nn.Linear(6, 5)
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    xs = torch.randn(4, 2, 6, generator=torch.Generator().manual_seed(1))

    def run(opt, steps, refresh_at=None, change_at=None):
        for t in range(steps):
            if t == change_at:
                with torch.no_grad():
                    lopt.ff_weights[0].mul_(-2.0)
            if t == refresh_at:
                opt.refresh_meta_parameters()
            opt.zero_grad()
            loss = model(xs[t]).square().mean()
            loss.backward()
            opt.step(loss=loss)
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    def fresh(**kw):
        model.load_state_dict(init)
        return lopt.optimizer(model.parameters(), num_steps=20, backend="reference", **kw)

    original = {k: v.detach().clone() for k, v in lopt.state_dict().items()}
    ignored = run(fresh(), 4, change_at=2)            # changed, never refreshed
    lopt.load_state_dict(original)
    unchanged = run(fresh(), 4)
    refreshed = run(fresh(), 4, change_at=2, refresh_at=2)
    lopt.load_state_dict(original)
    # the pure path, which always reads the module: the change counts from step 2 on
    model.load_state_dict(init)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    state = lopt.init(params, 20)
    for t in range(4):
        if t == 2:
            with torch.no_grad():
                lopt.ff_weights[0].mul_(-2.0)
        p = {k: v.clone().requires_grad_() for k, v in params.items()}
        loss = torch.func.functional_call(model, p, (xs[t],)).square().mean()
        grads = dict(zip(p, torch.autograd.grad(loss, list(p.values()))))
        with torch.no_grad():
            params, state = lopt.update(grads, state, params, loss=loss.detach())
    for k in init:
        torch.testing.assert_close(ignored[k], unchanged[k], rtol=1e-6, atol=1e-7)
        assert not torch.allclose(refreshed[k], unchanged[k], rtol=1e-6, atol=1e-7), k
        torch.testing.assert_close(refreshed[k], params[k], rtol=1e-5, atol=1e-6)
    lopt.load_state_dict(original)


def test_in_place_kernel_plans_match_the_checked_path(monkeypatch):
    """The torch.optim shell's in-place steps go through prepared kernel plans (one per
    tensor, reused while the tensors are the same); they give the same bits as the checked
    per-call path, and a state dict loaded between steps (new state tensors) is planned
    afresh."""
    pytest.importorskip("ctypes")
    from metaopt.lopt import cpu_kernels, velo_kernels
    if cpu_kernels.kernels() is None:
        pytest.skip("no C compiler")
    torch.manual_seed(0)
    lopt = VeLO(lstm_hidden_size=16, param_inits=8)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def run(use_plans: bool, reload_at: int | None = None) -> dict[str, torch.Tensor]:
        model.load_state_dict(init)
        if not use_plans:
            monkeypatch.setattr(velo_kernels, "plan_for", lambda *a, **k: None)
        opt = lopt.optimizer(model.parameters(), num_steps=20, backend="cpu_kernels")
        opts.append(opt)
        x, y = torch.randn(8, 6, generator=torch.Generator().manual_seed(1)), torch.zeros(8, 3)
        for t in range(6):
            if t == reload_at:
                opt.load_state_dict(copy.deepcopy(opt.state_dict()))
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step(loss=loss)
        monkeypatch.undo()
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    opts = []
    planned = run(True)
    plans = opts[0]._workspace["velo_plans"]  # owned by the optimizer, not the module
    assert len(plans) == 4 and all(isinstance(plan, cpu_kernels.VeLOTensorPlan)
                                   for plan in plans.values())
    assert not [k for k in vars(lopt) if "plan" in k]
    checked = run(False)
    reloaded = run(True, reload_at=3)
    for k in planned:
        assert torch.equal(planned[k], checked[k]), k
        assert torch.equal(reloaded[k], checked[k]), k


def test_in_place_kernel_plans_are_reused_between_steps():
    """A plan is prepared once per tensor and reused while the shell steps the same
    parameters and state (the point of planning), and rebuilt after a state-dict load."""
    from metaopt.lopt import cpu_kernels
    if cpu_kernels.kernels() is None:
        pytest.skip("no C compiler")
    torch.manual_seed(0)
    lopt = VeLO(lstm_hidden_size=16, param_inits=8)
    model = torch.nn.Linear(6, 5)
    opt = lopt.optimizer(model.parameters(), num_steps=20, backend="cpu_kernels")

    def step() -> dict:
        opt.zero_grad()
        loss = model(torch.ones(2, 6)).square().mean()
        loss.backward()
        opt.step(loss=loss)
        return dict(opt._workspace.get("velo_plans", {}))

    step()  # the first step moves the fresh (channel-last) state to channel-first buffers
    first = step()
    second = step()
    assert first.keys() == second.keys() and len(first) == 2
    assert all(first[k] is second[k] for k in first)
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # new state tensors
    third = step()
    assert all(third[k] is not second[k] for k in first)


def test_copied_shell_takes_its_own_snapshot():
    """A deep-copied or unpickled shell rebuilds its meta-parameter snapshot from its own
    copy of the learned optimizer (equal values, its own tensors)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 5)
    opt = VeLO(lstm_hidden_size=16, param_inits=8).optimizer(model.parameters(),
                                                             num_steps=20,
                                                             backend="reference")
    model(torch.ones(2, 6)).square().mean().backward()
    opt.step(loss=1.0)
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        meta, own = clone._workspace["meta"], opt._workspace["meta"]
        assert meta.keys() == own.keys()
        for name in own:
            assert meta[name] is not own[name] and torch.equal(meta[name], own[name]), name
