"""benchmarks/objective_study.py: its rows' command lines and its table, without running them."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from benchmark_scripts import load_benchmark


@pytest.fixture(scope="module")
def study():
    return load_benchmark("objective_study")


def test_the_grid_of_rows_and_their_commands(study, tmp_path):
    rows = study.build_rows(tmp_path, num_runs=3, steps=50, extra=("threads=1",))
    assert len(rows) == 5 * 2 * 2  # victims x objectives x optimisers
    names = [r["name"] for r in rows]
    assert len(set(names)) == len(names) and len({r["run_dir"] for r in rows}) == len(rows)
    by_name = {r["name"]: r for r in rows}
    # the default victim, the default objective and target: neither key is on its command line
    wd = by_name["wd-kkt-theta-adam"]
    assert wd["command"][:3] == [sys.executable, "-m", "recon_lightning.fit"]
    assert wd["overrides"] == [f"run_dir={tmp_path / 'wd-kkt-theta-adam'}", "reconstruct.optimizer=adam",
                               "reconstruct.num_runs=3", "reconstruct.steps=50", "threads=1"]
    assert "classifier.weight_decay=0" in by_name["nowd-projection-theta-sgd"]["overrides"]
    assert "reconstruct=projection" in by_name["nowd-projection-theta-sgd"]["overrides"]
    # Adam takes its own step sizes with the projection preset (whose range is SGD's), SGD the preset's
    assert "reconstruct.lr=[0.001,0.03]" in by_name["nowd-projection-theta-adam"]["overrides"]
    assert not any(o.startswith("reconstruct.lr=") for o in by_name["nowd-projection-theta-sgd"]["overrides"])
    assert "reconstruct.target=theta" not in by_name["nowd-projection-theta-sgd"]["overrides"]
    lazy = by_name["lazy16000-kkt-displacement-sgd"]["overrides"]
    assert {"classifier=lazy_mse", "classifier.hidden=[16000]", "reconstruct.target=displacement",
            "reconstruct.optimizer=sgd"} <= set(lazy) and not any(o.startswith("reconstruct=") for o in lazy)
    # every lazy row, and only those, takes the displacement
    assert {r["victim"] for r in rows if r["target"] == "displacement"} == {"lazy1000", "lazy4000", "lazy16000"}
    subset = study.build_rows(tmp_path, victims=["lazy4000"], objectives=["projection"], optimizers=["sgd"])
    assert [r["name"] for r in subset] == ["lazy4000-projection-displacement-sgd"]
    with pytest.raises(ValueError, match="unknown row names"):
        study.build_rows(tmp_path, victims=["lazy8000"])


def test_the_table_collects_each_rows_report(study, tmp_path):
    rows = study.build_rows(tmp_path, victims=["wd"], objectives=["kkt"], optimizers=["adam", "sgd"])
    done = Path(rows[0]["run_dir"])
    (done / "classifier").mkdir(parents=True)
    summary = {"membership_auc": 0.61, "membership_tpr_at_1pct_fpr": 0.15, "control_membership_tpr_at_1pct_fpr": 0.01,
               "selection_attribution_at_24": 0.5, "selection_attribution_chance": 0.333, "kkt_residual_at_train": 0.006,
               "kkt_residual_at_heldout": 0.4}
    (done / "report.json").write_text(json.dumps({"summary": summary}))
    (done / "classifier" / "victim.json").write_text(json.dumps({"relative_displacement": {"layers.0.weight": 0.25}}))
    rows[0]["status"], rows[0]["figures"] = "ok", study.collect(rows[0])
    rows[1]["status"] = "failed (exit 2)"
    assert rows[0]["figures"]["membership_tpr_at_1pct_fpr"] == 0.15
    assert rows[0]["figures"]["victim_first_layer_displacement"] == 0.25
    assert rows[0]["figures"]["candidates_objective_best"] is None  # no candidates file
    study.write_results(tmp_path, rows)
    table = (tmp_path / "study.md").read_text().splitlines()
    assert table[0].startswith("| row | AUC | TPR@1%FPR |")
    assert table[2] == "| wd-kkt-theta-adam | 0.61 | 0.15 | 0.01 | 0.5 | 0.333 | 0.006 | 0.4 | - | - | - | - | 0.25 | ok |"
    assert table[3].startswith("| wd-kkt-theta-sgd | - |") and table[3].endswith("| failed (exit 2) |")
    assert f"`python -m recon_lightning.fit run_dir={done} reconstruct.optimizer=adam" in "\n".join(table)
    saved = json.loads((tmp_path / "study.json").read_text())
    assert saved[0]["figures"]["membership_auc"] == 0.61 and saved[0]["command"].startswith("python -m recon_lightning.fit")

    # --collect runs nothing and tabulates only the rows that have a report
    assert study.main(["--out", str(tmp_path), "--victims", "wd", "--objectives", "kkt", "--collect"]) == 0
    table = (tmp_path / "study.md").read_text()
    assert "| wd-kkt-theta-adam | 0.61 |" in table and "wd-kkt-theta-sgd |" not in table
    assert not (tmp_path / "wd-kkt-theta-sgd" / "study.log").exists()
