"""small_fc_lopt parity with learned_optimization's AdafacMLPLOpt (golden vectors).

Tolerances: the golden README reports the reference's own float32-vs-float64 spread
(3.5e-6 absolute after 30 steps); a port with one wrong formula is off by a whole
step (~1e-4) or more, which the mutation test below confirms.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from metaopt.lopt import SmallFCLOpt, load_checkpoint
from metaopt.lopt.features import factored_dims
from metaopt.lopt.release import flatten_tree, read_flax_msgpack

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "golden"
SHARED_NPZ = Path("/work/shared/golden/small_fc_lopt_theta.npz")
KEYS = ("b1", "conv", "scalar_like", "w1", "w2")
ACC_SOURCES = {"m": "mom_rolling/m", "rms": "rms_rolling/rms",
               "v_row": "fac_rolling_features/v_row", "v_col": "fac_rolling_features/v_col",
               "v_diag": "fac_rolling_features/v_diag"}


@pytest.fixture(scope="module")
def golden():
    traj = np.load(GOLDEN / "small_fc_lopt_trajectory.npz")
    state = np.load(GOLDEN / "small_fc_lopt_opt_state.npz")
    return traj, state


def make_release_folder(tmp: Path) -> Path:
    folder = tmp / "small_fc_release"
    folder.mkdir()
    shutil.copy(GOLDEN / "small_fc_lopt_theta.msgpack", folder / "params")
    shutil.copy(GOLDEN / "small_fc_lopt_config.gin", folder / "config.gin")
    return folder


@pytest.fixture()
def lopt(tmp_path) -> SmallFCLOpt:
    return load_checkpoint(make_release_folder(tmp_path))


def golden_state(state, t: int) -> dict:
    out = {"iteration": torch.tensor(state["iteration"][t]),
           "num_steps": int(state["num_steps"][t])}
    for ours, theirs in ACC_SOURCES.items():
        # the reference keeps the decay index last; our state keeps it first
        out[ours] = {k: torch.from_numpy(state[f"{theirs}/{k}"][t].copy()).movedim(-1, 0)
                     .contiguous() for k in KEYS}
    return out


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.max(np.abs(ours - ref) / (1.0 + np.abs(ref)))) if ref.size else 0.0


# ----------------------------------------------------------------- (1) importer


def test_importer_reads_every_leaf_exactly(lopt):
    summary = json.loads((GOLDEN / "generation_summary.json").read_text())["small_fc_lopt"]
    raw = (GOLDEN / "small_fc_lopt_theta.msgpack").read_bytes()
    assert hashlib.sha256(raw).hexdigest() == summary["msgpack_sha256"]
    container = read_flax_msgpack(raw)
    assert container["gen_id"] == "golden_public_small_fc_lopt"
    leaves = flatten_tree(container["params"])
    assert [list(p) for p in leaves] == summary["theta_paths"]  # JAX flatten order
    for path, value in leaves.items():
        assert list(value.shape) == summary["theta_shapes"]["/".join(path)]
        assert value.dtype == np.float32
        ours = getattr(lopt, path[-1]).detach().numpy()
        np.testing.assert_array_equal(ours, value)  # bit-exact
    if SHARED_NPZ.exists():  # the npz duplicate (not copied into the repo)
        npz = np.load(SHARED_NPZ)
        assert sorted(npz.files) == sorted("/".join(p) for p in leaves)
        for path, value in leaves.items():
            np.testing.assert_array_equal(npz["/".join(path)], value)


def test_factored_dims_follow_reference():
    summary = json.loads((GOLDEN / "generation_summary.json").read_text())["small_fc_lopt"]
    shapes = {"b1": (4,), "conv": (3, 3, 2, 4), "scalar_like": (1,), "w1": (8, 4), "w2": (4, 3)}
    for key, text in summary["factored_dims"].items():
        dims = factored_dims(shapes[key])
        assert text == ("not factored" if dims is None else f"factored d1={dims[0]} d0={dims[1]}")
    assert factored_dims((5, 5)) == (0, 1)


def test_init_state_matches_reference(lopt, golden):
    traj, state = golden
    params = {k: torch.from_numpy(traj[f"init/{k}"]) for k in KEYS}
    ours = lopt.init(params, num_steps=int(traj["num_steps"]))
    ref = golden_state(state, 0)
    assert int(ours["iteration"]) == 0 and ours["num_steps"] == 30
    for acc in ACC_SOURCES:
        for k in KEYS:
            assert ours[acc][k].shape == ref[acc][k].shape, (acc, k)
            assert torch.count_nonzero(ours[acc][k]) == 0


# ----------------------------------------------------------------- (2) teacher forcing


def teacher_forced_errors(lopt, golden) -> tuple[float, float]:
    traj, state = golden
    worst_param, worst_acc = 0.0, 0.0
    for t in range(int(traj["num_steps"])):
        s = golden_state(state, t)
        params = {k: torch.from_numpy(state[f"params/{k}"][t].copy()) for k in KEYS}
        grads = {k: torch.from_numpy(traj[f"grads/{k}"][t].copy()) for k in KEYS}
        with torch.no_grad():
            new_params, new_state = lopt.update(grads, s, params,
                                                loss=torch.tensor(traj["losses"][t]))
        ref = golden_state(state, t + 1)
        assert int(new_state["iteration"]) == t + 1
        for k in KEYS:
            worst_param = max(worst_param, rel_err(new_params[k].numpy(),
                                                   state[f"params/{k}"][t + 1]))
            for acc in ACC_SOURCES:
                ours, theirs = new_state[acc][k].numpy(), ref[acc][k].numpy()
                assert ours.shape == theirs.shape
                if theirs.size:
                    err = np.max(np.abs(ours - theirs) / (1e-6 * np.max(np.abs(theirs))
                                                          + np.abs(theirs)))
                    worst_acc = max(worst_acc, float(err))
    return worst_param, worst_acc


def test_teacher_forced_steps_match_recorded_state(lopt, golden):
    worst_param, worst_acc = teacher_forced_errors(lopt, golden)
    print(f"small_fc teacher-forced: max |dθ|/(1+|θ|) = {worst_param:.3e}, "
          f"accumulators max rel = {worst_acc:.3e}")
    assert worst_param <= 1e-6
    assert worst_acc <= 1e-4


def test_teacher_forcing_detects_a_wrong_formula(lopt, golden):
    """The check can fail: a 1e-3 change in one decay offset is caught."""
    with torch.no_grad():
        lopt.momentum_decays.add_(1e-3)
    worst_param, worst_acc = teacher_forced_errors(lopt, golden)
    assert worst_acc > 1e-4 or worst_param > 1e-6


# ----------------------------------------------------------------- (3) open loop, public path


class GoldenModel(torch.nn.Module):
    def __init__(self, init: dict[str, np.ndarray], dtype=torch.float32) -> None:
        super().__init__()
        for k in KEYS:  # sorted order, as JAX flattens the dict
            self.register_parameter(k, torch.nn.Parameter(
                torch.from_numpy(init[k].copy()).to(dtype)))


def replay(folder: Path, golden, dtype=torch.float32) -> list[float]:
    traj, _ = golden
    model = GoldenModel({k: traj[f"init/{k}"] for k in KEYS}, dtype)
    opt = load_checkpoint(folder).optimizer(model.parameters(), num_steps=int(traj["num_steps"]))
    errors = []
    for t in range(int(traj["num_steps"])):
        for k, p in model.named_parameters():
            p.grad = torch.from_numpy(traj[f"grads/{k}"][t].copy()).to(dtype)
        opt.step(loss=torch.tensor(traj["losses"][t]))
        errors.append(max(rel_err(p.detach().double().numpy(), traj[f"traj/{k}"][t + 1])
                          for k, p in model.named_parameters()))
    movement = max(float(np.max(np.abs(traj[f"traj/{k}"][-1] - traj[f"traj/{k}"][0])))
                   for k in KEYS)
    final = max(float(np.max(np.abs(p.detach().double().numpy() - traj[f"traj/{k}"][-1])))
                for k, p in model.named_parameters())
    errors.append(final / movement)
    return errors


def test_open_loop_replay_through_public_api(tmp_path, golden):
    errors = replay(make_release_folder(tmp_path), golden)
    per_step, rel_to_movement = errors[:-1], errors[-1]
    print(f"small_fc open-loop: max |dθ|/(1+|θ|) over 30 steps = {max(per_step):.3e}; "
          f"final error / max movement = {rel_to_movement:.3e}")
    assert len(per_step) == 30
    assert max(per_step) <= 1e-5
    assert rel_to_movement <= 1e-3


def test_open_loop_replay_float64(tmp_path, golden):
    """In float64 the port stays within the reference's float32 spread."""
    errors = replay(make_release_folder(tmp_path), golden, dtype=torch.float64)
    assert max(errors[:-1]) <= 1e-5


# ----------------------------------------------------------------- functional properties


def test_update_is_pure_and_differentiable_in_meta_params(lopt):
    params = {"w": torch.randn(5, 3), "b": torch.randn(3), "s": torch.randn(())}
    grads = {k: torch.randn_like(v) for k, v in params.items()}
    before = {k: v.clone() for k, v in params.items()}
    state = lopt.init(params, num_steps=10)
    new_params, new_state = lopt.update(grads, state, params)
    for k in params:
        assert torch.equal(params[k], before[k])
        assert new_params[k].shape == params[k].shape
    assert int(state["iteration"]) == 0 and int(new_state["iteration"]) == 1
    meta_loss = sum((v ** 2).sum() for v in new_params.values())
    meta_loss.backward()
    for name, p in lopt.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert lopt.w0.grad.abs().sum() > 0 and lopt.momentum_decays.grad.abs().sum() > 0


def test_fresh_architecture_has_reference_shapes():
    lopt = SmallFCLOpt()
    assert lopt.w0.shape == (39, 4) and lopt.w2.shape == (4, 2)
    assert lopt.config()["hidden_size"] == 4
    decays = lopt.decays()
    torch.testing.assert_close(decays[0], torch.tensor([0.9, 0.99, 0.999]))


def test_blocked_evaluation_equals_single_block(lopt, monkeypatch):
    """Large tensors run the MLP in row blocks; the result must not depend on that."""
    import metaopt.lopt.small_fc as small_fc

    torch.manual_seed(0)
    params = {"w": torch.randn(300, 40), "c": torch.randn(7, 5, 6), "b": torch.randn(50)}
    grads = {k: torch.randn_like(v) for k, v in params.items()}
    state = lopt.init(params, num_steps=10)
    with torch.no_grad():
        monkeypatch.setattr(small_fc, "_BLOCK_ELEMENTS", 10**9)
        whole, _ = lopt.update(grads, state, params)
        monkeypatch.setattr(small_fc, "_BLOCK_ELEMENTS", 37)  # many uneven blocks
        blocked, _ = lopt.update(grads, state, params)
    for k in params:
        step = (params[k] - whole[k]).abs().max()
        assert step > 0
        # a slicing bug would be off by a whole step; rounding is ~1 ulp of p
        torch.testing.assert_close(blocked[k], whole[k], rtol=0, atol=1e-3 * float(step))


@pytest.mark.parametrize("backend", ["cpu_kernels", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_no_grad_fast_path_equals_differentiable_path(lopt, dtype, backend):
    """Without autograd, float32 rank-1/2 tensors may take the fused kernel backend.

    Both orientations of a factored matrix, a square one, vectors (incl. length 1) and
    the reference-only tensors (rank 3, 0-d, float64) run for several steps; the no-grad
    step with ``backend`` must track the differentiable reference path to rounding.
    """
    from metaopt.lopt import cpu_kernels

    if backend == "cpu_kernels" and not cpu_kernels.kernels_available():
        pytest.skip("no C compiler: the kernels cannot be built here")
    torch.manual_seed(1)
    shapes = {"tall": (300, 40), "wide": (40, 300), "sq": (33, 33), "vec": (50,),
              "one": (1,), "c": (7, 5, 6), "s": ()}
    params = {k: torch.randn(s, dtype=dtype) for k, s in shapes.items()}
    fast_p, slow_p = dict(params), dict(params)
    fast_s = lopt.init(params, num_steps=100)
    slow_s = lopt.init(params, num_steps=100)
    for _ in range(4):
        grads = {k: torch.randn_like(v) * 0.1 for k, v in params.items()}
        with torch.no_grad():
            fast_p, fast_s = lopt.update(grads, fast_s, fast_p, backend=backend)
        with torch.enable_grad():
            slow_p, slow_s = lopt.update(grads, slow_s, slow_p)
        slow_p = {k: v.detach() for k, v in slow_p.items()}
        slow_s = {k: ({n: t.detach() for n, t in v.items()} if isinstance(v, dict) else v)
                  for k, v in slow_s.items()}
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    for k in params:
        assert fast_p[k].dtype == dtype and fast_p[k].shape == params[k].shape
        assert (fast_p[k] - params[k]).abs().max() > 0
        torch.testing.assert_close(fast_p[k], slow_p[k], rtol=0, atol=tol)
        for acc in ("m", "rms", "v_row", "v_col", "v_diag"):
            assert fast_s[acc][k].shape == slow_s[acc][k].shape
            ref = slow_s[acc][k]
            scale = float(ref.abs().max()) if ref.numel() else 0.0
            torch.testing.assert_close(fast_s[acc][k], ref, rtol=10 * tol, atol=tol * scale)
