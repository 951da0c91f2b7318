"""`tokenfactory backbones`: list the registered backbone configs and the weights layout each expects."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser(
        "backbones", help="list registered backbones, their families and the weights layout each expects"
    )
    p.set_defaults(func=run)


def run(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from factory.backbones import get_backbone_config, list_backbones

    table = Table(title="backbones (--backbone NAME, or a config file / URI)")
    for col in ("name", "family", "layout", "default weights", "--weights must hold"):
        table.add_column(col, overflow="fold")
    for name in list_backbones():
        cfg = get_backbone_config(name)
        table.add_row(name, cfg.family, cfg.layout, cfg.weights or "-", cfg.expected_layout())
    Console(width=200).print(table)
    return 0
