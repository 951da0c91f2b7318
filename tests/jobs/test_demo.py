"""The demo's learning step on a 3-product catalog (tiny backbone: the real one is exercised by `make demo`)."""
import json

from jobs.cli import main


def test_demo_runs_on_three_products(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--backbone", "tiny-hf-clip", "--products", "3", "--shots", "2", "--heldout", "2",
                 "--steps", "2", "--sample-steps", "2", "--figure-products", "2", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["learned"] == 3 and report["version"] == 1
    assert set(report["accuracy"]) == {"parent word", "caption", "token (TI+CE, projected)"}
    assert (out / "tokens.png").stat().st_size > 1000
    assert (out / "registry" / "versions" / "v000001" / "manifest.json").exists()
