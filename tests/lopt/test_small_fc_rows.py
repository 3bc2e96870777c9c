"""``lopt_small_fc_rows``: small_fc_lopt's step of R rows of several tensors in one C call.

The one C call must be exactly the per-(tensor, row) work: every row of every tensor is
bit-identical to stepping that tensor's row alone (R = 1, one tensor), a perturbed input
row changes that row's outputs only, rows may lie apart in memory (row strides), and
malformed arguments are refused with one-line errors before anything is written. The
equality to the PyTorch reference step is tested through ``update_rows`` (tests/algorithms
/test_lopt_training.py) and the optimizer paths (test_cpu_kernels.py).
"""

from __future__ import annotations

import ctypes

import pytest
import torch

from metaopt.lopt import SmallFCLOpt, cpu_kernels
from metaopt.lopt.small_fc import _ACCUMULATORS, _factored_d0

pytestmark = pytest.mark.skipif(not cpu_kernels.kernels_available(),
                                reason="no C compiler: the kernels cannot be built here")

#: a tall and a wide matrix (both factored orientations), a square one, a row of length
#: not a multiple of the vector width and a vector (diagonal second moments)
SHAPES = {"tall": (21, 5), "wide": (3, 19), "square": (6, 6), "vec": (13,)}
ROWS = 4


@pytest.fixture
def one_thread():
    """Row jobs run on one thread each; R = 1 jobs on torch's threads: with one thread
    both sum in the same order, so the results are bit-identical."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _setup(rows: int = ROWS, seed: int = 0):
    torch.manual_seed(seed)
    lopt = SmallFCLOpt()
    with torch.no_grad():
        for name, p in lopt.named_parameters():
            p.add_((0.02 if "decays" in name else 0.3) * torch.randn_like(p))
    meta = {k: torch.stack([v.detach() + 0.01 * r * torch.randn_like(v) for r in range(rows)])
            for k, v in lopt.named_parameters()}
    gen = torch.Generator().manual_seed(seed + 1)
    params = {k: torch.randn(rows, *s, generator=gen) for k, s in SHAPES.items()}
    grads = {k: torch.randn(rows, *s, generator=gen) for k, s in SHAPES.items()}
    one = lopt.init({k: v[0] for k, v in params.items()}, 50)
    state = {acc: {k: (torch.rand(rows, *v.shape, generator=gen) * 0.1).contiguous()
                   for k, v in one[acc].items()} for acc in _ACCUMULATORS}
    iteration = torch.tensor([0, 3, 17, 40][:rows] + [5] * max(0, rows - 4), dtype=torch.int32)
    with torch.no_grad():
        const = lopt._kernel_constants(*lopt._prepare(iteration, torch.float32,
                                                      torch.device("cpu"), meta))
    const["rms_d"] = const["rms_d"].contiguous()
    coef = torch.rand(len(SHAPES), rows, generator=gen) * 1e-3 + 1e-4
    p_decay = 1.0 - torch.rand(len(SHAPES), rows, generator=gen) * 1e-2
    return lopt, params, grads, state, const, coef, p_decay


def _items(params, grads, state, names=None):
    names = list(SHAPES) if names is None else names
    return [cpu_kernels.SmallFCRows(grads[n], params[n], *(state[k][n] for k in _ACCUMULATORS),
                                    _factored_d0(params[n].shape[1:])) for n in names]


def _row_const(const, r):
    out = {k: v[r:r + 1] for k, v in const.items() if k != "mlp"}
    out["mlp"] = [t[r:r + 1] for t in const["mlp"]]
    return out


def test_one_call_equals_every_row_of_every_tensor_alone(one_thread):
    # y[j][r] = step(tensor j, row r) exactly: the batched C loop adds no arithmetic
    kern = cpu_kernels.kernels()
    lopt, params, grads, state, const, coef, p_decay = _setup()
    outs = kern.small_fc_rows(_items(params, grads, state), const, lopt.exp_mult, coef, p_decay)
    for j, name in enumerate(SHAPES):
        for r in range(ROWS):
            row = {k: v[r:r + 1] for k, v in params.items()}
            g_row = {k: v[r:r + 1] for k, v in grads.items()}
            s_row = {acc: {k: v[r:r + 1] for k, v in state[acc].items()}
                     for acc in _ACCUMULATORS}
            alone = kern.small_fc_rows(_items(row, g_row, s_row, [name]), _row_const(const, r),
                                       lopt.exp_mult, coef[j:j + 1, r:r + 1],
                                       p_decay[j:j + 1, r:r + 1])[0]
            for got, want in zip(outs[j], alone):
                if want.numel():
                    assert torch.equal(got[r:r + 1] if got.shape[0] == ROWS else got, want)
        assert not torch.equal(outs[j][0], params[name])  # it stepped


def test_a_perturbed_row_changes_only_that_row(one_thread):
    kern = cpu_kernels.kernels()
    lopt, params, grads, state, const, coef, p_decay = _setup()
    base = kern.small_fc_rows(_items(params, grads, state), const, lopt.exp_mult, coef, p_decay)
    grads2 = {k: v.clone() for k, v in grads.items()}
    grads2["wide"][2, 1, 4] += 0.5
    moved = kern.small_fc_rows(_items(params, grads2, state), const, lopt.exp_mult, coef,
                               p_decay)
    for j, name in enumerate(SHAPES):
        for a, b in zip(base[j][:3], moved[j][:3]):  # p, m, rms
            for r in range(ROWS):
                same = torch.equal(a[r], b[r])
                assert same == (not (name == "wide" and r == 2)), (name, r)


def test_rows_apart_in_memory_equal_contiguous_rows(one_thread):
    # a row stride larger than a row (rows of a wider buffer) reads the same rows
    kern = cpu_kernels.kernels()
    lopt, params, grads, state, const, coef, p_decay = _setup()
    name = "tall"
    wide = torch.zeros(ROWS, 2, *SHAPES[name])
    wide[:, 1] = params[name]
    apart = wide[:, 1]
    assert not apart.is_contiguous() and apart[0].is_contiguous()
    ref = kern.small_fc_rows(_items(params, grads, state, [name]), const, lopt.exp_mult,
                             coef[:1], p_decay[:1])[0]
    item = _items(params, grads, state, [name])[0]._replace(p=apart)
    got = kern.small_fc_rows([item], const, lopt.exp_mult, coef[:1], p_decay[:1])[0]
    for a, b in zip(got, ref):
        assert torch.equal(a, b)


def test_inplace_writes_the_given_tensors(one_thread):
    kern = cpu_kernels.kernels()
    lopt, params, grads, state, const, coef, p_decay = _setup()
    pure = kern.small_fc_rows(_items(params, grads, state), const, lopt.exp_mult, coef, p_decay)
    p2 = {k: v.clone() for k, v in params.items()}
    s2 = {acc: {k: v.clone() for k, v in d.items()} for acc, d in state.items()}
    outs = kern.small_fc_rows(_items(p2, grads, s2), const, lopt.exp_mult, coef, p_decay,
                              inplace=True)
    for j, name in enumerate(SHAPES):
        assert outs[j][0] is p2[name]
        for a, b in zip(outs[j], pure[j]):
            assert torch.equal(a, b)


def test_bad_arguments_are_refused_with_one_line_errors():
    kern = cpu_kernels.kernels()
    lopt, params, grads, state, const, coef, p_decay = _setup()
    items = _items(params, grads, state)

    def call(its, c=coef, d=p_decay):
        return kern.small_fc_rows(its, const, lopt.exp_mult, c, d)

    overlapping = params["tall"][:1].expand(ROWS, *SHAPES["tall"])  # row stride 0
    cases = [
        ([items[0]._replace(p=overlapping), *items[1:]], "'p\\[0\\]' has row stride 0"),
        ([items[0]._replace(g=grads["tall"].transpose(1, 2).contiguous().transpose(1, 2)),
          *items[1:]], "'g\\[0\\]': each row must be contiguous"),
        ([items[0]._replace(m=state["m"]["tall"][:, :2]), *items[1:]], "'m\\[0\\]' has shape"),
        ([items[0]._replace(d0=3), *items[1:]], "'d0' must be 0 or 1"),
        ([*items[:3], items[3]._replace(v_diag=state["v_diag"]["vec"].double())],
         "'v_diag\\[3\\]' must be a float32 CPU tensor"),
        ([items[0], items[1]._replace(p=params["wide"][:2]), *items[2:]],
         "tensor 1: p must be \\(4, n\\)"),
    ]
    for its, match in cases:
        with pytest.raises(ValueError, match=match) as err:
            call(its)
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="'coef' has shape \\(4, 3\\), expected \\(4, 4\\)"):
        call(items, c=coef[:, :3])
    bad_const = {**const, "w1": None, "mlp": [const["mlp"][0][:2], *const["mlp"][1:]]}
    with pytest.raises(ValueError, match="'w1' has 32 elements, expected 64"):
        kern.small_fc_rows(items, bad_const, lopt.exp_mult, coef, p_decay)


def test_the_c_entry_point_checks_its_table():
    # the library refuses a malformed table row itself (-(1 + j)) and writes nothing
    kern = cpu_kernels.kernels()
    lopt, params, grads, state, const, coef, p_decay = _setup(rows=1)
    items = _items(params, grads, state)
    before = params["vec"].clone()
    slots = cpu_kernels._SR_SLOTS
    for column, value in ((0, 7), (1, 0), (cpu_kernels._SR_G, 0), (4 + 11, 1)):
        table = (ctypes.c_int64 * (len(items) * slots))()
        for j, item in enumerate(items):
            table[j * slots:(j + 1) * slots] = kern._small_fc_entry(j, item, 1, True)[0]
        table[3 * slots + column] = value  # tensor 3 (the vector; column 15: g's stride)
        with pytest.raises(ValueError, match="refused table row 3"):
            kern._small_fc_call(len(items), table, 1, const, coef.data_ptr(),
                                p_decay.data_ptr(), lopt.exp_mult)
        assert torch.equal(params["vec"], before)


def test_plan_steps_like_the_checked_call_and_checks_gradients(one_thread):
    kern = cpu_kernels.kernels()
    lopt, params, grads, state, const, coef, p_decay = _setup(rows=1)
    one = {k: v[0] for k, v in params.items()}
    g1 = {k: v[0] for k, v in grads.items()}
    s1 = {acc: {k: v[0] for k, v in d.items()} for acc, d in state.items()}
    plain = [cpu_kernels.SmallFCRows(g1[n], one[n], *(s1[k][n] for k in _ACCUMULATORS),
                                     _factored_d0(one[n].shape)) for n in SHAPES]
    ref = {k: v.clone() for k, v in params.items()}
    s_ref = {acc: {k: v.clone() for k, v in d.items()} for acc, d in state.items()}
    plan = kern.small_fc_plan(plain)
    assert plan.matches(plain)
    for _ in range(2):
        plan.step([it.g for it in plain], const, lopt.exp_mult, coef[:, 0].tolist(),
                  p_decay[:, 0].tolist())
        kern.small_fc_rows(_items(ref, grads, s_ref), const, lopt.exp_mult, coef, p_decay,
                           inplace=True)
    for n in SHAPES:
        assert torch.equal(one[n], ref[n][0])
        for k in _ACCUMULATORS:
            assert torch.equal(s1[k][n], s_ref[k][n][0])
    # other state tensors: no longer the planned ones
    assert not plan.matches([plain[0]._replace(m=plain[0].m.clone()), *plain[1:]])
    with pytest.raises(ValueError, match="'g\\[1\\]' must be a contiguous float32 CPU tensor "
                                         "of shape \\(3, 19\\)"):
        plan.step([plain[0].g, plain[1].g.t(), *[it.g for it in plain[2:]]], const,
                  lopt.exp_mult, coef[:, 0].tolist(), p_decay[:, 0].tolist())


def test_shell_keeps_one_plan_and_rebuilds_it_after_load_state_dict():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    lopt = SmallFCLOpt()
    opt = lopt.optimizer(model.parameters(), num_steps=20, backend="cpu_kernels")
    calls = []
    lib = opt.backend._lib
    for _ in range(3):
        model.zero_grad()
        model(torch.randn(4, 7)).square().mean().backward()
        opt.step()
        calls.append(opt._workspace.get("small_fc_plan"))
    assert calls[0] is not None and calls[0] is calls[1] is calls[2]
    opt.load_state_dict(opt.state_dict())
    assert "small_fc_plan" not in opt._workspace
    opt.step()
    assert opt._workspace["small_fc_plan"] is not calls[0]
    assert lib is opt.backend._lib


def test_rows_do_not_depend_on_the_thread_count():
    # with R > 1 each (tensor, row) job runs on one thread: any thread count gives the
    # same bits (deterministic meta-training)
    kern = cpu_kernels.kernels()
    lopt, params, grads, state, const, coef, p_decay = _setup()
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(kern.small_fc_rows(_items(params, grads, state), const,
                                              lopt.exp_mult, coef, p_decay))
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        for a_outs, b_outs in zip(results[0], other):
            for a, b in zip(a_outs, b_outs):
                assert torch.equal(a, b)
