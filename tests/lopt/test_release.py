"""The learned_optimization release importer: flax msgpack decoding and gin parsing."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import msgpack
import numpy as np
import pytest

from metaopt.lopt import ReleaseFormatError, SmallFCLOpt, load_checkpoint, load_release
from metaopt.lopt.release import (
    GinMacro,
    GinReference,
    GinUnparsed,
    UnsupportedReleaseError,
    architecture_for_release,
    check_tree,
    parse_gin,
    read_flax_msgpack,
    read_release_params,
)

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "golden"


def ext_array(a: np.ndarray, code: int = 1) -> msgpack.ExtType:
    """Encode like flax.serialization: ExtType(1, packb((shape, dtype name, bytes)))."""
    a = np.asarray(a, order="C")  # (ascontiguousarray would make 0-d arrays 1-d)
    return msgpack.ExtType(code, msgpack.packb((list(a.shape), a.dtype.name, a.tobytes()),
                                               use_bin_type=True))


def container(params: dict) -> bytes:
    def enc(node):
        if isinstance(node, dict):
            return {k: enc(v) for k, v in node.items()}
        return ext_array(node) if isinstance(node, np.ndarray) else node
    return msgpack.packb({"params": enc(params), "gen_id": "test",
                          "step": ext_array(np.asarray(0, np.int32))}, use_bin_type=True)


def small_fc_tree(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    return {"momentum_decays": f(3), "rms_decays": f(1), "adafactor_decays": f(3),
            "nn": {"~": {"w0": f(39, 4), "b0": f(4), "w1": f(4, 4), "b1": f(4),
                         "w2": f(4, 2), "b2": f(2)}}}


def write_release(folder: Path, data: bytes, gin: str = "run_train.lopt = @AdafacMLPLOpt()\n"
                  ) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params").write_bytes(data)
    (folder / "config.gin").write_text(gin)
    return folder


# ----------------------------------------------------------------- msgpack


def test_decoder_handles_flax_encodings():
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    big = np.arange(10, dtype=np.float64)
    data = msgpack.packb({
        "arr": ext_array(a),
        "scalar0d": ext_array(np.asarray(7, np.int32)),
        "npscalar": ext_array(np.asarray(2.5, np.float32), code=3),
        "chunked": {"__msgpack_chunked_array__": True, "shape": {"0": 2, "1": 5},
                    "chunks": {"0": ext_array(big[:7]), "1": ext_array(big[7:])}},
        "legacy_state": {"name": "LSTMState", "fields": {"0": "hidden", "1": "cell"},
                         "values": {"0": ext_array(a[:1]), "1": ext_array(a[1:2])}},
    }, use_bin_type=True)
    tree = read_flax_msgpack(data)
    np.testing.assert_array_equal(tree["arr"], a)
    assert tree["arr"].flags.writeable
    assert tree["scalar0d"].shape == () and tree["scalar0d"] == 7
    assert tree["npscalar"] == np.float32(2.5)
    np.testing.assert_array_equal(tree["chunked"], big.reshape(2, 5))
    assert set(tree["legacy_state"]) == {"hidden", "cell"}
    np.testing.assert_array_equal(tree["legacy_state"]["cell"], a[1:2])


def test_truncated_file_gives_clear_error(tmp_path):
    raw = (GOLDEN / "small_fc_lopt_theta.msgpack").read_bytes()
    path = tmp_path / "params"
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ReleaseFormatError, match=r"not a complete flax msgpack|truncated"):
        read_release_params(path)


def test_array_with_short_buffer_is_rejected():
    bad = msgpack.ExtType(1, msgpack.packb(([4, 4], "float32", b"\0" * 12), use_bin_type=True))
    with pytest.raises(ReleaseFormatError, match="needs 64 bytes"):
        read_flax_msgpack(msgpack.packb({"w": bad}, use_bin_type=True))


def test_object_dtype_is_refused():
    bad = msgpack.ExtType(1, msgpack.packb(([1], "object", b"\0" * 8), use_bin_type=True))
    with pytest.raises(ReleaseFormatError, match="object"):
        read_flax_msgpack(msgpack.packb({"w": bad}, use_bin_type=True))


def test_wrong_keys_are_listed(tmp_path):
    tree = small_fc_tree()
    del tree["rms_decays"]  # missing
    tree["nn"]["~"]["w0"] = np.zeros((38, 4), np.float32)  # mis-shaped
    tree["nn"]["~"]["w9"] = np.zeros((1,), np.float32)  # unexpected
    folder = write_release(tmp_path / "rel", container(tree))
    with pytest.raises(ReleaseFormatError) as info:
        load_checkpoint(folder)
    msg = str(info.value)
    assert "missing keys: rms_decays" in msg
    assert "unexpected keys: nn/~/w9" in msg
    assert "mis-shaped key nn/~/w0: got (38, 4), expected (39, 4)" in msg


def test_check_tree_accepts_exact_tree():
    tree = {"a": {"b": np.zeros(3, np.float32)}}
    leaves = check_tree(tree, {("a", "b"): (3,)})
    assert list(leaves) == [("a", "b")]


def test_synthetic_release_loads_bit_exactly(tmp_path):
    tree = small_fc_tree(3)
    folder = write_release(tmp_path / "rel", container(tree))
    lopt = load_release(folder / "params")  # the params file itself also works
    assert isinstance(lopt, SmallFCLOpt)
    np.testing.assert_array_equal(lopt.w1.detach().numpy(), tree["nn"]["~"]["w1"])
    np.testing.assert_array_equal(lopt.rms_decays.detach().numpy(), tree["rms_decays"])


def test_missing_config_is_reported(tmp_path):
    folder = tmp_path / "rel"
    folder.mkdir()
    shutil.copy(GOLDEN / "small_fc_lopt_theta.msgpack", folder / "params")
    with pytest.raises(ReleaseFormatError, match="config"):
        load_release(folder)


# ----------------------------------------------------------------- gin


REAL_STYLE_GIN = """\
from __gin__ import dynamic_registration
import learned_optimization.research.general_lopt.hyper_v2
include 'base.gin'

# Parameters for HyperV2:
# ==============================================================================
HyperV2.lstm_hidden_size = 512   # trailing comment
HyperV2.param_inits = %INITS
HyperV2.use_bugged_loss_features = False
INITS = 256
run_train.lopt = @HyperV2()
run_train.outer_learner_fn = @GradientLearner
run_train.num_estimators = 8
train/ES.std = 0.01
learned_optimization.optimizers.Adam.learning_rate = 3e-4
build.tasks = [
    @task_a(),   # first
    @scope/task_b(),
]
weird.value = lambda x: x
strings.value = ('a # not a comment', "b", 'c''')
nested.value = {'k': (1, 2.5, None), 'j': [True, -3]}
continued.value = \\
    (1,)
"""


def test_gin_parser_reads_release_style_config():
    config = parse_gin(REAL_STYLE_GIN)
    assert config.imports[0].startswith("from __gin__")
    assert config.includes == ["base.gin"]
    assert config.query("HyperV2", "lstm_hidden_size") == 512
    assert config.query("HyperV2", "param_inits") == 256  # macro resolved
    assert config.bindings[("", "HyperV2", "param_inits")] == GinMacro("INITS")
    assert config.query("run_train", "lopt") == GinReference("HyperV2", evaluate=True)
    assert config.query("run_train", "outer_learner_fn") == GinReference("GradientLearner")
    assert config.query("ES", "std", scope="train") == 0.01
    assert config.query("Adam", "learning_rate") == pytest.approx(3e-4)
    assert config.query("build", "tasks") == [GinReference("task_a", evaluate=True),
                                              GinReference("task_b", "scope", True)]
    assert isinstance(config.query("weird", "value"), GinUnparsed)
    assert config.query("strings", "value") == ("a # not a comment", "b", "c")
    assert config.query("nested", "value") == {"k": (1, 2.5, None), "j": [True, -3]}
    assert config.query("continued", "value") == (1,)
    arch, bindings = architecture_for_release(config)
    assert arch == "velo"
    assert bindings == {"lstm_hidden_size": 512, "param_inits": 256,
                        "use_bugged_loss_features": False}


def test_golden_velo_config_dispatches_to_velo():
    config = parse_gin((GOLDEN / "velo_config.gin").read_text())
    arch, bindings = architecture_for_release(config)
    assert arch == "velo"
    assert bindings == {"lstm_hidden_size": 512, "param_inits": 256,
                        "use_bugged_loss_features": False}


def test_unknown_learned_optimizer_is_named(tmp_path):
    folder = write_release(tmp_path / "rel", container(small_fc_tree()),
                           gin="run_train.lopt = @LOLv2()\n")
    with pytest.raises(ReleaseFormatError, match="LOLv2"):
        load_checkpoint(folder)


def test_gin_arguments_reach_the_architecture(tmp_path):
    tree = small_fc_tree()
    tree["nn"]["~"]["w0"] = np.zeros((39, 8), np.float32)
    tree["nn"]["~"]["b0"] = np.zeros((8,), np.float32)
    tree["nn"]["~"]["w1"] = np.zeros((8, 8), np.float32)
    tree["nn"]["~"]["b1"] = np.zeros((8,), np.float32)
    tree["nn"]["~"]["w2"] = np.zeros((8, 2), np.float32)
    gin = "run_train.lopt = @AdafacMLPLOpt()\nAdafacMLPLOpt.hidden_size = 8\n"
    lopt = load_checkpoint(write_release(tmp_path / "rel", container(tree), gin))
    assert lopt.hidden_size == 8
    gin_bad = gin + "AdafacMLPLOpt.make_separate_weights = True\n"
    with pytest.raises(NotImplementedError, match="make_separate_weights"):
        load_checkpoint(write_release(tmp_path / "rel2", container(tree), gin_bad))


# ----------------------------------------------------------------- hostile input


def small_container(**leaf_overrides) -> bytes:
    tree = small_fc_tree()
    tree["nn"]["~"].update(leaf_overrides)
    return container(tree)


@pytest.mark.parametrize("dtype", ["int32", "bool", "complex64", "uint8"])
def test_non_float_leaves_are_refused_not_cast(tmp_path, dtype):
    w1 = small_fc_tree()["nn"]["~"]["w1"]
    value = (w1 > 0) if dtype == "bool" else (w1 + 1j if dtype == "complex64" else w1).astype(
        dtype)
    folder = write_release(tmp_path / "rel", small_container(w1=value))
    with pytest.raises(ReleaseFormatError, match=rf"key nn/~/w1 has dtype {dtype}; only "
                                                 "floating-point"):
        load_release(folder)


def test_float64_leaves_are_converted_and_checked_for_overflow(tmp_path):
    w1 = small_fc_tree()["nn"]["~"]["w1"]
    lopt = load_release(write_release(tmp_path / "ok", small_container(
        w1=w1.astype(np.float64))))
    np.testing.assert_array_equal(lopt.w1.detach().numpy(), w1)
    with pytest.raises(ReleaseFormatError, match="nn/~/w1 holds 16 NaN or infinite"):
        load_release(write_release(tmp_path / "big", small_container(
            w1=np.full((4, 4), 1e300))))


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_weights_are_refused(tmp_path, value):
    w0 = small_fc_tree()["nn"]["~"]["w0"].copy()
    w0[2, 1] = value
    with pytest.raises(ReleaseFormatError, match=r"params .*nn/~/w0 holds 1 NaN or infinite"):
        load_release(write_release(tmp_path / "rel", small_container(w0=w0)))


@pytest.mark.parametrize("name", ["<U1", "M8[s]", "V4", "object", "f4", 7])
def test_unknown_dtype_names_are_refused_with_the_field(name):
    bad = msgpack.ExtType(1, msgpack.packb(([1], name, b"\0" * 4), use_bin_type=True))
    with pytest.raises(ReleaseFormatError, match=r"<bytes>: field 'params/w'"):
        read_flax_msgpack(msgpack.packb({"params": {"w": bad}}, use_bin_type=True))


@pytest.mark.parametrize("depth", [100, 500, 1000, 100_000])
def test_deep_nesting_is_refused_without_recursion_error(depth):
    data = b"\x81\xa6params" + b"\x81\xa1a" * depth + b"\xc0"
    with pytest.raises(ReleaseFormatError, match=r"nest deeper than 64|not a complete"):
        read_flax_msgpack(data)


@pytest.mark.parametrize(("node", "message"), [
    ({"__msgpack_chunked_array__": True, "chunks": {"0": 1}}, "shape must be an indexed map"),
    ({"__msgpack_chunked_array__": True, "shape": {"0": 10**9}, "chunks": {"0": np.zeros(
        3, np.float32)}}, r"chunks hold 3 numbers, shape \(1000000000,\) needs"),
    ({"name": "T", "fields": {"0": "a", "1": "b"}, "values": {"0": 1}}, "one per value"),
    ({"name": "T", "fields": {"0": "a", "2": "b"}, "values": {"0": 1}}, "must have keys"),
])
def test_malformed_containers_name_the_field(node, message):
    def enc(n):
        if isinstance(n, dict):
            return {k: enc(v) for k, v in n.items()}
        return ext_array(n) if isinstance(n, np.ndarray) else n
    data = msgpack.packb({"params": {"x": enc(node)}}, use_bin_type=True)
    with pytest.raises(ReleaseFormatError, match=rf"field 'params/x.*{message}"):
        read_flax_msgpack(data)


def test_huge_shape_is_refused_before_allocating():
    bad = msgpack.ExtType(1, msgpack.packb(([2**40, 2**40], "float32", b""), use_bin_type=True))
    with pytest.raises(ReleaseFormatError, match="needs 4835703278458516698824704 bytes"):
        read_flax_msgpack(msgpack.packb({"w": bad}, use_bin_type=True))


def test_non_utf8_config_is_refused(tmp_path):
    folder = write_release(tmp_path / "rel", small_container())
    (folder / "config.gin").write_bytes(b"run_train.lopt = @AdafacMLPLOpt()\n# \xff\n")
    with pytest.raises(ReleaseFormatError, match=r"config.gin: release config is not UTF-8"):
        load_release(folder)


def test_special_files_are_not_read(tmp_path):
    folder = write_release(tmp_path / "rel", small_container())
    (folder / "config.gin").unlink()
    os.mkfifo(folder / "config.gin")  # open().read() would block forever
    with pytest.raises(ReleaseFormatError, match="release config not found|not a regular"):
        load_release(folder)
    with pytest.raises(ReleaseFormatError, match="not a regular file"):
        read_flax_msgpack("/dev/zero")


@pytest.mark.parametrize(("line", "message"), [
    ("AdafacMLPLOpt.hidden_layers = 1000000", r"'AdafacMLPLOpt.hidden_layers' must lie in"),
    ("AdafacMLPLOpt.hidden_size = 100000", r"'AdafacMLPLOpt.hidden_size' must lie in"),
    ("AdafacMLPLOpt.hidden_size = 0", r"hidden_size' must lie in \[1, 1024\], got 0"),
    ("AdafacMLPLOpt.hidden_size = 4.5", r"hidden_size' must be an integer, got float"),
    ("AdafacMLPLOpt.exp_mult = 'yes'", r"exp_mult' must be a number, got str"),
    ("AdafacMLPLOpt.exp_mult = nan", r"exp_mult' must be finite"),
    ("AdafacMLPLOpt.concat_weights = 'yes'", r"concat_weights' must be True or False"),
    ("AdafacMLPLOpt.hidden_size = lambda: 4", r"hidden_size' must be an integer, got "
                                              "GinUnparsed"),
    ("AdafacMLPLOpt.hidden_size = " + "[" * 2000 + "]" * 2000,
     r"hidden_size' must be an integer, got GinUnparsed"),
])
def test_gin_values_are_type_checked_and_bounded(tmp_path, line, message):
    folder = write_release(tmp_path / "rel", small_container(),
                           gin=f"run_train.lopt = @AdafacMLPLOpt()\n{line}\n")
    with pytest.raises(ReleaseFormatError, match=message):
        load_release(folder)


def test_velo_gin_booleans_and_sizes_are_checked():
    from metaopt.lopt.velo import VeLO

    with pytest.raises(ReleaseFormatError, match="use_bugged_loss_features' must be True"):
        VeLO.release_config({"HyperV2.use_bugged_loss_features": "yes"})
    with pytest.raises(ReleaseFormatError, match=r"lstm_hidden_size' must lie in \[1, 4096\]"):
        VeLO.release_config({"HyperV2.lstm_hidden_size": 10**5})
    with pytest.raises(ReleaseFormatError, match="initial_rms_decays' must hold 1 decays"):
        VeLO.release_config({"HyperV2.initial_rms_decays": [0.9, 0.99]})
    with pytest.raises(UnsupportedReleaseError):  # also a NotImplementedError
        VeLO.release_config({"HyperV2.precondition_output": True})


def test_macro_expansion_is_bounded():
    gin = "x.y = %M0\n" + "".join(f"M{i} = [%M{i + 1}, %M{i + 1}]\n" for i in range(40))
    config = parse_gin(gin + "M40 = 1\n")
    with pytest.raises(ReleaseFormatError, match="expands to more than 100000 values"):
        config.query("x", "y")
    cyclic = parse_gin("x.y = %A\nA = %B\nB = %A\n")
    with pytest.raises(ReleaseFormatError, match="cycle"):
        cyclic.query("x", "y")
