"""Concurrent requests share the ingress's batches: each still gets its own answer or its own error."""

from __future__ import annotations

import base64
import threading
from concurrent.futures import ThreadPoolExecutor


def _b64(uri: str) -> str:
    with open(uri, "rb") as f:
        return base64.b64encode(f.read()).decode()


def test_good_and_bad_requests_in_one_batch_each_get_their_own_answer(service):
    cases = []  # (endpoint, body, expected status, check of the answer)
    for spec in service.specs:
        cid = spec.concept_id
        cases.append(
            (
                "retrieve",
                {"query": f"a photo of a <concept:{cid}> {spec.parent}", "top_k": 2},
                200,
                lambda a, cid=cid: len(a["items"]) == 2 and all(it["id"].startswith(f"{cid}-") for it in a["items"]),
            )
        )
        cases.append(
            (
                "retrieve",
                {"query": f"a photo of a <concept:{cid}x> {spec.parent}"},
                404,
                lambda a, cid=cid: a["error"]["code"] == "unknown_concept" and f"{cid}x" in a["error"]["message"],
            )
        )
        cases.append(
            (
                "classify",
                {"image": _b64(spec.heldout_uris[0]), "top_k": 1},
                200,
                lambda a, cid=cid: a["concepts"][0]["concept_id"] == cid,
            )
        )
        cases.append(
            (
                "classify",
                {"image": _b64(spec.heldout_uris[0]), "parent": "spaceship"},
                404,
                lambda a: a["error"]["code"] == "unknown_parent",
            )
        )
    start = threading.Barrier(len(cases))

    def send(case):
        endpoint, body, _, _ = case
        start.wait()  # all requests leave together, so they meet in the ingress's batches
        return service.client.post(f"/v1/{endpoint}", json=body)

    with ThreadPoolExecutor(len(cases)) as pool:
        answers = list(pool.map(send, cases))
    for (endpoint, body, status, check), r in zip(cases, answers):
        assert r.status_code == status, (endpoint, body, r.text)
        assert check(r.json()), (endpoint, body, r.json())
