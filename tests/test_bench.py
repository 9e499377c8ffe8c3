"""The benchmark harness runs and reports what it measured (numbers are not asserted)."""
import json

from ld3m_fast import bench


def test_measured_part_times_both_schemes_in_one_process(tmp_path):
    rows = bench.measured_cpu((32,), ipc=1, iterations=1, pairs=1)
    keys = [r["key"] for r in rows]
    assert keys[:2] == ["released", "ours"] and set(keys) == {"released", "ours", "released, best chunk",
                                                               "ours, best plan"}
    assert rows[0]["speedup_vs_released"] == 1.0
    assert all(r["seconds_median"] > 0 and r["device"].startswith("CPU") for r in rows)
    for name in ("equal chunk", "equal memory budget"):  # one released and one ours row chosen
        chosen = [r["key"] for r in rows if r["comparisons"].get(name, {}).get("chosen")]
        assert len(chosen) == 2 and chosen[0].startswith("released") and chosen[1].startswith("ours"), name
    assert {r["chunk"] for r in rows if r["key"] in ("released", "ours")} == {10}  # equal chunk
    report = bench.markdown(rows)
    assert "speed-up vs released" in report and "released (eager, reference ops)" in report
    path = bench.write_json(rows, tmp_path / "bench.json")
    assert json.loads(path.read_text())["rows"][1]["scheme"].startswith("ours")
