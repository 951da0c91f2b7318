"""`tokenfactory serve`: run the online service (classify, retrieve, generate, GAIR) on Ray Serve.

Connects to the Ray cluster at $RAY_ADDRESS, else starts a local one; deploys the application of
`serve/app.py` with these settings; prints its URL once ``/readyz`` answers; serves until Ctrl-C.
On a cluster, prefer ``serve deploy serve/configs/cluster.yaml`` (same application, autoscaling
configured per deployment). The API key is read from the environment variable named by
``--api-key-env`` (never from a flag: flags show up in ``ps``) and required on every /v1 route with
``--require-key``; the admin API has its own key (``--admin-key-env``), without which it is off. Binding
beyond loopback (``--host 0.0.0.0``) is refused unless ``--require-key`` is on. ``--image-uri-prefix``
allows ``image_uri`` reads under an s3:// prefix (none by default: the server reads nothing on a
client's behalf unless told where).
"""

from __future__ import annotations

import json
import time

# Flags that are `ServeSettings` fields -> the field (their defaults are read off it: one source per default).
SETTINGS_FLAGS = {
    "gallery_shards": "gallery_shards",
    "backbone": "backbone",
    "weights": "weights",
    "api_key_env": "api_key_env",
    "require_key": "require_key",
    "admin_key_env": "admin_key_env",
    "image_uri_prefix": "image_uri_prefixes",
    "poll_s": "poll_s",
    "max_batch_size": "max_batch_size",
    "batch_wait_s": "batch_wait_s",
    "device": "device",
    "precision": "precision",
    "allowed_host": "allowed_hosts",
    "docs": "docs",
}


def register(sub) -> None:
    from cli.arguments import field_defaults
    from serve.settings import DEVICES, LOOPBACK_HOSTS, PRECISION_NAMES, ServeSettings

    # Defaults and choices are read off ServeSettings, so a flag never drifts from the config files' default.
    d = field_defaults(ServeSettings)
    p = sub.add_parser(
        "serve",
        help="serve tokens online: classification, retrieval, generation, GAIR (Ray Serve)",
        description=__doc__,
    )
    p.add_argument("--registry", required=True, help="token registry root URI")
    p.add_argument("--index", required=True, help="gallery index URI (written by `tokenfactory index`)")
    p.add_argument(
        "--gallery-shards",
        type=int,
        default=d["gallery_shards"],
        metavar="N",
        help="--index is a sharded index of N shards (factory.index.sharded): one GalleryIndex deployment "
        "per shard, the ingress merges their hits (default: %(default)s, an unsharded index)",
    )
    p.add_argument(
        "--backbone",
        default=d["backbone"],
        help="backbone: a registered name or a config file/URI (default: %(default)s)",
    )
    p.add_argument("--weights", default=d["weights"], help="backbone weights URI or ROOT (default: the config's own)")
    p.add_argument("--host", default="127.0.0.1", help="HTTP host to bind (default: 127.0.0.1, loopback only)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default: 8000)")
    p.add_argument(
        "--allowed-host",
        action="append",
        default=None,
        metavar="NAME",
        help="a Host header name the service answers, repeatable; others get 400 (default: "
        f"{', '.join(LOOPBACK_HOSTS)}; behind a proxy, the names clients use)",
    )
    p.add_argument(
        "--docs",
        action="store_true",
        default=d["docs"],
        help="serve /docs, a plain list of the routes (no scripts, nothing from a CDN; default: off)",
    )
    p.add_argument(
        "--api-key-env",
        default=d["api_key_env"],
        metavar="VAR",
        help="environment variable holding the clients' API key (with --require-key)",
    )
    p.add_argument(
        "--require-key",
        action="store_true",
        default=d["require_key"],
        help="require the clients' API key on every /v1 route",
    )
    p.add_argument(
        "--admin-key-env",
        default=d["admin_key_env"],
        metavar="VAR",
        help="environment variable holding the admin key of /v1/admin/* (default: admin API off)",
    )
    # A new list per parse (argparse appends to the default it is given); the field's default is an empty list.
    p.add_argument(
        "--image-uri-prefix",
        action="append",
        default=[],
        metavar="s3://BUCKET/PREFIX/",
        help="allow image_uri reads under this prefix (repeatable; default: image_uri off)",
    )
    p.add_argument(
        "--poll-s",
        type=float,
        default=d["poll_s"],
        help="seconds between checks for a newer committed registry version; 0 disables (default: %(default)s)",
    )
    p.add_argument(
        "--max-batch-size",
        type=int,
        default=d["max_batch_size"],
        help="largest batch of the ingress, the encoders and the index (@serve.batch); 1 disables batching "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--batch-wait-s",
        type=float,
        default=d["batch_wait_s"],
        help="how long a batch waits to fill (default: %(default)s)",
    )
    p.add_argument(
        "--device",
        choices=DEVICES,
        default=d["device"],
        help="where replicas compute: 'auto' = a replica's GPU when Ray gave it one, else the CPU; 'cuda' = "
        "every replica on this node's GPU (default: %(default)s)",
    )
    p.add_argument(
        "--precision",
        choices=PRECISION_NAMES,
        default=d["precision"],
        help="precision of the backbone in every replica; bf16 suits GPUs, fp32 CPUs (default: %(default)s)",
    )
    p.add_argument(
        "--exit-when-ready",
        action="store_true",
        help="deploy, print the URL and return (the app keeps running on the cluster)",
    )
    p.set_defaults(func=run)


def settings_from(args):
    from cli.arguments import absolute_uri
    from factory.backbones import resolve_backbone_config
    from factory.storage import S3Options
    from serve.settings import ServeSettings

    # Resolved before anything is deployed (a bad backbone fails here, in seconds); replicas get the data.
    backbone = resolve_backbone_config(args.backbone, absolute_uri(args.weights), S3Options.from_env())
    flags = {field: getattr(args, dest) for dest, field in SETTINGS_FLAGS.items() if getattr(args, dest) is not None}
    return ServeSettings(
        **{
            **flags,
            "registry": absolute_uri(args.registry),
            "index": absolute_uri(args.index),
            "backbone": backbone.to_dict(),
            "weights": backbone.weights,
        }
    )


def run(args) -> int:
    from cli.arguments import effective_config
    from jobs._ray import connect
    from serve.app import start, stop

    settings = settings_from(args)
    print("[serve] config: " + json.dumps(effective_config(args), sort_keys=True), flush=True)
    connect()
    url = start(settings, host=args.host, port=args.port)
    print(f"[serve] ready at {url}  (OpenAPI: {url}/openapi.json, studio: {url}/studio)", flush=True)
    if args.exit_when_ready:
        return 0
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("[serve] stopping", flush=True)
        stop()
    return 0
