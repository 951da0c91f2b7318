"""`tokenfactory index`: embed a gallery's images with Ray Data batch inference into a vector index.

``--gallery`` is the root (or manifest.json) of a catalog written by `tokenfactory world` (its gallery
table is used), a bare gallery table (CatalogRow Parquet/JSONL), or a folder of image files (S3 or
local; item id = file name without extension), or the ``<split>_fsl_train.txt`` of a PerVL-DeepFashion2
layout (its retrieval images). Images are read and validated by tasks and encoded by
an actor pool; bad images are listed, never fatal. The index (exact, or FAISS HNSW/IVF/IVF-PQ) is written to
``--out`` with item ids and URIs. (The command line's side: flags -> `jobs.index.IndexConfig` ->
`jobs.index.build_index`.)
"""

from __future__ import annotations


def register(sub) -> None:
    from cli.arguments import add_s3_arguments, field_defaults
    from jobs.index import IndexConfig
    from jobs.onboard_data import ENCODER_GPU_SHARE

    d = field_defaults(IndexConfig)  # every flag's default is its field's (one source per default)
    p = sub.add_parser(
        "index", help="embed gallery images into a vector index (Ray Data batch inference)", description=__doc__
    )
    p.add_argument(
        "--gallery",
        required=True,
        help="catalog root / manifest.json, a gallery Parquet/JSONL, a PerVL "
        "<split>_fsl_train.txt, or a folder of images",
    )
    p.add_argument("--out", required=True, help="URI of the index folder to write")
    p.add_argument(
        "--backbone",
        default=d["backbone"],
        help="backbone: a registered name or a config file/URI (default: %(default)s)",
    )
    p.add_argument("--weights", default=d["weights"], help="backbone weights URI or ROOT (default: the config's own)")
    p.add_argument(
        "--use-gpu",
        action="store_true",
        default=d["use_gpu"],
        help=f"encode on GPUs: {ENCODER_GPU_SHARE:g} of a GPU per image-encoder actor; a request the "
        "cluster's GPUs cannot hold fails at once",
    )
    p.add_argument(
        "--allow-outside-catalog",
        action="store_true",
        default=d["allow_outside_catalog"],
        help="accept gallery image URIs outside the catalog's bucket/folder (default: refused)",
    )
    p.add_argument(
        "--precision",
        choices=["fp32", "bf16", "fp16"],
        default=d["precision"],
        help="precision of the image encoder; fp16 is allowed (indexing only encodes). Default: bf16 "
        "with --use-gpu, fp32 without",
    )
    p.add_argument(
        "--backend",
        choices=["exact", "hnsw", "ivf", "ivfpq"],
        default=d["backend"],
        help="index backend; ivfpq: compressed IVF-PQ codes, about 75 bytes a 512-d vector, approximate "
        "scores (default: %(default)s)",
    )
    p.add_argument("--batch-size", type=int, default=d["batch_size"], help="Ray Data batch size (default: %(default)s)")
    p.add_argument(
        "--decode-tasks", type=int, default=d["decode_tasks"], help="concurrent decode tasks (default: %(default)s)"
    )
    p.add_argument("--encoders", type=int, default=d["encoders"], help="image-encoder actors (default: %(default)s)")
    p.add_argument(
        "--append",
        action="store_true",
        default=d["append"],
        help="--out is a root of index versions: encode only the gallery items its newest version lacks "
        "and commit the union as the next version (the service follows the newest; default: write "
        "one index folder)",
    )
    add_s3_arguments(p)
    p.set_defaults(func=run)


def config_from_args(args):
    """The typed job config of these flags."""
    import dataclasses

    from cli.arguments import s3_options
    from jobs.index import IndexConfig

    fields = [f.name for f in dataclasses.fields(IndexConfig) if f.name != "s3"]  # every other field is a flag
    return IndexConfig(**{f: getattr(args, f) for f in fields}, s3=s3_options(args))


def run(args) -> int:
    from jobs.index import build_index

    build_index(config_from_args(args))
    return 0
