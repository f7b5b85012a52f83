"""The variants table's speed and memory figures: each variant measured in several fresh processes, round-robin over
the variants, and reported as the median of the processes with every run kept."""

import pytest

from slimswarm.deploy.report import variants_rows
from slimswarm.deploy.variants import Measured, measure_in_subprocess, measure_round_robin, median_of_runs


def _m(rate, peak=100, pre=1.0):
    return Measured(decode_tokens_per_s=rate, peak_rss_bytes=peak, batch=1, context=256, new_tokens=32,
                    decode_path="native", prefill_s=pre)


def test_median_of_runs_takes_each_figure_s_median_and_keeps_every_run():
    runs = [_m(48.3, 500, 0.8), _m(53.9, 520, 0.9), _m(30.0, 510, 2.0)]  # one process hit by a slow spell
    me = median_of_runs(runs)
    assert me.decode_tokens_per_s == 48.3
    assert me.peak_rss_bytes == 510
    assert me.prefill_s == 0.9
    assert me.decode_tokens_per_s_runs == [48.3, 53.9, 30.0]
    assert me.peak_rss_bytes_runs == [500, 520, 510] and me.prefill_s_runs == [0.8, 0.9, 2.0]
    with pytest.raises(ValueError):
        median_of_runs([])


def test_round_robin_measures_every_variant_once_before_any_again():
    order = []
    rates = {"a": iter([10.0, 30.0, 20.0]), "b": iter([5.0, 6.0, 7.0])}

    def fake(ck, threads=1):
        order.append(ck)
        return _m(next(rates[ck]))

    got = measure_round_robin({"a": "a", "b": "b"}, processes=3, log=lambda m: None, measure=fake)
    assert order == ["a", "b", "a", "b", "a", "b"]
    assert got["a"].decode_tokens_per_s == 20.0 and got["b"].decode_tokens_per_s == 6.0
    assert got["a"].decode_tokens_per_s_runs == [10.0, 30.0, 20.0]


def test_the_table_judges_the_median_and_shows_the_processes_spread():
    from test_planner import table

    t = table()
    t.variants[0].measured = median_of_runs([_m(40.0), _m(44.0), _m(20.0)])
    r = variants_rows(t)[0]
    assert r["meas_tok_s"] == 40.0 and r["processes"] == 3 and r["meas_tok_s_range"] == "20.0..44.0"
    assert r["tok_s_err_pct"] == pytest.approx(100 * (r["pred_tok_s"] / 40.0 - 1), abs=0.1)
    assert r["meas_prefill224_s_range"] == "1.000..1.000"


def test_fresh_processes_report_generates_prefill_and_decode(tmp_path, stories):
    from slimswarm.models.checkpoint import save_checkpoint

    ck = tmp_path / "stories"
    save_checkpoint(stories.model, stories.tokenizer, ck, {"recipe": None})
    me = measure_round_robin({"s": ck}, processes=2, log=lambda m: None,
                             measure=lambda c, threads=1: measure_in_subprocess(c, context=64, new_tokens=16,
                                                                                threads=threads))["s"]
    assert len(me.decode_tokens_per_s_runs) == 2 and all(r > 0 for r in me.decode_tokens_per_s_runs)
    assert min(me.decode_tokens_per_s_runs) <= me.decode_tokens_per_s <= max(me.decode_tokens_per_s_runs)
    assert me.prefill_s > 0 and len(me.prefill_s_runs) == 2
    assert me.peak_rss_bytes > 0 and me.context == 64 and me.new_tokens == 16


def test_a_regenerated_results_page_keeps_its_hand_written_notes(tmp_path):
    from slimswarm.evaluate.report import write_keeping_notes

    p = tmp_path / "r.md"
    write_keeping_notes(p, "# table v1\n")
    assert p.read_text() == "# table v1\n"
    p.write_text(p.read_text() + "\n## Notes (written by hand; regenerated above)\n\n- a reading\n")
    write_keeping_notes(p, "# table v2\n| a |\n")
    assert p.read_text() == "# table v2\n| a |\n\n## Notes (written by hand; regenerated above)\n\n- a reading\n"
    assert not list(tmp_path.glob(".*tmp"))
