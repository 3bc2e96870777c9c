"""The paired per-stream comparison of CaMeLS results: differences, win counts and the
exact sign test, on a results file the test writes."""

from __future__ import annotations

import json
import sys

import pytest

from tests.script_module import load_script


def test_sign_test_is_the_exact_two_sided_binomial():
    script = load_script("camels_paired")
    assert script.sign_test_p(6, 0) == pytest.approx(2 / 64)
    assert script.sign_test_p(0, 6) == pytest.approx(2 / 64)
    assert script.sign_test_p(4, 2) == pytest.approx(2 * (1 + 6 + 15) / 64)
    assert script.sign_test_p(3, 3) == 1.0 and script.sign_test_p(0, 0) == 1.0


def test_paired_differences_wins_and_errors(tmp_path, monkeypatch, capsys):
    script = load_script("camels_paired")
    runs = {"uniform": [{"f1": f} for f in (0.10, 0.20, 0.30, 0.40)],
            "tfidf": [{"f1": f} for f in (0.12, 0.20, 0.25, 0.41)],
            "camels": [{"f1": f} for f in (0.13, 0.22, 0.30, 0.45)]}
    r = script.paired(runs, "camels", "uniform")
    assert r["diffs"] == pytest.approx([0.03, 0.02, 0.0, 0.05])
    assert (r["wins"], r["ties"], r["losses"]) == (3, 1, 0)
    assert r["mean"] == pytest.approx(0.025)
    assert r["stderr"] == pytest.approx(r["std"] / 2)
    assert r["sign_test_p"] == pytest.approx(2 / 8)
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"long": {"test_runs": runs}}))
    out = tmp_path / "paired.json"
    monkeypatch.setattr(sys, "argv", ["camels_paired.py", str(path), "--against", "uniform",
                                      "tfidf", "--json", str(out)])
    script.main()
    table = capsys.readouterr().out
    assert "| uniform | +0.0250" in table and "3 / 1 / 0" in table
    saved = json.loads(out.read_text())["results"][str(path)]
    assert saved["tfidf"]["wins"] == 4 and saved["tfidf"]["losses"] == 0
    with pytest.raises(KeyError, match="oracle"):
        script.paired(runs, "camels", "oracle")
    monkeypatch.setattr(sys, "argv", ["camels_paired.py", str(path), "--section", "short"])
    with pytest.raises(SystemExit, match="short"):
        script.main()
