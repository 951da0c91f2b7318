"""Reading a catalog laid out like PerVL-DeepFashion2 (the PALAVRA benchmark), from any URI.

Users with that data (and real CLIP/diffusion weights) can onboard, index and evaluate it with the same
commands as our sample catalog: point ``--catalog``/``--gallery`` at its ``<split>_fsl_train.txt``. The
layout, as the benchmark's annotation files define it (paths relative to the folder of that file)::

    <split>_fsl_train.txt                 blocks of "codes_infer/<pair_id>:" then few-shot image names
                                          (relative to train/image/), blocks separated by a blank line
    train_coarse_grained_names.csv        unique_pair_ids, pair_id_categories (the parent class name)
    <split>_captions.csv                  image_name: the retrieval images of the split (relative paths)
    shortened_deepfashion2_captions.csv   image_name, caption, pair_id: one caption query per image
    train/image/*.jpg                     the images

Each retrieval image is the one relevant answer to its own caption query, and an image of its concept in
a new context, so it also serves as that concept's held-out image for classification. Captions name the
concept as "person" (the benchmark rewrites it to "person wearing *"); a caption that already has a ``*``
keeps it as the concept's slot.
"""

from __future__ import annotations

import io
import posixpath
import re
from dataclasses import dataclass

import pyarrow.csv as pacsv

from factory import storage
from factory.errors import TokenFactoryError
from factory.storage import S3Options
from schemas import CONCEPT_SLOT, CatalogRow, RetrievalQuery

FSL_SUFFIX = "_fsl_train.txt"
NAMES_CSV = "train_coarse_grained_names.csv"
SHORT_CAPTIONS_CSV = "shortened_deepfashion2_captions.csv"


class PervlLayoutError(TokenFactoryError, ValueError):
    """A PerVL-style catalog whose files are missing or disagree with each other."""

    code = "bad_pervl_layout"


@dataclass
class PervlCatalog:
    rows: list[CatalogRow]  # fewshot rows and heldout rows (the concept's retrieval images)
    gallery: list[CatalogRow]  # every retrieval image; attributes["item"] is its item id
    queries: list[RetrievalQuery]


def is_pervl(uri: str) -> bool:
    return uri.rstrip("/").endswith(FSL_SUFFIX)


def concept_id_for(pair_id: str) -> str:
    return f"df2-{pair_id}"


def parent_word(category: str) -> str:
    """'Short sleeve top' / 'short_sleeve_top' -> 'short sleeve top' (a valid ParentWord)."""
    return " ".join(re.sub(r"[^a-z0-9]+", " ", category.lower()).split())


def template_for(caption: str) -> str:
    """The caption with a ``{concept}`` slot where the concept goes (see the module docstring)."""
    text = " ".join(caption.replace("{", "(").replace("}", ")").split())
    if "*" in text:
        head, _, tail = text.partition("*")
        return f"{head}{CONCEPT_SLOT}{tail.replace('*', '')}"
    m = re.search(r"\bperson\b", text, flags=re.IGNORECASE)
    if m:
        return f"{text[: m.end()]} wearing {CONCEPT_SLOT}{text[m.end() :]}"
    return f"a photo of {CONCEPT_SLOT}, {text}"


def _csv(uri: str, s3: S3Options | None) -> list[dict[str, str]]:
    try:
        data = storage.read_bytes(uri, s3)
    except FileNotFoundError:
        raise PervlLayoutError(f"PerVL layout: {uri} is missing") from None
    table = pacsv.read_csv(io.BytesIO(data), convert_options=pacsv.ConvertOptions(strings_can_be_null=False))
    cols = {c: [str(v) for v in table.column(c).to_pylist()] for c in table.column_names}
    return [dict(zip(cols, vals)) for vals in zip(*cols.values())]


def _need(rows: list[dict[str, str]], uri: str, columns: tuple[str, ...]) -> None:
    missing = [c for c in columns if rows and c not in rows[0]]
    if missing:
        raise PervlLayoutError(f"PerVL layout: {uri} lacks column(s) {', '.join(missing)}")


def _fewshot_blocks(text: str, uri: str) -> dict[str, list[str]]:
    """pair_id -> few-shot image names, from the ``codes_infer/<pair_id>:`` blocks."""
    blocks: dict[str, list[str]] = {}
    current = None
    for n, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line:
            current = None
        elif line.endswith(":"):
            current = line[:-1].rstrip("/").rsplit("/", 1)[-1]
            blocks.setdefault(current, [])
        elif current is None:
            raise PervlLayoutError(f"PerVL layout: {uri} line {n}: image {line!r} outside a codes_infer/<id>: block")
        else:
            blocks[current].append(line)
    if not blocks:
        raise PervlLayoutError(f"PerVL layout: {uri} names no concepts")
    return blocks


def read_pervl(uri: str, s3: S3Options | None = None) -> PervlCatalog:
    """Rows, gallery and queries of the PerVL-style catalog whose ``<split>_fsl_train.txt`` is ``uri``."""
    if not is_pervl(uri):
        raise PervlLayoutError(f"PerVL layout: point at a <split>{FSL_SUFFIX} file, got {uri}")
    root, name = posixpath.split(uri.rstrip("/"))
    split = name[: -len(FSL_SUFFIX)]
    try:
        blocks = _fewshot_blocks(storage.read_bytes(uri, s3).decode(), uri)
    except FileNotFoundError:
        raise PervlLayoutError(f"PerVL layout: {uri} is missing") from None
    names_uri = storage.join(root, NAMES_CSV)
    names = _csv(names_uri, s3)
    _need(names, names_uri, ("unique_pair_ids", "pair_id_categories"))
    category = {r["unique_pair_ids"]: r["pair_id_categories"] for r in names}
    split_uri, short_uri = storage.join(root, f"{split}_captions.csv"), storage.join(root, SHORT_CAPTIONS_CSV)
    split_rows, short_rows = _csv(split_uri, s3), _csv(short_uri, s3)
    _need(split_rows, split_uri, ("image_name",))
    _need(short_rows, short_uri, ("image_name", "caption", "pair_id"))
    short = {r["image_name"]: r for r in short_rows}

    unnamed = [p for p in blocks if p not in category]
    if unnamed:
        raise PervlLayoutError(f"PerVL layout: pair ids {unnamed[:5]} have no category in {names_uri}")
    parents = {p: parent_word(category[p]) for p in blocks}
    rows = [
        CatalogRow(
            concept_id=concept_id_for(p),
            parent=parents[p],
            split="fewshot",
            image_uri=storage.join(root, "train", "image", img),
            attributes={"pair_id": p},
        )
        for p, imgs in blocks.items()
        for img in imgs
    ]
    gallery, queries = [], []
    for r in split_rows:
        image = r["image_name"]
        if image not in short:
            raise PervlLayoutError(f"PerVL layout: retrieval image {image} has no caption in {short_uri}")
        pair, caption = short[image]["pair_id"], short[image]["caption"]
        if pair not in blocks:
            raise PervlLayoutError(
                f"PerVL layout: retrieval image {image} shows pair id {pair}, which has no few-shot images in {uri}"
            )
        cid, item = concept_id_for(pair), posixpath.splitext(posixpath.basename(image))[0]
        image_uri = storage.join(root, image)
        attrs = {"pair_id": pair}
        rows.append(
            CatalogRow(concept_id=cid, parent=parents[pair], split="heldout", image_uri=image_uri, attributes=attrs)
        )
        gallery.append(
            CatalogRow(
                concept_id=cid,
                parent=parents[pair],
                split="gallery",
                image_uri=image_uri,
                attributes={**attrs, "item": item},
                caption=caption,
            )
        )
        template = template_for(caption)
        queries.append(
            RetrievalQuery(
                query_id=f"q{len(queries):05d}",
                concept_id=cid,
                parent=parents[pair],
                template=template,
                intent=" ".join(template.replace(CONCEPT_SLOT, "").split()),
                relevant=[item],
            )
        )
    return PervlCatalog(rows, gallery, queries)


__all__ = ["PervlCatalog", "PervlLayoutError", "is_pervl", "read_pervl", "template_for"]
