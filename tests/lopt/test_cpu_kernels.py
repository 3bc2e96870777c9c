"""The fused CPU kernels compute what the PyTorch paths compute.

Every entry point of ``metaopt/lopt/kernels/lopt_cpu.c`` runs here: through
``update`` (pure), through ``update_`` (in place, with lr and weight decay), against the
PyTorch reference path (``backend="reference"``) on matrices of both orientations and
with row lengths that are not a multiple of the vector width; plus the fallback when no
compiler is available, the private, digest-checked kernel cache and the argument checks
of the ctypes wrappers.
"""

from __future__ import annotations

import copy

import pytest
import torch

from metaopt.lopt import SmallFCLOpt, cpu_kernels
from metaopt.lopt.mulo import MuSmallFC, MuVeLO
from metaopt.lopt.velo import VeLO

pytestmark = pytest.mark.skipif(not cpu_kernels.kernels_available(),
                                reason="no C compiler: the kernels cannot be built here")

SHAPES = {"tall": (45, 11), "wide": (9, 70), "square": (24, 24), "k_by_k": (3, 3), "vec": (13,),
          "one_row": (1, 5),
          "conv": (4, 3, 2, 2)}


def _lopt(cls, seed: int = 0):
    torch.manual_seed(seed)
    lopt = cls(lstm_hidden_size=16, param_inits=8) if issubclass(cls, VeLO) else cls()
    with torch.no_grad():
        if isinstance(lopt, VeLO):  # non-degenerate mixing of the stored MLPs
            lopt.rnn_to_controls.weight.normal_()
        else:
            for name, p in lopt.named_parameters():
                p.add_((0.02 if "decays" in name else 0.3) * torch.randn_like(p))
    return lopt


def _params(seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}


def _grads(params, t: int) -> dict[str, torch.Tensor]:
    return {k: torch.sin(3 * v + t) * (1 + t) for k, v in params.items()}


KERNELS = cpu_kernels.kernels() if cpu_kernels.kernels_available() else None


def _run(lopt, steps: int = 4, inplace: bool = False, lr=None, wd=None, backend=KERNELS):
    params = {k: v.clone() for k, v in _params().items()}
    state = lopt.init(params, 20)
    ptrs = {k: v.data_ptr() for k, v in params.items()}
    with torch.no_grad():
        for t in range(steps):
            if inplace:
                state = lopt.update_(_grads(params, t), state, params, loss=float(5 - t),
                                     lr=lr, weight_decay=wd, backend=backend)
            else:
                params, state = lopt.update(_grads(params, t), state, params, loss=float(5 - t),
                                            backend=backend)
    if inplace:
        assert all(params[k].data_ptr() == ptrs[k] for k in params), "update_ must write in place"
    return params, state


def _close(a, b, scale_like=None, tol=2e-6):
    scale = float(scale_like.abs().max()) if scale_like is not None and scale_like.numel() else 1.0
    torch.testing.assert_close(a, b, rtol=tol, atol=tol * max(scale, 1e-30))


@pytest.mark.parametrize("cls", [SmallFCLOpt, VeLO])
def test_kernel_path_equals_pytorch_fast_path(cls):
    lopt = _lopt(cls)
    p_kernel, s_kernel = _run(lopt)
    p_torch, s_torch = _run(lopt, backend="reference")
    start = _params()
    for k in SHAPES:
        step = p_torch[k] - start[k]
        assert step.abs().max() > 0
        # a wrong channel or weight is off by a whole step; rounding is ~1 ulp of p
        _close(p_kernel[k], p_torch[k], step, tol=1e-4)
        groups = ("mom", "rms", "v_row", "v_col") if cls is VeLO else ("m", "rms", "v_row",
                                                                        "v_col")
        for group in groups:
            _close(s_kernel[group][k].contiguous(), s_torch[group][k].contiguous(),
                   s_torch[group][k])


@pytest.mark.parametrize("cls", [SmallFCLOpt, VeLO, MuSmallFC, MuVeLO])
def test_inplace_update_equals_pure_update_with_lr_and_weight_decay(cls):
    lopt = _lopt(cls)
    lr = dict.fromkeys(SHAPES, 0.5)
    wd = dict.fromkeys(SHAPES, 0.1)
    p_inplace, _ = _run(copy.deepcopy(lopt), inplace=True, lr=lr, wd=wd)
    # reference: the pure update, then the shell's formula p + lr (p_learned - p) - lr wd p
    params = {k: v.clone() for k, v in _params().items()}
    state = lopt.init(params, 20)
    with torch.no_grad():
        for t in range(4):
            new_p, state = lopt.update(_grads(params, t), state, params, loss=float(5 - t))
            params = {k: p + 0.5 * (new_p[k] - p) - 0.05 * p for k, p in params.items()}
    start = _params()
    for k in SHAPES:
        _close(p_inplace[k], params[k], params[k] - start[k], tol=1e-4)


@pytest.mark.parametrize("cls", [SmallFCLOpt, VeLO])
def test_shell_uses_the_kernels_and_matches_the_pytorch_path(cls):
    """The torch.optim shell (update_ in place) against the same run without kernels."""
    from torch import nn

    def train(backend) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(10, 37), nn.ReLU(), nn.Linear(37, 3))
        opt = _lopt(cls).optimizer(model.parameters(), num_steps=10, lr=0.7, backend=backend)
        assert (opt.backend is None) == (backend == "reference")
        x, y = torch.randn(16, 10), torch.randn(16, 3)
        for _ in range(5):
            opt.zero_grad()
            loss = ((model(x) - y) ** 2).mean()
            loss.backward()
            opt.step(loss=loss)
        return [p.detach().clone() for p in model.parameters()]

    with_kernels = train("cpu_kernels")
    without = train("reference")
    for a, b in zip(with_kernels, without, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_missing_compiler_falls_back_with_a_warning(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    cache = tmp_path / "cache"
    with pytest.raises(cpu_kernels.KernelBuildError, match="no C compiler"):
        cpu_kernels.load_kernels(cache)
    with pytest.warns(RuntimeWarning, match="PyTorch reference path"):
        assert cpu_kernels.kernels(tmp_path / "cache2") is None
    assert cpu_kernels.select_backend("auto") is None  # no compiler on PATH: the reference
    with pytest.raises(cpu_kernels.KernelBuildError):
        cpu_kernels.select_backend("cpu_kernels", cache_dir=cache)
    params, _ = _run(_lopt(SmallFCLOpt), steps=2, backend=None)  # the reference still runs
    assert all(torch.isfinite(v).all() for v in params.values())


def _fresh(monkeypatch):
    """Forget the kernels loaded in this process (so a new cache dir is really used)."""
    monkeypatch.setattr(cpu_kernels, "_loaded", {})
    monkeypatch.setattr(cpu_kernels, "_failed", {})


def test_kernels_build_into_a_private_cache_dir_with_a_digest(monkeypatch, tmp_path):
    _fresh(monkeypatch)
    cache = tmp_path / "kernels"
    assert cpu_kernels.load_kernels(cache) is not None
    built = list(cache.glob("lopt_cpu_*.so"))
    assert len(built) == 1
    assert (cache.stat().st_mode & 0o777) == 0o700
    digest = built[0].with_name(built[0].name + ".sha256").read_text().strip()
    import hashlib
    assert digest == hashlib.sha256(built[0].read_bytes()).hexdigest()
    assert not [p for p in cache.iterdir() if p.name.startswith(".tmp")]


def test_the_cache_location_may_come_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("METAOPT_CACHE", str(tmp_path))
    assert cpu_kernels.default_cache_dir() == tmp_path / "kernels"


def test_a_group_or_world_writable_cache_is_refused(monkeypatch, tmp_path):
    _fresh(monkeypatch)
    cache = tmp_path / "shared"
    cache.mkdir()
    cache.chmod(0o777)
    with pytest.raises(cpu_kernels.KernelCacheError, match="world-writable"):
        cpu_kernels.load_kernels(cache)
    cache.chmod(0o720)
    _fresh(monkeypatch)
    with pytest.raises(cpu_kernels.KernelCacheError, match="group/world-writable"):
        cpu_kernels.load_kernels(cache)
    assert not list(cache.iterdir())  # nothing was built or loaded there


def test_a_cache_owned_by_another_user_is_refused(monkeypatch, tmp_path):
    _fresh(monkeypatch)
    cache = tmp_path / "theirs"
    cache.mkdir(mode=0o700)
    monkeypatch.setattr(cpu_kernels.os, "getuid", lambda: cache.stat().st_uid + 1)
    with pytest.raises(cpu_kernels.KernelCacheError, match="owned by uid"):
        cpu_kernels.load_kernels(cache)


def _replace(path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(data)
    tmp.replace(path)


@pytest.mark.parametrize("damage", ["garbage", pytest.param("planted", marks=pytest.mark.slow),
                                    pytest.param("no_digest", marks=pytest.mark.slow)])
def test_a_cached_library_that_fails_its_digest_is_rebuilt_not_loaded(monkeypatch, tmp_path,
                                                                      damage):
    _fresh(monkeypatch)
    cache = cpu_kernels.private_dir(tmp_path / "kernels")
    for built in cpu_kernels.default_cache_dir().glob("lopt_cpu_*"):  # the session's build
        (cache / built.name).write_bytes(built.read_bytes())
    real_open, loaded = cpu_kernels._open, []
    # the library this source builds (the cache may also hold builds of other versions)
    monkeypatch.setattr(cpu_kernels, "_open", lambda path: loaded.append(path)
                        or real_open(path))
    cpu_kernels.load_kernels(cache)
    lib = loaded[-1]
    assert cpu_kernels._verified(lib)
    good = lib.read_bytes()
    digest = lib.with_name(lib.name + ".sha256")
    # (replaced, not rewritten: this process has the library mapped)
    if damage == "garbage":
        _replace(lib, b"not a shared library")
    elif damage == "planted":  # a different library at the computable path: never loaded
        _replace(lib, good[:-1] + bytes([good[-1] ^ 1]))
    else:
        digest.unlink()
    _fresh(monkeypatch)
    opened = []
    monkeypatch.setattr(cpu_kernels, "_open", lambda path: opened.append(
        path.read_bytes()) or real_open(path))
    kern = cpu_kernels.load_kernels(cache)
    assert kern.decays == 3
    assert opened and all(data == good for data in opened)  # only the rebuilt library
    assert lib.read_bytes() == good and digest.read_text().strip()


def test_backend_names_are_checked():
    with pytest.raises(ValueError, match="backend must be one of"):
        cpu_kernels.select_backend("fast")
    assert cpu_kernels.select_backend("reference") is None
    assert isinstance(cpu_kernels.select_backend("cpu_kernels"), cpu_kernels.LoptCpuKernels)


def test_wrappers_reject_bad_tensors():
    kern = cpu_kernels.kernels()
    g = torch.randn(6, 5)
    with pytest.raises(ValueError, match="'g'"):
        kern.sq_rowcol(g.t())  # not contiguous
    with pytest.raises(ValueError, match="'g'"):
        kern.sq_rowcol(g.double())
    k = kern.decays
    with pytest.raises(ValueError, match="'m_old'"):
        kern.pass1("small_fc", g, g, torch.zeros(k - 1, 30), torch.zeros(1, 30),
                   torch.full((k,), 0.9), 0.99, torch.ones(k, 6), torch.ones(k, 5))
    with pytest.raises(ValueError, match="unknown kernel mode"):
        kern.n_channels("adam")


def test_sq_rowcol_matches_torch():
    g = torch.randn(7, 19)
    row, col = cpu_kernels.kernels().sq_rowcol(g)
    g2 = g.double() ** 2
    torch.testing.assert_close(row, g2.sum(1), rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(col, g2.sum(0), rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("iteration", [0, 1, 2, 3, 17])
def test_velo_scalars_equal_loss_buffer_and_lstm_features(iteration):
    """``lopt_velo_scalars`` (one call for the loss buffer, the time/loss features and the
    LSTM input) equals ``loss_buffer_step`` + ``kernel_moments`` + ``_lstm_features``
    to float32 rounding, also for a buffer whose iteration differs from the step's and a
    loss above twice the running means (the cap)."""
    from metaopt.lopt import velo as velo_mod
    from metaopt.lopt import velo_kernels

    g = torch.Generator().manual_seed(iteration)
    lopt = VeLO()
    shapes = [(40, 7), (7,), (3, 90), (1,)]
    state = lopt.init({str(i): torch.zeros(s) for i, s in enumerate(shapes)}, 50)
    state["iteration"] = torch.tensor(iteration, dtype=torch.int32)
    buf = dict(state["loss_buffer"])
    buf["iteration"] = torch.tensor(max(iteration - 1, 0), dtype=torch.int32)
    buf["means"] = torch.rand(10, generator=g) + 0.5
    buf["running_min"] = buf["means"] * 0.9 / (1 - buf["decays"] ** max(iteration - 1, 1))
    state["loss_buffer"] = buf
    loss = torch.tensor(2.0 + 10.0 * (iteration % 2), dtype=torch.float32)
    pres = []
    for s in shapes:  # sums over n elements of plausible accumulators
        n = int(torch.tensor(s).prod())
        m = torch.randn(3, n, generator=g) * 0.1
        r = torch.rand(n, generator=g) * 0.01
        p = torch.randn(n, generator=g)
        stats = torch.tensor([v for q in range(3) for v in (m[q].sum(), (m[q] ** 2).sum())]
                             + [r.sum(), (r ** 2).sum(), (p ** 2).sum()], dtype=torch.float64)
        pres.append({"stats": stats, "n": n})
    buf_ref, feat_ref = velo_mod.loss_buffer_step(buf, loss)
    moments = velo_kernels.kernel_moments(3, pres)
    x_ref = lopt._lstm_features(shapes, state, feat_ref, *moments)
    buf_k, feat_k, x_k, msq_k = velo_kernels.scalars(
        KERNELS, state, loss, pres, velo_mod._constant(velo_mod._FRACTION_TIMESCALES, "cpu"),
        velo_mod._rank_features(shapes, "cpu"))
    for name in ("means", "running_min"):
        torch.testing.assert_close(buf_k[name], buf_ref[name], rtol=1e-6, atol=0)
    assert torch.equal(buf_k["iteration"], buf_ref["iteration"])
    assert buf_k["decays"] is buf["decays"]
    torch.testing.assert_close(feat_k, feat_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x_k, x_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(msq_k, moments[0], rtol=1e-6, atol=0)
    if iteration <= 1:  # buffer iterations 0 and 1: the loss features are still zero
        assert not feat_k.any()


def test_velo_plan_batch_checks_its_arguments():
    """The batched in-place calls check every gradient and the packed MLP rows before a
    pointer crosses into C, naming the argument."""
    from torch import nn

    model = nn.Linear(6, 5)
    opt = VeLO(lstm_hidden_size=16, param_inits=8).optimizer(model.parameters(), num_steps=9,
                                                             backend="cpu_kernels")
    for _ in range(2):  # the second step runs planned (state stored channel-first)
        opt.zero_grad()
        model(torch.ones(2, 6)).square().mean().backward()
        opt.step(loss=1.0)
    batch = opt._workspace["velo_batch"]
    assert isinstance(batch, cpu_kernels.VeLOPlanBatch) and batch.count == 2
    decays = torch.tensor([0.9, 0.99, 0.999])
    with pytest.raises(ValueError, match=r"'g\[1\]'"):
        batch.pass1([torch.zeros(5, 6), torch.zeros(4)], decays, 0.999, decays)
    with pytest.raises(ValueError, match="'g\\[0\\]'"):
        batch.pass1([torch.zeros(5, 6, dtype=torch.float64), torch.zeros(5)], decays, 0.999,
                    decays)
    with pytest.raises(ValueError, match="pass1 first"):
        batch.pass2(torch.zeros(2, 1000), [1.0, 1.0], [1.0, 1.0], 0.001)
