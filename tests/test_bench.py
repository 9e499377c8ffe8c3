"""The benchmark harness runs and reports what it measured (numbers are not asserted)."""
import json

from ld3m_fast import bench


def test_measured_part_times_both_schemes_in_one_process(tmp_path):
    rows = bench.measured_cpu((32,), ipc=1, iterations=1, log=lambda *a: None)
    assert [r["scheme"].split(" ")[0] for r in rows] == ["released", "ours"]
    assert rows[0]["speedup_vs_released"] == 1.0
    assert all(r["seconds_median"] > 0 and r["device"].startswith("CPU") for r in rows)
    report = bench.markdown(rows)
    assert "speed-up vs released" in report and "released (eager, reference ops)" in report
    path = bench.write_json(rows, tmp_path / "bench.json")
    assert json.loads(path.read_text())["rows"][1]["scheme"].startswith("ours")
