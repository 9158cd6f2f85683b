"""scripts/benchmark_data.py's path table at a tiny size: every path reads the whole corpus, every worker count."""
import json
import os
import runpy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = 12  # a full batch of 8 and a short one: a path that drops the short batch fails


def test_path_table_has_the_lhotse_rows_and_every_path_reads_the_whole_corpus(tmp_path, capsys):
    main = runpy.run_path(os.path.join(ROOT, "scripts", "benchmark_data.py"))["main"]
    out = tmp_path / "rows.jsonl"
    assert main(["--files", str(FILES), "--noise_files", "1", "--workers", "0,1", "--formats", "wav", "--tables",
                 "paths", "--repeats", "2", "--shards", "2", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    paths = ["manifest", "tarred", "lhotse_cuts", "lhotse_shar"]
    assert [(x["path"], x["workers"]) for x in rows] == [(p, w) for p in paths for w in (0, 1)]
    # the native manifest sampler fills the short last training batch by wrapping around (sampler.py): 16 items
    expected = {x["path"]: [16] if x["path"] == "manifest" else [FILES] for x in rows}
    assert [x["items"] for x in rows] == [expected[x["path"]] for x in rows]
    assert all(x["corpus_items"] == FILES and x["repeats"] == 2 for x in rows)
    assert all(x["items_per_s"] > 0 and x["audio_s_per_wall_s"] > 0 for x in rows)
    assert all((x["worker_peak_rss_mib"] is None) == (x["worker_private_mib"] is None) == (x["workers"] == 0)
               for x in rows)
    table = [line.split() for line in text.splitlines() if line.startswith("wav ")]
    assert [(r[1], r[2], r[3]) for r in table] == [(x["path"], str(x["workers"]), str(*x["items"])) for x in rows]
    assert "nemo_cuts, nemo_shar: skipped: `nemo` is not importable" in text
