"""The learned_optimization release importer: flax msgpack decoding and gin parsing."""

from __future__ import annotations

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
