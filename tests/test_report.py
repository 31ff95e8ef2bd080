"""`velodiff report DIR`: a bench folder and an eval folder each become one markdown page with tables,
plots and a contact sheet; a folder with neither is one clear error line."""

from __future__ import annotations

import json

from PIL import Image

from velodiff.eval.sweep import finish


def cli(*args: str) -> int:
    """Run the velodiff command in process; its exit status (typer exits on success)."""
    from velodiff.cli import main

    try:
        return main(list(args))
    except SystemExit as e:
        return int(e.code or 0)


def _bench_folder(tmp_path):
    out = tmp_path / "bench"
    (out / "samples").mkdir(parents=True)
    recs = []
    for i, (solver, nfe, secs, acc) in enumerate(
        [("ddim", 2, 0.1, 0.2), ("ddim", 4, 0.2, 0.5), ("unipc", 2, 0.1, 0.4), ("unipc", 4, 0.25, 0.45)]
    ):
        cid = f"{solver}_default_nfe{nfe}_g2"
        Image.new("RGB", (8 * 16 + 14, 16), (40 * i, 100, 200)).save(out / "samples" / f"{cid}.png")
        recs.append({"id": cid, "solver": solver, "grid": None, "nfe_budget": nfe, "guidance": 2.0,
                     "steps": nfe, "nfe": nfe, "evals": 2 * nfe, "seconds_per_image": secs,
                     "shapes_eval": acc, "psnr": 20.0 + nfe, "sheet": f"samples/{cid}.png",
                     "sheet_cell": 16})
    result = {"kind": "bench", "command": "velodiff bench --nfe 2,4", "model": "default",
              "model_info": "tiny",
              "device": "cpu", "threads": 2, "sweep": {"repeat": 3, "batch": 16}, "prompts": ["a red circle"],
              "n_images": 8, "records": recs}
    finish(result, out)
    return out


def test_bench_report(tmp_path, capsys):
    out = _bench_folder(tmp_path)
    res = json.loads((out / "results.json").read_text())
    assert [r["pareto"] for r in res["records"]] == [False, True, True, False]
    assert cli("report", str(out)) == 0
    text = (out / "report.md").read_text()
    assert "velodiff bench --nfe 2,4" in text and "![quality vs time](pareto.png)" in text
    assert text.count("**yes**") == 2 and "![samples](report_samples.png)" in text
    sheet = Image.open(out / "report_samples.png")
    assert sheet.height >= 4 * 16  # one row per configuration
    assert "wrote" in capsys.readouterr().out


def test_a_plan_bench_names_each_records_plan(tmp_path):
    """Two plans of one solver, NFE and grid are told apart on the page (the front and the labels)."""
    out = _bench_folder(tmp_path)
    res = json.loads((out / "results.json").read_text())
    for r, plan in zip(res["records"], ["none", "none", "none", "pag"], strict=True):
        r["plan"] = plan
    res["records"][3]["seconds_per_image"] = 0.05  # the plan is on the front
    finish(res, out)
    assert cli("report", str(out)) == 0
    front = next(line for line in (out / "report.md").read_text().splitlines() if line.startswith("Pareto"))
    assert "`unipc` 4 NFE plan `pag` (" in front and "`ddim` 4 NFE (" in front


def test_eval_report_and_errors(tmp_path, capsys):
    ev = tmp_path / "eval"
    ev.mkdir()
    for name, overall in (("steps10", 0.5), ("steps20", 0.7)):
        (ev / f"{name}.json").write_text(json.dumps({
            "overall": overall, "by_category": {"single": overall, "counting": overall / 2},
            "config": {"model": "default", "prompts": "v1", "solver": "dpmpp_2m", "nfe": 10,
                       "guidance": 3.0}}))
        Image.new("RGB", (32, 32)).save(ev / f"{name}.png")
    assert cli("report", str(ev)) == 0
    text = (ev / "report.md").read_text()
    assert "| steps20 | default | v1 | dpmpp_2m | 10 | 3.0 | 0.700 | 0.700 | 0.350 |" in text
    assert "![steps10](steps10.png)" in text and (ev / "report_eval.png").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    capsys.readouterr()
    assert cli("report", str(empty)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "no bench results.json" in err[0]
    # a results.json of another kind (bench solvers' list) or damaged, an eval JSON with a bad field
    for text, needle in (("[1, 2]", "is not a `velodiff bench` result"),
                         ('{"kind": "bench"}', "'records' must be a list")):
        (empty / "results.json").write_text(text)
        assert cli("report", str(empty)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err
    (empty / "results.json").unlink()
    (empty / "e.json").write_text('{"overall": 0.5, "by_category": "x"}')
    assert cli("report", str(empty)) == 2 and "no bench results.json" in capsys.readouterr().err


def test_a_damaged_bench_result_names_the_field(tmp_path, capsys):
    """A hand-edited results.json: the record and field are named, and a NaN time is refused (it was put
    first on the Pareto front)."""
    out = _bench_folder(tmp_path)
    res = json.loads((out / "results.json").read_text())
    for field, value, needle in (("seconds_per_image", float("nan"), "records[1].seconds_per_image must be a "
                                  "finite number, got nan"),
                                 ("seconds_per_image", "fast", "got 'fast'"),
                                 ("solver", None, "records[1].solver must be a name, got None")):
        damaged = json.loads(json.dumps(res))
        damaged["records"][1][field] = value
        (out / "results.json").write_text(json.dumps(damaged))
        capsys.readouterr()
        assert cli("report", str(out)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err



def test_a_stopped_bench_is_reported_as_unfinished(tmp_path):
    """A bench killed part way leaves the records it finished; its page says how many of the
    configurations asked for they are, instead of showing them as the whole bench."""
    out = _bench_folder(tmp_path)
    res = json.loads((out / "results.json").read_text())
    res["configurations"] = 4
    finish(res, out)
    assert cli("report", str(out)) == 0
    assert "Unfinished" not in (out / "report.md").read_text()
    res["configurations"] = 6
    finish(res, out)
    assert cli("report", str(out)) == 0
    text = (out / "report.md").read_text()
    assert "**Unfinished**: 4 of the 6 configurations asked for were measured" in text


def test_the_front_is_listed_fastest_first_and_the_contact_sheet_puts_the_front_on_top(tmp_path):
    """The page's Pareto line lists the front by time; the contact sheet's rows are the front's records
    (fastest first), then the others (fastest first): row colours 80, 40 (front), 0, 120."""
    from velodiff.eval.report import bench_contact_sheet

    out = _bench_folder(tmp_path)
    assert cli("report", str(out)) == 0
    front = next(line for line in (out / "report.md").read_text().splitlines() if line.startswith("Pareto"))
    assert front.index("`unipc` 2 NFE") < front.index("`ddim` 4 NFE")
    records = json.loads((out / "results.json").read_text())["records"]
    sheet = bench_contact_sheet(out, records)
    row = (sheet.height + 4) // 4  # (4 rows, 4 pixels between them)
    assert [sheet.getpixel((121, k * row + 2))[0] for k in range(4)] == [80, 40, 0, 120]


def test_review36_the_contact_sheets_rows_are_four_white_pixels_apart(tmp_path):
    """review36: the bench contact sheet (now images.image_grid) keeps 4 white pixels between its rows."""
    from velodiff.eval.report import bench_contact_sheet

    out = _bench_folder(tmp_path)
    records = json.loads((out / "results.json").read_text())["records"]
    one, two = bench_contact_sheet(out, records[:1]), bench_contact_sheet(out, records[:2])
    assert one.width == two.width and two.height == 2 * one.height + 4
    assert all(two.getpixel((x, one.height + 1)) == (255, 255, 255) for x in range(0, two.width, 7))
