"""The benchmark script's table and target checks (the runs themselves are slow)."""

import json

import pytest

from tests.script_module import load_script


def _bench():
    return load_script("bench_hypercleaning")


def _rec(name, acc, seed=0):
    return {"p": 0.5, "estimator": name, "seed": seed, "test_acc": acc, "clean_f1": 0.5,
            "seconds": 1.0}


def test_targets_pass_and_fail():
    bench = _bench()
    good = [_rec("corrupted", 0.70), _rec("oracle", 0.87), _rec("a", 0.86), _rec("b", 0.80)]
    assert all(line.startswith("PASS") for line in bench.check_targets(good))
    bad = [_rec("corrupted", 0.70), _rec("oracle", 0.87), _rec("a", 0.83), _rec("b", 0.69)]
    lines = bench.check_targets(bad)
    assert [line[:4] for line in lines] == ["PASS", "FAIL", "FAIL"]


def test_summary_mean_and_std():
    bench = _bench()
    table = bench.summarise([_rec("a", 0.80, 0), _rec("a", 0.90, 1)])
    assert "| 0.5 | a | 85.0 ± 7.1 |" in table


@pytest.mark.slow
def test_quick_run_writes_records(tmp_path):
    bench = _bench()
    out = tmp_path / "r.json"
    assert bench.main(["--quick", "--estimators", "f2sa", "--json", str(out)]) == 0
    records = json.loads(out.read_text())["records"]
    assert {r["estimator"] for r in records} == {"corrupted", "oracle", "f2sa"}
    assert set(records[-1]) >= {"p", "estimator", "seed", "test_acc", "clean_f1", "seconds"}
