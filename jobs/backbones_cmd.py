"""`tokenfactory backbones`: list the registered backbone configs."""
from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("backbones", help="list registered backbones and their families")
    p.set_defaults(func=run)


def run(args) -> int:
    from factory.backbones import get_backbone_config, list_backbones

    for name in list_backbones():
        cfg = get_backbone_config(name)
        print(f"{name:24s} {cfg.family:10s} weights={cfg.weights or '-'}  {cfg.description}")
    return 0
