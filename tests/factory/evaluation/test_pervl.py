"""The PerVL-DeepFashion2 adapter, on a tiny fixture in that layout (local and on SeaweedFS)."""

import io

import numpy as np
import pytest
from PIL import Image

from factory import storage
from factory.catalogs import read_concepts, read_rows
from factory.catalogs.evaluation import read_eval_catalog
from factory.catalogs.pervl import PervlLayoutError, read_pervl, template_for

FSL = """codes_infer/1001:
000001.jpg
000002.jpg

codes_infer/1002:
000003.jpg
000004.jpg
000005.jpg
"""
NAMES = "unique_pair_ids,pair_id_categories\n1001,skirt\n1002,Short sleeve top\n"
SPLIT = "image_name\ntrain/image/000010.jpg\ntrain/image/000011.jpg\ntrain/image/000012.jpg\n"
SHORT = (
    "image_name,caption,pair_id\n"
    "train/image/000010.jpg,a person standing on a street,1001\n"
    'train/image/000011.jpg,"a person sitting, holding a cup",1002\n'
    "train/image/000012.jpg,* on a sofa,1002\n"
    "train/image/000099.jpg,a person elsewhere,1001\n"
)


def _jpg(seed):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def write_fixture(root: str, s3=None, **overrides) -> str:
    files = {
        "test_fsl_train.txt": FSL,
        "train_coarse_grained_names.csv": NAMES,
        "test_captions.csv": SPLIT,
        "shortened_deepfashion2_captions.csv": SHORT,
        **overrides,
    }
    for name, text in files.items():
        if text is not None:
            storage.write_bytes(storage.join(root, name), text.encode(), s3)
    for i in (1, 2, 3, 4, 5, 10, 11, 12):
        storage.write_bytes(storage.join(root, "train", "image", f"{i:06d}.jpg"), _jpg(i), s3)
    return storage.join(root, "test_fsl_train.txt")


def test_round_trip_concepts_gallery_and_queries(tmp_path):
    uri = write_fixture(str(tmp_path))
    cat = read_pervl(uri)
    specs = {s.concept_id: s for s in read_concepts(uri)}
    assert set(specs) == {"df2-1001", "df2-1002"}
    assert specs["df2-1002"].parent == "short sleeve top"
    assert [u.rsplit("/", 1)[1] for u in specs["df2-1002"].image_uris] == ["000003.jpg", "000004.jpg", "000005.jpg"]
    assert [u.rsplit("/", 1)[1] for u in specs["df2-1002"].heldout_uris] == ["000011.jpg", "000012.jpg"]
    assert all(storage.exists(u) for s in specs.values() for u in s.image_uris + s.heldout_uris)
    assert [g.attributes["item"] for g in cat.gallery] == ["000010", "000011", "000012"]
    q = cat.queries
    assert [x.relevant for x in q] == [["000010"], ["000011"], ["000012"]]
    assert q[0].text("a <concept:df2-1001> skirt") == "a person wearing a <concept:df2-1001> skirt standing on a street"
    assert q[1].intent == "a person wearing sitting, holding a cup"
    assert q[2].template == "{concept} on a sofa"
    assert read_eval_catalog(uri).intents == [x.intent for x in q]
    assert len(read_rows(uri)) == 5 + 3


def test_template_rules():
    assert template_for("a person {x} on a bench") == "a person wearing {concept} (x) on a bench"
    assert template_for("two dogs on a lawn") == "a photo of {concept}, two dogs on a lawn"


@pytest.mark.s3
def test_reads_from_s3(s3_bucket, s3_server):
    uri = write_fixture(f"{s3_bucket}/df2", s3_server.s3_options)
    cat = read_eval_catalog(uri, s3_server.s3_options)
    assert len(cat.concepts) == 2 and len(cat.queries) == 3
    assert cat.gallery[0].image_uri.startswith(s3_bucket)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"train_coarse_grained_names.csv": None}, "train_coarse_grained_names.csv is missing"),
        ({"train_coarse_grained_names.csv": "unique_pair_ids,pair_id_categories\n1001,skirt\n"}, "no category"),
        ({"test_captions.csv": "image_name\ntrain/image/000077.jpg\n"}, "has no caption"),
        ({"shortened_deepfashion2_captions.csv": "image_name,caption\nx,y\n"}, "lacks column"),
        ({"test_fsl_train.txt": "000001.jpg\n"}, "outside a codes_infer"),
    ],
)
def test_broken_layouts_say_what_is_wrong(tmp_path, overrides, message):
    uri = write_fixture(str(tmp_path), **overrides)
    with pytest.raises(PervlLayoutError, match=message):
        read_pervl(uri)
