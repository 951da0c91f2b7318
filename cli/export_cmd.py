"""`tokenfactory export`: registry tokens as diffusers textual-inversion files.

    tokenfactory export --registry s3://bucket/tokens --out ./exported [--version 3] [--concepts sku-1 sku-2]

writes one ``<concept id>.safetensors`` per token (``{token_string: float32 [1, d]}``, the format
`StableDiffusionPipeline.load_textual_inversion` takes as it is) and ``tokens.json``, the index that names
the token string to write in prompts, the parent word and the backbone the tokens were learned on:

    pipe.load_textual_inversion("exported/sku-1.safetensors")
    pipe("a photo of a <concept:sku-1> dress on the beach")

The pipeline must be the one of the tokens' backbone (its text encoder is the CLIP text tower they were
learned in); `tokens.json` records that backbone's name and fingerprint.
"""

from __future__ import annotations

import json


def register(sub) -> None:
    from cli.arguments import add_s3_arguments

    p = sub.add_parser(
        "export", help="write registry tokens as diffusers textual-inversion safetensors", description=__doc__
    )
    p.add_argument("--registry", required=True, help="token registry root URI")
    p.add_argument("--version", type=int, default=None, help="registry version (default: the newest)")
    p.add_argument("--concepts", nargs="+", metavar="ID", default=None, help="concept ids to export (default: all)")
    p.add_argument("--out", required=True, help="output folder (local or s3://)")
    add_s3_arguments(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from cli.arguments import absolute_uri, s3_options
    from jobs.export import export_tokens

    index = export_tokens(
        absolute_uri(args.registry), absolute_uri(args.out), args.version, args.concepts, s3_options(args)
    )
    print(
        json.dumps(
            {
                "version": index["version"],
                "backbone": index["backbone"],
                "tokens": len(index["tokens"]),
                "out": absolute_uri(args.out),
            }
        ),
        flush=True,
    )
    return 0
