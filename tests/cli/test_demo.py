"""The demo end to end on a 3-product catalog (tiny backbone: `make demo` runs the real one)."""

import json
import socket

from cli.main import main


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_demo_runs_on_three_products(ray_cluster, tmp_path):
    out = tmp_path / "demo"
    assert (
        main(
            [
                "demo",
                "--backbone",
                "tiny-hf-clip",
                "--products",
                "3",
                "--shots",
                "2",
                "--heldout",
                "2",
                "--steps",
                "2",
                "--sample-steps",
                "2",
                "--figure-products",
                "2",
                "--out",
                str(out),
                "--port",
                str(_free_port()),
            ]
        )
        == 0
    )
    result = json.loads((out / "demo.json").read_text())
    assert result["learned"] == 3 and result["registry_version"] == 1
    assert set(result["accuracy"]) == {"parent word", "hand-written caption", "learned token"}
    assert (out / "tokens.png").stat().st_size > 1000
    report = json.loads((out / "onboard-report.json").read_text())
    assert report["concepts_learned"] == 3 and report["images_read"] == 6
    # the service answered one request of each kind over HTTP
    service = result["service"]
    assert {k: v["status"] for k, v in service.items()} == {
        "GET /readyz": 200,
        "GET /v1/tokens": 200,
        "POST /v1/classify": 200,
        "POST /v1/retrieve": 200,
        "POST /v1/generate": 200,
        "POST /v1/gair": 200,
        "POST /v1/admin/reload": 200,
    }
    assert service["GET /v1/tokens"]["answer"] == "3 tokens"
    assert (out / "service-generate-0.png").stat().st_size > 100
