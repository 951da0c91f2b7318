"""`tokenfactory index`: Ray Data batch inference over a gallery into a saved vector index."""

import io

import numpy as np
from PIL import Image

from cli.main import main
from factory import storage
from factory.backbones import load_backbone
from factory.catalogs import read_world_catalog
from factory.index import load_index
from factory.world import write_catalog


def test_index_from_a_catalog_root(ray_cluster, tmp_path):
    catalog = str(tmp_path / "catalog")
    write_catalog(catalog, seed=1, products=3, shots=1, heldout=0, contexts=2, distractors=4)
    out = str(tmp_path / "index")
    assert main(["index", "--gallery", catalog, "--out", out, "--backbone", "tiny-hf-clip"]) == 0
    index = load_index(out)
    gallery = read_world_catalog(catalog).gallery
    assert len(index) == len(gallery) == 3 * 2 + 4
    assert set(index.uris) == {r.image_uri for r in gallery}
    # an item's own image finds itself first
    bb = load_backbone("tiny-hf-clip")
    img = np.asarray(Image.open(gallery[0].image_uri).convert("RGB"))[None]
    query = bb.encode_image(bb.preprocess(img)).detach().numpy()
    assert index.search(query, 1).uris[0][0] == gallery[0].image_uri


def test_index_from_a_folder_of_images_on_s3_with_a_bad_file(ray_cluster, s3_bucket, s3_server, monkeypatch):
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    rng = np.random.default_rng(0)
    for i in range(5):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, format="PNG")
        storage.write_bytes(f"{s3_bucket}/imgs/item{i}.png", buf.getvalue(), s3_server.s3_options)
    storage.write_bytes(f"{s3_bucket}/imgs/broken.png", b"not a png", s3_server.s3_options)
    out = f"{s3_bucket}/index"
    assert (
        main(
            ["index", "--gallery", f"{s3_bucket}/imgs", "--out", out, "--backbone", "tiny-hf-clip", "--backend", "hnsw"]
        )
        == 0
    )
    index = load_index(out, s3_server.s3_options)
    assert sorted(index.ids) == [f"item{i}" for i in range(5)]


def test_append_encodes_only_new_items_and_commits_immutable_versions(ray_cluster, tmp_path, capsys):
    from factory.index.versions import IndexVersions

    rng, images = np.random.default_rng(1), tmp_path / "imgs"
    images.mkdir()

    def add_images(names):
        for name in names:
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(images / f"{name}.png")

    root = str(tmp_path / "gallery-index")
    add_images(["a", "b", "c"])
    assert main(["index", "--gallery", str(images), "--out", root, "--append", "--backbone", "tiny-hf-clip"]) == 0
    add_images(["d", "e"])
    capsys.readouterr()
    assert main(["index", "--gallery", str(images), "--out", root, "--append", "--backbone", "tiny-hf-clip"]) == 0
    assert "2 items encoded, 5 in the index" in capsys.readouterr().out  # the first three were not re-embedded
    versions = IndexVersions(root)
    assert versions.versions() == [1, 2]
    (_, v1), (_, v2) = versions.open(1), versions.open(2)
    assert sorted(v1.ids) == ["a", "b", "c"] and sorted(v2.ids) == ["a", "b", "c", "d", "e"]
    np.testing.assert_array_equal(v2.vectors_of(["a", "b", "c"]), v1.vectors_of(["a", "b", "c"]))
    assert sorted(load_index(root).ids) == sorted(v2.ids)  # a versions root loads as its newest version
    # nothing new: no empty version is committed
    assert main(["index", "--gallery", str(images), "--out", root, "--append", "--backbone", "tiny-hf-clip"]) == 0
    assert versions.versions() == [1, 2]
