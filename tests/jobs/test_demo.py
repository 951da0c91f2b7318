"""The demo end to end on a 3-product catalog (tiny backbone: `make demo` runs the real one)."""
import json

from jobs.cli import main


def test_demo_runs_on_three_products(ray_cluster, tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--backbone", "tiny-hf-clip", "--products", "3", "--shots", "2", "--heldout", "2",
                 "--steps", "2", "--sample-steps", "2", "--figure-products", "2", "--out", str(out)]) == 0
    result = json.loads((out / "demo.json").read_text())
    assert result["learned"] == 3 and result["registry_version"] == 1
    assert set(result["accuracy"]) == {"parent word", "hand-written caption", "learned token"}
    assert (out / "tokens.png").stat().st_size > 1000
    report = json.loads((out / "onboard-report.json").read_text())
    assert report["concepts_learned"] == 3 and report["images_read"] == 6
