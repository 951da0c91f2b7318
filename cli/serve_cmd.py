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


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve tokens online: classification, retrieval, generation, GAIR (Ray Serve)",
                       description=__doc__)
    p.add_argument("--registry", required=True, help="token registry root URI")
    p.add_argument("--index", required=True, help="gallery index URI (written by `tokenfactory index`)")
    p.add_argument("--gallery-shards", type=int, default=1, metavar="N",
                   help="--index is a sharded index of N shards (factory.index.sharded): one GalleryIndex deployment "
                        "per shard, the ingress merges their hits (default: 1, an unsharded index)")
    p.add_argument("--backbone", default="fashion-mini",
                   help="backbone: a registered name or a config file/URI (default: fashion-mini)")
    p.add_argument("--weights", default=None, help="backbone weights URI or ROOT (default: the config's own)")
    p.add_argument("--host", default="127.0.0.1", help="HTTP host to bind (default: 127.0.0.1, loopback only)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default: 8000)")
    p.add_argument("--api-key-env", default=None, metavar="VAR",
                   help="environment variable holding the clients' API key (with --require-key)")
    p.add_argument("--require-key", action="store_true", help="require the clients' API key on every /v1 route")
    p.add_argument("--admin-key-env", default=None, metavar="VAR",
                   help="environment variable holding the admin key of /v1/admin/* (default: admin API off)")
    p.add_argument("--image-uri-prefix", action="append", default=[], metavar="s3://BUCKET/PREFIX/",
                   help="allow image_uri reads under this prefix (repeatable; default: image_uri off)")
    p.add_argument("--poll-s", type=float, default=30.0,
                   help="seconds between checks for a newer committed registry version; 0 disables (default: 30)")
    p.add_argument("--max-batch-size", type=int, default=32,
                   help="largest batch of the ingress, the encoders and the index (@serve.batch); 1 disables batching (default: 32)")
    p.add_argument("--batch-wait-s", type=float, default=0.005,
                   help="how long a batch waits to fill (default: 0.005)")
    p.add_argument("--exit-when-ready", action="store_true", help="deploy, print the URL and return (the app keeps running on the cluster)")
    p.set_defaults(func=run)


def settings_from(args):
    from factory.backbones import resolve_backbone_config
    from factory.storage import S3Options
    from cli.arguments import absolute_uri
    from serve.settings import ServeSettings

    # Resolved before anything is deployed (a bad backbone fails here, in seconds); replicas get the data.
    backbone = resolve_backbone_config(args.backbone, absolute_uri(args.weights), S3Options.from_env())
    return ServeSettings(registry=absolute_uri(args.registry), index=absolute_uri(args.index), gallery_shards=args.gallery_shards,
                         backbone=backbone.to_dict(), weights=backbone.weights, api_key_env=args.api_key_env, require_key=args.require_key,
                         admin_key_env=args.admin_key_env, image_uri_prefixes=args.image_uri_prefix,
                         poll_s=args.poll_s, max_batch_size=args.max_batch_size, batch_wait_s=args.batch_wait_s)


def run(args) -> int:
    import os

    import ray

    from cli.arguments import effective_config
    from serve.app import start, stop

    settings = settings_from(args)
    print("[serve] config: " + json.dumps(effective_config(args), sort_keys=True), flush=True)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), logging_level="WARNING")
    url = start(settings, host=args.host, port=args.port)
    print(f"[serve] ready at {url}  (OpenAPI: {url}/docs)", flush=True)
    if args.exit_when_ready:
        return 0
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("[serve] stopping", flush=True)
        stop()
    return 0
