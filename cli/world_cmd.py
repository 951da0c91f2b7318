"""`tokenfactory world`: render a sample catalog of the fashion world to a folder or an S3 prefix."""

from __future__ import annotations

import argparse

_DESCRIPTION = """\
Render a sample catalog from the fashion world (real Fashion-MNIST garments, coloured, patterned and
placed in scenes): products (one test-split garment in its own colourway; products come in groups of
2-3 sharing category and colourway, so words alone cannot tell them apart), few-shot and held-out
images, a retrieval gallery with each product in several scenes plus distractors, composite queries
with ground truth, and a manifest in the tokenfactory catalog format. Same seed, same catalog.

S3 credentials come from the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN),
never from the command line, where other users could read them in the process list."""


def register(sub: argparse._SubParsersAction) -> None:
    from cli.arguments import add_s3_arguments

    p = sub.add_parser(
        "world",
        help="render a sample fashion-world catalog (local folder or s3://)",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--out",
        required=True,
        metavar="URI",
        help="where to write the catalog: a folder, file:///abs/folder or s3://bucket/prefix",
    )
    p.add_argument(
        "--seed",
        type=int,
        required=True,
        metavar="S",
        help="random seed; the same seed and sizes give byte-identical images and tables",
    )
    p.add_argument("--products", type=int, default=24, metavar="N", help="number of products (concepts). Default: 24")
    p.add_argument("--shots", type=int, default=5, metavar="n", help="few-shot training images per product. Default: 5")
    p.add_argument(
        "--heldout", type=int, default=10, metavar="m", help="held-out evaluation images per product. Default: 10"
    )
    p.add_argument(
        "--contexts",
        type=int,
        default=3,
        metavar="K",
        help="scenes each product appears in within the gallery (1-6); one query per scene. Default: 3",
    )
    p.add_argument(
        "--distractors",
        type=int,
        default=48,
        metavar="D",
        help="extra gallery images of other garments; half copy a product's category and colourway. Default: 48",
    )
    p.add_argument("--size", type=int, default=32, metavar="PX", help="image side in pixels. Default: 32")
    p.add_argument(
        "--groups-per-parent",
        type=int,
        default=1,
        metavar="G",
        help="look-alike groups (colourways) per category; 2+ makes the caption a real baseline. Default: 1",
    )
    p.add_argument(
        "--categories",
        nargs="+",
        metavar="WORD",
        help="only these garment categories (e.g. dress coat). Default: all ten",
    )
    add_s3_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import sys

    from cli.arguments import s3_options
    from factory.storage import join
    from factory.world.catalog import write_catalog
    from factory.world.fashion_mnist import FashionMNISTMissing

    s3 = s3_options(args)
    try:
        manifest = write_catalog(
            args.out,
            args.seed,
            products=args.products,
            shots=args.shots,
            heldout=args.heldout,
            contexts=args.contexts,
            distractors=args.distractors,
            size=args.size,
            categories=args.categories,
            s3=s3,
            groups_per_parent=args.groups_per_parent,
        )
    except (ValueError, FashionMNISTMissing) as e:  # bad sizes or a missing dataset: say so, no traceback
        print(f"tokenfactory world: error: {e}", file=sys.stderr)
        return 2
    extra = manifest.extra
    print(f"fashion-world catalog {manifest.name!r} written to {args.out}")
    print(
        f"  products   {manifest.n_concepts} in {len(extra['groups'])} groups sharing category+colourway, "
        f"{extra['shots']} few-shot + {extra['heldout']} held-out images each"
    )
    print(
        f"  gallery    {extra['n_gallery']} images ({manifest.n_concepts * extra['contexts']} product, "
        f"{extra['distractors']} distractors), {extra['n_queries']} queries"
    )
    size = extra["size"]
    print(f"  images     {manifest.n_images} PNGs of {size}x{size} px; manifest {join(args.out, 'manifest.json')}")
    return 0
