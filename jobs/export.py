"""Exporting registry tokens as diffusers textual-inversion files (`tokenfactory export`, `cli/export_cmd.py`).

One ``<concept id>.safetensors`` per token (``{token_string: float32 [1, d]}``, what
`StableDiffusionPipeline.load_textual_inversion` takes) and ``tokens.json``, the index naming each token
string, its parent word and the backbone the tokens were learned on.
"""

from __future__ import annotations


def export_tokens(
    registry_uri: str, out: str, version: int | None = None, concepts: list[str] | None = None, s3=None
) -> dict:
    """Write the files (see the module docstring); returns the index that is written as tokens.json."""
    from factory import storage
    from factory.registry import TokenRegistry

    opened = TokenRegistry(registry_uri, s3).open(version)
    wanted = concepts or opened.concept_ids()
    tokens = []
    for cid in wanted:
        file = f"{cid}.safetensors"
        token = opened.export_textual_inversion(cid, storage.join(out, file))
        rec = opened.get(cid)
        tokens.append(
            {
                "concept_id": cid,
                "token": token,
                "file": file,
                "parent": rec.parent,
                "dim": rec.dim,
                "prompt_example": f"a photo of a {token} {rec.parent}",
            }
        )
    first = opened.get(wanted[0]) if wanted else None
    index = {
        "registry": registry_uri,
        "version": opened.version,
        "backbone": first.backbone if first else None,
        "backbone_fingerprint": first.backbone_fingerprint if first else None,
        "tokens": tokens,
    }
    storage.write_json(storage.join(out, "tokens.json"), index, s3)
    return index


__all__ = ["export_tokens"]
